"""The endpoint core every mode shares: one container's veth, from creation to removal.

A container interface is a veth pair. Its host end is named from the owner
(:func:`host_ifname_for`: ``ndv`` + 12 hex digits) and carries the owner's
mark in its alias (:class:`Mark`: ``netd:<scope>:<container id>:<ifname>``),
so a restarted agent finds it again and tells its own from anything else.
Its container end is created directly in the container's namespace (one
``RTM_NEWLINK``, nothing moved), or, for a runtime that moves the interface
itself (Docker's ``Join``), left in the host's namespace under
:func:`peer_ifname_for` (*handover*).

The life of an endpoint, in the order the agent drives it:

* :func:`create` makes the pair while the IPAM is still allocating (the
  address is not needed yet): container end down, host end up, handed to
  the mode's host-end step through ``master`` (the L2 bridge) or afterwards
  (an OVS port, a host route);
* :func:`finish` gives the container end its MAC, probes the wire for the
  address (RFC 5227, :func:`netd.dataplane.arp.probe`) while it configures
  address and routes (:func:`configure`), and announces it (gratuitous ARP);
  any failure removes the pair;
* :func:`check_container` says what is missing (CNI CHECK, reconcile);
* :func:`detach` removes it and returns as soon as the kernel reports it
  unregistered;
* :func:`marked_links` lists what carries a mark (reconcile, the orphan sweep).

Nothing here knows a mode; ``host`` arguments are the host's namespace (None:
this process's) or an open :class:`~netd.dataplane.netlink.Netlink` to reuse.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import logging
import os
import socket
import threading
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass

from netd.dataplane.arp import (
    ArpSocket,
    announce_frame,
    close_later,
    packet_socket,
    probe,
)
from netd.dataplane.errors import (
    AddressConflict,
    DataplaneError,
    LinkExists,
    LinkNotFound,
    NetnsNotFound,
)
from netd.dataplane.model import (
    RT_SCOPE_LINK,
    RT_SCOPE_UNIVERSE,
    RTN_UNICAST,
    RTPROT_NETD,
    Address,
    Link,
    Route,
    normalize_mac,
)
from netd.dataplane.netlink import (
    HostArg,
    LinkMonitor,
    Netlink,
    handle,
    netlink_socket,
)
from netd.dataplane.netns import open_netns, run_in_netns, run_in_netns_fd

log = logging.getLogger(__name__)

#: Host ends of container veths: ``ndv`` + 12 hex digits of a hash (15 characters).
HOST_PREFIX = "ndv"
#: A container end waiting in the host's namespace for its runtime (handover).
PEER_PREFIX = "ndp"
#: ifalias of a host end: ``netd:<scope>:<container id>:<container ifname>``.
MARK_PREFIX = "netd:"
#: What the first release's Docker driver named and marked its host ends (``ndd`` + 12 hex,
#: alias ``netd-docker:<endpoint id>``); still recognised, never made.
LEGACY_DOCKER_PREFIX = "ndd"
LEGACY_DOCKER_MARK = "netd-docker:"
IFNAMSIZ = 15

RouteSpec = tuple[str, str | None]  # (destination CIDR, gateway or None: on-link)
RouteArg = str | RouteSpec


# --------------------------------------------------------------------------- names, marks


def _digest(container_id: str, ifname: str, salt: int) -> str:
    if not container_id:
        raise ValueError("container id is empty")
    key = f"{container_id}\0{ifname}" + (f"\0{salt}" if salt else "")
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def host_ifname_for(container_id: str, ifname: str = "eth0", *, salt: int = 0) -> str:
    """The host end's name: ``ndv`` + 12 hex digits of sha256(container id, ifname[, salt]).

    Deterministic (a restarted agent finds it again), 15 characters (IFNAMSIZ),
    48 bits of hash: a collision needs millions of containers on one host. The
    owner is also in the link's alias; on the unlikely clash :func:`create`
    raises :class:`LinkExists` naming the holder.
    """
    name = HOST_PREFIX + _digest(container_id, ifname, salt)
    assert len(name) <= IFNAMSIZ
    return name


def peer_ifname_for(container_id: str, ifname: str = "eth0", *, salt: int = 0) -> str:
    """The container end's name while it waits in the host namespace (handover)."""
    return PEER_PREFIX + _digest(container_id, ifname, salt)


