"""Layer-2 "bridge over bond0" dataplane.

The host's uplink (``bond0``) is enslaved to a Linux bridge (``br0``) that takes
over the uplink's MAC, addresses and routes; containers get a veth whose host
end is a port of ``br0``, so they sit in the hosts' own subnet.

Takeover is split so it can be shown before it is made and undone when it cuts
the host off:

* :func:`read_state` snapshots uplink and bridge (:class:`L2State`);
* :func:`plan_takeover` is pure: state in, :class:`Plan` out (empty when the
  host is already taken over), printable for ``netd agent --plan``;
* :func:`apply_takeover` makes the plan; :func:`rollback` restores a snapshot;
* :func:`takeover` does all of it and rolls back when the default gateway does
  not answer ARP on the bridge in time (:func:`gateway_answers_arp`).

Containers: :func:`attach` / :func:`detach`, named by :func:`host_ifname_for`,
with ARP duplicate detection (:func:`dad_probe`) and a gratuitous ARP.
Their ``host_netns`` is the host's namespace (None: this process's) or an open
:class:`~netd.dataplane.netlink.Netlink` handle to reuse (one per thread).

:func:`ensure_bridge_forwarding` makes the bridge work on hosts where dockerd
set the iptables FORWARD policy to DROP and br_netfilter hands bridged frames
to iptables.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import NoReturn

from netd.dataplane.arp import (
    ZERO_IP,
    ArpSocket,
    announce_frame,
    close_later,
    conflict_mac,
    packet_socket,
    probe_frame,
    request_frame,
)
from netd.dataplane.errors import (
    AddressConflict,
    DataplaneError,
    LinkExists,
    LinkNotFound,
    NetnsNotFound,
    PlanError,
    TakeoverFailed,
)
from netd.dataplane.model import (
    AF_INET,
    RTPROT_KERNEL,
    RTPROT_RA,
    Address,
    Link,
    Route,
    normalize_mac,
)
from netd.dataplane.netlink import (
    HostArg,
    LinkMonitor,
    Netlink,
    container_route,
    handle,
    netlink_socket,
    open_netns,
    run_in_netns,
    run_in_netns_fd,
)

log = logging.getLogger(__name__)

#: Host ends of container veths: ``ndv`` + 12 hex digits of a hash (15 characters).
HOST_IFNAME_PREFIX = "ndv"
#: ifalias of a host end: ``netd:<container id>:<container ifname>``, the owner record.
ALIAS_PREFIX = "netd:"
#: The comment on netd's iptables rules.
RULE_COMMENT = "netd: accept frames bridged on {bridge}"

IFNAMSIZ = 15
BR_STATE_FORWARDING = 3


# --------------------------------------------------------------------------- state


@dataclass(frozen=True)
class L2State:
    """A snapshot of the uplink and the bridge (the bridge may not exist yet)."""

    uplink: Link
    bridge_name: str
    bridge: Link | None = None
    uplink_addresses: tuple[Address, ...] = ()
    uplink_routes: tuple[Route, ...] = ()
    bridge_addresses: tuple[Address, ...] = ()
    bridge_routes: tuple[Route, ...] = ()
    #: Things on the uplink that cannot be moved safely (multipath routes...).
    unsupported: tuple[str, ...] = ()

    def __str__(self) -> str:
        lines = [str(self.uplink)]
        lines += [f"    inet {a}" for a in self.uplink_addresses]
        lines += [f"    route {r}" for r in self.uplink_routes]
        if self.bridge is None:
            lines.append(f"{self.bridge_name}: absent")
        else:
            lines.append(str(self.bridge))
            lines += [f"    inet {a}" for a in self.bridge_addresses]
            lines += [f"    route {r}" for r in self.bridge_routes]
        lines += [f"    unsupported: {u}" for u in self.unsupported]
        return "\n".join(lines)


def read_state(uplink: str, bridge: str, *, netns: str | None = None) -> L2State:
    """Snapshot ``uplink`` and ``bridge`` (addresses, routes of every table but local)."""
    with Netlink(netns) as nl:
        up = nl.link(uplink)
        if up is None:
            raise LinkNotFound(f"uplink {uplink} does not exist")
        br = nl.link(bridge)
        routes = nl.routes(table=None)
        return L2State(
            uplink=up,
            bridge_name=bridge,
            bridge=br,
            uplink_addresses=tuple(nl.addresses(uplink)),
            uplink_routes=tuple(r for r in routes if r.ifname == uplink),
            bridge_addresses=tuple(nl.addresses(bridge)) if br else (),
            bridge_routes=tuple(r for r in routes if r.ifname == bridge) if br else (),
            unsupported=tuple(nl.multipath_routes(uplink)),
        )


def default_gateway(state: L2State) -> str | None:
    """The IPv4 default gateway in the main table (uplink or bridge), lowest metric first."""
    candidates = [r for r in (*state.uplink_routes, *state.bridge_routes)
                  if r.is_default and r.family == AF_INET and r.gateway and r.table == 254]
    candidates.sort(key=lambda r: r.metric or 0)
    return candidates[0].gateway if candidates else None


# --------------------------------------------------------------------------- plan steps


@dataclass(frozen=True)
class CreateBridge:
    name: str
    mac: str
    mtu: int
    note: str = ""

    def __str__(self) -> str:
        return (f"ip link add {self.name} address {self.mac} mtu {self.mtu} up type bridge "
                "stp_state 0 forward_delay 0")

    def apply(self, nl: Netlink) -> None:
        if nl.link(self.name) is None:
            nl.create_bridge(self.name, mac=self.mac, mtu=self.mtu)


@dataclass(frozen=True)
class SetMac:
    ifname: str
    mac: str
    note: str = ""

    def __str__(self) -> str:
        return f"ip link set {self.ifname} address {self.mac}"

    def apply(self, nl: Netlink) -> None:
        nl.set_mac(self.ifname, self.mac)


@dataclass(frozen=True)
class SetUp:
    ifname: str
    up: bool = True
    note: str = ""

    def __str__(self) -> str:
        return f"ip link set {self.ifname} {'up' if self.up else 'down'}"

    def apply(self, nl: Netlink) -> None:
        if self.up:
            nl.set_up(self.ifname)
        else:
            nl.set_down(self.ifname)


@dataclass(frozen=True)
class SetMaster:
    ifname: str
    master: str | None
    note: str = ""

    def __str__(self) -> str:
        if self.master:
            return f"ip link set {self.ifname} master {self.master}"
        return f"ip link set {self.ifname} nomaster"

    def apply(self, nl: Netlink) -> None:
        nl.set_master(self.ifname, self.master)


@dataclass(frozen=True)
class AddAddress:
    ifname: str
    address: Address
    note: str = ""

    def __str__(self) -> str:
        return f"ip addr add {self.address} dev {self.ifname}"

    def apply(self, nl: Netlink) -> None:
        nl.add_address(self.ifname, self.address)


@dataclass(frozen=True)
class DelAddress:
    ifname: str
    address: Address
    note: str = ""

    def __str__(self) -> str:
        return f"ip addr del {self.address.cidr} dev {self.ifname}"

    def apply(self, nl: Netlink) -> None:
        nl.del_address(self.ifname, self.address)


@dataclass(frozen=True)
class ReplaceRoute:
    route: Route
    note: str = ""

    def __str__(self) -> str:
        return f"ip route replace {self.route}"

    def apply(self, nl: Netlink) -> None:
        nl.replace_route(self.route)


@dataclass(frozen=True)
class DelRoute:
    route: Route
    note: str = ""

    def __str__(self) -> str:
        return f"ip route del {self.route}"

    def apply(self, nl: Netlink) -> None:
        nl.del_route(self.route)


@dataclass(frozen=True)
class DeleteLink:
    ifname: str
    note: str = ""

    def __str__(self) -> str:
        return f"ip link del {self.ifname}"

    def apply(self, nl: Netlink) -> None:
        nl.delete_link(self.ifname)


Step = (CreateBridge | SetMac | SetUp | SetMaster | AddAddress | DelAddress | ReplaceRoute
        | DelRoute | DeleteLink)


@dataclass(frozen=True)
class Plan:
    """An ordered list of changes; ``str(plan)`` is what ``netd agent --plan`` prints."""

    steps: tuple[Step, ...] = ()
    title: str = ""

    def __bool__(self) -> bool:
        return bool(self.steps)

    def __len__(self) -> int:
        return len(self.steps)

    def __iter__(self) -> Iterator[Step]:
        return iter(self.steps)

    def __str__(self) -> str:
        if not self.steps:
            return f"{self.title}: nothing to change" if self.title else "nothing to change"
        width = min(60, max(len(str(s)) for s in self.steps))
        lines = [f"{self.title}:"] if self.title else []
        for n, step in enumerate(self.steps, 1):
            text = str(step)
            if step.note:
                text = f"{text:<{width}}  # {step.note}"
            lines.append(f"{n:3}. {text}")
        return "\n".join(lines)


def _movable_addresses(addresses: Iterable[Address]) -> list[Address]:
    # IPv6 link-local addresses belong to the device (the bridge makes its own,
    # identical since it carries the same MAC).
    return [a for a in addresses if not a.link_local]


def _movable_routes(routes: Iterable[Route]) -> list[Route]:
    """Routes to move, in an order the kernel accepts: device routes before routes via gateways.

    Kernel routes follow their address; RA routes are relearned on the bridge.
    """
    keep = [r for r in routes if r.proto not in (RTPROT_KERNEL, RTPROT_RA)
            and not (r.family != AF_INET and r.network.is_link_local)]
    return sorted(keep, key=lambda r: (r.gateway is not None, r.is_default))


def plan_takeover(state: L2State) -> Plan:
    """The changes that make ``state.bridge_name`` own the uplink and its configuration.

    Pure. Order matters for a remote host: the bridge gets the addresses and
    routes before the uplink loses them, and each route is moved with one
    ``replace`` so there is no moment without it. Raises :class:`PlanError`
    when the takeover cannot be made safely.
    """
    up, bname = state.uplink, state.bridge_name
    if state.unsupported:
        raise PlanError(f"cannot take over {up.name}: " + "; ".join(state.unsupported)
                        + " (move these by hand first)")
    if up.master and up.master != bname:
        raise PlanError(f"{up.name} is already enslaved to {up.master}, not {bname}")
    if state.bridge is not None and state.bridge.kind != "bridge":
        raise PlanError(f"{bname} exists and is not a bridge (kind {state.bridge.kind})")
    if not up.mac:
        raise PlanError(f"{up.name} has no MAC address")
    mac = normalize_mac(up.mac)
    steps: list[Step] = []
    if state.bridge is None:
        steps.append(CreateBridge(bname, mac, up.mtu,
                                  note=f"{up.name}'s MAC, so switches and ARP caches stay valid"))
    else:
        if normalize_mac(state.bridge.mac or "00:00:00:00:00:00") != mac:
            steps.append(SetMac(bname, mac, note=f"keep {up.name}'s MAC on the bridge"))
        if not state.bridge.up:
            steps.append(SetUp(bname))
    if up.master != bname:
        steps.append(SetMaster(up.name, bname))
    if not up.up:
        steps.append(SetUp(up.name))

    addresses = _movable_addresses(state.uplink_addresses)
    on_bridge = {a.cidr for a in state.bridge_addresses}
    for addr in addresses:
        if addr.cidr not in on_bridge:
            steps.append(AddAddress(bname, addr, note=f"from {up.name}"))

    routes = _movable_routes(state.uplink_routes)
    bridge_keys = {r.key() for r in state.bridge_routes}
    for route in routes:
        if route.key() not in bridge_keys:
            steps.append(ReplaceRoute(route.on(bname), note=f"moves it from {up.name}"))
    for addr in addresses:
        steps.append(DelAddress(up.name, addr))
    for route in routes:
        if route.key() in bridge_keys:
            steps.append(DelRoute(route, note=f"already on {bname}"))
    return Plan(tuple(steps), title=f"take over {up.name} with {bname}")


def plan_rollback(before: L2State, current: L2State) -> Plan:
    """The changes that bring ``current`` back to ``before`` (a snapshot taken before a takeover).

    Pure; empty when nothing differs.
    """
    up, bname = before.uplink, before.bridge_name
    steps: list[Step] = []
    if current.uplink.master != up.master:
        steps.append(SetMaster(up.name, up.master))
    if current.uplink.up != up.up:
        steps.append(SetUp(up.name, up.up))
    have = {a.cidr for a in current.uplink_addresses}
    for addr in _movable_addresses(before.uplink_addresses):
        if addr.cidr not in have:
            steps.append(AddAddress(up.name, addr))
    have_routes = {r.key() for r in current.uplink_routes}
    for route in _movable_routes(before.uplink_routes):
        if route.key() not in have_routes:
            steps.append(ReplaceRoute(route))
    if current.bridge is not None:
        had = {a.cidr for a in before.bridge_addresses}
        for addr in _movable_addresses(current.bridge_addresses):
            if addr.cidr not in had:
                steps.append(DelAddress(bname, addr))
        had_routes = {r.key() for r in before.bridge_routes}
        for route in _movable_routes(current.bridge_routes):
            if route.key() not in had_routes:
                steps.append(DelRoute(route))
        if before.bridge is None:
            steps.append(DeleteLink(bname, note="netd created it"))
        else:
            if before.bridge.mac and before.bridge.mac != current.bridge.mac:
                steps.append(SetMac(bname, before.bridge.mac))
            if before.bridge.up != current.bridge.up:
                steps.append(SetUp(bname, before.bridge.up))
    return Plan(tuple(steps), title=f"restore {up.name}")


# --------------------------------------------------------------------------- apply


def apply_plan(plan: Plan, *, netns: str | None = None) -> None:
    """Make each step, in order. Steps are idempotent; a failure stops and raises."""
    with Netlink(netns) as nl:
        for step in plan.steps:
            log.info("l2: %s", step)
            try:
                step.apply(nl)
            except DataplaneError as exc:
                raise DataplaneError(f"step '{step}' failed: {exc.message}") from exc


def apply_takeover(plan: Plan, *, netns: str | None = None) -> None:
    apply_plan(plan, netns=netns)


def rollback(snapshot: L2State, *, netns: str | None = None) -> Plan:
    """Bring the host back to ``snapshot``; returns what was changed (empty: nothing to do)."""
    current = read_state(snapshot.uplink.name, snapshot.bridge_name, netns=netns)
    plan = plan_rollback(snapshot, current)
    apply_plan(plan, netns=netns)
    return plan


@dataclass(frozen=True)
class TakeoverResult:
    before: L2State
    plan: Plan
    gateway: str | None
    changed: bool


def takeover(uplink: str, bridge: str, *, netns: str | None = None,
             gateway: str | None = None, arp_timeout: float = 10.0,
             accept_forwarding: bool = True) -> TakeoverResult:
    """Take the uplink over, check the gateway answers ARP on the bridge, roll back if not.

    ``gateway`` defaults to the IPv4 default route's gateway; with none, the
    check is skipped. Raises :class:`TakeoverFailed` (after restoring the
    snapshot) when applying fails or the gateway stays silent for ``arp_timeout``
    seconds. ``accept_forwarding`` also runs :func:`ensure_bridge_forwarding`.
    """
    before = read_state(uplink, bridge, netns=netns)
    plan = plan_takeover(before)
    gw = gateway or default_gateway(before)
    if plan:
        try:
            apply_takeover(plan, netns=netns)
        except Exception as exc:
            _restore(before, netns, f"applying the takeover of {uplink} failed: {exc}")
        if gw is not None and not gateway_answers_arp(bridge, gw, arp_timeout, netns=netns):
            _restore(before, netns, f"gateway {gw} did not answer ARP on {bridge} within "
                                    f"{arp_timeout:g} s after the takeover of {uplink}")
    if accept_forwarding:
        ensure_bridge_forwarding(bridge, netns=netns)
    return TakeoverResult(before, plan, gw, bool(plan))


def _restore(before: L2State, netns: str | None, why: str) -> NoReturn:
    log.error("l2: %s; restoring the previous configuration", why)
    try:
        rollback(before, netns=netns)
    except Exception as exc:
        raise TakeoverFailed(f"{why}; restoring the previous configuration ALSO failed: {exc}. "
                             f"Configuration before the takeover:\n{before}") from exc
    raise TakeoverFailed(f"{why}; the previous configuration was restored")


# --------------------------------------------------------------------------- ARP


def arp_resolve(ifname: str, ip: str, timeout: float, *, netns: str | None = None,
                source_ip: str | None = None, interval: float = 1.0) -> str | None:
    """ARP for ``ip`` on ``ifname`` (raw socket, bypassing the neighbour cache); its MAC or None.

    The request's sender is ``source_ip``, by default the interface's address in
    ``ip``'s subnet (0.0.0.0 when it has none). Any ARP packet from ``ip``
    counts as an answer. Repeats the request every ``interval`` seconds.
    """
    if source_ip is None:
        source_ip = _source_for(ifname, ip, netns)
    with ArpSocket(ifname, netns) as sock:
        deadline = time.monotonic() + timeout
        next_send = time.monotonic()
        while True:
            now = time.monotonic()
            if now >= deadline:
                return None
            if now >= next_send:
                sock.send(request_frame(sock.mac, source_ip, ip))
                next_send = now + interval
            pkt = sock.receive(min(deadline, next_send))
            if pkt is not None and pkt.sender_ip == ip and pkt.sender_mac != sock.mac:
                return pkt.sender_mac


def _source_for(ifname: str, ip: str, netns: str | None) -> str:
    target = ipaddress.ip_address(ip)
    with Netlink(netns) as nl:
        for addr in nl.addresses(ifname, family=AF_INET):
            if target in addr.interface.network:
                return addr.ip
    return ZERO_IP


def gateway_answers_arp(ifname: str, gw_ip: str, timeout: float, *,
                        netns: str | None = None) -> bool:
    """True when ``gw_ip`` answers an ARP request sent on ``ifname`` within ``timeout`` s."""
    mac = arp_resolve(ifname, gw_ip, timeout, netns=netns, interval=min(1.0, timeout / 3))
    if mac is None:
        log.warning("l2: gateway %s did not answer ARP on %s within %g s", gw_ip, ifname, timeout)
    return mac is not None


def dad_probe(netns: str | None, ifname: str, ip: str, timeout: float, *,
              interval: float | None = None) -> str | None:
    """RFC 5227 duplicate address detection; the MAC of whoever holds ``ip``, or None.

    Sends ARP probes (sender IP 0.0.0.0) from ``ifname`` (up, without ``ip``)
    every ``interval`` seconds (default: two probes when ``timeout`` is at most
    0.1 s, else one every third of it, at least 50 ms apart) and listens for
    ``timeout`` seconds for a reply or a probe for the same address from
    another MAC.
    """
    with ArpSocket(ifname, netns) as sock:
        return _dad(sock, ip, timeout, interval)


def _dad(sock: ArpSocket, ip: str, timeout: float, interval: float | None = None,
         meanwhile: Callable[[], None] | None = None) -> str | None:
    """:func:`dad_probe` on a bound socket; ``meanwhile()`` runs after the first probe is out.

    Answers arriving while ``meanwhile`` runs wait in the socket's buffer, so
    the time it takes overlaps the probe's wait instead of adding to it.
    """
    if interval is None:  # short waits: two probes (one may be lost), else one every 1/3
        interval = timeout / 2 if timeout <= 0.1 else max(0.05, timeout / 3)
    deadline = time.monotonic() + timeout
    sock.send(probe_frame(sock.mac, ip))
    next_send = time.monotonic() + interval
    if meanwhile is not None:
        meanwhile()
    while True:
        now = time.monotonic()
        if now >= deadline:
            return None
        if now >= next_send:
            sock.send(probe_frame(sock.mac, ip))
            next_send = now + interval
        pkt = sock.receive(min(deadline, next_send))
        if pkt is not None:
            mac = conflict_mac(pkt, ip, sock.mac)
            if mac is not None:
                return mac


def send_gratuitous_arp(netns: str | None, ifname: str, ip: str, *, mac: str | None = None,
                        count: int = 1, interval: float = 0.0) -> None:
    """Announce ``ip`` from ``ifname`` (RFC 5227 announcement) so neighbours learn its MAC.

    With ``mac`` (the interface's), a send-only socket is used: no receive
    hook to register.
    """
    with ArpSocket(ifname, netns, listen=mac is None, mac=mac) as sock:
        for n in range(count):
            if n and interval:
                time.sleep(interval)
            sock.send(announce_frame(sock.mac, ip))


# --------------------------------------------------------------------------- containers


def host_ifname_for(container_id: str, container_ifname: str = "eth0", *, salt: int = 0) -> str:
    """The host end's name: ``ndv`` + 12 hex digits of sha256(container id, ifname[, salt]).

    Deterministic (a restarted agent finds it again), 15 characters (IFNAMSIZ),
    48 bits of hash: a collision needs millions of containers on one host. The
    owner is also written in the link's alias; on the unlikely clash
    :func:`attach` raises :class:`LinkExists` and the caller retries with ``salt=1``.
    """
    if not container_id:
        raise ValueError("container id is empty")
    key = f"{container_id}\0{container_ifname}" + (f"\0{salt}" if salt else "")
    name = HOST_IFNAME_PREFIX + hashlib.sha256(key.encode()).hexdigest()[:12]
    assert len(name) <= IFNAMSIZ
    return name


def owner_alias(container_id: str, container_ifname: str) -> str:
    return f"{ALIAS_PREFIX}{container_id}:{container_ifname}"


def parse_owner_alias(alias: str | None) -> tuple[str, str] | None:
    """``(container id, container ifname)`` from a host end's alias, or None when not ours."""
    if not alias or not alias.startswith(ALIAS_PREFIX):
        return None
    cid, sep, ifname = alias[len(ALIAS_PREFIX):].rpartition(":")
    return (cid, ifname) if sep and cid else None


@dataclass(frozen=True)
class Attachment:
    """What :func:`attach` plumbed (the agent records it under ``state_dir``)."""

    container_netns: str
    container_ifname: str
    host_ifname: str
    bridge: str
    address: str
    mac: str
    gateway: str | None
    routes: tuple[tuple[str, str | None], ...] = ()
    container_index: int = 0
    host_index: int = 0
    mtu: int = 1500
    alias: str | None = field(default=None, compare=False)


RouteArg = str | tuple[str, str | None]


def _route_specs(routes: Iterable[RouteArg], gateway: str | None) -> list[tuple[str, str | None]]:
    """CNI semantics: a route without a gateway goes via the interface's gateway."""
    out: list[tuple[str, str | None]] = []
    for item in routes:
        dst, gw = (item, None) if isinstance(item, str) else item
        out.append((str(ipaddress.ip_network(dst, strict=False)), gw or gateway))
    return out


def _check_gateways(iface: ipaddress.IPv4Interface | ipaddress.IPv6Interface,
                    gateway: str | None, specs: Iterable[tuple[str, str | None]]) -> None:
    for gw in {gateway, *(g for _, g in specs)} - {None}:
        if ipaddress.ip_address(str(gw)).version != iface.version:
            raise ValueError(f"gateway {gw} is not of the address family of {iface}")


def _interface(address: str) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface:
    if "/" not in address:
        raise ValueError(f"address needs a prefix length: {address!r}")
    return ipaddress.ip_interface(address)


class PendingAttach:
    """A container's veth made before its address is known: :func:`prepare_attach`.

    Holds what :func:`attach` goes on with: a netlink handle in the host's and
    one in the container's namespace, a packet socket in the container's (for
    the probe and the announcement), the namespace's descriptor. The container
    end is down and has no address until :func:`attach`. :meth:`close` (also
    done by :func:`attach`) releases the handles, never the veth.
    """

    def __init__(self, container_netns: str, container_ifname: str, host_ifname: str,
                 bridge: str, container_id: str | None) -> None:
        self.container_netns = container_netns
        self.container_ifname = container_ifname
        self.host_ifname = host_ifname
        self.bridge = bridge
        self.container_id = container_id
        self.mtu = 0
        self.mac: str | None = None  # the container end's, when known
        self.index = 0  # the container end's
        self.fd = -1
        self.host: Netlink | None = None
        self.own_host = False
        self.ctr: Netlink | None = None
        self.packet: socket.socket | None = None

    def take_packet(self) -> socket.socket | None:
        sock, self.packet = self.packet, None
        return sock

    def close(self) -> None:
        packet = self.take_packet()
        if packet is not None:
            close_later(packet)
        if self.ctr is not None:
            self.ctr.close()
            self.ctr = None
        if self.host is not None and self.own_host:
            self.host.close()
        self.host = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> PendingAttach:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def prepare_attach(container_netns: str, container_ifname: str, host_ifname: str, bridge: str,
                   *, host_netns: HostArg = None, container_id: str | None = None,
                   mac: str | None = None, mtu: int | None = None) -> PendingAttach:
    """The first half of :func:`attach`, which needs no address: the veth, down.

    Enters the container's namespace once (one thread makes its netlink and
    packet sockets), creates the pair (container end directly in its
    namespace, down, with ``mac`` if given; host end on ``bridge``, up, its
    alias naming the owner) and keeps the handles for :func:`attach`. The
    agent runs this while the IPAM allocates the address. An existing pair of
    the same owner is taken over (its MAC is set by :func:`attach`); a
    foreign one raises :class:`LinkExists`. On failure nothing is left behind.
    """
    pending = PendingAttach(container_netns, container_ifname, host_ifname, bridge,
                            container_id)
    try:
        pending.fd = open_netns(container_netns)  # NetnsNotFound before anything is made
        nl_sock, pending.packet = run_in_netns_fd(
            pending.fd, lambda: _container_sockets(True), container_netns)
        pending.ctr = Netlink(container_netns, sock=nl_sock)
        if isinstance(host_netns, Netlink):
            pending.host = host_netns
        else:
            pending.host = Netlink(host_netns)
            pending.own_host = True
        _create_pair(pending, None if mac is None else normalize_mac(mac), mtu)
    except BaseException:
        pending.close()
        raise
    return pending


def _create_pair(pending: PendingAttach, mac: str | None, mtu: int | None) -> None:
    host, ctr = pending.host, pending.ctr
    assert host is not None and ctr is not None
    alias = (owner_alias(pending.container_id, pending.container_ifname)
             if pending.container_id else None)
    br = host.link_brief(pending.bridge)
    if br is None:
        raise LinkNotFound(f"bridge {pending.bridge} does not exist")
    pending.mtu = mtu or br[0].mtu
    try:
        host.create_veth(pending.host_ifname, pending.container_ifname,
                         peer_netns=pending.container_netns, peer_netns_fd=pending.fd,
                         peer_mac=mac, mtu=pending.mtu, master=br[0].index, up=True)
    except LinkExists:
        existing = host.link(pending.host_ifname)
        if existing is None:
            raise  # the container already has an interface of that name
        if alias is not None and existing.alias == alias and existing.master == pending.bridge:
            peer = ctr.link(pending.container_ifname)
            if peer is not None:  # ours, from an interrupted attempt: take it over
                pending.mtu = existing.mtu
                pending.mac = normalize_mac(peer.mac) if peer.mac else None
                pending.index = peer.index
                return
        owner = parse_owner_alias(existing.alias)
        raise LinkExists(f"host interface {pending.host_ifname} already exists"
                         + (f" (owned by container {owner[0]} {owner[1]})" if owner else "")
                         ) from None
    pending.mac = mac
    try:
        if alias:
            host.set_link(pending.host_ifname, alias=alias)
        pending.index = ctr.index(pending.container_ifname)
    except BaseException:
        host.delete_link(pending.host_ifname)
        raise


def _finish_pair(pending: PendingAttach, mac: str, noarp: bool) -> tuple[int, int | None]:
    """Container end: ``mac``, up (IFF_NOARP with ``noarp``); (host index, port state)."""
    host, ctr = pending.host, pending.ctr
    assert host is not None and ctr is not None
    name = pending.container_ifname
    if pending.mac == mac:
        ctr.set_link(name, up=True, noarp=noarp)
    else:
        if pending.mac is not None:  # an up link may refuse a new MAC: down first
            ctr.set_link(name, up=False)
        ctr.set_link(name, mac=mac, up=True, noarp=noarp)
        pending.mac = mac
    got = host.link_brief(pending.host_ifname)
    if got is None:
        raise LinkNotFound(f"{pending.host_ifname} vanished while it was being made")
    return got[0].index, got[2]


def plumb(container_netns: str, container_ifname: str, host_ifname: str, bridge: str,
          mac: str, *, host_netns: HostArg = None, container_id: str | None = None,
          mtu: int | None = None) -> tuple[int, int]:
    """Create the veth: container end (``mac``, up, no address) directly in ``container_netns``.

    One netlink message creates the pair with the container end already in
    ``container_netns`` (a name or a path such as ``/proc/PID/ns/net``) and the
    host end enslaved to ``bridge`` and up, both with the bridge's MTU (a
    smaller port MTU would lower the bridge's). The host end's alias records
    the owner (``container_id``). Idempotent: an existing pair of the same
    owner is accepted; a foreign one raises :class:`LinkExists`. On failure,
    nothing is left behind. Returns ``(host index, mtu)``.
    """
    mac = normalize_mac(mac)
    with prepare_attach(container_netns, container_ifname, host_ifname, bridge,
                        host_netns=host_netns, container_id=container_id, mac=mac,
                        mtu=mtu) as pending:
        assert pending.host is not None
        try:
            index, _ = _finish_pair(pending, mac, noarp=False)
        except BaseException:
            pending.host.delete_link(host_ifname)
            raise
        return index, pending.mtu


def wait_forwarding(host_ifname: str, timeout: float = 2.0, *,
                    host_netns: HostArg = None) -> bool:
    """Wait until the bridge forwards on the port ``host_ifname``; False on timeout.

    A new port forwards only once the kernel's link watcher has seen its
    carrier (usually within a millisecond, up to a second when links churn);
    frames sent before that (a duplicate-detection probe, the gratuitous ARP)
    would be dropped.
    """
    with handle(host_netns) as host:
        return _wait_forwarding(host, host_ifname, timeout)


def _wait_forwarding(host: Netlink, host_ifname: str, timeout: float,
                     state: int | None = None) -> bool:
    """``state``: the port state already read (saves the first request)."""
    deadline = time.monotonic() + timeout
    pause = 0.0002
    while True:
        if state is None:
            state = host.bridge_port_state(host_ifname)
        if state == BR_STATE_FORWARDING:
            return True
        if time.monotonic() >= deadline:
            log.warning("l2: bridge port %s is not forwarding after %g s", host_ifname, timeout)
            return False
        time.sleep(pause)
        pause = min(pause * 2, 0.005)
        state = None


def configure(container_netns: str, container_ifname: str, address: str,
              gateway: str | None, routes: Sequence[RouteArg] = (), *,
              garp: bool = True) -> None:
    """Address the container end, add its routes (``proto netd``), announce it; idempotent.

    ``address`` is ``ip/prefix``; the default route goes via ``gateway``;
    ``routes`` are ``"dst"`` (via the gateway, as CNI means it) or
    ``("dst", gw)``. A gateway outside the subnet is used ``onlink``. Then one
    gratuitous ARP so switches and neighbours learn the MAC at once.
    """
    iface = _interface(address)
    specs = _route_specs(routes, gateway)
    _check_gateways(iface, gateway, specs)
    with Netlink(container_netns) as ctr:
        link = ctr.link(container_ifname)
        if link is None:
            raise LinkNotFound(f"{container_ifname} does not exist in {container_netns}")
        _configure(ctr, container_ifname, link.index, iface, gateway, specs)
        if garp and iface.version == 4 and link.mac:
            send_gratuitous_arp(container_netns, container_ifname, str(iface.ip), mac=link.mac)


def _configure(ctr: Netlink, ifname: str, index: int,
               iface: ipaddress.IPv4Interface | ipaddress.IPv6Interface, gateway: str | None,
               specs: Sequence[tuple[str, str | None]]) -> None:
    """The address and the routes of interface ``index``: one request each."""
    broadcast = None
    if iface.version == 4 and iface.network.prefixlen < 31:
        broadcast = str(iface.network.broadcast_address)
    ctr.add_address(index, Address(str(iface), broadcast=broadcast))
    if gateway:
        default = "0.0.0.0/0" if iface.version == 4 else "::/0"
        ctr.add_route(_container_route(default, gateway, ifname, iface), oif=index)
    for dst, gw in specs:
        ctr.add_route(_container_route(dst, gw, ifname, iface), oif=index)


def _container_sockets(with_packet: bool) -> tuple[socket.socket, socket.socket | None]:
    """A netlink socket and (``with_packet``) a packet socket, made in this thread's namespace."""
    nl = netlink_socket()
    try:
        return nl, packet_socket() if with_packet else None
    except BaseException:
        nl.close()
        raise


def attach(container_netns: str, container_ifname: str, host_ifname: str, bridge: str,
           address: str, mac: str, gateway: str | None, routes: Sequence[RouteArg] = (), *,
           host_netns: HostArg = None, container_id: str | None = None,
           dad_timeout: float | None = None, garp: bool = True,
           mtu: int | None = None, port_timeout: float = 2.0,
           pending: PendingAttach | None = None) -> Attachment:
    """Plug a container into ``bridge``: :func:`plumb`, duplicate detection, :func:`configure`.

    Before anything goes on the wire it waits (up to ``port_timeout``) for
    the bridge port to forward (:func:`wait_forwarding`). With
    ``dad_timeout``, the container end then probes the wire for the IPv4
    address (:func:`dad_probe`) while the address and routes are configured
    on it, IFF_NOARP meanwhile so the kernel claims nothing on the wire
    before the probe has found the address free; when another machine
    answers, :class:`AddressConflict` names its MAC. Then one gratuitous ARP.
    Any failure removes the veth again: a failed attach leaves nothing behind.

    ``pending``: the veth :func:`prepare_attach` made for these names (it is
    closed here, whatever happens); without it the veth is made here, the
    container's namespace entered once for both sockets (netlink, and the
    packet socket that probes and announces).
    """
    iface = _interface(address)
    mac = normalize_mac(mac)
    specs = _route_specs(routes, gateway)
    _check_gateways(iface, gateway, specs)
    probe = bool(dad_timeout) and iface.version == 4
    announce = garp and iface.version == 4
    if pending is None:
        pending = prepare_attach(container_netns, container_ifname, host_ifname, bridge,
                                 host_netns=host_netns, container_id=container_id, mac=mac,
                                 mtu=mtu)
    elif (pending.container_netns, pending.container_ifname, pending.host_ifname,
          pending.bridge) != (container_netns, container_ifname, host_ifname, bridge):
        pending.close()
        raise ValueError("the pending attachment is for another interface")
    arp: ArpSocket | None = None
    with pending:
        host, ctr = pending.host, pending.ctr
        assert host is not None and ctr is not None
        try:
            host_index, state = _finish_pair(pending, mac, noarp=probe)
            if probe or announce:
                _wait_forwarding(host, host_ifname, port_timeout, state)
            index = pending.index or ctr.index(container_ifname)
            packet = pending.take_packet()
            if packet is not None and (probe or announce):
                arp = ArpSocket(container_ifname, listen=probe, mac=mac, sock=packet)
            elif packet is not None:
                close_later(packet)
            if arp is not None and probe:
                holder = _dad(arp, str(iface.ip), float(dad_timeout or 0), meanwhile=(
                    lambda: _configure(ctr, container_ifname, index, iface, gateway, specs)))
                if holder is not None:
                    raise AddressConflict(str(iface.ip), holder)
                ctr.set_link(container_ifname, noarp=False)
            else:
                _configure(ctr, container_ifname, index, iface, gateway, specs)
            if arp is not None and announce:
                arp.send(announce_frame(mac, str(iface.ip)))
        except BaseException:
            host.delete_link(host_ifname)
            raise
        finally:
            if arp is not None:
                arp.close()
    alias = owner_alias(container_id, container_ifname) if container_id else None
    return Attachment(container_netns, container_ifname, host_ifname, bridge, str(iface), mac,
                      gateway, tuple(specs), index, host_index, pending.mtu, alias)


def check_attachment(att: Attachment, *, host_netns: HostArg = None) -> list[str]:
    """What is missing or wrong in an attachment (CNI CHECK); empty when all is in place."""
    problems: list[str] = []
    with handle(host_netns) as host:
        end = host.link(att.host_ifname)
        if end is None:
            problems.append(f"host interface {att.host_ifname} is missing")
        else:
            if end.master != att.bridge:
                problems.append(f"{att.host_ifname} is not on {att.bridge} "
                                f"(master {end.master})")
            if not end.up:
                problems.append(f"{att.host_ifname} is down")
    try:
        ctr = Netlink(att.container_netns)
    except NetnsNotFound:
        return [*problems, f"network namespace {att.container_netns} is gone"]
    with ctr:
        link = ctr.link(att.container_ifname)
        if link is None:
            return [*problems, f"{att.container_ifname} is missing in {att.container_netns}"]
        if normalize_mac(link.mac or "00:00:00:00:00:00") != normalize_mac(att.mac):
            problems.append(f"{att.container_ifname} has MAC {link.mac}, expected {att.mac}")
        if not link.up:
            problems.append(f"{att.container_ifname} is down")
        iface = _interface(att.address)
        have = {a.cidr for a in ctr.addresses(att.container_ifname)}
        if str(iface) not in have:
            problems.append(f"{att.container_ifname} lacks address {iface} "
                            f"(has {', '.join(sorted(have)) or 'none'})")
        routes = ctr.routes(att.container_ifname)
        wanted = list(att.routes)
        if att.gateway:
            wanted.insert(0, ("0.0.0.0/0" if iface.version == 4 else "::/0", att.gateway))
        for dst, gw in wanted:
            net = ipaddress.ip_network(dst, strict=False)
            if not any(r.network == net and r.gateway == gw for r in routes):
                shown = "default" if net.prefixlen == 0 else str(net)
                problems.append(f"route {shown} via {gw} dev {att.container_ifname} is missing")
    return problems


def _container_route(dst: str, gw: str | None, ifname: str,
                     iface: ipaddress.IPv4Interface | ipaddress.IPv6Interface) -> Route:
    route = container_route(dst, gw, ifname)
    if gw and ipaddress.ip_address(gw) not in iface.network:
        # a gateway outside the subnet is reached on the link directly
        route = Route(route.dst, gw, ifname, route.metric, route.proto, route.scope,
                      route.table, onlink=True)
    return route


def is_netd_host_link(link: Link) -> bool:
    """A host end netd made: a veth with netd's name prefix or owner alias."""
    return link.kind == "veth" and (link.name.startswith(HOST_IFNAME_PREFIX)
                                    or parse_owner_alias(link.alias) is not None)


def detach(host_ifname: str, *, host_netns: HostArg = None, timeout: float = 30.0) -> bool:
    """Remove a container's veth by its host end; False when it was already gone.

    Idempotent: deleting the host end removes the container end too, and when
    the container's namespace is gone the kernel has removed both already.
    Refuses to delete anything that is not a netd host end (:func:`is_netd_host_link`).

    Returns as soon as the kernel reports the host end unregistered (both ends
    are then gone from their namespaces, down, without addresses or routes).
    The ``RTM_DELLINK`` request itself returns only after the kernel has also
    freed the devices, an RCU barrier later (10-20 ms here, more on a busy
    host); a thread waits for that in the background.
    """
    with handle(host_netns) as nl:
        got = nl.link_brief(host_ifname)
        if got is None:
            return False
        link = got[0]
        if not is_netd_host_link(link):
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


def host_links(bridge: str | None = None, *, host_netns: HostArg = None) -> list[Link]:
    """The host ends netd made (optionally only those on ``bridge``), for reconciliation."""
    with handle(host_netns) as nl:
        return [link for link in nl.links() if is_netd_host_link(link)
                and (bridge is None or link.master == bridge)]


# --------------------------------------------------------------------------- iptables


def _forward_rule(bridge: str) -> list[str]:
    return ["FORWARD", "-i", bridge, "-o", bridge, "-m", "comment", "--comment",
            RULE_COMMENT.format(bridge=bridge), "-j", "ACCEPT"]


def _iptables(tool: str, args: list[str], netns: str | None) -> subprocess.CompletedProcess[str]:
    cmd = [tool, "-w", "5", *args]
    return run_in_netns(netns, lambda: subprocess.run(cmd, capture_output=True, text=True,
                                                       check=False, timeout=30))


def ensure_bridge_forwarding(bridge: str, *, netns: str | None = None) -> bool:
    """Accept frames bridged on ``bridge`` in the FORWARD chain (IPv4 and IPv6); idempotent.

    Needed when dockerd has set the FORWARD policy to DROP and br_netfilter
    passes bridged frames through iptables (``bridge-nf-call-iptables=1``).
    Rules are per network namespace: they go into ``netns`` (the host's).
    Inserts at the top one rule, commented "netd: ...", if it is missing;
    returns True when it inserted one.
    """
    changed = False
    rule = _forward_rule(bridge)
    for tool in ("iptables", "ip6tables"):
        path = shutil.which(tool)
        if path is None:
            log.warning("l2: %s not found; cannot make sure %s forwards bridged frames",
                        tool, bridge)
            continue
        if _iptables(path, ["-C", *rule], netns).returncode == 0:
            continue
        done = _iptables(path, ["-I", rule[0], "1", *rule[1:]], netns)
        if done.returncode != 0:
            raise DataplaneError(f"{tool}: cannot accept forwarding on {bridge}: "
                                 f"{done.stderr.strip()}")
        log.info("l2: %s: accepting frames bridged on %s", tool, bridge)
        changed = True
    return changed


def remove_bridge_forwarding(bridge: str, *, netns: str | None = None) -> bool:
    """Remove netd's FORWARD rules for ``bridge`` (every copy); True when one was removed."""
    removed = False
    rule = _forward_rule(bridge)
    for tool in ("iptables", "ip6tables"):
        path = shutil.which(tool)
        if path is None:
            continue
        while _iptables(path, ["-D", *rule], netns).returncode == 0:
            removed = True
    return removed


__all__ = [
    "AddAddress",
    "Attachment",
    "CreateBridge",
    "DelAddress",
    "DelRoute",
    "DeleteLink",
    "L2State",
    "Plan",
    "ReplaceRoute",
    "SetMac",
    "SetMaster",
    "SetUp",
    "Step",
    "TakeoverResult",
    "apply_plan",
    "apply_takeover",
    "arp_resolve",
    "attach",
    "check_attachment",
    "configure",
    "dad_probe",
    "default_gateway",
    "detach",
    "ensure_bridge_forwarding",
    "gateway_answers_arp",
    "host_ifname_for",
    "host_links",
    "plan_rollback",
    "plan_takeover",
    "plumb",
    "read_state",
    "remove_bridge_forwarding",
    "rollback",
    "send_gratuitous_arp",
    "takeover",
    "wait_forwarding",
]
