"""What the host installs from what its ToRs send (pure): the calculation stage.

exabgp does not program the kernel; the agent does, from the routes each peer
sent (:class:`RibIn`, fed with :class:`netd.bgp.exabgp.Event` s):

* the default route, through every peer whose session is up and that sent
  one (two ToRs: ECMP);
* /32 exceptions inside the host's own blocks: addresses of its blocks that
  other hosts borrowed (without them, the block's blackhole would eat their
  traffic);
* never a prefix the host announces itself, which the ToRs reflect back
  (installing every received route overwrote a container's own /32 and made
  a loop, measured); nothing else (the default covers it).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from .exabgp import Event

DEFAULT = "0.0.0.0/0"


@dataclass
class RibIn:
    """The routes one peer sent, and whether its session is up."""

    up: bool = False
    routes: dict[str, str] = field(default_factory=dict)  # prefix -> next hop
    down_since: float | None = None  # monotonic time the session went down
    eor: bool = False  # the peer sent End-of-RIB since its session came up: complete
    state: str = "never"  # exabgp's last word on the session (connected, up, down)
    reason: str = ""  # why it last went down (a NOTIFICATION: bad peer AS...)

    def apply(self, ev: Event, now: float = 0.0) -> None:
        if ev.kind == "state":  # the routes of a peer that went down stay, stale,
            was = self.up  # until its restart time has passed (graceful restart)
            self.up = ev.state == "up"
            self.state = ev.state
            if ev.state == "down":
                self.reason = ev.reason
            self.eor = False
            if self.up:
                self.down_since = None
            elif was or self.down_since is None:
                self.down_since = now
        elif ev.kind == "eor":
            self.eor = True
        elif ev.kind == "update":
            for prefix in ev.withdrawn:
                self.routes.pop(prefix, None)
            self.routes.update(ev.announced)


@dataclass(frozen=True)
class Wanted:
    """The kernel routes the host should have from BGP."""

    default: tuple[str, ...]  # next hops of the default route (ECMP when several)
    exceptions: Mapping[str, tuple[str, ...]]  # /32 -> next hops


def usable(rib: RibIn, now: float, stale_after: float) -> bool:
    """A peer's routes count while its session is up, and for ``stale_after`` seconds
    after it went down (its restart time: it may come back with the same routes)."""
    return rib.up or (rib.down_since is not None and now - rib.down_since < stale_after)


def wanted(ribs: Mapping[str, RibIn], own_blocks: Iterable[str],
           own_announced: Iterable[str], *, now: float = 0.0,
           stale_after: float = float("inf")) -> Wanted:
    """From the peers' routes, what to install (see the module's rules)."""
    blocks = [ipaddress.ip_network(b) for b in own_blocks]
    mine = {str(ipaddress.ip_network(p)) for p in own_announced}
    default: set[str] = set()
    exceptions: dict[str, set[str]] = {}
    for rib in ribs.values():
        if not usable(rib, now, stale_after):
            continue
        for prefix, nexthop in rib.routes.items():
            if prefix in mine:
                continue  # our own, reflected back
            net = ipaddress.ip_network(prefix)
            if prefix == DEFAULT:
                default.add(nexthop)
            elif net.prefixlen == 32 and any(net.network_address in b for b in blocks):
                exceptions.setdefault(prefix, set()).add(nexthop)
    return Wanted(tuple(sorted(default, key=ipaddress.ip_address)),
                  {p: tuple(sorted(n, key=ipaddress.ip_address))
                   for p, n in sorted(exceptions.items())})


def announcements(own_blocks: Iterable[str], container_ips: Iterable[str]) -> set[str]:
    """What the host announces: its blocks, and as /32s the addresses of its containers
    that lie outside them (borrowed from another host's block)."""
    blocks = {str(ipaddress.ip_network(b)) for b in own_blocks}
    nets = [ipaddress.ip_network(b) for b in blocks]
    out = set(blocks)
    for ip in container_ips:
        addr = ipaddress.ip_address(ip.split("/")[0])
        if not any(addr in n for n in nets):
            out.add(f"{addr}/{addr.max_prefixlen}")
    return out


__all__ = ["DEFAULT", "RibIn", "Wanted", "announcements", "usable", "wanted"]
