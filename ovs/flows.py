"""The OpenFlow rules of the VLAN mode, as values (pure: no socket, no OVS).

The bridge runs with ``fail_mode=secure`` and these flows only; whatever they
do not let through is dropped, also while the agent is away (no controller
can "fail open", there is none). Two tables, after Neutron's native OVS agent
(its ARP and MAC spoofing tables and its firewall's source checks):

* table 0 (:data:`CLASSIFY`): the uplink trunk and the host's own internal
  port go to ``NORMAL`` (MAC learning, and the VLAN tagging of the ports'
  OVSDB ``tag``/``trunks``); a container port goes to table 10; anything else
  is dropped. A canary flow (:data:`CANARY_COOKIE`) shows that the flows are
  still there: a restarted ovs-vswitchd has none.
* table 10 (:data:`PORT_SECURITY`): per container port, only untagged frames
  from its MAC, ARP only with its MAC and one of its addresses (or 0.0.0.0, an
  RFC 5227 probe) as sender, IPv4 only from its addresses, IPv6 only from its
  addresses and its link-local one (``::`` for duplicate address detection),
  neighbour advertisements only for those, never a router advertisement or a
  redirect; then ``NORMAL``. Everything else from the port is dropped.

Every flow carries a cookie ``netd`` | kind | port (:func:`cookie`): netd's
flows are told from anyone else's, a port's flows are found and removed by
its cookie, and a restart replaces flows in place (an OpenFlow add of the same
match and priority replaces the flow) before it removes the ones nobody wants.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from netd.dataplane.model import eui64_link_local, normalize_mac

CLASSIFY = 0
PORT_SECURITY = 10

NETD = 0x6E657464 << 32  # "netd" in the cookie's high 32 bits
COOKIE_MASK_NETD = 0xFFFFFFFF << 32
KIND_BASE, KIND_PORT, KIND_CANARY = 1, 2, 3
KIND_MASK = 0xFF << 24
PORT_MASK = 0xFFFFFF
CANARY_COOKIE = NETD | KIND_CANARY << 24
CANARY_ETHERTYPE = 0x88B5  # IEEE local experimental: nobody sends it here

OFPP_LOCAL = 0xFFFFFFFE  # the bridge's own internal port
ETH_ARP, ETH_IPV4, ETH_IPV6 = 0x0806, 0x0800, 0x86DD
IPPROTO_ICMPV6 = 58
ND_ROUTER_ADVERT, ND_NEIGHBOR_SOLICIT, ND_NEIGHBOR_ADVERT, ND_REDIRECT = 134, 135, 136, 137
MLDV2_REPORT = 143
OFPVID_NONE = 0  # match: no 802.1Q header


def cookie(kind: int, port: int = 0) -> int:
    return NETD | (kind << 24) | (port & PORT_MASK)


def port_of(value: int) -> int | None:
    """The container port a cookie belongs to (None: not a port flow of netd)."""
    if value & COOKIE_MASK_NETD != NETD or (value & KIND_MASK) >> 24 != KIND_PORT:
        return None
    return value & PORT_MASK


@dataclass(frozen=True)
class Flow:
    """One flow: match fields as os-ken names them (``in_port``, ``eth_src``...), and
    what to do: ``normal``, ``goto`` a table, or drop (neither)."""

    table: int
    priority: int
    match: tuple[tuple[str, int | str], ...]
    cookie: int
    normal: bool = False
    goto: int | None = None

    @property
    def key(self) -> tuple[int, int, tuple[tuple[str, int | str], ...]]:
        """What OpenFlow identifies a flow by (an add with the same key replaces it)."""
        return (self.table, self.priority, tuple(sorted(self.match)))

    def __str__(self) -> str:
        fields = ",".join(f"{k}={_show(v)}" for k, v in self.match)
        action = "NORMAL" if self.normal else (f"goto:{self.goto}" if self.goto is not None
                                               else "drop")
        return (f"cookie={self.cookie:#x} table={self.table} priority={self.priority}"
                f"{',' + fields if fields else ''} actions={action}")


def _show(value: int | str) -> str:
    return hex(value) if isinstance(value, int) and value > 9 else str(value)


Match = dict[str, int | str]


def _flow(table: int, priority: int, ck: int, match: Match, *, normal: bool = False,
          goto: int | None = None) -> Flow:
    return Flow(table, priority, tuple(match.items()), ck, normal, goto)


def base_flows(uplink: int) -> list[Flow]:
    """Table 0 for the trunk (``uplink``'s ofport) and the host's own port."""
    ck = cookie(KIND_BASE)
    return [
        _flow(CLASSIFY, 100, ck, {"in_port": uplink}, normal=True),
        _flow(CLASSIFY, 100, ck, {"in_port": OFPP_LOCAL}, normal=True),
        _flow(CLASSIFY, 1, CANARY_COOKIE, {"eth_type": CANARY_ETHERTYPE}),
        _flow(CLASSIFY, 0, ck, {}),  # the rest: dropped (as the table-miss would, but visibly)
    ]


@dataclass(frozen=True)
class PortSecurity:
    """What one container port may send: its MAC and addresses (allowed ones included)."""

    ofport: int
    mac: str
    addresses: tuple[str, ...]
    owner: str = ""
    extra: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if not 1 <= self.ofport <= 0xFFFF_FF00:
            raise ValueError(f"bad ofport {self.ofport}")
        object.__setattr__(self, "mac", normalize_mac(self.mac))
        for a in (*self.addresses, *self.extra):
            ipaddress.ip_address(a)  # ValueError for anything else

    def ipv4(self) -> list[str]:
        return _family((*self.addresses, *self.extra), 4)

    def ipv6(self) -> list[str]:
        return sorted({*_family((*self.addresses, *self.extra), 6),
                       eui64_link_local(self.mac)}, key=ipaddress.IPv6Address)

    def flows(self) -> list[Flow]:
        """Table 0's jump and table 10's checks for this port."""
        p, mac, ck = self.ofport, self.mac, cookie(KIND_PORT, self.ofport)
        own: Match = {"in_port": p, "eth_src": mac, "vlan_vid": OFPVID_NONE}
        icmp6: Match = {"eth_type": ETH_IPV6, "ip_proto": IPPROTO_ICMPV6}
        v4, v6 = self.ipv4(), self.ipv6()
        out = [_flow(CLASSIFY, 100, ck, {"in_port": p}, goto=PORT_SECURITY)]
        for ip in ("0.0.0.0", *v4) if v4 else ():  # 0.0.0.0: an RFC 5227 probe
            out.append(_flow(PORT_SECURITY, 200, ck, {**own, "eth_type": ETH_ARP,
                                                      "arp_sha": mac, "arp_spa": ip},
                             normal=True))
        for ip in v4:
            out.append(_flow(PORT_SECURITY, 200, ck, {**own, "eth_type": ETH_IPV4,
                                                      "ipv4_src": ip}, normal=True))
        for kind in (ND_ROUTER_ADVERT, ND_REDIRECT):
            out.append(_flow(PORT_SECURITY, 300, ck, {"in_port": p, **icmp6,
                                                      "icmpv6_type": kind}))
        for target in v6:
            out.append(_flow(PORT_SECURITY, 250, ck, {
                **own, **icmp6, "icmpv6_type": ND_NEIGHBOR_ADVERT, "ipv6_nd_target": target},
                normal=True))
        # an advertisement for anyone else's address
        out.append(_flow(PORT_SECURITY, 240, ck, {"in_port": p, **icmp6,
                                                  "icmpv6_type": ND_NEIGHBOR_ADVERT}))
        for kind in (ND_NEIGHBOR_SOLICIT, MLDV2_REPORT):  # duplicate address detection
            out.append(_flow(PORT_SECURITY, 200, ck, {**own, **icmp6, "ipv6_src": "::",
                                                      "icmpv6_type": kind}, normal=True))
        for ip in v6:
            out.append(_flow(PORT_SECURITY, 200, ck, {**own, "eth_type": ETH_IPV6,
                                                      "ipv6_src": ip}, normal=True))
        out.append(_flow(PORT_SECURITY, 1, ck, {"in_port": p}))  # the rest from the port
        return out


def _family(addresses: Iterable[str], version: int) -> list[str]:
    found = {str(ipaddress.ip_address(a)) for a in addresses
             if ipaddress.ip_address(a).version == version}
    return sorted(found, key=ipaddress.ip_address)


def desired(uplink: int | None, ports: Sequence[PortSecurity]) -> list[Flow]:
    """Every flow the bridge should have (base flows only with an uplink)."""
    out = base_flows(uplink) if uplink is not None else []
    for p in ports:
        out += p.flows()
    return out


def stale(present: Iterable[Flow], wanted: Iterable[Flow]) -> list[Flow]:
    """netd's flows present that nobody wants (by key; another cookie counts as stale)."""
    want = {(f.key, f.cookie) for f in wanted}
    return [f for f in present if f.cookie & COOKIE_MASK_NETD == NETD
            and (f.key, f.cookie) not in want]


__all__ = ["CANARY_COOKIE", "CLASSIFY", "OFPP_LOCAL", "PORT_SECURITY", "Flow", "PortSecurity",
           "base_flows", "cookie", "desired", "port_of", "stale"]
