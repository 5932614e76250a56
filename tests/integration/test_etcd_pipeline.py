"""The etcd store's pipelined group commit: a try built on one still on the wire
(``Stm.on_top_of``) against a real etcd.

A child reads its parent's writes as done and commits after it; what it read
of them is compared at the parent's revision, everything else as it read it:
a third party's change anywhere it looked makes it conflict, and a parent that
fails takes its child down with it (the child's changes run again).
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from netd.ipam.etcd_kv import Conflict, EtcdClient, Stm, prefix_end
from netd.ipam.etcd_store import EtcdStore
from netd.ipam.service import IPAM, AllocRequest, PoolSpec
from tests.conftest import ipam_check
from tests.support import etcd

pytestmark = pytest.mark.real


@pytest.fixture
def client(etcd_cluster: etcd.EtcdCluster) -> Iterator[tuple[EtcdClient, bytes]]:
    """A client and a key prefix of this test's own (removed afterwards)."""
    c = EtcdClient(etcd_cluster.endpoints)
    p = f"/netd-test/{secrets.token_hex(6)}/".encode()
    yield c, p
    c.delete_range(p, prefix_end(p))
    c.close()


def commit_pair(parent: Stm, child: Stm) -> int:
    """The parent, then the child against the parent's revision (as the committer)."""
    rev = parent.commit()
    request = child.request(rev)
    assert request is not None
    return child.finish(child.client.txn(*request))


def test_a_child_reads_its_parents_writes_and_commits_after_it(
        client: tuple[EtcdClient, bytes]) -> None:
    c, p = client
    c.put(p + b"a", b"1")
    parent = Stm(c)
    assert parent.get(p + b"a") == b"1"
    parent.put(p + b"a", b"2")
    parent.put(p + b"r/1", b"x")
    child = Stm.on_top_of(parent)
    assert child.get(p + b"a") == b"2"  # not yet on the server
    assert child.range(p + b"r/", prefix_end(p + b"r/")) == [(p + b"r/1", b"x")]
    child.put(p + b"a", b"3")
    child.put(p + b"r/2", b"y")
    commit_pair(parent, child)
    got = c.range(p, prefix_end(p))
    assert {kv.key: kv.value for kv in got.kvs} == {p + b"a": b"3", p + b"r/1": b"x",
                                                     p + b"r/2": b"y"}


@pytest.mark.parametrize("where", ["in the range it listed", "a key the parent wrote",
                                   "a key it read itself"])
def test_a_third_partys_change_where_the_child_looked_is_a_conflict(
        client: tuple[EtcdClient, bytes], where: str) -> None:
    c, p = client
    c.put(p + b"mine", b"0")
    c.put(p + b"r/5", b"old")
    parent = Stm(c)
    parent.get(p + b"mine")
    parent.put(p + b"r/3", b"parent")  # inside the range the child lists
    child = Stm.on_top_of(parent)
    assert [k for k, _ in child.range(p + b"r/", prefix_end(p + b"r/"))] == [
        p + b"r/3", p + b"r/5"]
    child.get(p + b"mine")
    child.put(p + b"out", b"child")
    rev = parent.commit()
    # the third party, after the parent and before the child
    {"in the range it listed": lambda: c.put(p + b"r/4", b"intruder"),
     "a key the parent wrote": lambda: c.put(p + b"r/3", b"intruder"),
     "a key it read itself": lambda: c.put(p + b"mine", b"intruder")}[where]()
    request = child.request(rev)
    assert request is not None
    with pytest.raises(Conflict):
        child.finish(c.txn(*request))
    assert c.range(p + b"out").kvs == []  # nothing of the child's was written


def test_without_a_third_party_the_split_range_compare_passes(
        client: tuple[EtcdClient, bytes]) -> None:
    """The parent's own writes inside the child's range do not count as a change."""
    c, p = client
    for i in (1, 5, 9):
        c.put(p + f"r/{i}".encode(), b"v")
    parent = Stm(c)
    parent.range(p + b"r/", prefix_end(p + b"r/"))
    parent.put(p + b"r/3", b"new")
    parent.delete(p + b"r/5")
    child = Stm.on_top_of(parent)
    assert [k for k, _ in child.range(p + b"r/", prefix_end(p + b"r/"))] == [
        p + b"r/1", p + b"r/3", p + b"r/9"]
    child.put(p + b"r/7", b"child")
    commit_pair(parent, child)
    got = c.range(p + b"r/", prefix_end(p + b"r/"))
    assert [kv.key for kv in got.kvs] == [p + b"r/1", p + b"r/3", p + b"r/7", p + b"r/9"]