@dataclass(frozen=True)
class Mark:
    """Who a host end belongs to: the agent's ``scope`` and the owner (container id, ifname).

    The scope is what makes an object provably one agent's: its driver says
    what it is (the L2 driver: its bridge). A mark written by the first
    release (``netd:<container id>:<ifname>``, or its Docker driver's
    ``netd-docker:<endpoint id>``) parses with scope ``""``.
    """

    scope: str
    container_id: str
    ifname: str

    def alias(self) -> str:
        return f"{MARK_PREFIX}{self.scope}:{self.container_id}:{self.ifname}"

    @property
    def owner(self) -> tuple[str, str]:
        return (self.container_id, self.ifname)

    def same_owner(self, other: Mark | None) -> bool:
        return other is not None and other.owner == self.owner

    @staticmethod
    def parse(alias: str | None) -> Mark | None:
        if alias and alias.startswith(LEGACY_DOCKER_MARK) and len(alias) > len(LEGACY_DOCKER_MARK):
            return Mark("", alias[len(LEGACY_DOCKER_MARK):], "eth0")
        if not alias or not alias.startswith(MARK_PREFIX):
            return None
        parts = alias[len(MARK_PREFIX):].split(":")
        if len(parts) == 2 and all(parts):
            return Mark("", parts[0], parts[1])
        if len(parts) == 3 and parts[1] and parts[2]:
            return Mark(parts[0], parts[1], parts[2])
        return None


def is_netd_link(link: Link) -> bool:
    """A veth end netd made: by name (``ndv``/``ndp``/``ndd`` + 12 hex) or by mark."""
    named = (link.name.startswith((HOST_PREFIX, PEER_PREFIX, LEGACY_DOCKER_PREFIX))
             and len(link.name) == IFNAMSIZ)
    return link.kind == "veth" and (named or Mark.parse(link.alias) is not None)


# --------------------------------------------------------------------------- addressing


def interface(address: str) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface:
    """``ip/prefix`` -> interface; ValueError without a prefix length."""
    if "/" not in address:
        raise ValueError(f"address needs a prefix length: {address!r}")
    return ipaddress.ip_interface(address)


def route_specs(routes: Iterable[RouteArg], gateway: str | None) -> list[RouteSpec]:
    """CNI semantics: a route without a gateway goes via the interface's gateway."""
    out: list[RouteSpec] = []
    for item in routes:
        dst, gw = (item, None) if isinstance(item, str) else item
        out.append((str(ipaddress.ip_network(dst, strict=False)), gw or gateway))
    return out


def check_families(iface: ipaddress.IPv4Interface | ipaddress.IPv6Interface,
                   gateway: str | None, specs: Iterable[RouteSpec]) -> None:
    for gw in {gateway, *(g for _, g in specs)} - {None}:
        if ipaddress.ip_address(str(gw)).version != iface.version:
            raise ValueError(f"gateway {gw} is not of the address family of {iface}")


def default_dst(iface: ipaddress.IPv4Interface | ipaddress.IPv6Interface) -> str:
    return "0.0.0.0/0" if iface.version == 4 else "::/0"


def container_route(dst: str, gw: str | None, ifname: str,
                    iface: ipaddress.IPv4Interface | ipaddress.IPv6Interface | None = None,
                    metric: int | None = None) -> Route:
    """A route netd installs in a container (:data:`RTPROT_NETD`).

    A gateway outside the interface's subnet (BGP mode's 169.254.1.1) is used
    ``onlink``: reached on the link directly.
    """
    scope = RT_SCOPE_UNIVERSE if gw else RT_SCOPE_LINK
    onlink = bool(gw and iface is not None and ipaddress.ip_address(gw) not in iface.network)
    return Route(dst=str(ipaddress.ip_network(dst, strict=False)), gateway=gw, ifname=ifname,
                 metric=metric, proto=RTPROT_NETD, scope=scope, type=RTN_UNICAST,
                 onlink=onlink)


