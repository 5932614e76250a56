"""The IPAM on a real 3-member etcd (Debian etcd-server 3.4) with two API replicas.

Every test gets a key prefix of its own on one cluster of the module (three
members on loopback, started and removed by the test), and two ``netd ipam
serve --store etcd://m0,m1,m2/PREFIX`` processes. Proves: concurrent hosts on
both replicas get no duplicate address or MAC; an etcd leader killed mid-run
costs every request nothing but time, and writes resume (how fast: the benchmark); a replica
killed mid-run leaves the other carrying on, the retried requests idempotent;
a commit whose answer is lost is run again and returns the same allocation.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from netd.ipam.etcd_kv import Retry
from netd.ipam.etcd_store import EtcdStore
from netd.ipam.service import IPAM, AllocRequest, PoolSpec, cursor
from tests.conftest import Server, ipam_check, require, start_server
from tests.integration.test_concurrency import check_consistent
from tests.support import etcd

pytestmark = [pytest.mark.real, pytest.mark.slow]

WORKER = Path(__file__).with_name("_alloc_worker.py")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[etcd.EtcdCluster]:
    require(etcd.ensure_etcd(), "etcd is missing (apt-get install etcd-server)")
    c = etcd.EtcdCluster(tmp_path_factory.mktemp("etcd3"), size=3,
                         tag=f"nt{secrets.token_hex(3)}")
    took = c.start()
    print(f"\n3-member etcd healthy after {took:.1f} s")
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture
def prefix(cluster: etcd.EtcdCluster) -> Iterator[str]:
    p = f"/netd-test/{secrets.token_hex(6)}/"
    yield p
    store = EtcdStore(cluster.url(p))
    etcd.drop_store(store)


@pytest.fixture
def replicas(tmp_path: Path, cluster: etcd.EtcdCluster,
             prefix: str) -> Iterator[tuple[Server, Server]]:
    token = secrets.token_hex(16)
    a = start_server(tmp_path, token=token, store=cluster.url(prefix))
    try:
        b = start_server(tmp_path, token=token, store=cluster.url(prefix))
        try:
            yield a, b
        finally:
            b.stop()
    finally:
        a.stop()


def client(srv: Server) -> httpx.Client:
    return httpx.Client(base_url=srv.url, timeout=30,
                        headers={"Authorization": f"Bearer {srv.token}"})


def start_workers(jobs: list[tuple[list[Server], str, int, str, str]],
                  delay: float = 2.0) -> list[subprocess.Popen[bytes]]:
    """(replicas, prefix, count, pools, host) jobs as OS processes, starting together."""
    start_at = time.time() + delay
    return [subprocess.Popen([sys.executable, str(WORKER), ",".join(s.url for s in srvs),
                              srvs[0].token, name, str(count), str(start_at), pools, "0", host],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            for srvs, name, count, pools, host in jobs]


def results(procs: list[subprocess.Popen[bytes]]) -> list[dict[str, Any]]:
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=900)
        assert p.returncode == 0, stderr.decode()[-3000:]
        doc = json.loads(stdout)
        assert doc["errors"] == [], doc["errors"][:5]
        out.append(doc)
    return out


def pools(c: httpx.Client) -> None:
    for body in ({"name": "l2", "cidr": "10.110.0.0/20"},
                 {"name": "bgp", "cidr": "10.111.0.0/20", "mode": "bgp", "block_prefix": 26}):
        r = c.post("/v1/pools", json=body)
        assert r.status_code == 201, r.text


def test_a_warning_before_the_quota_is_reached(cluster: etcd.EtcdCluster, prefix: str) -> None:
    """``quota_gb`` in the URL is the members' --quota-backend-bytes; past 80 % of it the
    server warns (every minute; here called once)."""
    store = EtcdStore(cluster.url(prefix) + "?quota_gb=0.01")  # 10.7 MB
    try:
        assert store.warn_on_space() == []
        blob = b"x" * (512 << 10)
        for i in range(18):  # 9 MiB
            store.client.put(f"{prefix}junk/{i}".encode(), blob)
        deadline = time.monotonic() + 10  # every member, once each has applied the writes
        while len(warned := store.warn_on_space()) < 3 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(warned) == 3 and all("of the 0.01 GiB quota" in w for w in warned), warned
        print("\n" + warned[0])
    finally:
        store.close()


def test_four_hosts_on_two_replicas_no_duplicates(replicas: tuple[Server, Server]) -> None:
    a, b = replicas
    with client(a) as c:
        pools(c)
        t0 = time.monotonic()
        # 4 hosts x 500 allocations, each host's half through each replica, all at once
        procs = start_workers([([srv], f"h{h}-{k}", 250, "l2,bgp", f"h{h}")
                               for h in range(1, 5) for k, srv in (("a", a), ("b", b))])
        done = results(procs)
        took = time.monotonic() - t0 - 2.0
        held = [x for r in done for x in r["held"]]
        assert len(held) == 2000
        print(f"\n2,000 allocations over 2 replicas in {took:.1f} s "
              f"({2000 / took:.0f}/s), slowest {max(r['max_latency_s'] for r in done):.2f} s")
        check_consistent(c, held, [])
        with client(b) as cb:  # the other replica sees the same state
            assert {p["name"]: p["allocated"] for p in cb.get("/v1/pools").json()["pools"]} \
                == {"l2": 1000, "bgp": 1000}
        blocks = c.get("/v1/pools/bgp/blocks").json()["blocks"]
        assert {blk["host"] for blk in blocks} == {"h1", "h2", "h3", "h4"}
    print(ipam_check(a.store_url))


def test_the_etcd_leader_killed_mid_run(cluster: etcd.EtcdCluster,
                                        replicas: tuple[Server, Server]) -> None:
    a, b = replicas
    with client(a) as c:
        pools(c)
        procs = start_workers([([a], "k1", 300, "l2", "h1"), ([b], "k2", 300, "l2", "h2")],
                              delay=1.0)
        time.sleep(2.0)  # mid-run
        leader = cluster.leader()
        killed_at = time.monotonic()
        cluster.kill(leader)
        # writes resume: an allocation through each replica goes through again
        resumed = {}
        for srv in (a, b):
            with client(srv) as cc:
                while True:
                    r = cc.post("/v1/allocate", json={"pool": "l2", "container_id":
                                                      f"probe-{srv.url[-5:]}", "host": "p"})
                    if r.status_code == 200:
                        resumed[srv.url] = time.monotonic() - killed_at
                        break
                    assert time.monotonic() - killed_at < 30, r.text
                    time.sleep(0.05)
        done = results(procs)
        print(f"\nleader {leader.name} killed: writes back after "
              f"{max(resumed.values()):.2f} s; slowest request "
              f"{max(r['max_latency_s'] for r in done):.2f} s")
        # writes resumed (the time is the benchmark's business: etcd_bench's leader gap,
        # target <= 2.5 s; a timed assertion here would only measure CI's load)
        assert len(resumed) == 2
        held = [x for r in done for x in r["held"]]
        assert len(held) == 600
        probes = [x for x in c.get("/v1/addresses", params={"pool": "l2",
                                                            "limit": 1000}).json()["addresses"]
                  if x["container_id"].startswith("probe-")]
        check_consistent(c, held + [{"pool": "l2", "ip": p["ip"], "mac": p["mac"],
                                     "container_id": p["container_id"]} for p in probes], [])
    cluster.restart(leader)
    cluster.wait_healthy()
    ipam_check(a.store_url)


def test_a_replica_killed_mid_run(replicas: tuple[Server, Server]) -> None:
    a, b = replicas
    with client(a) as c:
        pools(c)
        # every worker prefers b and falls back to a
        procs = start_workers([([b, a], f"r{i}", 200, "l2,bgp", f"h{i}") for i in range(3)],
                              delay=1.0)
        time.sleep(2.0)
        b.proc.kill()
        b.proc.wait()
        done = results(procs)
        held = [x for r in done for x in r["held"]]
        assert len(held) == 600
        print(f"\nreplica b killed: {sum(r['retries'] for r in done)} requests retried on a")
        check_consistent(c, held, [])
    ipam_check(a.store_url)


def test_a_lost_commit_answer_returns_the_same_allocation(
        cluster: etcd.EtcdCluster, prefix: str) -> None:
    """The commit reaches etcd, its answer does not (as when the member dies right after):
    the change runs again, finds the owner's allocation and returns it."""
    store = EtcdStore(cluster.url(prefix), group_commit=False)
    ipam = IPAM(store)
    ipam.create_pool(PoolSpec(name="p", cidr="10.112.0.0/24"))
    real_start = store.client.txn_start
    lost = threading.Event()

    def txn_then_lose_the_answer(*args: Any, **kwargs: Any) -> Any:
        answer = real_start(*args, **kwargs)

        def lose() -> Any:
            got = answer()
            if not lost.is_set():
                lost.set()
                raise Retry("the answer was lost")  # committed all the same
            return got

        return lose

    store.client.txn_start = txn_then_lose_the_answer  # type: ignore[method-assign]
    try:
        got, _ = ipam.allocate(AllocRequest(pool="p", container_id="c1", host="h1"))
    finally:
        store.client.txn_start = real_start  # type: ignore[method-assign]
    assert lost.is_set()
    held = ipam.addresses(pool="p")
    assert [(x.ip, x.container_id) for x, _ in held] == [(got.ip, "c1")]
    assert ipam.get_pool("p")[1].allocated == 1
    allocs = [e for e in ipam.history(pool="p") if e.action == "allocate"]
    assert len(allocs) == 1
    # a second allocation of the same owner is the same address (idempotent)
    again, _ = ipam.allocate(AllocRequest(pool="p", container_id="c1", host="h1"))
    assert again == got
    store.close()
    ipam_check(cluster.url(prefix))


