"""The one object callers use for netlink: :class:`Netlink`, rtnetlink over one socket.

A handle works in one network namespace: the caller's own (``netns=None``), a
named one (``/run/netns/NAME``) or any namespace file (``/proc/PID/ns/net``, a
CNI ``CNI_NETNS`` path). Opening a handle never creates a namespace; its socket
is made inside the namespace by :func:`netd.dataplane.netns.run_in_netns`
(a short-lived thread, no fork, unlike pyroute2's ``IPRoute(netns=...)``).

The handle talks to the kernel itself, synchronously, over a plain
``AF_NETLINK`` socket: one ``send`` of the request and the ``recv`` of its
answer. pyroute2's ``IPRoute`` runs an asyncio event loop for every call and
encodes through its generic message classes: 1.5-3 ms of CPU per request
here, against ~0.1 ms this way, and a container ADD makes about ten. The
requests (links, addresses, routes) are encoded here (``_nla`` and friends:
the handful of attributes netd sends); answers about links, read on every
ADD and DEL, are parsed here too (:func:`parse_link`), acknowledgements are
never decoded, and address and route dumps are decoded by pyroute2's message
classes (``ifaddrmsg``, ``rtmsg``). tests/unit/test_netlink_codec.py checks
every message built or parsed here against pyroute2's codecs.

Requests address links by name wherever the kernel allows it (``RTM_SETLINK``,
``RTM_GETLINK`` and ``RTM_DELLINK`` with ``IFLA_IFNAME``), so changing a link
costs one round trip, not a lookup plus the change. :class:`LinkMonitor`
follows a namespace's link events. Everything is synchronous; from asyncio
code call it through an executor.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import itertools
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg
from pyroute2.netlink.rtnl.rtmsg import rtmsg

from netd.dataplane.errors import DataplaneError, LinkExists, LinkNotFound
from netd.dataplane.model import (
    AF_INET,
    AF_INET6,
    RT_TABLE_LOCAL,
    RT_TABLE_MAIN,
    RTNH_F_ONLINK,
    Address,
    Link,
    Route,
    normalize_mac,
)
from netd.dataplane.netns import open_netns, run_in_netns

IFF_UP = 0x1
IFF_NOARP = 0x80
NETLINK_ROUTE = 0


def _cidr(ip: str, prefixlen: int) -> str:
    return str(ipaddress.ip_interface(f"{ip}/{prefixlen}"))


# netlink protocol numbers (linux/netlink.h, linux/rtnetlink.h, linux/if_link.h)
NLMSG_ERROR = 2
RT_SCOPE_NOWHERE = 255
RT_TABLE_COMPAT = 252
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_MULTI = 0x2
NLM_F_ACK = 0x4
NLM_F_DUMP_INTR = 0x10
NLM_F_REPLACE = 0x100
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
NLM_F_DUMP = 0x300
NLM_F_CAPPED = 0x100  # in an NLMSG_ERROR: the request is not echoed
NLM_F_ACK_TLVS = 0x200  # in an NLMSG_ERROR: extended ack attributes follow
NLMSGERR_ATTR_MSG = 1
SOL_NETLINK = 270
NETLINK_CAP_ACK = 10
NETLINK_EXT_ACK = 11
RTMGRP_LINK = 0x1
RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK, RTM_SETLINK = 16, 17, 18, 19
RTM_NEWADDR, RTM_DELADDR, RTM_GETADDR = 20, 21, 22
RTM_NEWROUTE, RTM_DELROUTE, RTM_GETROUTE = 24, 25, 26
IFLA_ADDRESS = 1
IFLA_IFNAME = 3
IFLA_MTU = 4
IFLA_MASTER = 10
IFLA_LINKINFO = 18
IFLA_IFALIAS = 20
IFLA_NET_NS_FD = 28
IFLA_INFO_KIND = 1
IFLA_INFO_DATA = 2
IFLA_INFO_SLAVE_DATA = 5
IFLA_BR_FORWARD_DELAY = 1
IFLA_BR_STP_STATE = 5
IFLA_BRPORT_STATE = 1
VETH_INFO_PEER = 1
IFA_ADDRESS = 1
IFA_LOCAL = 2
IFA_BROADCAST = 4
RTA_DST = 1
RTA_OIF = 4
RTA_GATEWAY = 5
RTA_PRIORITY = 6
RTA_PREFSRC = 7
RTA_MULTIPATH = 9
RTA_TABLE = 15
NLA_TYPE_MASK = 0x3FFF

_HDR = struct.Struct("=IHHII")  # nlmsghdr: length, type, flags, sequence, port id
_IFINFO = struct.Struct("=BxHiII")  # ifinfomsg: family, type, index, flags, change
_IFADDR = struct.Struct("=BBBBI")  # ifaddrmsg: family, prefix length, flags, scope, index
_RTNH = struct.Struct("=HBBi")  # rtnexthop: length, flags, hops, ifindex
_RTMSG = struct.Struct("=BBBBBBBBI")  # rtmsg: family, dst len, src len, tos, table,
#                                       protocol, scope, type, flags
_NLA = struct.Struct("=HH")
_U32 = struct.Struct("=I")
_I32 = struct.Struct("=i")
RECV_SIZE = 1 << 16  # the kernel fills at most 32 KiB per datagram of a dump
SOCKET_BUFFER = 1 << 20
DUMP_RETRIES = 5


def _align(n: int) -> int:
    return (n + 3) & ~3


def _nla(kind: int, payload: bytes) -> bytes:
    """One netlink attribute (nested ones are attributes of attributes)."""
    length = 4 + len(payload)
    return _NLA.pack(length, kind) + payload + b"\0" * (-length % 4)


def _nla_u32(kind: int, value: int) -> bytes:
    return _nla(kind, _U32.pack(value))


def _nla_str(kind: int, value: str, *, nul: bool = True) -> bytes:
    return _nla(kind, value.encode() + (b"\0" if nul else b""))


def _nla_mac(kind: int, mac: str) -> bytes:
    return _nla(kind, bytes.fromhex(normalize_mac(mac).replace(":", "")))


def _nla_ip(kind: int, ip: str) -> bytes:
    return _nla(kind, ipaddress.ip_address(ip).packed)


def _ifinfo(index: int = 0, flags: int = 0, change: int = 0) -> bytes:
    return _IFINFO.pack(0, 0, index, flags, change)


def _attrs(data: bytes, offset: int, end: int) -> dict[int, bytes]:
    """The netlink attributes in ``data[offset:end]``: {type: payload} (first of each type)."""
    out: dict[int, bytes] = {}
    while offset + 4 <= end:
        length, kind = _NLA.unpack_from(data, offset)
        if length < 4:
            break
        out.setdefault(kind & NLA_TYPE_MASK, data[offset + 4:offset + length])
        offset += _align(length)
    return out


def _asciiz(raw: bytes | None) -> str | None:
    return None if raw is None else raw.split(b"\0", 1)[0].decode("utf-8", "replace")


def parse_link(data: bytes, offset: int = 0) -> tuple[Link, int | None, int | None]:
    """One RTM_NEWLINK message -> (Link with ``master`` unresolved, master index, port state).

    Reads the header and the few attributes a :class:`Link` holds; the bridge
    port state (``IFLA_BRPORT_STATE``) is None when the link is no bridge port.
    """
    length = _HDR.unpack_from(data, offset)[0]
    _family, _type, index, flags, _change = _IFINFO.unpack_from(data, offset + 16)
    attrs = _attrs(data, offset + 32, offset + length)
    mac_raw = attrs.get(IFLA_ADDRESS)
    mac = ":".join(f"{b:02x}" for b in mac_raw) if mac_raw and len(mac_raw) == 6 else None
    mtu = _U32.unpack(attrs[IFLA_MTU][:4])[0] if IFLA_MTU in attrs else 0
    master = _U32.unpack(attrs[IFLA_MASTER][:4])[0] if IFLA_MASTER in attrs else None
    kind = None
    port_state = None
    info_raw = attrs.get(IFLA_LINKINFO)
    if info_raw is not None:
        info = _attrs(info_raw, 0, len(info_raw))
        kind = _asciiz(info.get(IFLA_INFO_KIND))
        slave = info.get(IFLA_INFO_SLAVE_DATA)
        if slave is not None:
            state = _attrs(slave, 0, len(slave)).get(IFLA_BRPORT_STATE)
            port_state = state[0] if state else None
    link = Link(index=index, name=_asciiz(attrs.get(IFLA_IFNAME)) or "", mac=mac, kind=kind,
                master=None, up=bool(flags & IFF_UP), mtu=mtu,
                alias=_asciiz(attrs.get(IFLA_IFALIAS)))
    return link, master or None, port_state


class _Raw:
    """An undecoded message: the bytes of one netlink message of an answer."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data


