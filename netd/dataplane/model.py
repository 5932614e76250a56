"""Value types the dataplane reads and plans with: links, addresses, routes.

Pure: no netlink here. :mod:`netd.dataplane.netlink` turns kernel messages into
these values, :mod:`netd.dataplane.l2` plans with them, and tests build them by
hand. Each prints like the matching ``ip`` command would show it, so a printed
plan reads like what an operator would type.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass

# The route protocol number that marks routes netd created (``proto 78``; 78 is
# ASCII "N"). Unused by iproute2's rt_protos and by the routing daemons (zebra
# 11, bird 12, babel 42, openr 99, bgp/isis/ospf/rip/eigrp 186-192).
RTPROT_NETD = 78

# Kernel protocol numbers used in decisions and in printing.
RTPROT_KERNEL = 2
RTPROT_RA = 9
RTPROT_NAMES = {
    0: "unspec", 1: "redirect", 2: "kernel", 3: "boot", 4: "static", 8: "gated", 9: "ra",
    10: "mrt", 11: "zebra", 12: "bird", 16: "dhcp", 18: "keepalived", 42: "babel",
    99: "openr", 186: "bgp", 187: "isis", 188: "ospf", 189: "rip", 192: "eigrp",
    RTPROT_NETD: "netd",
}

RT_TABLE_MAIN = 254
RT_TABLE_LOCAL = 255
RT_SCOPE_UNIVERSE = 0
RT_SCOPE_LINK = 253
RT_SCOPE_HOST = 254
RTN_UNICAST = 1
RTN_BLACKHOLE = 6
RTNH_F_ONLINK = 4

AF_INET = int(socket.AF_INET)
AF_INET6 = int(socket.AF_INET6)


@dataclass(frozen=True)
class Link:
    """One network interface as the kernel reports it."""

    index: int
    name: str
    mac: str | None
    kind: str | None = None  # "bridge", "veth", None for physical/unknown
    master: str | None = None  # name of the bridge/bond it is enslaved to
    up: bool = False
    mtu: int = 1500
    alias: str | None = None

    def __str__(self) -> str:
        parts = [f"{self.index}: {self.name}"]
        if self.kind:
            parts.append(f"type {self.kind}")
        parts.append(f"link/ether {self.mac}")
        parts.append(f"mtu {self.mtu}")
        parts.append("UP" if self.up else "DOWN")
        if self.master:
            parts.append(f"master {self.master}")
        return " ".join(parts)


@dataclass(frozen=True)
class Address:
    """An interface address: ``cidr`` is the address with its prefix, e.g. ``198.18.0.11/24``."""

    cidr: str
    broadcast: str | None = None
    scope: int = RT_SCOPE_UNIVERSE

    @property
    def interface(self) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface:
        return ipaddress.ip_interface(self.cidr)

    @property
    def ip(self) -> str:
        return str(self.interface.ip)

    @property
    def prefixlen(self) -> int:
        return self.interface.network.prefixlen

    @property
    def family(self) -> int:
        return AF_INET if self.interface.version == 4 else AF_INET6

    @property
    def link_local(self) -> bool:
        return self.interface.ip.is_link_local and self.interface.version == 6

    def __str__(self) -> str:
        text = self.cidr
        if self.broadcast:
            text += f" brd {self.broadcast}"
        if self.scope == RT_SCOPE_LINK:
            text += " scope link"
        elif self.scope == RT_SCOPE_HOST:
            text += " scope host"
        return text


@dataclass(frozen=True)
class Route:
    """A route; ``dst`` is always a CIDR (``0.0.0.0/0`` for the default route)."""

    dst: str
    gateway: str | None = None
    ifname: str | None = None
    metric: int | None = None
    proto: int = RTPROT_NETD
    scope: int = RT_SCOPE_UNIVERSE
    table: int = RT_TABLE_MAIN
    prefsrc: str | None = None
    type: int = RTN_UNICAST
    tos: int = 0
    onlink: bool = False
    #: next hops of an ECMP route (gateways; the kernel finds their devices);
    #: ``gateway`` is None then
    multipath: tuple[str, ...] = ()

    @property
    def network(self) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
        return ipaddress.ip_network(self.dst, strict=False)

    @property
    def family(self) -> int:
        return AF_INET if self.network.version == 4 else AF_INET6

    @property
    def is_default(self) -> bool:
        return self.network.prefixlen == 0

    def key(self) -> tuple[object, ...]:
        """What identifies the route apart from its device (what ``replace`` matches on)."""
        return (self.family, self.table, self.network, self.tos, self.metric, self.gateway,
                self.type)

    def on(self, ifname: str) -> Route:
        """The same route through another device."""
        return Route(self.dst, self.gateway, ifname, self.metric, self.proto, self.scope,
                     self.table, self.prefsrc, self.type, self.tos, self.onlink)

    def __str__(self) -> str:
        parts = ["default" if self.is_default else str(self.network)]
        if self.gateway:
            parts += ["via", self.gateway]
        if self.ifname:
            parts += ["dev", self.ifname]
        if self.table != RT_TABLE_MAIN:
            parts += ["table", str(self.table)]
        parts += ["proto", RTPROT_NAMES.get(self.proto, str(self.proto))]
        if self.scope == RT_SCOPE_LINK:
            parts += ["scope", "link"]
        elif self.scope == RT_SCOPE_HOST:
            parts += ["scope", "host"]
        if self.prefsrc:
            parts += ["src", self.prefsrc]
        if self.metric is not None:
            parts += ["metric", str(self.metric)]
        if self.onlink:
            parts.append("onlink")
        for gw in self.multipath:
            parts += ["nexthop", "via", gw]
        return " ".join(parts)


def normalize_mac(mac: str) -> str:
    """``AA-BB-cc:dd...`` -> ``aa:bb:cc:dd:ee:ff``; raises ValueError when it is not a MAC."""
    digits = mac.replace(":", "").replace("-", "").replace(".", "").lower()
    if len(digits) != 12 or any(c not in "0123456789abcdef" for c in digits):
        raise ValueError(f"not a MAC address: {mac!r}")
    return ":".join(digits[i:i + 2] for i in range(0, 12, 2))


def eui64_link_local(mac: str) -> str:
    """The IPv6 link-local address the kernel gives an interface with ``mac`` (EUI-64)."""
    b = bytes.fromhex(normalize_mac(mac).replace(":", ""))
    iid = bytes([b[0] ^ 0x02, b[1], b[2], 0xFF, 0xFE, b[3], b[4], b[5]])
    return str(ipaddress.IPv6Address(b"\xfe\x80" + b"\x00" * 6 + iid))