def test_listing_by_host_reads_the_allocations_the_host_index_names(
        cluster: etcd.EtcdCluster, prefix: str) -> None:
    """The host index holds names, not copies: a listing by host reads the documents in
    one round trip per page, pages like the full listing, and still reads a host key
    that holds a copy (a store written before the change)."""
    store = EtcdStore(cluster.url(prefix))
    ipam = IPAM(store)
    try:
        ipam.create_pool(PoolSpec(name="a", cidr="10.115.0.0/24"))
        ipam.create_pool(PoolSpec(name="b", cidr="10.115.1.0/24"))
        for i, (pool, host) in enumerate([("a", "h1"), ("b", "h1"), ("a", "h2"),
                                          ("a", "h1"), ("b", "h1")]):
            ipam.allocate(AllocRequest(pool=pool, container_id=f"c{i}", host=host))
        host_keys = store.client.range(f"{prefix}host/".encode(),
                                       f"{prefix}host0".encode()).kvs
        assert len(host_keys) == 5 and all(kv.value == b"" for kv in host_keys)
        every = ipam.addresses(limit=100)

        def of(host: str, pool: str | None = None) -> list[str]:
            return [a.container_id for a, _ in every if a.host == host
                    and (pool is None or a.pool == pool)]

        assert [a.container_id for a, _ in ipam.addresses(host="h1")] == of("h1")
        assert [a.container_id for a, _ in ipam.addresses(pool="b", host="h1")] == of("h1", "b")
        page = ipam.addresses(host="h1", limit=2)
        rest = ipam.addresses(host="h1", after=cursor(*page[-1]))
        assert [a.container_id for a, _ in page + rest] == of("h1")
        # a host key written by the code before holds the whole document: read as it is
        old = next(kv for kv in host_keys if b"/h2/" in kv.key)
        doc = store.client.range(old.key.replace(b"/host/h2/", b"/alloc/")).kvs[0].value
        store.client.put(old.key, doc)
        assert [(a.container_id, a.host) for a, _ in ipam.addresses(host="h2")] == [("c2", "h2")]
        ipam_check(cluster.url(prefix))
    finally:
        store.close()
