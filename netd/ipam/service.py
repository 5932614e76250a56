"""IPAM logic: pools, allocation, release, reservations, fixed addresses, history.

Every public method is one transaction on the :class:`~netd.ipam.store.Store`.
Allocation cost depends on the number of free *ranges* and released addresses
touched (a handful), never on the pool's size or fill level.

Address choice, in order: never-used addresses (lowest first); then released
addresses, least recently released first, those still inside the cooldown only
when nothing else is left. BGP pools do the same inside the requesting host's
blocks, then claim a new block, then borrow single addresses from other hosts'
blocks.
"""

from __future__ import annotations

import ipaddress
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from netd.errors import (
    AddressInUse,
    InvalidInput,
    MacInUse,
    NotFound,
    PoolExhausted,
    PoolExists,
    PoolInUse,
    PoolNotFound,
    PoolOverlap,
)
from netd.ipam.model import (
    MAX_ALLOWED,
    MAX_DNS_ITEMS,
    MAX_DOMAIN,
    MAX_NAMESERVERS,
    MAX_ROUTES,
    MODES,
    Allocation,
    Block,
    Event,
    IPAddress,
    IPNetwork,
    Pool,
    PoolStats,
    Reservation,
    Route,
    check_handle,
    check_ifname,
    check_labels,
    check_name,
    check_next_hop,
    check_pool_network,
    check_text,
    check_vlan,
    ip_str,
    key,
    mac_for_ipv4,
    normalize_mac,
    parse_ip,
    parse_network,
    parse_range,
    random_mac,
    usable_bounds,
)
from netd.ipam.store import Store, Txn

DEFAULT_BLOCK_PREFIX = {4: 26, 6: 122}
POOL_SPACE = ""


@dataclass
class PoolSpec:
    """What an operator asks for; validated by :meth:`IPAM.create_pool`."""

    name: str
    cidr: str | None = None
    gateway: str | None = None
    vlan: int | str | None = None
    mode: str = "l2"
    labels: dict[str, str] = field(default_factory=dict)
    reserved: list[str] = field(default_factory=list)
    routes: list[dict[str, str]] = field(default_factory=list)
    dns: dict[str, Any] = field(default_factory=dict)
    block_prefix: int | None = None
    # generated pools: pick the lowest free subnet of prefix_len inside supernet
    supernet: str | None = None
    prefix_len: int | None = None
    vlan_range: tuple[int, int] | None = None


MAX_PAGE = 1000  # rows of one listing page: every answer stays a few milliseconds long


def cursor(a: Allocation, pool: Pool) -> str:
    """Where a listing goes on after ``a``: ``POOL/IP`` (see :meth:`IPAM.addresses`)."""
    return f"{a.pool}/{ip_str(pool.version, a.ip)}"


def parse_cursor(text: str, pool: str | None) -> tuple[str, int]:
    name, sep, ip = text.rpartition("/")
    if not sep:
        if pool is None:
            raise InvalidInput("'after' is POOL/IP (the 'next' of the previous page); a "
                               "plain IP needs the pool")
        name, ip = pool, text
    check_name(name)
    if pool is not None and name != pool:
        raise InvalidInput(f"'after' {text!r} is not in pool {pool!r}")
    return name, int(parse_ip(ip, "'after' address"))


@dataclass
class AllocRequest:
    pool: str
    container_id: str
    ifname: str = "eth0"
    host: str = ""
    netns: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    ip: str | None = None
    mac: str | None = None
    handle: str | None = None


@dataclass
class ReleaseResult:
    released: list[Allocation]
    message: str
    #: the released allocations' pools, as the release saw them (to describe them)
    pools: dict[str, Pool] = field(default_factory=dict)


def _split(lo: int, hi: int, cut_lo: int, cut_hi: int) -> list[tuple[int, int]]:
    """Parts of [lo, hi] outside [cut_lo, cut_hi]."""
    out = []
    if lo < cut_lo:
        out.append((lo, min(hi, cut_lo - 1)))
    if hi > cut_hi:
        out.append((max(lo, cut_hi + 1), hi))
    return out


