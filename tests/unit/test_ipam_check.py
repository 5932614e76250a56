"""``netd ipam check``: each store's state against the IPAM's rules (SQLite and real etcd)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

from netd.ipam.check import check_store
from netd.ipam.service import IPAM, AllocRequest, PoolSpec
from netd.ipam.store import SqliteStore
from tests.conftest import bin_path


def filled(store: Any) -> IPAM:
    ipam = IPAM(store, cooldown=0)
    ipam.create_pool(PoolSpec(name="p", cidr="10.0.0.0/24", reserved=["10.0.0.200-10.0.0.210"]))
    ipam.create_pool(PoolSpec(name="b", cidr="10.1.0.0/24", mode="bgp", block_prefix=28))
    ipam.reserve("p", "10.0.0.150", "vip")
    ipam.assign("p", "10.0.0.151", "web-0")
    ipam.allocate(AllocRequest(pool="p", container_id="web", host="h1", handle="web-0"))
    for i in range(20):
        ipam.allocate(AllocRequest(pool="p", container_id=f"c{i}", host="h1"))
        ipam.allocate(AllocRequest(pool="b", container_id=f"c{i}", host=f"h{i % 3}"))
    ipam.release(pool="p", container_id="c3")
    return ipam


def test_a_consistent_store_is_reported_consistent(store: Any) -> None:
    filled(store)
    report = check_store(store)
    assert report.problems == [] and report.ok
    assert (report.pools, report.allocations) == (2, 40)


def test_wrong_counters_are_found_and_repaired(store: Any) -> None:
    filled(store)
    store.transact(lambda tx: tx.add_counters("p", 2, 5))
    report = check_store(store)
    assert not report.ok
    assert [p.what for p in report.problems] == [
        "counters say 25 allocated, 15 reserved; there are 20 and 13"]
    repaired = check_store(store, repair=True)
    assert repaired.ok and repaired.problems[0].repaired
    assert check_store(store).problems == []


def test_an_address_both_allocated_and_free_is_reported_not_repaired(store: Any) -> None:
    ipam = filled(store)
    a = ipam.addresses(pool="p")[0][0]
    store.transact(lambda tx: tx.put_free("p", "", a.ip, a.ip))
    report = check_store(store, repair=True)
    assert not report.ok
    assert any(f"{'10.0.0.' + str(a.ip & 0xFF)} is allocated to {a.container_id} and free"
               in p.what and not p.repaired for p in report.problems), report.problems


def test_a_lost_owner_key_in_etcd_is_found_and_written_again(etcd_cluster: Any) -> None:
    """etcd keeps an allocation's indexes as keys of their own; one gone missing (a
    hand-edit, a bug) is reported, and --repair writes the allocation again."""
    from tests.support import etcd

    store = etcd.fresh_store(etcd_cluster)
    try:
        ipam = filled(store)
        a = ipam.addresses(pool="p")[0][0]
        owner_key = store.transact(lambda tx: tx.k("owner", a.container_id, a.ifname, "p"))
        assert store.client.delete_range(owner_key) == 1
        report = check_store(store)
        assert [p.what for p in report.problems] == [
            f"10.0.0.{a.ip & 0xFF}: its owner {a.container_id}/{a.ifname} does not find it"]
        assert check_store(store, repair=True).ok
        assert check_store(store).problems == []
        again, _ = ipam.allocate(AllocRequest(pool="p", container_id=a.container_id,
                                              host="h1"))
        assert again == a  # the owner finds its address again: no second allocation
    finally:
        etcd.drop_store(store)


def test_the_command_exits_1_on_a_problem_and_0_once_repaired(tmp_path: Path) -> None:
    db = tmp_path / "ipam.db"
    store = SqliteStore(str(db))
    filled(store)
    store.transact(lambda tx: tx.add_counters("p", 0, 3))
    store.close()
    url = f"sqlite:///{db}"
    bad = subprocess.run([bin_path("netd"), "ipam", "check", "--store", url],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "counters say 23 allocated" in bad.stdout, bad.stdout
    fixed = subprocess.run([bin_path("netd"), "ipam", "check", "--store", url, "--repair"],
                           capture_output=True, text=True, timeout=60)
    assert fixed.returncode == 0 and "(repaired)" in fixed.stdout, fixed.stdout
    good = subprocess.run([bin_path("netd"), "ipam", "check", "--store", url, "--json"],
                          capture_output=True, text=True, timeout=60)
    assert good.returncode == 0 and '"ok": true' in good.stdout


def test_on_a_terminal_the_command_draws_a_progress_bar(tmp_path: Path) -> None:
    """stderr a terminal (a pty here): a bar of the allocations checked, ending at 100 %;
    a pipe gets none (the other tests)."""
    import os
    import pty
    import select

    db = tmp_path / "ipam.db"
    store = SqliteStore(str(db))
    ipam = IPAM(store)
    ipam.create_pool(PoolSpec(name="big", cidr="10.2.0.0/20"))
    for i in range(2500):
        ipam.allocate(AllocRequest(pool="big", container_id=f"c{i}", host="h1"))
    store.close()
    leader, follower = pty.openpty()
    proc = subprocess.Popen([bin_path("netd"), "ipam", "check", "--store", f"sqlite:///{db}"],
                            stdout=subprocess.PIPE, stderr=follower)
    os.close(follower)
    seen = b""
    while True:
        ready, _, _ = select.select([leader], [], [], 30)
        if not ready:
            break
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the command ended: the pty is closed
            break
        if not chunk:
            break
        seen += chunk
    out, _ = proc.communicate(timeout=30)
    os.close(leader)
    assert proc.returncode == 0
    text = seen.decode(errors="replace")
    assert "100% 2,500/2,500 allocations" in text and "[" + "#" * 30 + "]" in text
    assert out.decode().strip() == "1 pool(s), 2500 allocation(s): consistent"
