"""Property-based tests: random operation sequences keep the IPAM consistent.

After every step, every usable address of the pool is in exactly one place
(allocated, reserved, a never-used free range, the released list, or an
unclaimed BGP block), no address or MAC has two live owners, the counters
match, and allocation fails only when nothing is free.
"""

from __future__ import annotations

import contextlib
import ipaddress
from typing import Any

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from netd.errors import NetdError, PoolExhausted
from netd.ipam.model import key, usable_bounds
from netd.ipam.service import IPAM, AllocRequest, PoolSpec
from netd.ipam.store import SqliteStore
from tests.conftest import require
from tests.support import etcd

OWNERS = [f"c{i}" for i in range(24)]
HANDLES = ["web-0", "web-1", "db-0"]
HOSTS = ["h1", "h2", "h3"]


class IpamMachine(RuleBasedStateMachine):
    mode = "l2"
    cidr = "10.0.0.0/28"
    block_prefix: int | None = None

    def make_store(self) -> Any:
        return SqliteStore(":memory:")

    def teardown(self) -> None:
        self.store.close()

    def __init__(self) -> None:
        super().__init__()
        self.now = 1000.0
        self.store = self.make_store()
        self.ipam = IPAM(self.store, clock=lambda: self.now, cooldown=5)
        self.pool = self.ipam.create_pool(PoolSpec(
            name="p", cidr=self.cidr, mode=self.mode, block_prefix=self.block_prefix,
            reserved=["10.0.0.13"]))
        self.net = self.pool.network
        first, last = usable_bounds(self.net)
        self.addrs = [str(ipaddress.ip_address(i)) for i in range(first, last + 1)]

    @rule(owner=st.sampled_from(OWNERS), host=st.sampled_from(HOSTS),
          handle=st.none() | st.sampled_from(HANDLES), want=st.none() | st.integers(0, 14))
    def allocate(self, owner: str, host: str, handle: str | None, want: int | None) -> None:
        free_before = self.ipam.get_pool("p")[1].free
        held_before = [a for a, _ in self.ipam.addresses() if a.container_id == owner]
        ip = str(self.net.network_address + want) if want is not None else None
        try:
            self.ipam.allocate(AllocRequest(pool="p", container_id=owner, host=host, ip=ip,
                                            handle=handle))
        except PoolExhausted:
            assert free_before == 0 and not held_before and ip is None
        except NetdError:
            pass

    @rule(owner=st.sampled_from(OWNERS))
    def release_owner(self, owner: str) -> None:
        self.ipam.release(container_id=owner)

    @rule(owner=st.sampled_from(OWNERS), n=st.integers(1, 14))
    def release_ip(self, owner: str, n: int) -> None:
        target = str(self.net.network_address + n)
        before = self.ipam.show(target)
        res = self.ipam.release(ip=target, container_id=owner)
        if before.get("container_id") not in (None, owner):
            assert res.released == []  # a stale release never frees another's address

    @rule(n=st.integers(1, 14), width=st.integers(0, 3))
    def reserve(self, n: int, width: int) -> None:
        lo = self.net.network_address + n
        hi = min(lo + width, self.net.broadcast_address - 1)
        with contextlib.suppress(NetdError):
            self.ipam.reserve("p", f"{lo}-{hi}", note="prop")

    @rule(n=st.integers(1, 14), width=st.integers(0, 3))
    def unreserve(self, n: int, width: int) -> None:
        lo = self.net.network_address + n
        hi = min(lo + width, self.net.broadcast_address - 1)
        with contextlib.suppress(NetdError):
            self.ipam.unreserve("p", f"{lo}-{hi}")

    @rule(n=st.integers(1, 14), handle=st.sampled_from(HANDLES))
    def assign(self, n: int, handle: str) -> None:
        with contextlib.suppress(NetdError):
            self.ipam.assign("p", str(self.net.network_address + n), handle)

    @rule(dt=st.sampled_from([0.5, 3.0, 10.0]))
    def tick(self, dt: float) -> None:
        self.now += dt

    @invariant()
    def every_address_in_exactly_one_place(self) -> None:
        lo_all, hi_all = int(self.net.network_address), int(self.net.broadcast_address)
        with self.ipam.store.read() as tx:  # the store's own view, through its interface
            held = tx.list_allocations("p", None, None, 1 << 20)
            reservations = tx.list_reservations("p")
            free = [(key(lo), key(hi)) for _, lo, hi in tx.free_overlapping("p", lo_all, hi_all)]
            released = {key(ip) for ip in tx.released_in("p", lo_all, hi_all)}
            blocks = [(key(b.lo), key(b.hi)) for b in tx.blocks("p", None)]
            by_owner = {(a.container_id, a.ifname): tx.allocation_of("p", a.container_id,
                                                                     a.ifname)
                        for a in held}
        alloc = {key(a.ip): {"mac": a.mac, "handle": a.handle, "fixed": int(a.fixed)}
                 for a in held}
        macs = [a.mac for a in held]
        assert len(macs) == len(set(macs))
        owners = [(a.container_id, a.ifname) for a in held]
        assert len(owners) == len(set(owners))
        assert all(by_owner[(a.container_id, a.ifname)] == a for a in held)  # owner index
        res = [(key(r.lo), key(r.hi)) for r in reservations]
        counts = {"allocated": 0, "reserved": 0, "free": 0}
        for text in self.addrs:
            k = key(int(ipaddress.ip_address(text)))
            places = []
            if k in alloc:
                places.append("allocated")
            elif any(lo <= k <= hi for lo, hi in res):
                places.append("reserved")
            if any(lo <= k <= hi for lo, hi in free):
                places.append("free-range")
            if k in released:
                places.append("released")
            if self.mode == "bgp" and not any(lo <= k <= hi for lo, hi in blocks) and not places:
                places.append("unclaimed")
            assert len(places) == 1, (text, places)
            counts["allocated" if places[0] == "allocated" else
                   "reserved" if places[0] == "reserved" else "free"] += 1
        _, stats = self.ipam.get_pool("p")
        assert stats.free + stats.reserved + stats.allocated == stats.size == len(self.addrs)
        assert (stats.allocated, stats.reserved, stats.free) == (
            counts["allocated"], counts["reserved"], counts["free"])
        # fixed addresses are only ever held under their handle
        for r in reservations:
            if r.handle is None:
                continue
            a = alloc.get(key(r.lo))
            assert a is None or (a["handle"] == r.handle and a["fixed"] == 1)