def test_a_failed_parent_takes_its_child_with_it_and_both_run_again(
        etcd_cluster: etcd.EtcdCluster) -> None:
    """A third party touches the pool while a group commit is on the wire: that commit
    conflicts, the one prepared on top of it is dropped, and every change of both
    still happens exactly once."""
    store = etcd.fresh_store(etcd_cluster)
    assert isinstance(store, EtcdStore)
    ipam = IPAM(store)
    try:
        ipam.create_pool(PoolSpec(name="p", cidr="10.113.0.0/22"))
        real_start = store.client.txn_start
        real_gather = store._gather
        calls = [0]
        prepared_on_failed = [0]
        failed: list[Any] = []

        def touch_the_pool_first(*args: Any, **kwargs: Any) -> Any:
            calls[0] += 1
            if calls[0] in (4, 9, 15):  # under load: each has a batch queued behind it
                raw = store.client.range(store.prefix.encode() + b"pool/p").kvs[0].value
                store.client.put(store.prefix.encode() + b"pool/p", raw)  # same value
                failed.append(calls[0])
            return real_start(*args, **kwargs)

        def gather(flying: Any, most: int) -> Any:
            child, taken = real_gather(flying, most)
            if child is not None and calls[0] in failed:
                prepared_on_failed[0] += 1
            return child, taken

        store.client.txn_start = touch_the_pool_first  # type: ignore[method-assign]
        store._gather = gather  # type: ignore[method-assign]
        results: list[str] = []
        lock = threading.Lock()

        def worker(i: int) -> None:
            for j in range(16):
                a, _ = ipam.allocate(AllocRequest(pool="p", container_id=f"c{i}-{j}",
                                                  host=f"h{i % 4}"))
                with lock:
                    results.append(ipam_str(a.ip))

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        store.client.txn_start = real_start  # type: ignore[method-assign]
        assert failed and prepared_on_failed[0] >= 1, "no child was built on a failed parent"
        assert len(results) == 256 and len(set(results)) == 256
        assert ipam.get_pool("p")[1].allocated == 256
        held = {a.container_id for a, _ in ipam.addresses(pool="p", limit=1000)}
        assert held == {f"c{i}-{j}" for i in range(16) for j in range(16)}
        ipam_check(etcd_cluster.url(store.prefix))
    finally:
        etcd.drop_store(store)


def ipam_str(ip: int) -> str:
    import ipaddress

    return str(ipaddress.ip_address(ip))


def test_changes_that_arrive_while_a_commit_is_on_the_wire_go_in_the_next_one(
        etcd_cluster: etcd.EtcdCluster) -> None:
    """The committer executes what arrives during a commit at once, into the try that
    follows it, and sends that try the moment the answer is in: the arrivals wait for
    one commit besides their own, not two, and share one transaction."""
    store = etcd.fresh_store(etcd_cluster)
    assert isinstance(store, EtcdStore)
    ipam = IPAM(store)
    try:
        ipam.create_pool(PoolSpec(name="p", cidr="10.114.0.0/24"))
        real_start = store.client.txn_start
        hold = threading.Event()
        sent: list[int] = []  # operations per transaction sent

        def held_first(compares: Any, success: Any, *args: Any, **kwargs: Any) -> Any:
            success = list(success)
            sent.append(len(success))
            on_done = kwargs.pop("on_done", None)
            if len(sent) == 1:  # the first commit's answer is held back
                def late() -> None:
                    threading.Thread(target=lambda: (hold.wait(10), on_done())).start()
                return real_start(compares, success, *args, on_done=late, **kwargs)
            return real_start(compares, success, *args, on_done=on_done, **kwargs)

        store.client.txn_start = held_first  # type: ignore[method-assign]
        executed: list[str] = []
        real_execute = store._execute

        def execute(changes: Any, stm: Stm, into: Any = None) -> Any:
            executed.extend("c" for _ in changes)
            return real_execute(changes, stm, into)

        store._execute = execute  # type: ignore[method-assign]
        results: dict[str, str] = {}

        def alloc(cid: str) -> None:
            a, _ = ipam.allocate(AllocRequest(pool="p", container_id=cid, host="h1"))
            results[cid] = ipam_str(a.ip)

        first = threading.Thread(target=alloc, args=("first",))
        first.start()
        deadline = time.monotonic() + 10
        while not sent and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(sent) == 1  # the first commit is on the wire
        later = [threading.Thread(target=alloc, args=(f"later{i}",)) for i in range(3)]
        for t in later:
            t.start()
        while len(executed) < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
        # executed before the first answer came, and nothing more sent meanwhile
        assert len(executed) == 4 and len(sent) == 1 and not results
        hold.set()
        for t in [first, *later]:
            t.join(20)
        store.client.txn_start = real_start  # type: ignore[method-assign]
        assert len(results) == 4 and len(set(results.values())) == 4
        assert len(sent) == 2 and sent[1] > sent[0]  # the three in one transaction
        assert ipam.get_pool("p")[1].allocated == 4
        ipam_check(etcd_cluster.url(store.prefix))
    finally:
        etcd.drop_store(store)