def configure(ctr: Netlink, ifname: str, index: int, address: str, gateway: str | None,
              routes: Sequence[RouteSpec]) -> None:
    """The container end's address, default route via ``gateway`` and ``routes``; idempotent.

    One request each; ``index`` is the link's (saves lookups).
    """
    iface = interface(address)
    broadcast = None
    if iface.version == 4 and iface.network.prefixlen < 31:
        broadcast = str(iface.network.broadcast_address)
    ctr.add_address(index, Address(str(iface), broadcast=broadcast))
    if gateway:
        ctr.add_route(container_route(default_dst(iface), gateway, ifname, iface), oif=index)
    for dst, gw in routes:
        ctr.add_route(container_route(dst, gw, ifname, iface), oif=index)


# --------------------------------------------------------------------------- the pair


@dataclass(frozen=True)
class Names:
    """Where an endpoint's two ends live and what they are called.

    ``netns`` is the container's namespace; None means handover: the
    container end is made in the host's namespace as ``peer_ifname`` and the
    runtime moves it (Docker).
    """

    host_ifname: str
    ifname: str
    netns: str | None
    peer_ifname: str | None = None

    @property
    def container_end(self) -> str:
        """The container end's name where it is made."""
        if self.netns is None:
            if not self.peer_ifname:
                raise ValueError("a handed-over endpoint needs a peer name")
            return self.peer_ifname
        return self.ifname


class Veth:
    """A veth pair being made: :func:`create`, then :func:`finish` (which closes it).

    Holds what :func:`finish` goes on with: a netlink handle in the host's and
    one in the container end's namespace, a packet socket there (for the
    probe and the announcement), the namespace's descriptor. :meth:`close`
    releases the handles, never the veth.
    """

    def __init__(self, names: Names, mark: Mark | None) -> None:
        self.names = names
        self.mark = mark
        self.mtu = 0
        self.mac: str | None = None  # the container end's, when known
        self.index = 0  # the container end's
        self.host_index = 0
        self.fd = -1
        self.host: Netlink | None = None
        self.own_host = False
        self.ctr: Netlink | None = None
        self.own_ctr = True
        self.packet: socket.socket | None = None
        self.adopted = False  # an existing pair of the same owner was taken over

    def take_packet(self) -> socket.socket | None:
        sock, self.packet = self.packet, None
        return sock

    def close(self) -> None:
        packet = self.take_packet()
        if packet is not None:
            close_later(packet)
        if self.ctr is not None and self.own_ctr:
            self.ctr.close()
        self.ctr = None
        if self.host is not None and self.own_host:
            self.host.close()
        self.host = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def remove(self) -> None:
        """Delete the pair (both ends go); used when an ADD fails."""
        if self.host is not None:
            self.host.delete_link(self.names.host_ifname)
        else:
            with Netlink() as nl:
                nl.delete_link(self.names.host_ifname)

    def __enter__(self) -> Veth:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _sockets(with_packet: bool) -> tuple[socket.socket, socket.socket | None]:
    """A netlink socket and (``with_packet``) a packet socket, made in this thread's namespace."""
    nl = netlink_socket()
    try:
        return nl, packet_socket() if with_packet else None
    except BaseException:
        nl.close()
        raise


def create(names: Names, mark: Mark | None, *, host: HostArg = None, master: int | None = None,
           mtu: int | None = None, mac: str | None = None, packet: bool = True,
           host_up: bool = True) -> Veth:
    """Make the pair, container end down; returns the open :class:`Veth`.

    Enters the container's namespace once (one thread makes its netlink and
    packet sockets), creates the pair in one message (container end directly
    in its namespace, down, with ``mac`` if given; host end enslaved to
    ``master`` if given, both with ``mtu``; the host end up unless
    ``host_up`` is false: a down port forwards nothing, whatever the container
    does with its end, until the caller brings it up) and marks the host end.
    An existing pair of the same mark is taken over (``adopted``); a foreign
    one raises :class:`LinkExists`. On failure nothing is left behind.
    """
    veth = Veth(names, mark)
    try:
        if isinstance(host, Netlink):
            veth.host = host
        else:
            veth.host = Netlink(host)
            veth.own_host = True
        if names.netns is not None:
            veth.fd = open_netns(names.netns)  # NetnsNotFound before anything is made
            nl_sock, veth.packet = run_in_netns_fd(veth.fd, lambda: _sockets(packet),
                                                   names.netns)
            veth.ctr = Netlink(names.netns, sock=nl_sock)
        else:
            host_ns = veth.host.netns
            nl_sock, veth.packet = run_in_netns(host_ns, lambda: _sockets(packet))
            veth.ctr = Netlink(host_ns, sock=nl_sock)
        _create_pair(veth, None if mac is None else normalize_mac(mac), mtu, master, host_up)
    except BaseException:
        veth.close()
        raise
    return veth


