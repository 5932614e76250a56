"""The etcd store's pool watch against a real etcd: another server's pool changes
reach this server's cache, through a compaction while the watch is open, and after
falling behind one (it reads everything again)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest

from netd.ipam.etcd_store import EtcdStore, PoolWatch
from netd.ipam.service import IPAM, AllocRequest, PoolSpec
from tests.conftest import ipam_check
from tests.support import etcd

pytestmark = pytest.mark.real


@pytest.fixture
def two(etcd_cluster: etcd.EtcdCluster) -> Iterator[tuple[EtcdStore, EtcdStore]]:
    """Two servers' stores on one key prefix (as two IPAM replicas)."""
    a = etcd.fresh_store(etcd_cluster)
    assert isinstance(a, EtcdStore)
    b = EtcdStore(etcd_cluster.url(a.prefix))
    yield a, b
    b.close()
    etcd.drop_store(a)


def eventually(what: str, ok: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not ok():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.02)


def cached(store: EtcdStore, pool: str) -> bytes | None:
    entry = store._known.get(store._pool_prefix + pool.encode())
    return entry[0] if entry else b"<not cached>"


def test_another_servers_pool_changes_reach_the_cache(
        two: tuple[EtcdStore, EtcdStore]) -> None:
    a, b = two
    watch = a.watch_pools()
    try:
        IPAM(b).create_pool(PoolSpec(name="p", cidr="10.114.0.0/24"))
        eventually("A caches B's new pool", lambda: (cached(a, "p") or b"").startswith(b"{"))
        IPAM(b).delete_pool("p")
        eventually("A caches the pool's deletion", lambda: cached(a, "p") is None)
        assert watch.loads == 1 and watch.events >= 2
    finally:
        watch.stop()


def test_a_compaction_while_the_watch_is_open(etcd_cluster: etcd.EtcdCluster,
                                              two: tuple[EtcdStore, EtcdStore]) -> None:
    a, b = two
    ia, ib = IPAM(a), IPAM(b)
    watch = a.watch_pools()
    try:
        ib.create_pool(PoolSpec(name="p", cidr="10.114.1.0/24"))
        for i in range(20):
            ib.allocate(AllocRequest(pool="p", container_id=f"c{i}", host="h1"))
        eventually("A caches p", lambda: (cached(a, "p") or b"").startswith(b"{"))
        rev = b.client.range(b"/").revision
        b.client.compact(rev)  # the watch is caught up: it goes on
        ib.create_pool(PoolSpec(name="q", cidr="10.114.2.0/24"))
        eventually("A caches q, created after the compaction",
                   lambda: (cached(a, "q") or b"").startswith(b"{"))
        assert watch.loads == 1
        got, _ = ia.allocate(AllocRequest(pool="q", container_id="a1", host="h2"))
        assert got.pool == "q"
    finally:
        watch.stop()
    ipam_check(etcd_cluster.url(a.prefix))


def test_a_watch_that_fell_behind_a_compaction_reads_everything_again(
        two: tuple[EtcdStore, EtcdStore]) -> None:
    a, b = two
    ib = IPAM(b)
    ib.create_pool(PoolSpec(name="p", cidr="10.114.3.0/24"))
    first = a.watch_pools()
    eventually("A caches p", lambda: (cached(a, "p") or b"").startswith(b"{"))
    behind = first.revision
    first.stop()  # A is cut off (its member died, the network went) ...
    ib.delete_pool("p")
    ib.create_pool(PoolSpec(name="r", cidr="10.114.4.0/24"))
    b.client.compact(b.client.range(b"/").revision)  # ... and what it missed is compacted
    assert cached(a, "p") is not None and cached(a, "r") == b"<not cached>"  # stale
    again = PoolWatch(a)
    again.revision = behind  # it goes on from where it was
    again.start()
    try:
        eventually("A reads the pools again", lambda: again.loads == 1)
        eventually("A's cache is current", lambda: cached(a, "p") == b"<not cached>"
                   and (cached(a, "r") or b"").startswith(b"{"))
        ib.create_pool(PoolSpec(name="s", cidr="10.114.5.0/24"))
        eventually("and follows on", lambda: (cached(a, "s") or b"").startswith(b"{"))
    finally:
        again.stop()
