"""IPAM value types and pure helpers: no I/O here.

Addresses are handled as Python ints inside the domain and stored as
fixed-width 32-digit hex keys (:func:`key`) so that IPv6 /64 pools order and
index correctly in stores whose integers are 64-bit.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import secrets
from dataclasses import dataclass, field
from typing import Any, Literal

from netd.errors import InvalidInput
from netd.text import describe, unsafe_char

Mode = Literal["l2", "vlan", "bgp"]
MODES: tuple[str, ...] = ("l2", "vlan", "bgp")
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$")
HANDLE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@-]{0,252}$")
IFNAME_RE = re.compile(r"^[^\s/:]{1,15}$")
MAC_RE = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
MAX_ID = 255
MAX_NOTE = 255
MAX_LABELS = 32
MAX_ALLOWED = 16
MAX_ROUTES = 32  # a pool's routes go into every allocation's answer
MAX_NAMESERVERS = 8  # resolv.conf reads 3; room for runtimes that rotate
MAX_DNS_ITEMS = 32  # search domains, options
MAX_DOMAIN = 253

#: ranges no pool may overlap: their addresses are never a container's (RFC 6890)
SPECIAL_RANGES: dict[int, tuple[tuple[IPNetwork, str], ...]] = {
    4: tuple((ipaddress.ip_network(n), why) for n, why in (
        ("0.0.0.0/8", "'this network' (unspecified)"), ("127.0.0.0/8", "loopback"),
        ("169.254.0.0/16", "link-local"), ("224.0.0.0/4", "multicast"),
        ("255.255.255.255/32", "the limited broadcast address"))),
    6: tuple((ipaddress.ip_network(n), why) for n, why in (
        ("::/128", "the unspecified address"), ("::1/128", "loopback"),
        ("fe80::/10", "link-local"), ("ff00::/8", "multicast"),
        ("::ffff:0:0/96", "IPv4-mapped"))),
}


# --- addresses -----------------------------------------------------------


def key(value: int) -> str:
    """Store key of an address: 32 hex digits, so string order is numeric order."""
    return format(value, "032x")


def unkey(k: str) -> int:
    return int(k, 16)


def _no_zone(text: str, what: str) -> None:
    if isinstance(text, str) and "%" in text:  # fe80::1%eth0: a zone means one host's link
        raise InvalidInput(f"invalid {what} {text!r}: zone ids ('%...') are not allowed")


def parse_network(text: str) -> IPNetwork:
    _no_zone(text, "CIDR")
    try:
        net = ipaddress.ip_network(text, strict=True)
    except (ValueError, TypeError) as exc:
        raise InvalidInput(f"invalid CIDR {text!r}: {exc}") from None
    return net


def parse_ip(text: str, what: str = "address") -> IPAddress:
    _no_zone(text, what)
    try:
        return ipaddress.ip_address(text)
    except (ValueError, TypeError):
        raise InvalidInput(f"invalid {what} {text!r}") from None


def check_pool_network(net: IPNetwork, what: str = "pool") -> IPNetwork:
    """A pool's subnet must hold container addresses only: none of :data:`SPECIAL_RANGES`."""
    for special, why in SPECIAL_RANGES[net.version]:
        if net.overlaps(special):
            raise InvalidInput(f"{what} {net} overlaps {special}, {why}: its addresses "
                               "cannot be containers'")
    return net


def check_next_hop(addr: IPAddress, what: str) -> IPAddress:
    """A gateway or next hop: a unicast address (link-local is fine for IPv6)."""
    if addr.is_multicast or addr.is_unspecified or (
            addr.version == 4 and int(addr) == 0xFFFFFFFF):
        raise InvalidInput(f"{what} {addr} is not a unicast address")
    return addr


def ip_str(version: int, value: int) -> str:
    if version == 4:
        return str(ipaddress.IPv4Address(value))
    return str(ipaddress.IPv6Address(value))