def _create_pair(veth: Veth, mac: str | None, mtu: int | None, master: int | None,
                 host_up: bool = True) -> None:
    host, ctr, names = veth.host, veth.ctr, veth.names
    assert host is not None and ctr is not None
    end = names.container_end
    alias = veth.mark.alias() if veth.mark else None
    veth.mtu = mtu or 0
    try:
        host.create_veth(names.host_ifname, end, peer_netns=names.netns,
                         peer_netns_fd=veth.fd if veth.fd >= 0 else None, peer_mac=mac,
                         mtu=mtu, master=master, up=host_up)
    except LinkExists:
        existing = host.link(names.host_ifname)
        if existing is None:
            raise  # the container already has an interface of that name
        found = Mark.parse(existing.alias)
        if veth.mark is not None and (found == veth.mark or (
                found is not None and found.scope == "" and veth.mark.same_owner(found))):
            peer = ctr.link(end)
            if peer is not None and peer.kind == "veth":  # ours, from an interrupted attempt
                if existing.alias != alias:  # a first-release mark: write the current one
                    host.set_link(names.host_ifname, alias=alias)
                if not host_up:
                    host.set_link(names.host_ifname, up=False)
                veth.mtu = existing.mtu
                veth.mac = normalize_mac(peer.mac) if peer.mac else None
                veth.index = peer.index
                veth.host_index = existing.index
                veth.adopted = True
                return
        raise LinkExists(f"host interface {names.host_ifname} already exists"
                         + (f" (owned by container {found.container_id} {found.ifname})"
                            if found else "")) from None
    veth.mac = mac
    try:
        if alias:
            host.set_link(names.host_ifname, alias=alias)
        got = ctr.link_brief(end)
        if got is None:
            raise LinkNotFound(f"{end} vanished while it was being made")
        veth.index = got[0].index
        if not veth.mtu:
            veth.mtu = got[0].mtu
    except BaseException:
        host.delete_link(names.host_ifname)
        raise


@dataclass(frozen=True)
class Finished:
    """What :func:`finish` configured on the container end."""

    ifname: str  # the container end's name where it is (handover: the peer's)
    mac: str
    index: int
    host_index: int
    mtu: int


def finish(veth: Veth, address: str, mac: str, gateway: str | None,
           routes: Sequence[RouteSpec], *, dad_timeout: float = 0.0,
           ready: Callable[[Netlink, str, int | None], None] | None = None,
           announce: bool = True) -> Finished:
    """Give the container end its MAC, probe, configure, announce; closes ``veth``.

    ``ready(host, host_ifname, port_state)`` runs before anything goes on the
    wire (the L2 driver waits for the bridge port to forward; ``port_state``
    is the state already read, None when the host end is no bridge port). With ``dad_timeout`` the
    container end probes the wire for the IPv4 address while address and
    routes are configured on it, IFF_NOARP meanwhile so that the kernel claims
    nothing before the probe found the address free; when another machine
    answers, :class:`AddressConflict` names its MAC. Then one gratuitous ARP
    (``announce``). For a handed-over end (``names.netns`` None) nothing is
    configured: it is probed, then left down, ARP on, for its runtime.

    Any failure removes the pair: a failed finish leaves nothing behind.
    """
    iface = interface(address)
    mac = normalize_mac(mac)
    check_families(iface, gateway, routes)
    handover = veth.names.netns is None
    do_probe = dad_timeout > 0 and iface.version == 4
    do_announce = announce and not handover and iface.version == 4
    name = veth.names.container_end
    arp: ArpSocket | None = None
    with veth:
        host, ctr = veth.host, veth.ctr
        assert host is not None and ctr is not None
        try:
            _set_mac_up(veth, ctr, name, mac, noarp=do_probe)
            got = host.link_brief(veth.names.host_ifname)
            if got is None:
                raise LinkNotFound(f"{veth.names.host_ifname} vanished while it was being made")
            veth.host_index = got[0].index
            if ready is not None and (do_probe or do_announce):
                ready(host, veth.names.host_ifname, got[2])
            sock = veth.take_packet()
            if sock is not None and (do_probe or do_announce):
                arp = ArpSocket(name, listen=do_probe, mac=mac, sock=sock)
            elif sock is not None:
                close_later(sock)

            def addressing() -> None:
                if not handover:
                    configure(ctr, name, veth.index, address, gateway, routes)

            if arp is not None and do_probe:
                holder = probe(arp, str(iface.ip), dad_timeout, meanwhile=addressing)
                if holder is not None:
                    raise AddressConflict(str(iface.ip), holder)
                if handover:
                    ctr.set_link(name, up=False, noarp=False)
                else:
                    ctr.set_link(name, noarp=False)
            else:
                addressing()
            if arp is not None and do_announce:
                arp.send(announce_frame(mac, str(iface.ip)))
        except BaseException:
            host.delete_link(veth.names.host_ifname)
            raise
        finally:
            if arp is not None:
                arp.close()
    return Finished(name, mac, veth.index, veth.host_index, veth.mtu)