def netlink_socket(groups: int = 0) -> socket.socket:
    """A bound rtnetlink socket in the calling thread's namespace (``groups``: multicast)."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                         NETLINK_ROUTE)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
        with contextlib.suppress(OSError):  # older kernels: plain error codes
            sock.setsockopt(SOL_NETLINK, NETLINK_EXT_ACK, 1)
            sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
        sock.bind((0, groups))
    except BaseException:
        sock.close()
        raise
    return sock


class Netlink:
    """A netlink (rtnetlink) handle in one network namespace.

    Lookups by interface name; the "delete" operations succeed when the object
    is already gone, the "add" operations when it is already there as asked.
    One request at a time per handle (a lock serialises threads sharing it).
    ``sock`` hands over a netlink socket already made in ``netns`` (see
    :func:`netlink_socket`); the handle owns and closes it.
    """

    def __init__(self, netns: str | None = None, *, sock: socket.socket | None = None) -> None:
        self.netns = netns
        if sock is None:
            sock = netlink_socket() if netns is None else run_in_netns(netns, netlink_socket)
        self._sock = sock
        self._seq = itertools.count(1)
        self._lock = threading.Lock()

    # -- lifecycle ---------------------------------------------------------

    def close(self) -> None:
        self._sock.close()

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
            text = f"{what}{where}: {exc.args[1] if len(exc.args) > 1 else exc}"
            if exc.code == errno.ENODEV:
                raise LinkNotFound(text) from exc
            if exc.code == errno.EEXIST:
                raise LinkExists(text) from exc
            raise DataplaneError(text) from exc

    # -- the wire --------------------------------------------------------------

    def request(self, msg_type: int, body: bytes, flags: int = 0, *,
                decode: Callable[[bytes], Any] | None = None) -> list[Any]:
        """Send one message (``body``: what follows the netlink header), return the answer.

        ``flags`` adds to NLM_F_REQUEST; without NLM_F_DUMP the kernel is asked
        for an acknowledgement and the call returns when it arrives. A negative
        answer raises :class:`NetlinkError` (with the kernel's extended message
        when it sent one). The answer's messages are decoded by ``decode``
        (default: left as :class:`_Raw`).
        """
        dump = flags & NLM_F_DUMP == NLM_F_DUMP
        flags |= NLM_F_REQUEST | (0 if dump else NLM_F_ACK)
        with self._lock:
            seq = next(self._seq)
            self._sock.send(_HDR.pack(16 + len(body), msg_type, flags, seq, 0) + body)
            return self._answer(seq, decode or _Raw)

    def _answer(self, seq: int, decode: Callable[[bytes], Any]) -> list[Any]:
        out: list[Any] = []
        interrupted = False
        while True:
            data = self._sock.recv(RECV_SIZE)
            offset = 0
            while offset + 16 <= len(data):
                length, mtype, mflags, mseq, _ = _HDR.unpack_from(data, offset)
                if length < 16:
                    break
                end = offset + length
                if mseq != seq:  # an answer to an abandoned request, or an event
                    offset += _align(length)
                    continue
                if mtype == NLMSG_ERROR:
                    code = -_I32.unpack_from(data, offset + 16)[0]
                    if code:
                        raise NetlinkError(code, self._error_text(data, offset, end, code))
                    return out
                if mtype == NLMSG_DONE:
                    if interrupted or mflags & NLM_F_DUMP_INTR:
                        raise _DumpInterrupted
                    return out
                if mflags & NLM_F_DUMP_INTR:
                    interrupted = True
                out.append(decode(data[offset:end]))
                offset += _align(length)

    @staticmethod
    def _error_text(data: bytes, offset: int, end: int, code: int) -> str:
        text = os.strerror(code)
        flags = _HDR.unpack_from(data, offset)[2]
        if flags & NLM_F_ACK_TLVS:
            inner = offset + 20  # our header, the error code
            if flags & NLM_F_CAPPED:
                tlv = inner + 16  # the request's header only
            else:
                tlv = inner + _align(_HDR.unpack_from(data, inner)[0])
            message = _asciiz(_attrs(data, tlv, end).get(NLMSGERR_ATTR_MSG))
            if message:
                text = f"{text} ({message})"
        return text

    def _dump(self, msg_type: int, body: bytes, decode: Callable[[bytes], Any]) -> list[Any]:
        for attempt in range(DUMP_RETRIES):
            try:
                return self.request(msg_type, body, NLM_F_DUMP, decode=decode)
            except _DumpInterrupted:
                if attempt == DUMP_RETRIES - 1:
                    raise DataplaneError(f"netlink dump interrupted {DUMP_RETRIES} times "
                                         "(the kernel's tables keep changing)") from None
        return []

    @staticmethod
    def _decoded(cls: Any) -> Callable[[bytes], Any]:
        """Decode answers with a pyroute2 message class (addresses and routes)."""
        def decode(data: bytes) -> Any:
            msg = cls(data)
            msg.decode()
            return msg
        return decode

    # -- links ---------------------------------------------------------------

    @staticmethod
    def _link_body(ifname: str | None = None, index: int = 0, attrs: bytes = b"",
                   flags: int = 0, change: int = 0) -> bytes:
        name = _nla_str(IFLA_IFNAME, ifname) if ifname else b""
        return _ifinfo(index, flags, change) + name + attrs

    def links(self) -> list[Link]:
        with self._errors("listing links"):
            parsed = [parse_link(raw.data) for raw in self._dump(RTM_GETLINK, _ifinfo(), _Raw)]
        names = {link.index: link.name for link, _, _ in parsed}
        return [self._with_master(link, master, names) for link, master, _ in parsed]

    def _with_master(self, link: Link, master: int | None,
                     names: dict[int, str] | None = None) -> Link:
        if master is None:
            return link
        name = names.get(master) if names is not None else None
        if name is None:
            name = self._name_of(master)
        return Link(link.index, link.name, link.mac, link.kind, name, link.up, link.mtu,
                    link.alias)

    def _get_link(self, ifname: str) -> tuple[Link, int | None, int | None] | None:
        try:
            answer = self.request(RTM_GETLINK, self._link_body(ifname))
        except NetlinkError as exc:
            if exc.code == errno.ENODEV:
                return None
            raise DataplaneError(f"reading link {ifname}: {exc.args[1]}") from exc
        return parse_link(answer[0].data)

    def _name_of(self, index: int) -> str | None:
        try:
            answer = self.request(RTM_GETLINK, self._link_body(index=index))
        except NetlinkError:
            return None
        return parse_link(answer[0].data)[0].name

    def link(self, ifname: str) -> Link | None:
        """The interface, or None when there is none of that name."""
        got = self._get_link(ifname)
        return None if got is None else self._with_master(got[0], got[1])

    def link_brief(self, ifname: str) -> tuple[Link, int | None, int | None] | None:
        """One request: the interface (``master`` unresolved), its master's index, port state."""
        return self._get_link(ifname)

    def index(self, ifname: str) -> int:
        """The interface's index; :class:`LinkNotFound` when there is none."""
        got = self._get_link(ifname)
        if got is None:
            where = f" in netns {self.netns}" if self.netns else ""
            raise LinkNotFound(f"no interface {ifname}{where}")
        return got[0].index

    def bridge_port_state(self, ifname: str) -> int | None:
        """The STP state of a bridge port (3 = forwarding), None when it is not a port."""
        got = self._get_link(ifname)
        return None if got is None else got[2]

    def create_bridge(self, name: str, *, mac: str | None = None, mtu: int | None = None,
                      up: bool = True) -> None:
        """A Linux bridge without STP (ports forward at once); ``mac`` fixes its address."""
        data = _nla_u32(IFLA_BR_STP_STATE, 0) + _nla_u32(IFLA_BR_FORWARD_DELAY, 0)
        attrs = _nla(IFLA_LINKINFO, _nla_str(IFLA_INFO_KIND, "bridge", nul=False)
                     + _nla(IFLA_INFO_DATA, data))
        if mac:
            attrs += _nla_mac(IFLA_ADDRESS, mac)
        if mtu:
            attrs += _nla_u32(IFLA_MTU, mtu)
        body = self._link_body(name, attrs=attrs, flags=IFF_UP if up else 0,
                               change=IFF_UP if up else 0)
        with self._errors(f"creating bridge {name}"):
            self.request(RTM_NEWLINK, body, NLM_F_CREATE | NLM_F_EXCL)

    def create_veth(self, ifname: str, peer: str, *, peer_netns: str | None = None,
                    peer_netns_fd: int | None = None, peer_mac: str | None = None,
                    mac: str | None = None, mtu: int | None = None,
                    master: str | int | None = None, up: bool = True,
                    alias: str | None = None) -> None:
        """A veth pair whose ``peer`` end is created directly in ``peer_netns``.

        One RTM_NEWLINK: the peer never exists in this namespace, so nothing has
        to be moved (moving serialises on the rtnl lock and races with other
        adds). This end can be enslaved (``master``) and brought up in the same
        message; the peer comes up later, from a handle in its namespace (the
        kernel ignores IFF_UP in the peer's header). ``peer_netns_fd``, an open
        descriptor of the peer's namespace, saves opening it again. Raises
        :class:`LinkExists` when either name is taken.
        """
        peer_attrs = _nla_str(IFLA_IFNAME, peer)
        if peer_mac:
            peer_attrs += _nla_mac(IFLA_ADDRESS, peer_mac)
        if mtu:
            peer_attrs += _nla_u32(IFLA_MTU, mtu)
        attrs = b""
        if mac:
            attrs += _nla_mac(IFLA_ADDRESS, mac)
        if mtu:
            attrs += _nla_u32(IFLA_MTU, mtu)
        if master is not None:
            attrs += _nla_u32(IFLA_MASTER, master if isinstance(master, int)
                              else self.index(master))
        fd = peer_netns_fd
        own_fd = fd is None and peer_netns is not None
        if own_fd:
            fd = open_netns(str(peer_netns))
        try:
            if fd is not None:
                peer_attrs += _nla_u32(IFLA_NET_NS_FD, fd)
            attrs += _nla(IFLA_LINKINFO, _nla_str(IFLA_INFO_KIND, "veth", nul=False) + _nla(
                IFLA_INFO_DATA, _nla(VETH_INFO_PEER, _ifinfo() + peer_attrs)))
            body = self._link_body(ifname, attrs=attrs, flags=IFF_UP if up else 0,
                                   change=IFF_UP if up else 0)
            with self._errors(f"creating veth {ifname} (peer {peer} in "
                              f"{peer_netns or 'here'})"):
                self.request(RTM_NEWLINK, body, NLM_F_CREATE | NLM_F_EXCL)
        finally:
            if own_fd and fd is not None:
                os.close(fd)
        if alias:
            self.set_alias(ifname, alias)

    def set_link(self, ifname: str, *, up: bool | None = None, noarp: bool | None = None,
                 alias: str | None = None, mac: str | None = None, mtu: int | None = None,
                 master: int | None = None) -> None:
        """Change several things of a link in one request (addressed by name).

        ``master``: the index of the bridge to enslave it to, 0 to release it.
        """
        flags = change = 0
        if up is not None:
            change |= IFF_UP
            flags |= IFF_UP if up else 0
        if noarp is not None:
            change |= IFF_NOARP
            flags |= IFF_NOARP if noarp else 0
        attrs = b""
        if alias is not None:
            attrs += _nla_str(IFLA_IFALIAS, alias, nul=False)
        if mac is not None:
            attrs += _nla_mac(IFLA_ADDRESS, mac)
        if mtu is not None:
            attrs += _nla_u32(IFLA_MTU, mtu)
        if master is not None:
            attrs += _nla_u32(IFLA_MASTER, master)
        body = self._link_body(ifname, attrs=attrs, flags=flags, change=change)
        with self._errors(f"changing {ifname}"):
            self.request(RTM_SETLINK, body)

    def set_alias(self, ifname: str, alias: str) -> None:
        self.set_link(ifname, alias=alias)

    def set_mac(self, ifname: str, mac: str) -> None:
        self.set_link(ifname, mac=mac)

    def set_mtu(self, ifname: str, mtu: int) -> None:
        self.set_link(ifname, mtu=mtu)

    def set_up(self, ifname: str) -> None:
        self.set_link(ifname, up=True)

    def set_noarp(self, ifname: str, noarp: bool) -> None:
        """IFF_NOARP: the kernel neither answers nor sends ARP on the link."""
        self.set_link(ifname, noarp=noarp)

    def set_down(self, ifname: str) -> None:
        self.set_link(ifname, up=False)

    def set_master(self, ifname: str, master: str | None) -> None:
        """Enslave ``ifname`` to the bridge ``master``; ``None`` releases it."""
        self.set_link(ifname, master=self.index(master) if master else 0)

    def delete_link(self, ifname: str) -> bool:
        """Delete the interface (a veth takes its peer with it); False when already gone."""
        try:
            self.request(RTM_DELLINK, self._link_body(ifname))
        except NetlinkError as exc:
            if exc.code == errno.ENODEV:
                return False
            raise DataplaneError(f"deleting {ifname}: {exc.args[1]}") from exc
        return True

    def delete_link_index(self, index: int) -> bool:
        """:meth:`delete_link` by index; False when already gone."""
        try:
            self.request(RTM_DELLINK, self._link_body(index=index))
        except NetlinkError as exc:
            if exc.code == errno.ENODEV:
                return False
            raise DataplaneError(f"deleting link {index}: {exc.args[1]}") from exc
        return True

    # -- addresses -------------------------------------------------------------

    def addresses(self, ifname: str | None = None, family: int | None = None) -> list[Address]:
        return [a for _, a in self._address_msgs(ifname, family)]

    def _address_msgs(self, ifname: str | None,
                      family: int | None) -> list[tuple[str, Address]]:
        names = {link.index: link.name for link in self.links()}
        out: list[tuple[str, Address]] = []
        with self._errors("listing addresses"):
            msgs = self._dump(RTM_GETADDR, _IFADDR.pack(0, 0, 0, 0, 0),
                              self._decoded(ifaddrmsg))
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

    @staticmethod
    def _addr_body(index: int, addr: Address, *, for_delete: bool = False) -> bytes:
        body = (_IFADDR.pack(addr.family, addr.prefixlen, 0, addr.scope, index)
                + _nla_ip(IFA_LOCAL, addr.ip) + _nla_ip(IFA_ADDRESS, addr.ip))
        if addr.broadcast and not for_delete:
            body += _nla_ip(IFA_BROADCAST, addr.broadcast)
        return body

    def add_address(self, ifname: str | int, address: Address | str) -> bool:
        """Add ``198.18.0.11/24`` (or an :class:`Address`); False when it was already there.

        ``ifname`` may be the interface's index, which saves a lookup.
        """
        addr = address if isinstance(address, Address) else Address(str(address))
        index = ifname if isinstance(ifname, int) else self.index(ifname)
        try:
            self.request(RTM_NEWADDR, self._addr_body(index, addr), NLM_F_CREATE | NLM_F_EXCL)
        except NetlinkError as exc:
            if exc.code == errno.EEXIST:
                return False
            raise DataplaneError(f"adding {addr} to {ifname}: {exc.args[1]}") from exc
        return True

    def del_address(self, ifname: str, address: Address | str) -> bool:
        """Remove the address; False when it (or the interface) was already gone."""
        addr = address if isinstance(address, Address) else Address(str(address))
        got = self._get_link(ifname)
        if got is None:
            return False
        try:
            self.request(RTM_DELADDR, self._addr_body(got[0].index, addr, for_delete=True))
        except NetlinkError as exc:
            if exc.code in (errno.EADDRNOTAVAIL, errno.ENODEV, errno.ENOENT):
                return False
            raise DataplaneError(f"removing {addr} from {ifname}: {exc.args[1]}") from exc
        return True

    # -- routes ------------------------------------------------------------------

    def routes(self, ifname: str | None = None, *, family: int | None = None,
               table: int | None = RT_TABLE_MAIN) -> list[Route]:
        """Routes of one table (``table=None``: every table but ``local``), optionally one device.

        A multipath route comes with its gateways in ``multipath`` and no device (it
        matches no ``ifname``); :meth:`multipath_routes` names them by device.
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
                msgs = self._dump(RTM_GETROUTE, _RTMSG.pack(fam, 0, 0, 0, 0, 0, 0, 0, 0),
                                  self._decoded(rtmsg))
            for msg in msgs:
                if msg["family"] != fam:
                    continue
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
                    gws = tuple(sorted(str(h.get("gateway")) for h in hops
                                       if h.get("gateway")))
                    if gws:  # ECMP: the gateways, the kernel knows their devices
                        routes.append(Route(
                            dst=str(ipaddress.ip_network(dst, strict=False)),
                            metric=msg.get("priority"), proto=int(msg["proto"]),
                            scope=int(msg["scope"]), table=tbl, type=int(msg["type"]),
                            multipath=gws))
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

    def _route_body(self, route: Route, *, for_delete: bool = False,
                    oif: int | None = None) -> bytes:
        net = route.network
        table = route.table if route.table < 256 else RT_TABLE_COMPAT
        if for_delete:  # match any protocol and scope, as ``ip route del`` does
            proto, scope, flags = 0, RT_SCOPE_NOWHERE, 0
        else:
            proto, scope = route.proto, route.scope
            flags = RTNH_F_ONLINK if route.onlink else 0
        body = _RTMSG.pack(route.family, net.prefixlen, 0, route.tos, table, proto, scope,
                           route.type, flags)
        if net.prefixlen:
            body += _nla_ip(RTA_DST, str(net.network_address))
        if route.table >= 256:
            body += _nla_u32(RTA_TABLE, route.table)
        if route.ifname:
            body += _nla_u32(RTA_OIF, oif if oif is not None else self.index(route.ifname))
        if route.gateway:
            body += _nla_ip(RTA_GATEWAY, route.gateway)
        if route.multipath and not for_delete:
            hops = b""
            for gw in route.multipath:  # struct rtnexthop, then its gateway
                attr = _nla_ip(RTA_GATEWAY, gw)
                hops += _RTNH.pack(_RTNH.size + len(attr), 0, 0, 0) + attr
            body += _nla(RTA_MULTIPATH, hops)
        if route.metric is not None:
            body += _nla_u32(RTA_PRIORITY, route.metric)
        if route.prefsrc and not for_delete:
            body += _nla_ip(RTA_PREFSRC, route.prefsrc)
        return body

    def add_route(self, route: Route, *, oif: int | None = None) -> bool:
        """Add the route; False when an identical one was already there.

        ``oif``, the index of ``route.ifname``, saves a lookup.
        """
        try:
            self.request(RTM_NEWROUTE, self._route_body(route, oif=oif),
                         NLM_F_CREATE | NLM_F_EXCL)
        except NetlinkError as exc:
            if exc.code == errno.EEXIST:
                return False
            raise DataplaneError(f"adding route {route}: {exc.args[1]}") from exc
        return True

    def replace_route(self, route: Route) -> None:
        """Add the route, or replace the one with the same destination and metric.

        This is how a route is *moved* to another device without a window
        without it: the kernel swaps the next hop in place.
        """
        with self._errors(f"replacing route {route}"):
            self.request(RTM_NEWROUTE, self._route_body(route), NLM_F_CREATE | NLM_F_REPLACE)

    def del_route(self, route: Route) -> bool:
        """Delete the route (matching its device when it names one); False when already gone."""
        try:
            body = self._route_body(route, for_delete=True)
        except LinkNotFound:
            return False
        try:
            self.request(RTM_DELROUTE, body)
        except NetlinkError as exc:
            if exc.code in (errno.ESRCH, errno.ENODEV, errno.ENOENT):
                return False
            raise DataplaneError(f"deleting route {route}: {exc.args[1]}") from exc
        return True


class _DumpInterrupted(Exception):
    """The kernel's table changed during a dump (NLM_F_DUMP_INTR): dump again."""


