"""The hand-written netlink encoder and parser (netd.dataplane.netlink) against pyroute2's.

Every request :class:`Netlink` builds is captured from a fake socket and decoded with
pyroute2's message classes (``ifinfmsg``, ``ifaddrmsg``, ``rtmsg``); every message it
parses is built with them. No root and no kernel needed: the codec is fast because it is
hand-written, and these round trips keep it right.
"""

from __future__ import annotations

import socket
import struct
from typing import Any

import pytest
from pyroute2.netlink.rtnl.ifaddrmsg import ifaddrmsg
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg
from pyroute2.netlink.rtnl.rtmsg import rtmsg

from netd.dataplane.errors import DataplaneError, LinkExists, LinkNotFound
from netd.dataplane.model import RTPROT_NETD, Address, Route
from netd.dataplane.netlink import (
    IFF_NOARP,
    IFF_UP,
    NLM_F_ACK,
    NLM_F_CREATE,
    NLM_F_DUMP,
    NLM_F_EXCL,
    NLM_F_REPLACE,
    NLM_F_REQUEST,
    RTM_DELADDR,
    RTM_DELLINK,
    RTM_DELROUTE,
    RTM_GETADDR,
    RTM_GETLINK,
    RTM_GETROUTE,
    RTM_NEWADDR,
    RTM_NEWLINK,
    RTM_NEWROUTE,
    RTM_SETLINK,
    Netlink,
    parse_link,
)
from netd.dataplane.veth import container_route, interface

HDR = struct.Struct("=IHHII")


def encode(cls: Any, msg_type: int, seq: int, **fields: Any) -> bytes:
    """A message as pyroute2 encodes it (``fields``: the message's own, and ``attrs``)."""
    attrs = fields.pop("attrs", [])
    m = cls()
    for k, v in fields.items():
        m[k] = v
    m["attrs"] = attrs
    m["header"] = {"type": msg_type, "flags": 0, "sequence_number": seq, "pid": 0}
    m.encode()
    return bytes(m.data)


def error(seq: int, code: int = 0, message: str | None = None) -> bytes:
    """An NLMSG_ERROR as the kernel sends it (linux/netlink.h): ``struct nlmsgerr`` (the
    error, then the request's header: NLM_F_CAPPED, no payload), then with NLM_F_ACK_TLVS
    the extended ack's NLMSGERR_ATTR_MSG. (pyroute2 decodes these but cannot encode the
    echoed header, so this one is written by hand.)"""
    tlvs = b""
    if message:
        text = message.encode() + b"\0"
        tlvs = struct.pack("=HH", 4 + len(text), 1) + text + b"\0" * (-len(text) % 4)
    body = struct.pack("=i", -code) + HDR.pack(16, 0, 0, seq, 0) + tlvs
    flags = 0x100 | (0x200 if message else 0)
    return HDR.pack(16 + len(body), 2, flags, seq, 0) + body