def usable_bounds(net: IPNetwork) -> tuple[int, int]:
    """First and last address that may ever be handed out.

    IPv4 skips network and broadcast. IPv6 skips the subnet-router anycast
    address (the all-zero host part), as the kernel answers it on routers.
    """
    first = int(net.network_address)
    last = int(net.broadcast_address)
    if net.version == 4:
        return first + 1, last - 1
    return first + 1, last


def usable_size(net: IPNetwork) -> int:
    lo, hi = usable_bounds(net)
    return hi - lo + 1


# --- MACs ----------------------------------------------------------------


def mac_for_ipv4(value: int) -> str:
    """Deterministic locally administered unicast MAC for an IPv4 address.

    0a:58 + the four address octets (the convention ovn-kubernetes uses), so a
    re-used address keeps its MAC and upstream ARP caches stay right.
    """
    octets = value.to_bytes(4, "big")
    return "0a:58:" + ":".join(f"{b:02x}" for b in octets)


def random_mac() -> str:
    """Random locally administered unicast MAC (never in the 0a:58 space)."""
    raw = bytearray(secrets.token_bytes(6))
    raw[0] = (raw[0] & 0xFC) | 0x02
    if raw[0] == 0x0A and raw[1] == 0x58:
        raw[1] = 0x59
    return ":".join(f"{b:02x}" for b in raw)


def normalize_mac(text: str) -> str:
    mac = text.strip().lower().replace("-", ":")
    if not MAC_RE.match(mac):
        raise InvalidInput(f"invalid MAC address {text!r}")
    first = int(mac[:2], 16)
    if first & 1:
        raise InvalidInput(f"MAC address {text!r} is multicast; a unicast MAC is required")
    if mac == "00:00:00:00:00:00":
        raise InvalidInput("MAC address 00:00:00:00:00:00 is not usable")
    return mac


# --- validation ----------------------------------------------------------


def check_name(name: str, what: str = "pool name") -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise InvalidInput(
            f"invalid {what} {name!r}: 1-63 characters of a-z, 0-9, '.', '_', '-', "
            "starting and ending with a letter or digit"
        )
    return name


def check_text(value: str, what: str, limit: int = MAX_ID, required: bool = True) -> str:
    if required and not value:
        raise InvalidInput(f"{what} is required")
    if len(value) > limit:
        raise InvalidInput(f"{what} is longer than {limit} characters")
    bad = unsafe_char(value)
    if bad is not None:
        raise InvalidInput(f"{what} contains {describe(bad)}: control, format (bidirectional "
                           "override, zero width) and separator characters are not allowed")
    return value


def check_handle(handle: str) -> str:
    if not HANDLE_RE.match(handle):
        raise InvalidInput(
            f"invalid handle {handle!r}: 1-253 characters of letters, digits and ._:/@-"
        )
    return handle


def check_ifname(ifname: str) -> str:
    if (not IFNAME_RE.match(ifname) or ifname in (".", "..")
            or len(ifname.encode("utf-8", "replace")) > 15 or not ifname.isprintable()
            or unsafe_char(ifname) is not None):
        raise InvalidInput(
            f"invalid interface name {ifname!r}: 1-15 bytes, printable, no spaces, '/' or ':'"
        )
    return ifname


def check_labels(labels: dict[str, str]) -> dict[str, str]:
    if len(labels) > MAX_LABELS:
        raise InvalidInput(f"at most {MAX_LABELS} labels are allowed")
    for k, v in labels.items():
        check_text(k, "label key", 63)
        check_text(v, f"label {k!r}", MAX_ID, required=False)
    return dict(labels)


def check_vlan(vlan: int) -> int:
    if isinstance(vlan, bool) or not isinstance(vlan, int) or not 1 <= vlan <= 4094:
        raise InvalidInput(f"invalid VLAN {vlan!r}: must be 1-4094")
    return vlan