class BgpMachine(IpamMachine):
    mode = "bgp"
    block_prefix = 30


TestL2Pool = IpamMachine.TestCase
TestL2Pool.settings = settings(max_examples=60, stateful_step_count=40, deadline=None,
                               suppress_health_check=[HealthCheck.too_slow])
TestBgpPool = BgpMachine.TestCase
TestBgpPool.settings = settings(max_examples=60, stateful_step_count=40, deadline=None,
                                suppress_health_check=[HealthCheck.too_slow])


# --- the same machines on a real etcd (fewer examples: each step is a few round trips) -------


class EtcdStoreMixin:
    def make_store(self) -> Any:
        cluster = etcd.shared_cluster()
        require(cluster is not None, "etcd is missing (apt-get install etcd-server)")
        assert cluster is not None
        return etcd.fresh_store(cluster)

    def teardown(self) -> None:
        etcd.drop_store(self.store)  # type: ignore[attr-defined]


class EtcdL2Machine(EtcdStoreMixin, IpamMachine):
    pass


class EtcdBgpMachine(EtcdStoreMixin, BgpMachine):
    pass


ETCD_SETTINGS = settings(max_examples=12, stateful_step_count=30, deadline=None,
                         suppress_health_check=[HealthCheck.too_slow])
TestL2PoolOnEtcd = pytest.mark.real(EtcdL2Machine.TestCase)
TestL2PoolOnEtcd.settings = ETCD_SETTINGS
TestBgpPoolOnEtcd = pytest.mark.real(EtcdBgpMachine.TestCase)
TestBgpPoolOnEtcd.settings = ETCD_SETTINGS