class LinkMonitor:
    """Link events (RTNLGRP_LINK) of one namespace, from the moment it is made.

    :meth:`wait_deleted` returns as soon as the kernel reports an interface
    unregistered, which is well before the ``RTM_DELLINK`` request that removes
    it returns: unregistering takes about a millisecond, the request then waits
    for the kernel to free the device (an RCU barrier, 10-20 ms here).
    """

    def __init__(self, netns: str | None = None) -> None:
        def make() -> socket.socket:
            return netlink_socket(RTMGRP_LINK)

        self._sock = make() if netns is None else run_in_netns(netns, make)

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> LinkMonitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def wait_deleted(self, index: int, timeout: float,
                     done: Callable[[], bool] = lambda: False) -> bool:
        """True once interface ``index`` is reported deleted; False on timeout or ``done()``.

        ``done`` is polled every few milliseconds (e.g. "the deleting thread
        finished"): events can be lost when the socket's buffer overflows.
        """
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or done():
                return False
            ready, _, _ = select.select([self._sock], [], [], min(left, 0.005))
            if not ready:
                continue
            try:
                data = self._sock.recv(RECV_SIZE)
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:  # overflow: events lost, rely on done()
                    continue
                raise
            offset = 0
            while offset + 32 <= len(data):
                length, mtype = _HDR.unpack_from(data, offset)[:2]
                if length < 16:
                    break
                if mtype == RTM_DELLINK and _IFINFO.unpack_from(data, offset + 16)[2] == index:
                    return True
                offset += _align(length)


HostArg = str | Netlink | None


@contextlib.contextmanager
def handle(target: HostArg) -> Iterator[Netlink]:
    """A handle for ``target``: an open :class:`Netlink` is lent (not closed), a name opened."""
    if isinstance(target, Netlink):
        yield target
        return
    with Netlink(target) as nl:
        yield nl