def parse_range(text: str, net: IPNetwork) -> tuple[int, int]:
    """Parse 'A', 'A-B' or a CIDR inside ``net`` into inclusive int bounds."""
    text = text.strip()
    if "/" in text:
        sub = parse_network(text)
        versions = {sub.version}
        lo, hi = int(sub.network_address), int(sub.broadcast_address)
    elif "-" in text:
        a, b = (parse_ip(part.strip()) for part in text.split("-", 1))
        versions = {a.version, b.version}
        lo, hi = int(a), int(b)
    else:
        addr = parse_ip(text)
        versions = {addr.version}
        lo = hi = int(addr)
    if versions != {net.version}:
        raise InvalidInput(f"{text} is not an IPv{net.version} address or range")
    if lo > hi:
        raise InvalidInput(f"range {text!r} ends before it starts")
    if lo < int(net.network_address) or hi > int(net.broadcast_address):
        raise InvalidInput(f"{text} is outside pool subnet {net}")
    return lo, hi


# --- value types ---------------------------------------------------------


@dataclass(frozen=True)
class Route:
    dst: str
    gw: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"dst": self.dst}
        if self.gw:
            d["gw"] = self.gw
        return d


@dataclass(frozen=True)
class Pool:
    name: str
    cidr: str
    gateway: str
    mode: str = "l2"
    vlan: int | None = None
    labels: dict[str, str] = field(default_factory=dict)
    routes: tuple[Route, ...] = ()
    dns: dict[str, Any] = field(default_factory=dict)
    block_prefix: int | None = None
    created: float = 0.0

    @functools.cached_property
    def network(self) -> IPNetwork:
        return ipaddress.ip_network(self.cidr)

    @property
    def version(self) -> int:
        return self.network.version

    @property
    def size(self) -> int:
        return usable_size(self.network)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "cidr": self.cidr,
            "gateway": self.gateway,
            "mode": self.mode,
            "vlan": self.vlan,
            "labels": dict(self.labels),
            "routes": [r.to_dict() for r in self.routes],
            "dns": dict(self.dns),
            "block_prefix": self.block_prefix,
            "created": self.created,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Pool:
        return cls(
            name=d["name"],
            cidr=d["cidr"],
            gateway=d["gateway"],
            mode=d.get("mode", "l2"),
            vlan=d.get("vlan"),
            labels=dict(d.get("labels") or {}),
            routes=tuple(Route(r["dst"], r.get("gw")) for r in d.get("routes") or ()),
            dns=dict(d.get("dns") or {}),
            block_prefix=d.get("block_prefix"),
            created=float(d.get("created", 0.0)),
        )


@dataclass(frozen=True)
class PoolStats:
    size: int
    reserved: int
    allocated: int

    @property
    def free(self) -> int:
        return self.size - self.reserved - self.allocated

    @property
    def utilisation(self) -> float:
        return 0.0 if self.size == 0 else (self.reserved + self.allocated) / self.size


@dataclass(frozen=True)
class Reservation:
    pool: str
    lo: int
    hi: int
    note: str = ""
    handle: str | None = None
    created: float = 0.0

    @property
    def count(self) -> int:
        return self.hi - self.lo + 1


@dataclass(frozen=True)
class Allocation:
    pool: str
    ip: int
    container_id: str
    ifname: str
    mac: str
    host: str = ""
    netns: str = ""
    handle: str | None = None
    fixed: bool = False
    labels: dict[str, str] = field(default_factory=dict)
    block: int | None = None
    created: float = 0.0
    #: addresses the holder may also send from (a VRRP address): allowed-address-pairs
    allowed: tuple[str, ...] = ()


@dataclass(frozen=True)
class Block:
    pool: str
    lo: int
    hi: int
    host: str
    prefix: int


@dataclass(frozen=True)
class Event:
    id: int
    ts: float
    pool: str
    ip: str
    action: str
    container_id: str = ""
    ifname: str = ""
    host: str = ""
    mac: str = ""
    actor: str = ""
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id, "ts": self.ts, "pool": self.pool, "ip": self.ip,
            "action": self.action, "container_id": self.container_id,
            "ifname": self.ifname, "host": self.host, "mac": self.mac,
            "actor": self.actor, "note": self.note,
        }
