"""``netd ipam check``: is a store's state what the IPAM's rules allow? (either store)

Read through the same :class:`~netd.ipam.store.Txn` the IPAM uses, one pool at
a time, allocations page by page. Per pool: every allocation inside the pool's
usable addresses, found again by its owner, its MAC held by nobody else (over
all pools), its BGP block recorded; no address both allocated and free,
released or reserved (a fixed address excepted: it lies in its handle's
reservation); free ranges disjoint and inside the pool; the counters equal
what is there; in an L2 pool every usable address in exactly one place.

``--repair`` fixes what has one right answer: counters recomputed, an
allocation whose owner index is wrong written again (all its keys). Anything
else is reported for a human, with a non-zero exit.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from netd.ipam.model import Allocation, Pool, ip_str, usable_bounds
from netd.ipam.store import Store, Txn

PAGE = 1000


@dataclass
class Problem:
    pool: str
    what: str
    repaired: bool = False


@dataclass
class Report:
    pools: int = 0
    allocations: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(p.repaired for p in self.problems)

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "pools": self.pools, "allocations": self.allocations,
                "problems": [{"pool": p.pool, "problem": p.what, "repaired": p.repaired}
                             for p in self.problems]}


#: told how far the check is: (allocations read, allocations in all, the pool now)
Progress = Callable[[int, int, str], None]


def _allocations(tx: Txn, pool: str, on_page: Callable[[int], None] | None = None
                 ) -> list[Allocation]:
    out: list[Allocation] = []
    after: tuple[str, int] | None = None
    while True:
        page = tx.list_allocations(pool, None, after, PAGE)
        out += page
        if on_page is not None:
            on_page(len(page))
        if len(page) < PAGE:
            return out
        after = (page[-1].pool, page[-1].ip)


def _inside(ranges: list[tuple[int, int]], starts: list[int], ip: int) -> bool:
    i = bisect.bisect_right(starts, ip) - 1
    return i >= 0 and ranges[i][0] <= ip <= ranges[i][1]


def check_pool(tx: Txn, pool: Pool, macs: dict[str, str],
               on_page: Callable[[int], None] | None = None
               ) -> tuple[list[str], int, list[str]]:
    """(problems, allocations, owners whose index is wrong) of one pool (pure reads);
    ``on_page`` hears how many allocations each page read."""
    problems: list[str] = []
    v = pool.version
    first, last = usable_bounds(pool.network)
    lo_all, hi_all = int(pool.network.network_address), int(pool.network.broadcast_address)
    allocs = _allocations(tx, pool.name, on_page)
    free = sorted((lo, hi) for _, lo, hi in tx.free_overlapping(pool.name, lo_all, hi_all))
    starts = [lo for lo, _ in free]
    released = set(tx.released_in(pool.name, lo_all, hi_all))
    reservations = sorted(tx.list_reservations(pool.name), key=lambda r: r.lo)
    res_ranges = [(r.lo, r.hi) for r in reservations]
    res_starts = [r.lo for r in reservations]
    blocks = {b.lo: b for b in tx.blocks(pool.name, None)} if pool.mode == "bgp" else {}
    for (a_lo, a_hi), (b_lo, _) in itertools.pairwise(free):
        if b_lo <= a_hi:
            problems.append(f"free ranges {ip_str(v, a_lo)}-{ip_str(v, a_hi)} and one from "
                            f"{ip_str(v, b_lo)} overlap")
    for lo, hi in free:
        if lo < first or hi > last:
            problems.append(f"free range {ip_str(v, lo)}-{ip_str(v, hi)} leaves the pool's "
                            "usable addresses")
    bad_owner: list[str] = []
    fixed = 0
    for a in allocs:
        text = ip_str(v, a.ip)
        if not first <= a.ip <= last:
            problems.append(f"{text} ({a.container_id}) is outside the usable addresses")
        if _inside(free, starts, a.ip):
            problems.append(f"{text} is allocated to {a.container_id} and free")
        if a.ip in released:
            problems.append(f"{text} is allocated to {a.container_id} and released")
        in_res = _inside(res_ranges, res_starts, a.ip)
        if a.fixed:
            fixed += 1
            if not in_res:
                problems.append(f"{text} is fixed for {a.container_id} without its "
                                "reservation")
        elif in_res:
            problems.append(f"{text} is allocated to {a.container_id} and reserved")
        other = macs.get(a.mac)
        if other is not None:
            problems.append(f"MAC {a.mac} of {text} is also held by {other}")
        macs[a.mac] = f"{pool.name}/{text}"
        if tx.allocation_of(pool.name, a.container_id, a.ifname) != a:
            problems.append(f"{text}: its owner {a.container_id}/{a.ifname} does not find it")
            bad_owner.append(f"{a.container_id}/{a.ifname}")
        if pool.mode == "bgp" and a.block not in blocks:
            problems.append(f"{text}: its block is not recorded")
    for ip in released:
        if _inside(free, starts, ip) or _inside(res_ranges, res_starts, ip):
            problems.append(f"{ip_str(v, ip)} is released and free or reserved")
    reserved_n = sum(r.count for r in reservations) - fixed
    got_reserved, got_allocated = tx.counters(pool.name)
    if (got_reserved, got_allocated) != (reserved_n, len(allocs)):
        problems.append(f"counters say {got_allocated} allocated, {got_reserved} reserved; "
                        f"there are {len(allocs)} and {reserved_n}")
    if pool.mode != "bgp":
        accounted = (sum(hi - lo + 1 for lo, hi in free) + len(released) + len(allocs)
                     + reserved_n)
        if accounted != pool.size:
            problems.append(f"{accounted} addresses accounted for, the pool has {pool.size}")
    return problems, len(allocs), bad_owner


def check_store(store: Store, *, repair: bool = False,
                progress: Progress | None = None) -> Report:
    report = Report()
    macs: dict[str, str] = {}
    with store.read() as tx:
        pools = tx.list_pools()
        total = sum(tx.counters(p.name)[1] for p in pools)  # what the counters say
    done = 0
    for pool in pools:
        def on_page(n: int, pool: str = pool.name) -> None:
            nonlocal done
            done += n
            if progress is not None:
                progress(done, max(total, done), pool)

        on_page(0)
        with store.read() as tx:
            problems, n, bad_owner = check_pool(tx, pool, macs, on_page)
        report.pools += 1
        report.allocations += n
        if repair and problems:
            report.problems += _repair(store, pool, problems, bad_owner)
        else:
            report.problems += [Problem(pool.name, p) for p in problems]
    return report


def _repair(store: Store, pool: Pool, problems: list[str],
            bad_owner: list[str]) -> list[Problem]:
    """Counters and owner indexes written again; the rest stays reported."""
    def change(tx: Txn) -> None:
        allocs = _allocations(tx, pool.name)
        fixed = sum(1 for a in allocs if a.fixed)
        reserved = sum(r.count for r in tx.list_reservations(pool.name)) - fixed
        got_res, got_alloc = tx.counters(pool.name)
        tx.add_counters(pool.name, reserved - got_res, len(allocs) - got_alloc)
        for a in allocs:
            if f"{a.container_id}/{a.ifname}" in bad_owner:
                tx.del_allocation(pool.name, a.ip)
                tx.put_allocation(a)

    store.transact(change)
    out = []
    for p in problems:
        fixed = p.startswith("counters say") or "does not find it" in p
        out.append(Problem(pool.name, p, repaired=fixed))
    return out


__all__ = ["Problem", "Progress", "Report", "check_pool", "check_store"]