class FakeSocket:
    """What the kernel would answer: an ACK, or the messages queued for the next request."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.replies: list[list[bytes] | int | tuple[int, str]] = []
        self._pending: list[bytes] = []

    def send(self, data: bytes) -> int:
        self.sent.append(data)
        seq = HDR.unpack_from(data)[3]
        reply = self.replies.pop(0) if self.replies else []
        if isinstance(reply, int):
            self._pending = [error(seq, reply)]
        elif isinstance(reply, tuple):
            self._pending = [error(seq, reply[0], reply[1])]
        else:
            body = b"".join(self._reseq(m, seq) for m in reply)
            flags = HDR.unpack_from(data)[2]
            if flags & NLM_F_DUMP == NLM_F_DUMP:
                self._pending = [body + HDR.pack(20, 3, 2, seq, 0) + b"\0" * 4]
            else:  # the answer, then the ACK the request asked for
                self._pending = [body + error(seq)]
        return len(data)

    @staticmethod
    def _reseq(msg: bytes, seq: int) -> bytes:
        length, mtype, flags, _, pid = HDR.unpack_from(msg)
        return HDR.pack(length, mtype, flags, seq, pid) + msg[16:]

    def recv(self, size: int) -> bytes:
        return self._pending.pop(0)

    def close(self) -> None:
        pass


def handle() -> tuple[Netlink, FakeSocket]:
    sock = FakeSocket()
    return Netlink(sock=sock), sock  # type: ignore[arg-type]


def decoded(cls: Any, data: bytes) -> Any:
    m = cls(data)
    m.decode()
    return m


def header(data: bytes) -> tuple[int, int]:
    """(type, flags) of a request."""
    _, mtype, flags, _, _ = HDR.unpack_from(data)
    return mtype, flags


# ------------------------------------------------------------------ links


def test_create_bridge() -> None:
    nl, sock = handle()
    nl.create_bridge("br0", mac="02:00:C6:12:00:0B", mtu=9000)
    mtype, flags = header(sock.sent[0])
    assert mtype == RTM_NEWLINK and flags == NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL
    m = decoded(ifinfmsg, sock.sent[0])
    assert m["flags"] & IFF_UP and m["change"] & IFF_UP
    assert m.get_attr("IFLA_IFNAME") == "br0" and m.get_attr("IFLA_MTU") == 9000
    assert m.get_attr("IFLA_ADDRESS") == "02:00:c6:12:00:0b"
    info = m.get_attr("IFLA_LINKINFO")
    assert info.get_attr("IFLA_INFO_KIND") == "bridge"
    data = info.get_attr("IFLA_INFO_DATA")
    assert data.get_attr("IFLA_BR_STP_STATE") == 0
    assert data.get_attr("IFLA_BR_FORWARD_DELAY") == 0


def test_create_veth_with_its_peer_in_one_message() -> None:
    nl, sock = handle()
    nl.create_veth("ndv0123456789ab", "eth0", peer_mac="0a:58:c6:12:00:32", mtu=1450,
                   master=7, up=True, mac="02:00:00:00:00:01")
    m = decoded(ifinfmsg, sock.sent[0])
    assert header(sock.sent[0])[1] & NLM_F_EXCL
    assert m.get_attr("IFLA_IFNAME") == "ndv0123456789ab"
    assert (m.get_attr("IFLA_MASTER"), m.get_attr("IFLA_MTU")) == (7, 1450)
    assert m.get_attr("IFLA_ADDRESS") == "02:00:00:00:00:01" and m["flags"] & IFF_UP
    info = m.get_attr("IFLA_LINKINFO")
    assert info.get_attr("IFLA_INFO_KIND") == "veth"
    peer = info.get_attr("IFLA_INFO_DATA").get_attr("VETH_INFO_PEER")
    assert peer.get_attr("IFLA_IFNAME") == "eth0"
    assert peer.get_attr("IFLA_ADDRESS") == "0a:58:c6:12:00:32"
    assert peer.get_attr("IFLA_MTU") == 1450


def test_set_link_changes_several_things_by_name_in_one_request() -> None:
    nl, sock = handle()
    nl.set_link("eth0", up=True, noarp=False, alias="netd:br0:c:eth0", mac="0a:58:c6:12:00:32",
                mtu=1500, master=0)
    mtype, _ = header(sock.sent[0])
    m = decoded(ifinfmsg, sock.sent[0])
    assert mtype == RTM_SETLINK and m["index"] == 0
    assert m["flags"] == IFF_UP and m["change"] == IFF_UP | IFF_NOARP
    assert m.get_attr("IFLA_IFNAME") == "eth0"
    assert m.get_attr("IFLA_IFALIAS") == "netd:br0:c:eth0"
    assert m.get_attr("IFLA_ADDRESS") == "0a:58:c6:12:00:32"
    assert (m.get_attr("IFLA_MTU"), m.get_attr("IFLA_MASTER")) == (1500, 0)
    nl.set_noarp("eth0", True)
    m = decoded(ifinfmsg, sock.sent[1])
    assert m["flags"] == IFF_NOARP and m["change"] == IFF_NOARP


def test_delete_link_by_name_and_by_index_and_gone_is_false() -> None:
    nl, sock = handle()
    sock.replies = [[], 19, []]  # ack, ENODEV, ack
    assert nl.delete_link("ndv1") is True
    assert nl.delete_link("ndv1") is False
    assert nl.delete_link_index(42) is True
    assert [header(d)[0] for d in sock.sent] == [RTM_DELLINK] * 3
    assert decoded(ifinfmsg, sock.sent[0]).get_attr("IFLA_IFNAME") == "ndv1"
    by_index = decoded(ifinfmsg, sock.sent[2])
    assert by_index["index"] == 42 and by_index.get_attr("IFLA_IFNAME") is None


def test_parse_link_reads_what_pyroute2_writes() -> None:
    data = encode(ifinfmsg, RTM_NEWLINK, 1, index=9, flags=IFF_UP, attrs=[
        ("IFLA_IFNAME", "ndv0123456789ab"), ("IFLA_ADDRESS", "ee:3c:9a:00:11:22"),
        ("IFLA_MTU", 9000), ("IFLA_MASTER", 4), ("IFLA_IFALIAS", "netd:br0:c1:eth0"),
        ("IFLA_LINKINFO", {"attrs": [
            ("IFLA_INFO_KIND", "veth"), ("IFLA_INFO_SLAVE_KIND", "bridge"),
            ("IFLA_INFO_SLAVE_DATA", {"attrs": [("IFLA_BRPORT_STATE", 3)]})]})])
    link, master, state = parse_link(data)
    assert (link.index, link.name, link.mac, link.kind, link.up, link.mtu, link.alias) == (
        9, "ndv0123456789ab", "ee:3c:9a:00:11:22", "veth", True, 9000, "netd:br0:c1:eth0")
    assert (master, state) == (4, 3)
    bare, master, state = parse_link(encode(ifinfmsg, RTM_NEWLINK, 1, index=1, attrs=[
        ("IFLA_IFNAME", "lo"), ("IFLA_MTU", 65536)]))
    assert (bare.name, bare.kind, bare.mac, bare.up, bare.alias, master, state) == (
        "lo", None, None, False, None, None, None)


def test_link_lookup_and_dump_resolve_masters() -> None:
    nl, sock = handle()
    port = encode(ifinfmsg, RTM_NEWLINK, 0, index=9, attrs=[
        ("IFLA_IFNAME", "ndv1"), ("IFLA_MASTER", 4), ("IFLA_LINKINFO", {"attrs": [
            ("IFLA_INFO_KIND", "veth")]})], flags=IFF_UP)
    bridge = encode(ifinfmsg, RTM_NEWLINK, 0, index=4, attrs=[("IFLA_IFNAME", "br0")])
    sock.replies = [[port], [bridge], [port, bridge]]
    link = nl.link("ndv1")
    assert link is not None and link.master == "br0" and link.kind == "veth"
    get = decoded(ifinfmsg, sock.sent[0])
    assert header(sock.sent[0]) == (RTM_GETLINK, NLM_F_REQUEST | NLM_F_ACK)
    assert get.get_attr("IFLA_IFNAME") == "ndv1"
    assert decoded(ifinfmsg, sock.sent[1])["index"] == 4  # the master, by index
    assert [(x.name, x.master) for x in nl.links()] == [("ndv1", "br0"), ("br0", None)]
    assert header(sock.sent[2]) == (RTM_GETLINK, NLM_F_REQUEST | NLM_F_DUMP)


def test_errors_carry_the_kernels_extended_message() -> None:
    nl, sock = handle()
    sock.replies = [(17, "Device already exists"), (19, "Cannot find device")]
    with pytest.raises(LinkExists, match="Device already exists"):
        nl.create_bridge("br0")
    with pytest.raises(LinkNotFound, match="Cannot find device"):
        nl.set_up("nosuch0")
    sock.replies = [1]
    with pytest.raises(DataplaneError, match="Operation not permitted"):
        nl.set_mtu("eth0", 1500)


# ------------------------------------------------------------------ addresses


def test_add_and_delete_an_address() -> None:
    nl, sock = handle()
    sock.replies = [[], 17, [], 99]
    assert nl.add_address(3, Address("198.18.0.50/24", broadcast="198.18.0.255")) is True
    assert nl.add_address(3, "198.18.0.50/24") is False  # already there
    m = decoded(ifaddrmsg, sock.sent[0])
    assert header(sock.sent[0])[0] == RTM_NEWADDR
    assert (m["family"], m["prefixlen"], m["index"]) == (socket.AF_INET, 24, 3)
    assert m.get_attr("IFA_LOCAL") == m.get_attr("IFA_ADDRESS") == "198.18.0.50"
    assert m.get_attr("IFA_BROADCAST") == "198.18.0.255"
    link = encode(ifinfmsg, RTM_NEWLINK, 0, index=3, attrs=[("IFLA_IFNAME", "eth0")])
    sock.replies = [[link], [], [link], 99]
    assert nl.del_address("eth0", "2001:db8::5/64") is True
    m = decoded(ifaddrmsg, sock.sent[-1])
    assert header(sock.sent[-1])[0] == RTM_DELADDR
    assert (m["family"], m["prefixlen"], m.get_attr("IFA_LOCAL")) == (socket.AF_INET6, 64,
                                                                       "2001:db8::5")
    assert nl.del_address("eth0", "2001:db8::5/64") is False  # EADDRNOTAVAIL: gone


def test_address_dump_is_decoded() -> None:
    nl, sock = handle()
    link = encode(ifinfmsg, RTM_NEWLINK, 0, index=3, attrs=[("IFLA_IFNAME", "eth0")])
    addr = encode(ifaddrmsg, 20, 0, family=socket.AF_INET, prefixlen=24, index=3, scope=0,
                  attrs=[("IFA_LOCAL", "198.18.0.50"), ("IFA_ADDRESS", "198.18.0.50"),
                         ("IFA_BROADCAST", "198.18.0.255")])
    sock.replies = [[link], [addr]]
    assert nl.addresses("eth0") == [Address("198.18.0.50/24", broadcast="198.18.0.255")]
    assert header(sock.sent[1]) == (RTM_GETADDR, NLM_F_REQUEST | NLM_F_DUMP)


# ------------------------------------------------------------------ routes


@pytest.mark.parametrize("route", [
    container_route("0.0.0.0/0", "198.18.0.1", "eth0", interface("198.18.0.50/24")),
    container_route("0.0.0.0/0", "169.254.1.1", "eth0", interface("198.18.0.50/32")),
    container_route("169.254.1.1/32", None, "eth0"),
    Route("198.19.0.0/16", gateway="198.18.0.1", ifname="eth0", metric=50, proto=4),
    Route("198.19.64.0/18", gateway="198.18.0.1", ifname="eth0", table=1000, prefsrc="198.18.0.5"),
    Route("2001:db8:1::/48", gateway="fe80::1", ifname="eth0"),
])
def test_route_requests(route: Route) -> None:
    nl, sock = handle()
    assert nl.add_route(route, oif=5) is True
    m = decoded(rtmsg, sock.sent[0])
    mtype, flags = header(sock.sent[0])
    assert mtype == RTM_NEWROUTE and flags & NLM_F_CREATE and flags & NLM_F_EXCL
    net = route.network
    assert (m["family"], m["dst_len"], m["proto"], m["scope"], m["type"]) == (
        route.family, net.prefixlen, route.proto, route.scope, route.type)
    assert m.get_attr("RTA_DST") == (str(net.network_address) if net.prefixlen else None)
    assert m.get_attr("RTA_OIF") == 5 and m.get_attr("RTA_GATEWAY") == route.gateway
    assert m.get_attr("RTA_PRIORITY") == route.metric
    assert m.get_attr("RTA_PREFSRC") == route.prefsrc
    assert bool(m["flags"] & 4) == route.onlink  # RTNH_F_ONLINK
    if route.table > 255:
        assert m["table"] == 252 and m.get_attr("RTA_TABLE") == route.table
    else:
        assert m["table"] == route.table


def test_replace_and_delete_routes() -> None:
    nl, sock = handle()
    link = encode(ifinfmsg, RTM_NEWLINK, 0, index=5, attrs=[("IFLA_IFNAME", "br0")])
    route = Route("0.0.0.0/0", gateway="198.18.0.1", ifname="br0", proto=3)
    sock.replies = [[link], [], [link], [], [link], 3]
    nl.replace_route(route)
    mtype, flags = header(sock.sent[1])
    assert mtype == RTM_NEWROUTE and flags & NLM_F_REPLACE and not flags & NLM_F_EXCL
    assert decoded(rtmsg, sock.sent[1]).get_attr("RTA_OIF") == 5
    assert nl.del_route(route) is True
    m = decoded(rtmsg, sock.sent[3])
    assert header(sock.sent[3])[0] == RTM_DELROUTE
    assert (m["proto"], m["scope"]) == (0, 255)  # any protocol and scope, as 'ip route del'
    assert m.get_attr("RTA_PREFSRC") is None
    assert nl.del_route(route) is False  # ESRCH: already gone


def test_route_dump_is_decoded_and_multipath_is_reported() -> None:
    nl, sock = handle()
    link = encode(ifinfmsg, RTM_NEWLINK, 0, index=5, attrs=[("IFLA_IFNAME", "eth0")])
    plain = encode(rtmsg, RTM_NEWROUTE, 0, family=socket.AF_INET, dst_len=0, table=254,
                   proto=RTPROT_NETD, scope=0, type=1, flags=4,
                   attrs=[("RTA_TABLE", 254), ("RTA_GATEWAY", "169.254.1.1"), ("RTA_OIF", 5)])
    multi = encode(rtmsg, RTM_NEWROUTE, 0, family=socket.AF_INET, dst_len=8, table=254,
                   proto=4, scope=0, type=1, attrs=[
                       ("RTA_TABLE", 254), ("RTA_DST", "10.0.0.0"),
                       ("RTA_MULTIPATH", [{"oif": 5, "hops": 0, "attrs": [
                           ("RTA_GATEWAY", "198.18.0.1")]}])])
    sock.replies = [[link], [plain, multi], []]
    routes = nl.routes(family=socket.AF_INET)
    assert [str(r) for r in routes] == ["default via 169.254.1.1 dev eth0 proto netd onlink",
                                        "10.0.0.0/8 proto static nexthop via 198.18.0.1"]
    assert routes[1].multipath == ("198.18.0.1",) and routes[1].ifname is None
    assert header(sock.sent[1]) == (RTM_GETROUTE, NLM_F_REQUEST | NLM_F_DUMP)
    sock.replies = [[link], [plain, multi]]
    assert nl.multipath_routes("eth0", family=socket.AF_INET) == [
        "10.0.0.0/8 table 254 multipath via eth0"]
