"""The one object callers use for netlink: :class:`Netlink`, a small wrapper over pyroute2.

A handle works in one network namespace: the caller's own (``netns=None``), a
named one (``/run/netns/NAME``) or any namespace file (``/proc/PID/ns/net``, a
CNI ``CNI_NETNS`` path). Opening a handle never creates a namespace.

Namespaces are entered the way Go CNI plugins do it: a short-lived thread calls
``setns(2)`` (network namespaces are per thread), creates the socket and ends.
The socket stays in that namespace. This costs about a millisecond and, unlike
pyroute2's own ``IPRoute(netns=...)``, forks nothing, so it is safe in a
threaded daemon. :func:`run_in_netns` runs any callable that way (packet
sockets, iptables).

Everything is synchronous; from asyncio code call it through an executor
(pyroute2's sync API runs its own event loop and refuses a running one).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import ipaddress
import os
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from pyroute2 import IPRoute
from pyroute2 import netns as pr_netns
from pyroute2.netlink.exceptions import NetlinkError

from netd.dataplane.errors import DataplaneError, LinkExists, LinkNotFound, NetnsNotFound
from netd.dataplane.model import (
    AF_INET,
    AF_INET6,
    RT_SCOPE_LINK,
    RT_SCOPE_UNIVERSE,
    RT_TABLE_LOCAL,
    RT_TABLE_MAIN,
    RTN_UNICAST,
    RTNH_F_ONLINK,
    RTPROT_NETD,
    Address,
    Link,
    Route,
    normalize_mac,
)

T = TypeVar("T")

NETNS_RUN_DIR = "/run/netns"
CLONE_NEWNET = 0x40000000
IFF_UP = 0x1
IFF_NOARP = 0x80
NETLINK_ROUTE = 0

_libc: ctypes.CDLL | None = None


def _setns(fd: int) -> None:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def netns_path(netns: str) -> str:
    """A namespace name (``/run/netns/NAME``) or a path (anything with a ``/``) -> its file."""
    return netns if "/" in netns else os.path.join(NETNS_RUN_DIR, netns)


def open_netns(netns: str) -> int:
    """An O_RDONLY fd on the namespace file; :class:`NetnsNotFound` when it is gone."""
    path = netns_path(netns)
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError as exc:
        raise NetnsNotFound(f"network namespace {netns!r} does not exist ({path})") from exc


def run_in_netns(netns: str | None, fn: Callable[[], T]) -> T:
    """Run ``fn()`` inside the namespace (in a throw-away thread) and return its result.

    Sockets ``fn`` creates stay in that namespace; processes it starts with
    :mod:`subprocess` start there too. ``netns=None`` runs ``fn`` right here.
    """
    if netns is None:
        return fn()
    fd = open_netns(netns)
    result: list[T] = []
    failure: list[BaseException] = []

    def target() -> None:
        try:
            _setns(fd)
            result.append(fn())
        except BaseException as exc:  # handed to the caller's thread
            failure.append(exc)

    try:
        thread = threading.Thread(target=target, name=f"netns:{netns}", daemon=True)
        thread.start()
        thread.join()
    finally:
        os.close(fd)
    if failure:
        raise failure[0]
    return result[0]


def socket_in_netns(netns: str | None, family: int, type_: int, proto: int = 0) -> socket.socket:
    return run_in_netns(netns, lambda: socket.socket(family, type_, proto))


def create_netns(name: str) -> None:
    """Create a named namespace (``/run/netns/NAME``) with its loopback up (labs and tests)."""
    pr_netns.create(name)
    with Netlink(name) as nl:
        nl.set_up("lo")


def remove_netns(name: str) -> bool:
    """Remove a named namespace; False when it was already gone."""
    if name not in pr_netns.listnetns():
        return False
    try:
        pr_netns.remove(name)
    except FileNotFoundError:
        return False
    return True


def list_netns(prefix: str = "") -> list[str]:
    return sorted(n for n in pr_netns.listnetns() if n.startswith(prefix))


def _cidr(ip: str, prefixlen: int) -> str:
    return str(ipaddress.ip_interface(f"{ip}/{prefixlen}"))


class Netlink:
    """A netlink (rtnetlink) handle in one network namespace.

    Lookups by interface name; the "delete" operations succeed when the object
    is already gone, the "add" operations when it is already there as asked.
    """

    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns
        if netns is None:
            self._ipr: Any = IPRoute()
        else:
            sock = socket_in_netns(netns, socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_ROUTE)
            try:
                self._ipr = IPRoute(fileno=sock.fileno())
            except BaseException:
                sock.close()
                raise
            sock.detach()  # the IPRoute owns the descriptor now

    # -- lifecycle ---------------------------------------------------------

    def close(self) -> None:
        self._ipr.close()

    def __enter__(self) -> Netlink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Netlink(netns={self.netns!r})"

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        try:
            yield
        except NetlinkError as exc:
            where = f" in netns {self.netns}" if self.netns else ""
            text = f"{what}{where}: {os.strerror(exc.code)}"
            if exc.code == errno.ENODEV:
                raise LinkNotFound(text) from exc
            if exc.code == errno.EEXIST:
                raise LinkExists(text) from exc
            raise DataplaneError(text) from exc

    # -- links ---------------------------------------------------------------

    def _to_link(self, msg: Any, names: dict[int, str] | None = None) -> Link:
        master_index = msg.get("master")
        master: str | None = None
        if master_index:
            if names is not None and master_index in names:
                master = names[master_index]
            else:
                master = self._name_of(master_index)
        mac = msg.get("address")
        return Link(
            index=int(msg["index"]),
            name=str(msg.get("ifname")),
            mac=str(mac) if mac else None,
            kind=msg.get(("linkinfo", "kind")),
            master=master,
            up=bool(msg["flags"] & IFF_UP),
            mtu=int(msg.get("mtu") or 0),
            alias=msg.get("ifalias"),
        )

    def _name_of(self, index: int) -> str | None:
        try:
            msgs = self._ipr.link("get", index=index)
        except NetlinkError:
            return None
        return str(msgs[0].get("ifname"))

    def links(self) -> list[Link]:
        with self._errors("listing links"):
            msgs = list(self._ipr.link("dump"))
        names = {int(m["index"]): str(m.get("ifname")) for m in msgs}
        return [self._to_link(m, names) for m in msgs]

    def link(self, ifname: str) -> Link | None:
        """The interface, or None when there is none of that name."""
        try:
            msgs = self._ipr.link("get", ifname=ifname)
        except NetlinkError as exc:
            if exc.code == errno.ENODEV:
                return None
            raise DataplaneError(f"reading link {ifname}: {os.strerror(exc.code)}") from exc
        return self._to_link(msgs[0])

    def index(self, ifname: str) -> int:
        """The interface's index; :class:`LinkNotFound` when there is none."""
        link = self.link(ifname)
        if link is None:
            where = f" in netns {self.netns}" if self.netns else ""
            raise LinkNotFound(f"no interface {ifname}{where}")
        return link.index

    def bridge_port_state(self, ifname: str) -> int | None:
        """The STP state of a bridge port (3 = forwarding), None when it is not a port."""
        try:
            msgs = self._ipr.link("get", ifname=ifname)
        except NetlinkError as exc:
            if exc.code == errno.ENODEV:
                return None
            raise DataplaneError(f"reading link {ifname}: {os.strerror(exc.code)}") from exc
        state = msgs[0].get_nested("IFLA_LINKINFO", "IFLA_INFO_SLAVE_DATA", "IFLA_BRPORT_STATE")
        return None if state is None else int(state)

    def create_bridge(self, name: str, *, mac: str | None = None, mtu: int | None = None,
                      up: bool = True) -> None:
        """A Linux bridge without STP (ports forward at once); ``mac`` fixes its address."""
        kwargs: dict[str, Any] = {"ifname": name, "kind": "bridge", "br_stp_state": 0,
                                  "br_forward_delay": 0}
        if mac:
            kwargs["address"] = normalize_mac(mac)
        if mtu:
            kwargs["mtu"] = mtu
        if up:
            kwargs["state"] = "up"
        with self._errors(f"creating bridge {name}"):
            self._ipr.link("add", **kwargs)

    def create_veth(self, ifname: str, peer: str, *, peer_netns: str | None = None,
                    peer_mac: str | None = None, mac: str | None = None,
                    mtu: int | None = None, master: str | int | None = None, up: bool = True,
                    alias: str | None = None) -> None:
        """A veth pair whose ``peer`` end is created directly in ``peer_netns``.

        One RTM_NEWLINK: the peer never exists in this namespace, so nothing has
        to be moved (moving serialises on the rtnl lock and races with other
        adds). This end can be enslaved (``master``) and brought up in the same
        message; the peer comes up later, from a handle in its namespace (the
        kernel ignores IFF_UP in the peer's header).
        """
        peer_spec: dict[str, Any] = {"ifname": peer}
        if peer_mac:
            peer_spec["address"] = normalize_mac(peer_mac)
        if mtu:
            peer_spec["mtu"] = mtu
        kwargs: dict[str, Any] = {"ifname": ifname, "kind": "veth", "peer": peer_spec}
        if mac:
            kwargs["address"] = normalize_mac(mac)
        if mtu:
            kwargs["mtu"] = mtu
        if master is not None:
            kwargs["master"] = master if isinstance(master, int) else self.index(master)
        if up:
            kwargs["state"] = "up"
        fd = open_netns(peer_netns) if peer_netns is not None else None
        try:
            if fd is not None:
                peer_spec["net_ns_fd"] = fd
            with self._errors(f"creating veth {ifname} (peer {peer} in {peer_netns or 'here'})"):
                self._ipr.link("add", **kwargs)
        finally:
            if fd is not None:
                os.close(fd)
        if alias:
            self.set_alias(ifname, alias)

    def set_alias(self, ifname: str, alias: str) -> None:
        with self._errors(f"setting alias of {ifname}"):
            self._ipr.link("set", index=self.index(ifname), ifalias=alias)

    def set_mac(self, ifname: str, mac: str) -> None:
        with self._errors(f"setting MAC of {ifname}"):
            self._ipr.link("set", index=self.index(ifname), address=normalize_mac(mac))

    def set_mtu(self, ifname: str, mtu: int) -> None:
        with self._errors(f"setting MTU of {ifname}"):
            self._ipr.link("set", index=self.index(ifname), mtu=mtu)

    def set_up(self, ifname: str) -> None:
        with self._errors(f"bringing {ifname} up"):
            self._ipr.link("set", index=self.index(ifname), state="up")

    def set_noarp(self, ifname: str, noarp: bool) -> None:
        """IFF_NOARP: the kernel neither answers nor sends ARP on the link."""
        with self._errors(f"setting NOARP on {ifname}"):
            self._ipr.link("set", index=self.index(ifname), flags=IFF_NOARP if noarp else 0,
                           change=IFF_NOARP)

    def set_down(self, ifname: str) -> None:
        with self._errors(f"bringing {ifname} down"):
            self._ipr.link("set", index=self.index(ifname), state="down")

    def set_master(self, ifname: str, master: str | None) -> None:
        """Enslave ``ifname`` to the bridge ``master``; ``None`` releases it."""
        target = self.index(master) if master else 0
        with self._errors(f"setting master of {ifname} to {master or 'none'}"):
            self._ipr.link("set", index=self.index(ifname), master=target)

    def delete_link(self, ifname: str) -> bool:
        """Delete the interface (a veth takes its peer with it); False when already gone."""
        try:
            self._ipr.link("del", ifname=ifname)
        except NetlinkError as exc:
            if exc.code == errno.ENODEV:
                return False
            raise DataplaneError(f"deleting {ifname}: {os.strerror(exc.code)}") from exc
        return True

    # -- addresses -------------------------------------------------------------

    def addresses(self, ifname: str | None = None, family: int | None = None) -> list[Address]:
        return [a for _, a in self._address_msgs(ifname, family)]

    def _address_msgs(self, ifname: str | None,
                      family: int | None) -> list[tuple[str, Address]]:
        names = {link.index: link.name for link in self.links()}
        out: list[tuple[str, Address]] = []
        with self._errors("listing addresses"):
            msgs = list(self._ipr.addr("dump"))
        for msg in msgs:
            name = names.get(int(msg["index"]), "")
            if ifname is not None and name != ifname:
                continue
            if family is not None and msg["family"] != family:
                continue
            ip = msg.get("local") or msg.get("address")
            if not ip:
                continue
            out.append((name, Address(_cidr(ip, int(msg["prefixlen"])),
                                      broadcast=msg.get("broadcast"), scope=int(msg["scope"]))))
        return out

    def add_address(self, ifname: str, address: Address | str) -> bool:
        """Add ``198.18.0.11/24`` (or an :class:`Address`); False when it was already there."""
        addr = address if isinstance(address, Address) else Address(str(address))
        kwargs: dict[str, Any] = {"index": self.index(ifname), "address": addr.ip,
                                  "prefixlen": addr.prefixlen}
        if addr.broadcast:
            kwargs["broadcast"] = addr.broadcast
        if addr.scope != RT_SCOPE_UNIVERSE:
            kwargs["scope"] = addr.scope
        try:
            self._ipr.addr("add", **kwargs)
        except NetlinkError as exc:
            if exc.code == errno.EEXIST:
                return False
            raise DataplaneError(f"adding {addr} to {ifname}: {os.strerror(exc.code)}") from exc
        return True

    def del_address(self, ifname: str, address: Address | str) -> bool:
        """Remove the address; False when it (or the interface) was already gone."""
        addr = address if isinstance(address, Address) else Address(str(address))
        link = self.link(ifname)
        if link is None:
            return False
        try:
            self._ipr.addr("del", index=link.index, address=addr.ip, prefixlen=addr.prefixlen)
        except NetlinkError as exc:
            if exc.code in (errno.EADDRNOTAVAIL, errno.ENODEV, errno.ENOENT):
                return False
            raise DataplaneError(
                f"removing {addr} from {ifname}: {os.strerror(exc.code)}") from exc
        return True

    # -- routes ------------------------------------------------------------------

    def routes(self, ifname: str | None = None, *, family: int | None = None,
               table: int | None = RT_TABLE_MAIN) -> list[Route]:
        """Routes of one table (``table=None``: every table but ``local``), optionally one device.

        Multipath routes are not represented; see :meth:`multipath_routes`.
        """
        return [r for r in self._routes(family, table)[0]
                if ifname is None or r.ifname == ifname]

    def multipath_routes(self, ifname: str, *, family: int | None = None,
                         table: int | None = None) -> list[str]:
        """Descriptions of multipath routes with a next hop through ``ifname``."""
        return [text for text, devs in self._routes(family, table)[1] if ifname in devs]

    def _routes(self, family: int | None,
                table: int | None) -> tuple[list[Route], list[tuple[str, set[str]]]]:
        names = {link.index: link.name for link in self.links()}
        routes: list[Route] = []
        multipath: list[tuple[str, set[str]]] = []
        for fam in (AF_INET, AF_INET6) if family is None else (family,):
            with self._errors("listing routes"):
                msgs = list(self._ipr.route("dump", family=fam))
            for msg in msgs:
                tbl = int(msg.get("table") or msg["table"])
                if table is not None and tbl != table:
                    continue
                if table is None and tbl == RT_TABLE_LOCAL:
                    continue
                default = "0.0.0.0" if fam == AF_INET else "::"
                dst = f"{msg.get('dst') or default}/{msg['dst_len']}"
                hops = msg.get("multipath")
                if hops:
                    devs = {names.get(int(h["oif"]), "") for h in hops if h.get("oif")}
                    multipath.append((f"{dst} table {tbl} multipath via "
                                      f"{', '.join(sorted(devs))}", devs))
                    continue
                oif = msg.get("oif")
                routes.append(Route(
                    dst=str(ipaddress.ip_network(dst, strict=False)),
                    gateway=msg.get("gateway"),
                    ifname=names.get(int(oif)) if oif else None,
                    metric=msg.get("priority"),
                    proto=int(msg["proto"]),
                    scope=int(msg["scope"]),
                    table=tbl,
                    prefsrc=msg.get("prefsrc"),
                    type=int(msg["type"]),
                    tos=int(msg["tos"]),
                    onlink=bool(msg["flags"] & RTNH_F_ONLINK),
                ))
        return routes, multipath

    def _route_args(self, route: Route, *, for_delete: bool = False) -> dict[str, Any]:
        net = route.network
        kwargs: dict[str, Any] = {
            "family": route.family,
            "dst": str(net.network_address),
            "dst_len": net.prefixlen,
            "table": route.table,
            "tos": route.tos,
            "type": route.type,
        }
        if route.ifname:
            kwargs["oif"] = self.index(route.ifname)
        if route.gateway:
            kwargs["gateway"] = route.gateway
        if route.metric is not None:
            kwargs["priority"] = route.metric
        if not for_delete:
            kwargs["proto"] = route.proto
            kwargs["scope"] = route.scope
            if route.prefsrc:
                kwargs["prefsrc"] = route.prefsrc
            if route.onlink:
                kwargs["flags"] = RTNH_F_ONLINK
        return kwargs

    def add_route(self, route: Route) -> bool:
        """Add the route; False when an identical one was already there."""
        try:
            self._ipr.route("add", **self._route_args(route))
        except NetlinkError as exc:
            if exc.code == errno.EEXIST:
                return False
            raise DataplaneError(f"adding route {route}: {os.strerror(exc.code)}") from exc
        return True

    def replace_route(self, route: Route) -> None:
        """Add the route, or replace the one with the same destination and metric.

        This is how a route is *moved* to another device without a window
        without it: the kernel swaps the next hop in place.
        """
        with self._errors(f"replacing route {route}"):
            self._ipr.route("replace", **self._route_args(route))

    def del_route(self, route: Route) -> bool:
        """Delete the route (matching its device when it names one); False when already gone."""
        try:
            args = self._route_args(route, for_delete=True)
        except LinkNotFound:
            return False
        try:
            self._ipr.route("del", **args)
        except NetlinkError as exc:
            if exc.code in (errno.ESRCH, errno.ENODEV, errno.ENOENT):
                return False
            raise DataplaneError(f"deleting route {route}: {os.strerror(exc.code)}") from exc
        return True


HostArg = str | Netlink | None


@contextlib.contextmanager
def handle(target: HostArg) -> Iterator[Netlink]:
    """A handle for ``target``: an open :class:`Netlink` is lent (not closed), a name opened."""
    if isinstance(target, Netlink):
        yield target
        return
    with Netlink(target) as nl:
        yield nl


def container_route(dst: str, gateway: str | None, ifname: str,
                    metric: int | None = None) -> Route:
    """A route netd installs in a container (marked with :data:`RTPROT_NETD`)."""
    scope = RT_SCOPE_UNIVERSE if gateway else RT_SCOPE_LINK
    return Route(dst=str(ipaddress.ip_network(dst, strict=False)), gateway=gateway,
                 ifname=ifname, metric=metric, proto=RTPROT_NETD, scope=scope,
                 type=RTN_UNICAST)