class IPAM:
    """The central IPAM. Receives its store; owns no global state."""

    def __init__(
        self,
        store: Store,
        *,
        cooldown: float = 60.0,
        vlan_range: tuple[int, int] = (2, 4094),
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.cooldown = cooldown
        self.vlan_range = vlan_range
        self.clock = clock

    # --- pools -------------------------------------------------------------

    def create_pool(self, spec: PoolSpec, actor: str = "api") -> Pool:
        check_name(spec.name)
        if spec.mode not in MODES:
            raise InvalidInput(f"invalid mode {spec.mode!r}: one of {', '.join(MODES)}")
        labels = check_labels(spec.labels)
        if spec.cidr and spec.supernet:
            raise InvalidInput("give either a CIDR or a supernet to generate from, not both")
        if not spec.cidr and not spec.supernet:
            raise InvalidInput("a pool needs a CIDR, or a supernet and prefix length")
        vlan_range = spec.vlan_range or self.vlan_range
        if spec.vlan_range is not None:
            lo_v, hi_v = check_vlan(vlan_range[0]), check_vlan(vlan_range[1])
            if lo_v > hi_v:
                raise InvalidInput(f"VLAN range {lo_v}-{hi_v} ends before it starts")
        if spec.vlan not in (None, "auto"):
            if isinstance(spec.vlan, str):
                if not spec.vlan.isdigit():
                    raise InvalidInput(f"invalid VLAN {spec.vlan!r}: a number 1-4094 or 'auto'")
                spec.vlan = int(spec.vlan)
            check_vlan(spec.vlan)
        net: IPNetwork | None = check_pool_network(parse_network(spec.cidr)) if spec.cidr \
            else None
        supernet: IPNetwork | None = None
        if spec.supernet:
            supernet = check_pool_network(parse_network(spec.supernet), "supernet")
            if spec.prefix_len is None:
                raise InvalidInput("generating a pool from a supernet needs a prefix length")
            max_len = 32 if supernet.version == 4 else 128
            if not supernet.prefixlen <= spec.prefix_len <= max_len:
                raise InvalidInput(
                    f"prefix length {spec.prefix_len} must be between {supernet.prefixlen} "
                    f"and {max_len} for supernet {supernet}")
            self._check_prefix(supernet.version, spec.prefix_len)
        if net is not None:
            self._check_prefix(net.version, net.prefixlen)
        if not isinstance(spec.routes, list) or len(spec.routes) > MAX_ROUTES:
            raise InvalidInput(f"a pool has at most {MAX_ROUTES} routes (each allocation's "
                               "answer carries them all)")
        routes = tuple(self._route(r, net or supernet) for r in spec.routes)  # type: ignore[arg-type]
        dns = self._dns(spec.dns)
        block_prefix = spec.block_prefix
        if spec.mode != "bgp" and block_prefix is not None:
            raise InvalidInput("block_prefix applies to bgp pools only")

        given_net, given_block_prefix = net, block_prefix

        def change(tx: Txn) -> Pool:  # run again when a distributed store retries it
            net, block_prefix = given_net, given_block_prefix
            if tx.get_pool(spec.name) is not None:
                raise PoolExists(f"pool {spec.name!r} already exists")
            existing = tx.list_pools()
            if net is None:
                assert supernet is not None and spec.prefix_len is not None
                net = self._generate_subnet(supernet, spec.prefix_len, existing)
            for other in existing:
                if other.network.version == net.version and other.network.overlaps(net):
                    raise PoolOverlap(f"{net} overlaps pool {other.name!r} ({other.cidr})")
            vlan: int | None
            if spec.vlan == "auto":
                used = {p.vlan for p in existing}
                vlan = next((v for v in range(vlan_range[0], vlan_range[1] + 1)
                             if v not in used), None)
                if vlan is None:
                    raise PoolExhausted(
                        f"no free VLAN left in {vlan_range[0]}-{vlan_range[1]}")
            else:
                vlan = spec.vlan if isinstance(spec.vlan, int) else None
            first, last = usable_bounds(net)
            if spec.gateway:
                gw = parse_ip(spec.gateway, "gateway")
                if gw.version != net.version or gw not in net:
                    raise InvalidInput(f"gateway {spec.gateway} is outside subnet {net}")
                if not first <= int(gw) <= last:
                    raise InvalidInput(
                        f"gateway {spec.gateway} is the network or broadcast address of {net}")
                gateway = int(gw)
            else:
                gateway = first
            if spec.mode == "bgp":
                if block_prefix is None:
                    block_prefix = DEFAULT_BLOCK_PREFIX[net.version]
                # a block of one address (/32, /128) is a host route per container, and
                # the blocks of the network, gateway and broadcast addresses hold nothing
                max_len = 31 if net.version == 4 else 127
                if not net.prefixlen <= block_prefix <= max_len:
                    raise InvalidInput(
                        f"block prefix /{block_prefix} must lie between /{net.prefixlen} "
                        f"(the pool) and /{max_len} (two addresses per block)")
            reserved = self._reserved_ranges(spec.reserved, net, gateway)
            pool = Pool(
                name=spec.name, cidr=str(net), gateway=ip_str(net.version, gateway),
                mode=spec.mode, vlan=vlan, labels=labels, routes=routes, dns=dns,
                block_prefix=block_prefix, created=self.clock(),
            )
            tx.insert_pool(pool)
            now = self.clock()
            tx.add_event(Event(0, now, pool.name, pool.cidr, "pool-create", actor=actor,
                               note=f"gateway {pool.gateway}" + (f" vlan {vlan}" if vlan else "")))
            total = 0
            for lo, hi, note in reserved:
                tx.put_reservation(Reservation(pool.name, lo, hi, note, None, now))
                total += hi - lo + 1
                tx.add_event(Event(0, now, pool.name, self._range_text(pool, lo, hi), "reserve",
                                   actor=actor, note=note))
            tx.add_counters(pool.name, total, 0)
            if spec.mode == "bgp":
                tx.set_block_cursor(pool.name, int(net.network_address))
            else:
                for lo, hi in self._minus(first, last, [(r[0], r[1]) for r in reserved]):
                    tx.put_free(pool.name, POOL_SPACE, lo, hi)
            return pool

        return self.store.transact(change)

    @staticmethod
    def _check_prefix(version: int, prefix: int) -> None:
        if version == 4 and prefix > 30:
            raise InvalidInput(f"an IPv4 pool must be /30 or larger, not /{prefix}")
        if version == 6 and prefix > 126:
            raise InvalidInput(f"an IPv6 pool must be /126 or larger, not /{prefix}")

    @staticmethod
    def _route(r: dict[str, str], net: IPNetwork) -> Route:
        if not isinstance(r, dict) or "dst" not in r:
            raise InvalidInput("a route needs 'dst' (and optionally 'gw')")
        dst = parse_network(r["dst"])
        gw = r.get("gw")
        if gw:
            g = check_next_hop(parse_ip(gw, "route gateway"), "route gateway")
            if g.version != dst.version:
                raise InvalidInput(f"route {r['dst']} via {gw} mixes address families")
        if dst.version != net.version:
            raise InvalidInput(f"route {r['dst']} is not IPv{net.version}")
        return Route(str(dst), gw or None)

    @staticmethod
    def _dns(dns: dict[str, Any]) -> dict[str, Any]:
        """CNI's DNS block, bounded: it goes into every allocation's answer."""
        allowed = {"nameservers", "domain", "search", "options"}
        extra = set(dns) - allowed
        if extra:
            raise InvalidInput(f"unknown dns keys: {', '.join(sorted(extra))}")
        out: dict[str, Any] = {}
        for name, limit in (("nameservers", MAX_NAMESERVERS), ("search", MAX_DNS_ITEMS),
                            ("options", MAX_DNS_ITEMS)):
            if name not in dns:
                continue
            items = dns[name]
            if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
                raise InvalidInput(f"dns {name} must be a list of strings")
            if len(items) > limit:
                raise InvalidInput(f"dns {name}: at most {limit} entries")
            for item in items:
                if name == "nameservers":
                    check_next_hop(parse_ip(item, "nameserver"), "nameserver")
                elif not item or len(item) > MAX_DOMAIN or any(c.isspace() for c in item):
                    raise InvalidInput(f"dns {name} entry {item[:40]!r}: 1-{MAX_DOMAIN} "
                                       "characters without spaces")
                else:
                    check_text(item, f"dns {name} entry", MAX_DOMAIN)
            out[name] = list(items)
        if "domain" in dns:
            domain = dns["domain"]
            if not isinstance(domain, str) or len(domain) > MAX_DOMAIN or any(
                    c.isspace() for c in domain):
                raise InvalidInput(f"dns domain: at most {MAX_DOMAIN} characters without "
                                   "spaces")
            out["domain"] = check_text(domain, "dns domain", MAX_DOMAIN, required=False)
        return out

    @staticmethod
    def _generate_subnet(supernet: IPNetwork, prefix_len: int, pools: list[Pool]) -> IPNetwork:
        size = 1 << ((32 if supernet.version == 4 else 128) - prefix_len)
        start, end = int(supernet.network_address), int(supernet.broadcast_address)
        taken = sorted(
            (int(p.network.network_address), int(p.network.broadcast_address))
            for p in pools if p.network.version == supernet.version
        )
        cand = start
        while cand + size - 1 <= end:
            clash = [hi for lo, hi in taken if lo <= cand + size - 1 and hi >= cand]
            if not clash:
                return ipaddress.ip_network((cand, prefix_len))
            nxt = max(clash) + 1
            cand = (nxt + size - 1) // size * size
        raise PoolExhausted(f"no free /{prefix_len} left in {supernet}")

    @staticmethod
    def _minus(lo: int, hi: int, holes: list[tuple[int, int]]) -> list[tuple[int, int]]:
        parts = [(lo, hi)]
        for h_lo, h_hi in sorted(holes):
            nxt = []
            for p_lo, p_hi in parts:
                if p_hi < h_lo or p_lo > h_hi:
                    nxt.append((p_lo, p_hi))
                else:
                    nxt += _split(p_lo, p_hi, h_lo, h_hi)
            parts = nxt
        return parts

    def _reserved_ranges(
        self, specs: list[str], net: IPNetwork, gateway: int
    ) -> list[tuple[int, int, str]]:
        """Disjoint reserved ranges, clipped to usable space, gateway included."""
        first, last = usable_bounds(net)
        ranges: list[tuple[int, int, str]] = []
        for text in specs:
            lo, hi = parse_range(text, net)
            lo, hi = max(lo, first), min(hi, last)
            if lo <= hi:
                ranges.append((lo, hi, "reserved at pool creation"))
        ranges.sort()
        for (_, a_hi, _), (b_lo, _, _) in itertools.pairwise(ranges):
            if b_lo <= a_hi:
                raise InvalidInput("reserved ranges overlap each other")
        if not any(lo <= gateway <= hi for lo, hi, _ in ranges):
            ranges.append((gateway, gateway, "gateway"))
            ranges.sort()
        return ranges

    def list_pools(self) -> list[tuple[Pool, PoolStats]]:
        with self.store.read() as tx:
            return [(p, self._stats(tx, p)) for p in tx.list_pools()]

    def get_pool(self, name: str) -> tuple[Pool, PoolStats]:
        with self.store.read() as tx:
            pool = self._pool(tx, name)
            return pool, self._stats(tx, pool)

    @staticmethod
    def _stats(tx: Txn, pool: Pool) -> PoolStats:
        reserved, allocated = tx.counters(pool.name)
        return PoolStats(size=pool.size, reserved=reserved, allocated=allocated)

    @staticmethod
    def _pool(tx: Txn, name: str) -> Pool:
        pool = tx.get_pool(name)
        if pool is None:
            raise PoolNotFound(f"pool {name!r} does not exist")
        return pool

    def delete_pool(self, name: str, force: bool = False, actor: str = "api") -> int:
        """Delete a pool; refuse while addresses are allocated unless forced."""
        def change(tx: Txn) -> int:
            pool = self._pool(tx, name)
            _, allocated = tx.counters(name)
            if allocated and not force:
                raise PoolInUse(
                    f"pool {name!r} still has {allocated} allocated address(es); "
                    "release them or use --force")
            for a in tx.list_allocations(name, None, None, 1 << 62) if allocated else []:
                tx.add_event(self._event(pool, a, "release", actor, "pool deleted"))
            tx.delete_pool(name)
            tx.add_event(Event(0, self.clock(), name, pool.cidr, "pool-delete", actor=actor,
                               note=f"{allocated} allocation(s) dropped" if allocated else ""))
            return allocated

        return self.store.transact(change)

    # --- allocation ----------------------------------------------------------

    def allocate(self, req: AllocRequest, actor: str = "api") -> tuple[Allocation, Pool]:
        return self.store.transact(self.allocate_change(req, actor))

    def allocate_change(self, req: AllocRequest, actor: str = "api"
                        ) -> Callable[[Txn], tuple[Allocation, Pool]]:
        """:meth:`allocate` as a checked request and the change to run (on a network
        store, the API awaits it instead of blocking a thread on it)."""
        check_name(req.pool)
        check_text(req.container_id, "container id")
        check_ifname(req.ifname)
        check_text(req.host, "host", required=False)
        check_text(req.netns, "netns", 4096, required=False)
        labels = check_labels(req.labels)
        handle = check_handle(req.handle) if req.handle else None
        mac = normalize_mac(req.mac) if req.mac else None
        def change(tx: Txn) -> tuple[Allocation, Pool]:
            pool = self._pool(tx, req.pool)
            existing = tx.allocation_of(pool.name, req.container_id, req.ifname)
            if existing is not None:
                if req.ip and int(parse_ip(req.ip)) != existing.ip:
                    raise AddressInUse(
                        f"{req.container_id}/{req.ifname} already holds "
                        f"{ip_str(pool.version, existing.ip)} in pool {pool.name!r}")
                return existing, pool
            ip, fixed = self._choose(tx, pool, req, handle)
            alloc = Allocation(
                pool=pool.name, ip=ip, container_id=req.container_id, ifname=req.ifname,
                mac=mac or (mac_for_ipv4(ip) if pool.version == 4 else random_mac()),
                host=req.host, netns=req.netns, handle=handle, fixed=fixed, labels=labels,
                block=self._block_lo(pool, ip) if pool.mode == "bgp" else None,
                created=self.clock(),
            )
            while True:  # the store's unique index on MACs is the check
                try:
                    tx.put_allocation(alloc)
                    break
                except MacInUse:
                    if mac is not None:  # the caller's choice: tell them
                        raise
                    alloc = replace(alloc, mac=random_mac())
            tx.add_counters(pool.name, -1 if fixed else 0, 1)
            tx.add_event(self._event(pool, alloc, "allocate", actor, "fixed" if fixed else ""))
            return alloc, pool

        return change

    def _choose(
        self, tx: Txn, pool: Pool, req: AllocRequest, handle: str | None
    ) -> tuple[int, bool]:
        """Pick the address for a new allocation; returns (ip, fixed)."""
        wanted: int | None = None
        if req.ip:
            addr = parse_ip(req.ip)
            if addr.version != pool.version or addr not in pool.network:
                raise InvalidInput(f"{req.ip} is not in pool {pool.name!r} ({pool.cidr})")
            wanted = int(addr)
        if handle:
            res = tx.reservation_by_handle(pool.name, handle)
            if res is not None:
                if wanted is not None and wanted != res.lo:
                    raise AddressInUse(
                        f"handle {handle!r} is assigned {ip_str(pool.version, res.lo)}, "
                        f"not {req.ip}")
                wanted = res.lo
        if wanted is not None:
            return self._take_specific(tx, pool, wanted, handle)
        return self._take_any(tx, pool, req.host), False

    def _take_specific(
        self, tx: Txn, pool: Pool, ip: int, handle: str | None
    ) -> tuple[int, bool]:
        first, last = usable_bounds(pool.network)
        text = ip_str(pool.version, ip)
        if not first <= ip <= last:
            raise InvalidInput(f"{text} is the network or broadcast address of {pool.cidr}")
        holder = tx.allocation(pool.name, ip)
        if holder is not None:
            raise AddressInUse(f"{text} is allocated to {holder.container_id}/{holder.ifname}"
                               + (f" on {holder.host}" if holder.host else ""))
        res = tx.reservations_overlapping(pool.name, ip, ip)
        if res:
            r = res[0]
            if r.handle and r.handle == handle:
                return ip, True
            why = f"assigned to handle {r.handle!r}" if r.handle else f"reserved ({r.note})"
            raise AddressInUse(f"{text} is {why}")
        if tx.released_space(pool.name, ip) is not None:
            tx.del_released(pool.name, ip)
        else:
            self._cut_free(tx, pool.name, ip, ip)
        return ip, False

    def _cut_free(self, tx: Txn, pool: str, lo: int, hi: int) -> None:
        """Remove [lo, hi] from the never-used ranges."""
        for space, r_lo, r_hi in tx.free_overlapping(pool, lo, hi):
            tx.del_free(pool, r_lo)
            for p_lo, p_hi in _split(r_lo, r_hi, lo, hi):
                tx.put_free(pool, space, p_lo, p_hi)

    def _take_free(self, tx: Txn, pool: str, space: str | None) -> int | None:
        got = tx.first_free(pool, space)
        if got is None:
            return None
        _, lo, hi = got
        if lo < hi:
            tx.shrink_free(pool, lo, lo + 1)
        else:
            tx.del_free(pool, lo)
        return lo

    def _take_released(
        self, tx: Txn, pool: str, spaces: list[str | None], before: float | None
    ) -> int | None:
        best: tuple[str, int, float] | None = None
        for space in spaces:
            got = tx.oldest_released(pool, space, before)
            if got is not None and (best is None or got[2] < best[2]):
                best = got
        if best is None:
            return None
        tx.del_released(pool, best[1])
        return best[1]

    def _take_any(self, tx: Txn, pool: Pool, host: str) -> int:
        cutoff = self.clock() - self.cooldown
        if pool.mode != "bgp":
            ip = self._take_free(tx, pool.name, POOL_SPACE)
            if ip is None:
                ip = self._take_released(tx, pool.name, [POOL_SPACE], None)
            if ip is None:
                raise PoolExhausted(f"pool {pool.name!r} ({pool.cidr}) has no free address")
            return ip
        mine: list[str | None] = [key(b.lo) for b in tx.blocks(pool.name, host)]
        for space in mine:
            ip = self._take_free(tx, pool.name, space)
            if ip is not None:
                return ip
        ip = self._take_released(tx, pool.name, mine, cutoff) if mine else None
        while ip is None:
            block = self._claim_block(tx, pool, host)
            if block is None:
                break
            ip = self._take_free(tx, pool.name, key(block.lo))
        if ip is None:  # borrow from other hosts' blocks
            ip = self._take_free(tx, pool.name, None)
        if ip is None:
            ip = self._take_released(tx, pool.name, [None], cutoff)
        if ip is None and mine:
            ip = self._take_released(tx, pool.name, mine, None)
        if ip is None:
            ip = self._take_released(tx, pool.name, [None], None)
        if ip is None:
            raise PoolExhausted(f"pool {pool.name!r} ({pool.cidr}) has no free address")
        return ip

    def _block_lo(self, pool: Pool, ip: int) -> int:
        assert pool.block_prefix is not None
        bits = (32 if pool.version == 4 else 128) - pool.block_prefix
        return ip >> bits << bits

    def _claim_block(self, tx: Txn, pool: Pool, host: str) -> Block | None:
        """Give ``host`` the lowest unclaimed block; None when all are claimed."""
        assert pool.block_prefix is not None
        cursor = tx.block_cursor(pool.name)
        net = pool.network
        size = 1 << ((32 if pool.version == 4 else 128) - pool.block_prefix)
        if cursor < 0 or cursor > int(net.broadcast_address):
            return None
        lo, hi = cursor, cursor + size - 1
        tx.set_block_cursor(pool.name, hi + 1)
        block = Block(pool.name, lo, hi, host, pool.block_prefix)
        tx.put_block(block)
        first, last = usable_bounds(net)
        holes = [(r.lo, r.hi) for r in tx.reservations_overlapping(pool.name, lo, hi)]
        holes += [(a.ip, a.ip) for a in tx.allocations_in(pool.name, lo, hi, size)]
        u_lo, u_hi = max(lo, first), min(hi, last)
        if u_lo <= u_hi:  # else the block holds only the network or broadcast address
            for p_lo, p_hi in self._minus(u_lo, u_hi, holes):
                tx.put_free(pool.name, key(lo), p_lo, p_hi)
        return block

    # --- release -------------------------------------------------------------

    def release(
        self,
        *,
        pool: str | None = None,
        container_id: str | None = None,
        ifname: str | None = None,
        ip: str | None = None,
        force: bool = False,
        actor: str = "api",
    ) -> ReleaseResult:
        """Release by owner, or by IP when that IP's holder is the owner named.

        Releasing what is not allocated succeeds (CNI DEL is idempotent). A
        stale release naming another owner never frees the address.
        """
        return self.store.transact(self.release_change(
            pool=pool, container_id=container_id, ifname=ifname, ip=ip, force=force,
            actor=actor))

    def release_change(
        self,
        *,
        pool: str | None = None,
        container_id: str | None = None,
        ifname: str | None = None,
        ip: str | None = None,
        force: bool = False,
        actor: str = "api",
    ) -> Callable[[Txn], ReleaseResult]:
        """:meth:`release` as a checked request and the change to run."""
        if ifname is not None:
            check_ifname(ifname)
        if container_id is not None:
            check_text(container_id, "container id")
        if pool is not None:
            check_name(pool)
        if ip is None and container_id is None:
            raise InvalidInput("a release names an owner (container id) or an address")
        if ip is not None and container_id is None and not force:
            raise InvalidInput(
                f"releasing {ip} needs its owner (container id), or force for an operator")
        def change(tx: Txn) -> ReleaseResult:
            if pool is not None:
                self._pool(tx, pool)
            if ip is not None:
                addr = parse_ip(ip)
                p = self._pool_for(tx, int(addr), addr.version, pool)
                a = tx.allocation(p.name, int(addr))
                if a is None:
                    return ReleaseResult([], f"{ip} was not allocated; nothing to release")
                if container_id is not None and (
                    a.container_id != container_id or (ifname is not None and a.ifname != ifname)
                ):
                    return ReleaseResult(
                        [], f"{ip} is held by another owner; not released")
                targets = [a]
            else:
                assert container_id is not None
                targets = tx.allocations_of(container_id, ifname, pool)
                if not targets:
                    return ReleaseResult(
                        [], f"{container_id}{'/' + ifname if ifname else ''} holds no address; "
                        "nothing to release")
            pools = {a.pool: self._release_one(tx, a, actor) for a in targets}
            return ReleaseResult(targets, f"released {len(targets)} address(es)", pools)

        return change

    def update(
        self,
        ip: str,
        *,
        container_id: str,
        ifname: str | None = None,
        new_container_id: str | None = None,
        labels: dict[str, str] | None = None,
        actor: str = "api",
    ) -> tuple[Allocation, Pool]:
        """Hand an allocation to a new owner and/or merge labels into it; the address stays.

        The caller names the current holder (``container_id`` [+ ``ifname``]), like a
        release by IP: an update naming another owner is refused, so a stale
        caller never touches someone else's address. Used by the Docker driver,
        which learns the endpoint and the container name only after the address
        was requested.
        """
        check_text(container_id, "container id")
        if ifname is not None:
            check_ifname(ifname)
        if new_container_id is not None:
            check_text(new_container_id, "new container id")
        merged_in = check_labels(labels or {})
        addr = parse_ip(ip)
        def change(tx: Txn) -> tuple[Allocation, Pool]:
            p, a = self._held_by(tx, addr, container_id, ifname)
            owner = new_container_id or a.container_id
            if owner != a.container_id:
                other = tx.allocation_of(p.name, owner, a.ifname)
                if other is not None:
                    raise AddressInUse(f"{owner}/{a.ifname} already holds "
                                       f"{ip_str(p.version, other.ip)} in pool {p.name!r}")
            merged = check_labels({**a.labels, **merged_in})
            if owner == a.container_id and merged == a.labels:
                return a, p
            new = replace(a, container_id=owner, labels=merged)
            tx.del_allocation(p.name, a.ip)
            tx.put_allocation(new)
            changes = [f"owner {a.container_id} -> {owner}"] if owner != a.container_id else []
            changes += [f"{k}={v}" for k, v in sorted(merged_in.items())
                        if a.labels.get(k) != v]
            tx.add_event(self._event(p, new, "update", actor, "; ".join(changes)))
            return new, p

        return self.store.transact(change)

    def _held_by(self, tx: Txn, addr: IPAddress, container_id: str,
                 ifname: str | None) -> tuple[Pool, Allocation]:
        """The allocation of ``addr``, which the caller must name as its holder: a stale
        caller never changes someone else's address."""
        p = self._pool_for(tx, int(addr), addr.version, None)
        a = tx.allocation(p.name, int(addr))
        if a is None:
            raise NotFound(f"{addr} is not allocated")
        if a.container_id != container_id or (ifname is not None and a.ifname != ifname):
            raise AddressInUse(f"{addr} is held by {a.container_id}/{a.ifname}, "
                               f"not {container_id}{'/' + ifname if ifname else ''}")
        return p, a

    def set_allowed(self, ip: str, *, container_id: str, allowed: list[str],
                    ifname: str | None = None, actor: str = "api") -> tuple[Allocation, Pool]:
        """Set the extra addresses the holder of ``ip`` may send from (replaces the list).

        Like Neutron's allowed-address-pairs, for containers that speak for more
        than their own address (keepalived's VRRP address). Each must be a
        unicast address of the allocation's family, not its own; an address
        inside a pool must be *reserved* there (``netctl ip reserve``), so the
        IPAM never hands it to another container. The caller names the holder,
        as for :meth:`update`. The agents' port guards follow the list.
        """
        check_text(container_id, "container id")
        if ifname is not None:
            check_ifname(ifname)
        if not isinstance(allowed, list) or len(allowed) > MAX_ALLOWED:
            raise InvalidInput(f"allowed: at most {MAX_ALLOWED} addresses")
        addr = parse_ip(ip)
        wanted = sorted({str(parse_ip(str(a), "allowed address")) for a in allowed},
                        key=ipaddress.ip_address)
        def change(tx: Txn) -> tuple[Allocation, Pool]:
            p, a = self._held_by(tx, addr, container_id, ifname)
            for text in wanted:
                self._check_allowed(tx, addr, ipaddress.ip_address(text))
            if tuple(wanted) == a.allowed:
                return a, p
            new = replace(a, allowed=tuple(wanted))
            tx.del_allocation(p.name, a.ip)
            tx.put_allocation(new)
            tx.add_event(self._event(p, new, "allow", actor,
                                     "allowed: " + (", ".join(wanted) or "none")))
            return new, p

        return self.store.transact(change)

    def _check_allowed(self, tx: Txn, own: IPAddress, extra: IPAddress) -> None:
        if extra.version != own.version:
            raise InvalidInput(f"allowed address {extra} is not IPv{own.version} like {own}")
        if extra == own:
            raise InvalidInput(f"{extra} is the allocation's own address")
        if (extra.is_multicast or extra.is_loopback or extra.is_unspecified
                or extra.is_link_local or str(extra) == "255.255.255.255"):
            raise InvalidInput(f"allowed address {extra} is not a unicast address")
        for pool in tx.list_pools():
            net = pool.network
            if net.version != extra.version or extra not in net:
                continue
            held = tx.allocation(pool.name, int(extra))
            if held is not None:
                raise AddressInUse(f"allowed address {extra} is allocated to "
                                   f"{held.container_id}/{held.ifname}")
            if not tx.reservations_overlapping(pool.name, int(extra), int(extra)):
                raise InvalidInput(f"allowed address {extra} is in pool {pool.name!r} but not "
                                   f"reserved there: reserve it first (netctl ip reserve "
                                   f"{pool.name} {extra}) so that no container gets it")

    def _release_one(self, tx: Txn, a: Allocation, actor: str) -> Pool:
        pool = tx.get_pool(a.pool)
        assert pool is not None
        tx.del_allocation(a.pool, a.ip)
        if a.fixed:
            tx.add_counters(a.pool, 1, -1)
        else:
            tx.add_counters(a.pool, 0, -1)
            self._give_back(tx, pool, a.ip, a.ip, released=True)
        tx.add_event(self._event(pool, a, "release", actor))
        return pool

    def _give_back(self, tx: Txn, pool: Pool, lo: int, hi: int, released: bool) -> None:
        """Return [lo, hi] to free space: released addresses join the LRU list."""
        if pool.mode != "bgp":
            if released:
                tx.put_released(pool.name, POOL_SPACE, lo, self.clock())
            else:
                tx.put_free(pool.name, POOL_SPACE, lo, hi)
            return
        for b in tx.blocks(pool.name, None) if hi > lo else []:
            if b.hi >= lo and b.lo <= hi:
                self._give_back_block(tx, pool, b, max(lo, b.lo), min(hi, b.hi), released)
        if hi == lo:
            b2 = tx.block(pool.name, self._block_lo(pool, lo))
            if b2 is not None:
                self._give_back_block(tx, pool, b2, lo, hi, released)
        # addresses in unclaimed blocks become free by being in no table

    def _give_back_block(
        self, tx: Txn, pool: Pool, b: Block, lo: int, hi: int, released: bool
    ) -> None:
        if released:
            tx.put_released(pool.name, key(b.lo), lo, self.clock())
        else:
            tx.put_free(pool.name, key(b.lo), lo, hi)

    def _pool_for(self, tx: Txn, ip: int, version: int, name: str | None) -> Pool:
        if name is not None:
            pool = self._pool(tx, name)
            if pool.version != version or not (
                int(pool.network.network_address) <= ip <= int(pool.network.broadcast_address)
            ):
                raise InvalidInput(
                    f"{ip_str(version, ip)} is not in pool {name!r} ({pool.cidr})")
            return pool
        for pool in tx.list_pools():
            net = pool.network
            if net.version == version and (
                int(net.network_address) <= ip <= int(net.broadcast_address)
            ):
                return pool
        raise NotFound(f"{ip_str(version, ip)} is in no pool")

    # --- reservations and fixed addresses -------------------------------------

    def reserve(self, pool: str, spec: str, note: str = "", actor: str = "api") -> Reservation:
        check_name(pool)
        check_text(note, "note", required=False)
        def change(tx: Txn) -> Reservation:
            p = self._pool(tx, pool)
            lo, hi = self._usable_range(p, spec)
            self._check_reservable(tx, p, lo, hi)
            r = Reservation(p.name, lo, hi, note or "reserved", None, self.clock())
            self._hold(tx, p, r)
            tx.add_event(Event(0, self.clock(), p.name, self._range_text(p, lo, hi), "reserve",
                               actor=actor, note=r.note))
            return r

        return self.store.transact(change)

    def _usable_range(self, pool: Pool, spec: str) -> tuple[int, int]:
        lo, hi = parse_range(spec, pool.network)
        first, last = usable_bounds(pool.network)
        if lo == hi and not first <= lo <= last:
            raise InvalidInput(f"{spec} is the network or broadcast address of {pool.cidr}")
        lo, hi = max(lo, first), min(hi, last)
        return lo, hi

    def _range_text(self, pool: Pool, lo: int, hi: int) -> str:
        if lo == hi:
            return ip_str(pool.version, lo)
        return f"{ip_str(pool.version, lo)}-{ip_str(pool.version, hi)}"

    def _check_reservable(self, tx: Txn, pool: Pool, lo: int, hi: int) -> None:
        held = tx.reservations_overlapping(pool.name, lo, hi)
        if held:
            r = held[0]
            raise AddressInUse(
                f"{self._range_text(pool, max(lo, r.lo), min(hi, r.hi))} is already reserved "
                f"({r.note})")
        allocs = tx.allocations_in(pool.name, lo, hi, 1)
        if allocs:
            a = allocs[0]
            raise AddressInUse(f"{ip_str(pool.version, a.ip)} is allocated to "
                               f"{a.container_id}/{a.ifname}")

    def _hold(self, tx: Txn, pool: Pool, r: Reservation) -> None:
        """Take [r.lo, r.hi] out of free space and record the reservation."""
        self._cut_free(tx, pool.name, r.lo, r.hi)
        for ip in tx.released_in(pool.name, r.lo, r.hi):
            tx.del_released(pool.name, ip)
        tx.put_reservation(r)
        tx.add_counters(pool.name, r.count, 0)

    def unreserve(self, pool: str, spec: str, actor: str = "api") -> int:
        """Free reserved addresses in a range; returns how many were freed."""
        check_name(pool)
        def change(tx: Txn) -> int:
            p = self._pool(tx, pool)
            lo, hi = self._usable_range(p, spec)
            gw = int(parse_ip(p.gateway))
            held = tx.reservations_overlapping(p.name, lo, hi)
            for r in held:
                if r.handle and r.lo >= lo and r.hi <= hi:
                    a = tx.allocation(p.name, r.lo)
                    if a is not None:
                        raise AddressInUse(
                            f"{ip_str(p.version, r.lo)} is allocated to {a.container_id}/"
                            f"{a.ifname} under handle {r.handle!r}; release it first")
            freed = 0
            now = self.clock()
            for r in held:
                c_lo, c_hi = max(lo, r.lo), min(hi, r.hi)
                tx.del_reservation(p.name, r.lo)
                for k_lo, k_hi in _split(r.lo, r.hi, c_lo, c_hi):
                    tx.put_reservation(replace(r, lo=k_lo, hi=k_hi))
                parts = [(c_lo, c_hi)]
                if c_lo <= gw <= c_hi:
                    tx.put_reservation(Reservation(p.name, gw, gw, "gateway", None, now))
                    parts = _split(c_lo, c_hi, gw, gw)
                for f_lo, f_hi in parts:
                    self._give_back(tx, p, f_lo, f_hi, released=False)
                    freed += f_hi - f_lo + 1
            tx.add_counters(p.name, -freed, 0)
            if freed:
                tx.add_event(Event(0, now, p.name, self._range_text(p, lo, hi), "unreserve",
                                   actor=actor, note=f"{freed} address(es) freed"))
            return freed

        return self.store.transact(change)

    def assign(
        self, pool: str, ip: str, handle: str, note: str = "", actor: str = "api"
    ) -> Reservation:
        """Bind an address to a stable handle: allocations with it always get it."""
        check_name(pool)
        check_handle(handle)
        check_text(note, "note", required=False)
        def change(tx: Txn) -> Reservation:
            p = self._pool(tx, pool)
            lo, hi = parse_range(ip, p.network)
            if lo != hi:
                raise InvalidInput("a handle is assigned exactly one address")
            first, last = usable_bounds(p.network)
            if not first <= lo <= last:
                raise InvalidInput(f"{ip} is the network or broadcast address of {p.cidr}")
            if lo == int(parse_ip(p.gateway)):
                raise AddressInUse(f"{ip} is the gateway of pool {p.name!r}")
            other = tx.reservation_by_handle(p.name, handle)
            if other is not None:
                if other.lo == lo:
                    return other
                raise AddressInUse(
                    f"handle {handle!r} is already assigned {ip_str(p.version, other.lo)}")
            a = tx.allocation(p.name, lo)
            if a is not None:
                raise AddressInUse(f"{ip} is allocated to {a.container_id}/{a.ifname}")
            now = self.clock()
            res = Reservation(p.name, lo, lo, note or f"fixed address of {handle}", handle, now)
            held = tx.reservations_overlapping(p.name, lo, lo)
            if held:
                r = held[0]
                if r.handle:
                    raise AddressInUse(f"{ip} is already assigned to handle {r.handle!r}")
                tx.del_reservation(p.name, r.lo)
                for k_lo, k_hi in _split(r.lo, r.hi, lo, lo):
                    tx.put_reservation(replace(r, lo=k_lo, hi=k_hi))
                tx.put_reservation(res)
            else:
                self._hold(tx, p, res)
            tx.add_event(Event(0, now, p.name, ip_str(p.version, lo), "assign", actor=actor,
                               note=f"handle {handle}"))
            return res

        return self.store.transact(change)

    # --- queries -------------------------------------------------------------

    def addresses(
        self, pool: str | None = None, host: str | None = None, limit: int = 1000,
        after: str | None = None,
    ) -> list[tuple[Allocation, Pool]]:
        """Allocations in (pool, address) order, at most ``limit`` (<= :data:`MAX_PAGE`).

        ``after`` continues a listing: the :func:`cursor` of the last row of the
        previous page (``POOL/IP``; a plain IP inside the ``pool`` given).
        """
        if not 1 <= limit <= MAX_PAGE:
            raise InvalidInput(f"limit must be 1-{MAX_PAGE}: page through longer listings "
                               "with 'after'")
        with self.store.read() as tx:
            if pool is not None:
                self._pool(tx, pool)
            pools = {p.name: p for p in tx.list_pools()}
            start = parse_cursor(after, pool) if after else None
            rows = tx.list_allocations(pool, host, start, limit)
            return [(a, pools[a.pool]) for a in rows]

    def reservations(self, pool: str) -> tuple[Pool, list[Reservation]]:
        with self.store.read() as tx:
            p = self._pool(tx, pool)
            return p, tx.list_reservations(pool)

    def show(self, ip: str) -> dict[str, Any]:
        """State of one address: free, reserved or allocated, and by whom."""
        addr = parse_ip(ip)
        with self.store.read() as tx:
            p = self._pool_for(tx, int(addr), addr.version, None)
            out: dict[str, Any] = {"ip": str(addr), "pool": p.name, "cidr": p.cidr}
            first, last = usable_bounds(p.network)
            a = tx.allocation(p.name, int(addr))
            held = tx.reservations_overlapping(p.name, int(addr), int(addr))
            if a is not None:
                out.update(state="allocated", container_id=a.container_id, ifname=a.ifname,
                           host=a.host, netns=a.netns, mac=a.mac, handle=a.handle,
                           labels=a.labels, allowed=list(a.allowed), since=a.created)
            elif not first <= int(addr) <= last:
                out.update(state="unusable", note="network or broadcast address")
            elif held:
                r = held[0]
                out.update(state="reserved", note=r.note, handle=r.handle, since=r.created)
            else:
                out.update(state="free")
            return out

    def search(self, text: str, limit: int = 100) -> dict[str, Any]:
        """What an operator types: an address, a MAC, a container id, or a handle (a pod's
        ``namespace/name``, a container's name). Point reads and index ranges only.

        Returns ``{"query", "kind", "allocations": [(Allocation, Pool)], "reservations":
        [(Reservation, Pool)], "address"}`` (``address``: :meth:`show` of an address)."""
        q = text.strip()
        out: dict[str, Any] = {"query": q, "kind": "nothing", "allocations": [],
                               "reservations": [], "address": None}
        if not q or len(q) > 512:
            return out
        try:
            addr = ipaddress.ip_address(q)
        except ValueError:
            addr = None
        if addr is not None:
            out["kind"] = "address"
            try:
                out["address"] = self.show(str(addr))
            except PoolNotFound:
                out["address"] = {"ip": str(addr), "state": "in no pool"}
            return out
        try:
            mac = normalize_mac(q)
        except InvalidInput:
            mac = None
        with self.store.read() as tx:
            found: list[Allocation] = []
            if mac is not None:
                a = tx.allocation_by_mac(mac)
                out["kind"] = "mac"
                found = [a] if a is not None else []
            else:
                found = tx.allocations_of(q, None, None)[:limit]
                out["kind"] = "container id"
                if not found:
                    found = tx.allocations_by_handle(q, limit)
                    out["kind"] = "handle"
            pools = {p.name: p for p in tx.list_pools()}
            if out["kind"] == "handle":  # an address held for it (a StatefulSet's pod)
                for p in pools.values():
                    r = tx.reservation_by_handle(p.name, q)
                    if r is not None:
                        out["reservations"].append((r, p))
        out["allocations"] = [(a, pools[a.pool]) for a in found if a.pool in pools]
        return out

    def history(self, ip: str | None = None, pool: str | None = None,
                limit: int = 100, after: int | None = None) -> list[Event]:
        """The last ``limit`` events (oldest first), or the ``limit`` after event id ``after``."""
        if not 1 <= limit <= MAX_PAGE:
            raise InvalidInput(f"limit must be 1-{MAX_PAGE}: page through the history with "
                               "'after' (an event id)")
        if ip is not None:
            ip = str(parse_ip(ip))
        with self.store.read() as tx:
            return tx.events(ip, pool, limit, after)

    def blocks(self, pool: str | None = None, host: str | None = None) -> list[Block]:
        with self.store.read() as tx:
            if pool is not None:
                self._pool(tx, pool)
            return tx.blocks(pool, host)

    def hosts(self) -> list[dict[str, Any]]:
        with self.store.read() as tx:
            return tx.hosts()

    def _event(self, pool: Pool, a: Allocation, action: str, actor: str,
               note: str = "") -> Event:
        return Event(0, self.clock(), pool.name, ip_str(pool.version, a.ip), action,
                     a.container_id, a.ifname, a.host, a.mac, actor, note)