def _set_mac_up(veth: Veth, ctr: Netlink, name: str, mac: str, noarp: bool) -> None:
    """Container end: ``mac``; up unless it is handed over and not probing."""
    up = veth.names.netns is not None or noarp
    if veth.mac == mac:
        ctr.set_link(name, up=up, noarp=noarp)
        return
    if veth.mac is not None:  # an up link may refuse a new MAC: down first
        ctr.set_link(name, up=False)
    ctr.set_link(name, mac=mac, up=up, noarp=noarp)
    veth.mac = mac


# --------------------------------------------------------------------------- check


def check_host_end(host: Netlink, host_ifname: str, mark: Mark | None) -> tuple[Link | None,
                                                                               list[str]]:
    """The host end and what is wrong with it (missing, down, marked for someone else)."""
    end = host.link(host_ifname)
    if end is None:
        return None, [f"host interface {host_ifname} is missing"]
    problems = []
    if not end.up:
        problems.append(f"{host_ifname} is down")
    if mark is not None and Mark.parse(end.alias) not in (mark, Mark("", mark.container_id,
                                                                     mark.ifname)):
        problems.append(f"{host_ifname} is marked {end.alias!r}, not {mark.alias()!r}")
    return end, problems


def check_container(netns: str, ifname: str, mac: str, address: str, gateway: str | None,
                    routes: Sequence[RouteSpec]) -> list[str]:
    """What is missing or wrong on the container end (CNI CHECK); empty when all is there."""
    try:
        ctr = Netlink(netns)
    except NetnsNotFound:
        return [f"network namespace {netns} is gone"]
    problems: list[str] = []
    with ctr:
        link = ctr.link(ifname)
        if link is None:
            return [f"{ifname} is missing in {netns}"]
        if normalize_mac(link.mac or "00:00:00:00:00:00") != normalize_mac(mac):
            problems.append(f"{ifname} has MAC {link.mac}, expected {mac}")
        if not link.up:
            problems.append(f"{ifname} is down")
        iface = interface(address)
        have = {a.cidr for a in ctr.addresses(ifname)}
        if str(iface) not in have:
            problems.append(f"{ifname} lacks address {iface} "
                            f"(has {', '.join(sorted(have)) or 'none'})")
        present = ctr.routes(ifname)
        wanted = list(routes)
        if gateway:
            wanted.insert(0, (default_dst(iface), gateway))
        for dst, gw in wanted:
            net = ipaddress.ip_network(dst, strict=False)
            if not any(r.network == net and r.gateway == gw for r in present):
                shown = "default" if net.prefixlen == 0 else str(net)
                via = f" via {gw}" if gw else ""
                problems.append(f"route {shown}{via} dev {ifname} is missing")
    return problems


# --------------------------------------------------------------------------- detach, sweep


