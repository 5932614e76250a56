"""The fabric's FRR configurations, generated from a small description (pure).

``netd fabric config DESCRIPTION.toml`` writes what operators put on their
switches for the BGP "downward default" design: hosts in one AS peer with their
rack's ToR(s) (another AS, shared by every ToR), the ToRs with the core (a
third AS).

* A **ToR** accepts its hosts dynamically (``bgp listen range`` over the rack's
  host subnet, which it announces to the core), takes from them their blocks
  and single addresses (never a default), and sends them only the default it
  learned from the core plus /32 exceptions (a borrowed address's route). It
  never originates a default on its own: a ToR that lost its uplink and still
  announced one black-holed its rack (measured); with the core's default passed
  down, its hosts move to their other ToR or stop sending.
* The **core** holds every route, originates the default towards the ToRs and
  sends down only routes longer than a block (a borrowed address in another
  rack needs its /32; the blocks themselves stay aggregated behind the
  default). The ToRs share an AS, so routes from one rack would be refused by
  the others as a loop: the core rewrites it (``as-override``).
* Graceful restart everywhere (every FRR router is also a helper, by default),
  with the hosts' restart time: a restarting agent keeps its routes in the
  fabric.

Interface addresses are not part of it: they are the platform's (the lab sets
them with netlink).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from netd.errors import InvalidInput

from .driver import ipv4_of

MAX_ASN = 4294967294


@dataclass(frozen=True)
class Tor:
    name: str
    router_id: str
    core_address: str  # the core's end of the link to this ToR
    address: str  # this ToR's end (the core's neighbour)


@dataclass(frozen=True)
class Rack:
    name: str
    hosts: ipaddress.IPv4Network  # the rack's host subnet: the ToRs' listen range
    tors: tuple[Tor, ...]


@dataclass(frozen=True)
class Fabric:
    host_asn: int
    tor_asn: int
    core_asn: int
    core_router_id: str
    block_prefix: int
    restart_time: int
    racks: tuple[Rack, ...]


def _asn(doc: Mapping[str, Any], key: str) -> int:
    v = doc.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_ASN:
        raise InvalidInput(f"fabric: {key} must be an AS number 1-{MAX_ASN}, got {v!r}")
    return v


def _ipv4(value: Any, what: str) -> str:
    return ipv4_of(value, f"fabric: {what}")


def _name(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value or len(value) > 20 \
            or not all(c.isalnum() or c in "-_" for c in value):
        raise InvalidInput(f"fabric: {what} must be 1-20 letters, digits, - or _, got "
                           f"{value!r}")
    return value


def parse_fabric(doc: Mapping[str, Any]) -> Fabric:
    """The description (a TOML document) -> :class:`Fabric`, or :class:`InvalidInput`."""
    known = {"host_asn", "tor_asn", "core_asn", "block_prefix", "restart_time", "core",
             "racks"}
    unknown = sorted(set(doc) - known)
    if unknown:
        raise InvalidInput(f"fabric: unknown keys {', '.join(unknown)}")
    asns = {k: _asn(doc, k) for k in ("host_asn", "tor_asn", "core_asn")}
    if len(set(asns.values())) != 3:
        raise InvalidInput("fabric: host_asn, tor_asn and core_asn must differ (hosts share "
                           "one AS, the ToRs another, the core a third)")
    block = doc.get("block_prefix", 26)
    if isinstance(block, bool) or not isinstance(block, int) or not 16 <= block <= 31:
        raise InvalidInput(f"fabric: block_prefix must be 16-31, got {block!r}")
    restart = doc.get("restart_time", 120)
    if isinstance(restart, bool) or not isinstance(restart, int) or not 1 <= restart <= 4095:
        raise InvalidInput(f"fabric: restart_time must be 1-4095 s, got {restart!r}")
    core = doc.get("core")
    if not isinstance(core, Mapping) or set(core) != {"router_id"}:
        raise InvalidInput("fabric: [core] needs router_id (and nothing else)")
    racks_in = doc.get("racks")
    if not isinstance(racks_in, list) or not racks_in:
        raise InvalidInput("fabric: at least one [[racks]] entry")
    racks: list[Rack] = []
    seen_names: set[str] = set()
    seen_addresses: set[str] = {_ipv4(core["router_id"], "core.router_id")}
    for i, r in enumerate(racks_in):
        if not isinstance(r, Mapping) or set(r) != {"name", "hosts", "tors"}:
            raise InvalidInput(f"fabric: racks[{i}] needs exactly name, hosts and tors")
        name = _name(r["name"], f"racks[{i}].name")
        try:
            hosts = ipaddress.IPv4Network(r["hosts"])
        except (ValueError, TypeError):
            raise InvalidInput(f"fabric: racks[{i}].hosts must be an IPv4 subnet, got "
                               f"{r['hosts']!r}") from None
        if any(hosts.overlaps(o.hosts) for o in racks):
            raise InvalidInput(f"fabric: racks[{i}].hosts {hosts} overlaps another rack's")
        tors_in = r["tors"]
        if not isinstance(tors_in, list) or not 1 <= len(tors_in) <= 2:
            raise InvalidInput(f"fabric: racks[{i}].tors: one ToR, or two (dual-homed "
                               "hosts)")
        tors = []
        for j, t in enumerate(tors_in):
            what = f"racks[{i}].tors[{j}]"
            if not isinstance(t, Mapping) or set(t) != {"name", "router_id", "core_link"}:
                raise InvalidInput(f"fabric: {what} needs exactly name, router_id, core_link")
            try:
                link = ipaddress.IPv4Network(t["core_link"])
            except (ValueError, TypeError):
                link = None
            if link is None or link.prefixlen not in (30, 31):
                raise InvalidInput(f"fabric: {what}.core_link must be an IPv4 /30 or /31 "
                                   f"(the core's address first), got {t['core_link']!r}")
            ends = list(link) if link.prefixlen == 31 else list(link.hosts())
            tor = Tor(_name(t["name"], f"{what}.name"), _ipv4(t["router_id"],
                                                               f"{what}.router_id"),
                      str(ends[0]), str(ends[1]))
            for n in (tor.name,):
                if n in seen_names:
                    raise InvalidInput(f"fabric: the name {n!r} is used twice")
                seen_names.add(n)
            for a in (tor.router_id, tor.core_address, tor.address):
                if a in seen_addresses and a != tor.router_id:
                    raise InvalidInput(f"fabric: the address {a} is used twice")
                seen_addresses.add(a)
            tors.append(tor)
        if name in seen_names:
            raise InvalidInput(f"fabric: the name {name!r} is used twice")
        seen_names.add(name)
        racks.append(Rack(name, hosts, tuple(tors)))
    return Fabric(asns["host_asn"], asns["tor_asn"], asns["core_asn"],
                  _ipv4(core["router_id"], "core.router_id"), block, restart, tuple(racks))


def _head(hostname: str) -> list[str]:
    return ["! generated by netd fabric config: edit the description, not this file",
            "frr version 8.4", "frr defaults datacenter", f"hostname {hostname}",
            "log syslog informational", "service integrated-vtysh-config", "!"]


def _gr(f: Fabric) -> list[str]:
    return [" bgp graceful-restart", f" bgp graceful-restart restart-time {f.restart_time}",
            f" bgp graceful-restart stalepath-time {f.restart_time + 30}"]


def tor_config(f: Fabric, rack: Rack, tor: Tor) -> str:
    """One ToR: its hosts by listen range, the core as its one neighbour."""
    lines = [*_head(tor.name),
        "! what hosts may announce: their blocks and single addresses, never a default",
        "ip prefix-list NETD-FROM-HOSTS seq 10 permit 0.0.0.0/0 ge 1 le 32",
        "! what hosts get: the core's default and /32 exceptions, nothing else",
        "ip prefix-list NETD-TO-HOSTS seq 10 permit 0.0.0.0/0",
        "ip prefix-list NETD-TO-HOSTS seq 20 permit 0.0.0.0/0 ge 32",
        "!",
        "route-map NETD-FROM-HOSTS permit 10", " match ip address prefix-list NETD-FROM-HOSTS",
        "exit", "!",
        "route-map NETD-TO-HOSTS permit 10", " match ip address prefix-list NETD-TO-HOSTS",
        "exit", "!",
        "route-map NETD-CORE permit 10", "exit", "!",
        f"router bgp {f.tor_asn}",
        f" bgp router-id {tor.router_id}",
        " bgp bestpath as-path multipath-relax",
        *_gr(f),
        " neighbor HOSTS peer-group",
        f" neighbor HOSTS remote-as {f.host_asn}",
        f" neighbor HOSTS description netd hosts of rack {rack.name}",
        f" bgp listen range {rack.hosts} peer-group HOSTS",
        f" neighbor {tor.core_address} remote-as {f.core_asn}",
        f" neighbor {tor.core_address} description core",
        " !",
        " address-family ipv4 unicast",
        f"  network {rack.hosts}",  # the hosts' own subnet: the core routes replies to it
        "  neighbor HOSTS route-map NETD-FROM-HOSTS in",
        "  neighbor HOSTS route-map NETD-TO-HOSTS out",
        "  neighbor HOSTS as-override",
        f"  neighbor {tor.core_address} route-map NETD-CORE in",
        f"  neighbor {tor.core_address} route-map NETD-CORE out",
        " exit-address-family",
        "exit", "!", "end", ""]
    return "\n".join(lines)


def core_config(f: Fabric) -> str:
    """The core: every ToR as a neighbour, the default originated, routes longer than a
    block sent down."""
    tors = [t for r in f.racks for t in r.tors]
    lines = [*_head("core"),
        "! down to the ToRs: the default (originated below) and what is longer than a block",
        f"ip prefix-list NETD-DOWN seq 10 permit 0.0.0.0/0 ge {f.block_prefix + 1} le 32",
        "!",
        "route-map NETD-DOWN permit 10", " match ip address prefix-list NETD-DOWN", "exit",
        "!", "route-map NETD-UP permit 10", "exit", "!",
        f"router bgp {f.core_asn}",
        f" bgp router-id {f.core_router_id}",
        " bgp bestpath as-path multipath-relax",
        *_gr(f),
        " neighbor TORS peer-group",
        f" neighbor TORS remote-as {f.tor_asn}",
        *[f" neighbor {t.address} peer-group TORS" for t in tors],
        *[f" neighbor {t.address} description {t.name}" for t in tors],
        " !",
        " address-family ipv4 unicast",
        "  neighbor TORS default-originate",
        "  neighbor TORS as-override",
        "  neighbor TORS route-map NETD-UP in",
        "  neighbor TORS route-map NETD-DOWN out",
        " exit-address-family",
        "exit", "!", "end", ""]
    return "\n".join(lines)


def configs(f: Fabric) -> dict[str, str]:
    """{file name: FRR configuration} for the core and every ToR."""
    out = {"core.conf": core_config(f)}
    for rack in f.racks:
        for tor in rack.tors:
            out[f"{tor.name}.conf"] = tor_config(f, rack, tor)
    return out


__all__ = ["Fabric", "Rack", "Tor", "configs", "core_config", "parse_fabric", "tor_config"]