def detach(host_ifname: str, *, host: HostArg = None, timeout: float = 30.0,
           index: int | None = None) -> bool:
    """Remove a container's veth by its host end; False when it was already gone.

    Idempotent: deleting the host end removes the container end too, and when
    the container's namespace is gone the kernel has removed both already.
    Refuses to delete anything that is not a netd veth (:func:`is_netd_link`).
    ``index``: delete only the link with this index (a sweep that listed it:
    a link of the same name made since then is left alone).

    Returns as soon as the kernel reports the host end unregistered (both ends
    are then gone from their namespaces, down, without addresses or routes).
    The ``RTM_DELLINK`` request itself returns only after the kernel has also
    freed the devices, an RCU barrier later (10-20 ms here, more on a busy
    host); a thread waits for that in the background.
    """
    with handle(host) as nl:
        got = nl.link_brief(host_ifname)
        if got is None:
            return False
        link = got[0]
        if index is not None and link.index != index:
            return False
        if not is_netd_link(link):
            raise DataplaneError(f"refusing to delete {host_ifname}: not a netd container veth "
                                 f"(kind {link.kind}, alias {link.alias!r})")
        return _delete_unregistered(nl.netns, link.index, host_ifname, timeout)


def _delete_unregistered(netns: str | None, index: int, name: str, timeout: float) -> bool:
    """Delete link ``index`` from a worker thread; return once it is unregistered."""
    with LinkMonitor(netns) as monitor:  # subscribed before the request: no event missed
        sock = run_in_netns(netns, netlink_socket)
        outcome: dict[str, bool | BaseException] = {}
        done = threading.Event()

        def work() -> None:
            try:
                with Netlink(netns, sock=sock) as nl:
                    outcome["deleted"] = nl.delete_link_index(index)
            except BaseException as exc:  # handed to the caller
                outcome["error"] = exc
            finally:
                done.set()

        threading.Thread(target=work, name=f"netd-del-{name}", daemon=True).start()
        if monitor.wait_deleted(index, timeout, done.is_set):
            return True
    if not done.wait(max(0.0, timeout)):
        raise DataplaneError(f"deleting {name} did not finish within {timeout:g} s")
    error = outcome.get("error")
    if isinstance(error, BaseException):
        raise error
    return bool(outcome.get("deleted"))


def marked_links(*, host: HostArg = None) -> list[tuple[Link, Mark | None]]:
    """Every netd veth end in the host's namespace, with its mark (None: unmarked)."""
    with handle(host) as nl:
        return [(link, Mark.parse(link.alias)) for link in nl.links() if is_netd_link(link)]


def scoped_host_ends(scope: str, *, host: HostArg = None) -> list[tuple[Link, Mark]]:
    """The host ends marked in ``scope`` (not the peers waiting for a Docker Join)."""
    return [(link, mark) for link, mark in marked_links(host=host)
            if mark is not None and mark.scope == scope
            and not link.name.startswith(PEER_PREFIX)]


def sweep_host_ends(scope: str, keep: Iterable[str], *, host: Netlink,
                    hold: Callable[[tuple[str, str]], AbstractContextManager[None]] | None = None
                    ) -> list[str]:
    """Remove the veths marked in ``scope`` that ``keep`` does not name, each under its
    owner's ``hold`` (a sweep never races an ADD of the same owner); what went."""
    kept = set(keep)
    removed = []
    for link, mark in marked_links(host=host):
        if mark is None or mark.scope != scope:
            continue
        with hold(mark.owner) if hold is not None else contextlib.nullcontext():
            if link.name in kept:
                continue
            if detach(link.name, host=host, index=link.index):
                removed.append(f"removed orphaned interface {link.name} ({link.alias})")
    return removed


__all__ = [
    "HOST_PREFIX",
    "MARK_PREFIX",
    "PEER_PREFIX",
    "Finished",
    "Mark",
    "Names",
    "RouteSpec",
    "Veth",
    "check_container",
    "check_host_end",
    "configure",
    "container_route",
    "create",
    "detach",
    "finish",
    "host_ifname_for",
    "interface",
    "is_netd_link",
    "marked_links",
    "peer_ifname_for",
    "route_specs",
    "scoped_host_ends",
    "sweep_host_ends",
]
