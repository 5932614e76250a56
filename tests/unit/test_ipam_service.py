"""IPAM domain rules, run against the real SQLite store (in memory and on disk)."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import pytest

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
from netd.ipam.model import Allocation, Pool, mac_for_ipv4
from netd.ipam.service import IPAM, MAX_PAGE, AllocRequest, PoolSpec, cursor
from netd.ipam.store import SqliteStore


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def ipam(clock: Clock, store: Any) -> IPAM:
    """The IPAM on each store in turn (``store``: SQLite, then a real etcd)."""
    return IPAM(store, clock=clock, cooldown=60)


def ip(text: str) -> int:
    return int(ipaddress.ip_address(text))


def alloc(ipam: IPAM, cid: str, pool: str = "p", **kw: object) -> str:
    a, _ = ipam.allocate(AllocRequest(pool=pool, container_id=cid, **kw))  # type: ignore[arg-type]
    return str(ipaddress.ip_address(a.ip))


def every_allocation(ipam: IPAM, **kw: Any) -> list[tuple[Allocation, Pool]]:
    """All rows, page after page (a page holds at most MAX_PAGE)."""
    out: list[tuple[Allocation, Pool]] = []
    after = None
    while True:
        page = ipam.addresses(limit=MAX_PAGE, after=after, **kw)
        out += page
        if len(page) < MAX_PAGE:
            return out
        after = cursor(*page[-1])


def snapshot(ipam: IPAM) -> object:
    pools = [(p.to_dict(), s) for p, s in ipam.list_pools()]
    addrs = [(a, p.name) for a, p in every_allocation(ipam)]
    res = [ipam.reservations(p["name"]) for p, _ in pools]
    return pools, addrs, res, ipam.history(limit=MAX_PAGE), ipam.blocks()


# --- pools -------------------------------------------------------------------


def test_pool_defaults_and_stats(ipam: IPAM) -> None:
    pool = ipam.create_pool(PoolSpec(name="p", cidr="10.0.0.0/24", vlan=100,
                                     labels={"tenant": "blue"}))
    assert pool.gateway == "10.0.0.1"
    assert pool.vlan == 100
    _, stats = ipam.get_pool("p")
    assert (stats.size, stats.reserved, stats.allocated, stats.free) == (254, 1, 0, 253)


def test_gateway_reserved_and_never_handed_out(ipam: IPAM) -> None:
    ipam.create_pool(PoolSpec(name="p", cidr="10.0.0.0/30", gateway="10.0.0.2"))
    assert alloc(ipam, "a") == "10.0.0.1"
    with pytest.raises(PoolExhausted):
        alloc(ipam, "b")
    assert ipam.show("10.0.0.2")["state"] == "reserved"
    assert ipam.show("10.0.0.3")["state"] == "unusable"


@pytest.mark.parametrize("spec, err", [
    (PoolSpec(name="p", cidr="10.0.0.0/33"), InvalidInput),
    (PoolSpec(name="p", cidr="10.0.0.1/24"), InvalidInput),
    (PoolSpec(name="p", cidr="10.0.0.0/24", gateway="10.0.1.1"), InvalidInput),
    (PoolSpec(name="p", cidr="10.0.0.0/24", gateway="10.0.0.255"), InvalidInput),
    (PoolSpec(name="p", cidr="10.0.0.0/24", vlan=0), InvalidInput),
    (PoolSpec(name="p", cidr="10.0.0.0/24", vlan=4095), InvalidInput),
    (PoolSpec(name="p", cidr="10.0.0.0/24", reserved=["10.0.1.5"]), InvalidInput),
    (PoolSpec(name="p", cidr="10.0.0.0/24", reserved=["10.0.0.5-10.0.1.5"]), InvalidInput),
    (PoolSpec(name="P!", cidr="10.0.0.0/24"), InvalidInput),
    (PoolSpec(name="x" * 64, cidr="10.0.0.0/24"), InvalidInput),
    (PoolSpec(name="p", cidr="10.0.0.0/24", mode="vxlan"), InvalidInput),
    (PoolSpec(name="p", cidr="10.0.0.0/31"), InvalidInput),
    (PoolSpec(name="p", cidr="10.0.0.0/24", block_prefix=26), InvalidInput),
    (PoolSpec(name="p"), InvalidInput),
])
def test_bad_pool_changes_nothing(ipam: IPAM, spec: PoolSpec, err: type[Exception]) -> None:
    ipam.create_pool(PoolSpec(name="keep", cidr="10.9.0.0/24"))
    before = snapshot(ipam)
    with pytest.raises(err):
        ipam.create_pool(spec)
    assert snapshot(ipam) == before


def test_overlap_and_duplicate_refused(ipam: IPAM) -> None:
    ipam.create_pool(PoolSpec(name="a", cidr="10.0.0.0/16"))
    before = snapshot(ipam)
    with pytest.raises(PoolOverlap):
        ipam.create_pool(PoolSpec(name="b", cidr="10.0.5.0/24"))
    with pytest.raises(PoolOverlap):
        ipam.create_pool(PoolSpec(name="c", cidr="10.0.0.0/8"))
    with pytest.raises(PoolExists):
        ipam.create_pool(PoolSpec(name="a", cidr="10.1.0.0/16"))
    assert snapshot(ipam) == before
    ipam.create_pool(PoolSpec(name="v6", cidr="fd00::/64"))  # other family never overlaps


def test_generated_pools_pick_lowest_free_subnet_and_vlan(ipam: IPAM) -> None:
    ipam.create_pool(PoolSpec(name="manual", cidr="10.8.0.0/24", vlan=100))
    ipam.create_pool(PoolSpec(name="big", cidr="10.8.2.0/23", vlan=102))
    names = []
    for i in range(3):
        p = ipam.create_pool(PoolSpec(name=f"g{i}", supernet="10.8.0.0/16", prefix_len=24,
                                      vlan="auto", vlan_range=(100, 110)))
        names.append((p.cidr, p.vlan))
    assert names == [("10.8.1.0/24", 101), ("10.8.4.0/24", 103), ("10.8.5.0/24", 104)]


def test_generated_pool_exhaustion(ipam: IPAM) -> None:
    ipam.create_pool(PoolSpec(name="g0", supernet="10.8.0.0/23", prefix_len=24))
    ipam.create_pool(PoolSpec(name="g1", supernet="10.8.0.0/23", prefix_len=24))
    with pytest.raises(PoolExhausted):
        ipam.create_pool(PoolSpec(name="g2", supernet="10.8.0.0/23", prefix_len=24))
    with pytest.raises(PoolExhausted):
        ipam.create_pool(PoolSpec(name="g3", cidr="10.9.0.0/24", vlan="auto",
                                  vlan_range=(5, 5)))  # g0 and g1 have no VLAN: 5 is free
        ipam.create_pool(PoolSpec(name="g4", cidr="10.9.1.0/24", vlan="auto", vlan_range=(5, 5)))
    assert len(ipam.list_pools()) == 3


def test_delete_pool_refused_with_allocations(ipam: IPAM) -> None:
    ipam.create_pool(PoolSpec(name="p", cidr="10.0.0.0/24"))
    alloc(ipam, "a")
    with pytest.raises(PoolInUse):
        ipam.delete_pool("p")
    assert ipam.delete_pool("p", force=True) == 1
    with pytest.raises(PoolNotFound):
        ipam.get_pool("p")
    assert [e.action for e in ipam.history("10.0.0.2")] == [
        "pool-create", "allocate", "release", "pool-delete"]


# --- allocation ----------------------------------------------------------------


def test_allocation_is_idempotent_per_owner(ipam: IPAM) -> None:
    ipam.create_pool(PoolSpec(name="p", cidr="10.0.0.0/24"))
    first = alloc(ipam, "c1", host="h1")
    assert alloc(ipam, "c1", host="h1") == first
    assert alloc(ipam, "c1", ifname="net1") != first
    assert ipam.get_pool("p")[1].allocated == 2


def test_specific_ip_rules(ipam: IPAM) -> None:
    ipam.create_pool(PoolSpec(name="p", cidr="10.0.0.0/24", reserved=["10.0.0.10-10.0.0.19"]))
    assert alloc(ipam, "a", ip="10.0.0.50") == "10.0.0.50"
    before = snapshot(ipam)
    for bad, err in [("10.0.0.50", AddressInUse), ("10.0.0.15", AddressInUse),
                     ("10.0.0.1", AddressInUse), ("10.0.1.5", InvalidInput),
                     ("10.0.0.0", InvalidInput), ("10.0.0.255", InvalidInput),
                     ("nonsense", InvalidInput)]:
        with pytest.raises(err):
            alloc(ipam, "b", ip=bad)
    assert snapshot(ipam) == before
    # dynamic allocation skips the address taken ahead of time
    got = {alloc(ipam, f"d{i}") for i in range(60)}
    assert "10.0.0.50" not in got and not any(f"10.0.0.1{i}" in got for i in range(10))


def test_macs_deterministic_unique_and_supplied(ipam: IPAM) -> None:
    ipam.create_pool(PoolSpec(name="p", cidr="10.0.0.0/24"))
    a, _ = ipam.allocate(AllocRequest(pool="p", container_id="a"))
    assert a.mac == mac_for_ipv4(a.ip) == "0a:58:0a:00:00:02"
    b, _ = ipam.allocate(AllocRequest(pool="p", container_id="b", mac="02:AA:BB:CC:DD:EE"))
    assert b.mac == "02:aa:bb:cc:dd:ee"
    before = snapshot(ipam)
    with pytest.raises(MacInUse):
        ipam.allocate(AllocRequest(pool="p", container_id="c", mac="02:aa:bb:cc:dd:ee"))
    for bad in ("01:00:5e:00:00:01", "zz:00:00:00:00:00", "00:00:00:00:00:00"):
        with pytest.raises(InvalidInput):
            ipam.allocate(AllocRequest(pool="p", container_id="c", mac=bad))
    assert snapshot(ipam) == before
    # a supplied MAC that equals the derived MAC of the next address: that one gets a random MAC
    c, _ = ipam.allocate(AllocRequest(pool="p", container_id="c", mac=mac_for_ipv4(ip("10.0.0.5"))))
    d, _ = ipam.allocate(AllocRequest(pool="p", container_id="d"))
    assert c.ip == ip("10.0.0.4") and d.ip == ip("10.0.0.5") and d.mac != c.mac


def test_ipv6_macs_are_random_locally_administered(ipam: IPAM) -> None:
    ipam.create_pool(PoolSpec(name="p", cidr="fd00:1::/64"))
    macs = set()
    for i in range(20):
        a, _ = ipam.allocate(AllocRequest(pool="p", container_id=f"c{i}"))
        first = int(a.mac[:2], 16)
        assert first & 0b11 == 0b10
        macs.add(a.mac)
    assert len(macs) == 20


def test_update_hands_over_and_relabels_only_for_the_holder(ipam: IPAM) -> None:
    ipam.create_pool(PoolSpec(name="p", cidr="10.0.0.0/24"))
    a, _ = ipam.allocate(AllocRequest(pool="p", container_id="tmp", labels={"k": "1"},
                                      mac="02:00:00:00:00:01"))
    addr = str(ipaddress.ip_address(a.ip))
    other = alloc(ipam, "ep2")
    before = snapshot(ipam)
    for kwargs, err in [({"container_id": "someone"}, AddressInUse),
                        ({"container_id": "tmp", "ifname": "net1"}, AddressInUse),
                        ({"container_id": "tmp", "new_container_id": "ep2"}, AddressInUse),
                        ({"container_id": "tmp", "labels": {"": "x"}}, InvalidInput)]:
        with pytest.raises(err):
            ipam.update(addr, **kwargs)  # type: ignore[arg-type]
    with pytest.raises(NotFound):
        ipam.update("10.0.0.200", container_id="tmp")
    assert snapshot(ipam) == before
    b, _ = ipam.update(addr, container_id="tmp", new_container_id="ep1",
                       labels={"container_name": "web"})
    assert (b.ip, b.mac, b.container_id) == (a.ip, a.mac, "ep1")
    assert b.labels == {"k": "1", "container_name": "web"}
    assert ipam.show(addr)["container_id"] == "ep1"
    assert ipam.history(ip=addr, limit=1)[0].action == "update"
    # idempotent: the same update again changes nothing and records nothing
    n = len(ipam.history(limit=1000))
    ipam.update(addr, container_id="ep1", labels={"container_name": "web"})
    assert len(ipam.history(limit=1000)) == n
    # the new owner releases it; the old one cannot
    assert ipam.release(container_id="tmp").released == []
    assert len(ipam.release(container_id="ep1").released) == 1
    assert ipam.show(other)["container_id"] == "ep2"
    assert ipam.get_pool("p")[1].allocated == 1


# --- release and cooldown ------------------------------------------------------


def test_release_by_owner_and_ip_with_stale_protection(ipam: IPAM, clock: Clock) -> None:
    ipam.create_pool(PoolSpec(name="p", cidr="10.0.0.0/29"))
    addr = alloc(ipam, "old")
    assert len(ipam.release(container_id="old").released) == 1
    res = ipam.release(container_id="old")
    assert res.released == [] and "nothing to release" in res.message
    clock.now += 3600
    # fill so that the old address is handed out again, to "new"
    taken = {alloc(ipam, f"n{i}") for i in range(5)}
    assert addr in taken
    holder = ipam.show(addr)["container_id"]
    stale = ipam.release(ip=addr, container_id="old")
    assert stale.released == [] and "another owner" in stale.message
    assert ipam.show(addr)["container_id"] == holder
    with pytest.raises(InvalidInput):
        ipam.release(ip=addr)  # an operator must say force
    assert len(ipam.release(ip=addr, force=True).released) == 1
    again = ipam.release(ip=addr, force=True)
    assert again.released == [] and "not allocated" in again.message
    with pytest.raises(NotFound):
        ipam.release(ip="192.0.2.1", force=True)


def test_released_addresses_are_reused_last_and_lru(ipam: IPAM, clock: Clock) -> None:
    ipam.create_pool(PoolSpec(name="p", cidr="10.0.0.0/28"))  # .2 - .14 (13)
    first = [alloc(ipam, f"c{i}") for i in range(3)]  # .2 .3 .4
    ipam.release(container_id="c1")
    clock.now += 1
    ipam.release(container_id="c0")
    # never-used addresses come before released ones
    fresh = [alloc(ipam, f"f{i}") for i in range(10)]
    assert first[1] not in fresh and first[0] not in fresh
    # pool has only released addresses left; both inside cooldown: oldest released first
    assert alloc(ipam, "x") == first[1]
    assert alloc(ipam, "y") == first[0]


def test_cooldown_prefers_cooled_addresses(ipam: IPAM, clock: Clock) -> None:
    ipam.create_pool(PoolSpec(name="p", cidr="10.0.0.0/29", mode="bgp", block_prefix=30))
    # bgp pool, host h1: block .0/30 has .2 .3 usable (gateway .1)
    a = alloc(ipam, "a", host="h1")
    ipam.release(container_id="a")
    b = alloc(ipam, "b", host="h1")
    assert b != a  # fresh first
    ipam.release(container_id="b")
    clock.now += 120  # both cooled
    assert alloc(ipam, "c", host="h1") == a  # least recently released


# --- reservations and handles --------------------------------------------------


def test_reserve_unreserve_and_counts(ipam: IPAM) -> None:
    ipam.create_pool(PoolSpec(name="p", cidr="10.0.0.0/24"))
    alloc(ipam, "a")  # .2
    r = ipam.reserve("p", "10.0.0.100-10.0.0.109", note="lb vips")
    assert r.count == 10
    assert ipam.get_pool("p")[1].reserved == 11
    before = snapshot(ipam)
    for spec, err in [("10.0.0.105", AddressInUse), ("10.0.0.2", AddressInUse),
                      ("10.0.1.1", InvalidInput), ("10.0.0.0", InvalidInput)]:
        with pytest.raises(err):
            ipam.reserve("p", spec)
    with pytest.raises(PoolNotFound):
        ipam.reserve("nope", "10.0.0.5")
    assert snapshot(ipam) == before
    assert ipam.unreserve("p", "10.0.0.105") == 1
    assert ipam.get_pool("p")[1].reserved == 10
    assert alloc(ipam, "b", ip="10.0.0.105") == "10.0.0.105"
    # unreserving a range that includes the gateway keeps the gateway reserved
    assert ipam.unreserve("p", "10.0.0.0/24") == 9
    assert ipam.show("10.0.0.1")["state"] == "reserved"
    assert ipam.get_pool("p")[1].reserved == 1


def test_fixed_address_follows_handle_across_hosts(ipam: IPAM, clock: Clock) -> None:
    ipam.create_pool(PoolSpec(name="p", cidr="10.0.0.0/24"))
    ipam.assign("p", "10.0.0.77", "web-0")
    assert ipam.get_pool("p")[1].reserved == 2
    a = alloc(ipam, "pod-1", host="h1", handle="web-0")
    assert a == "10.0.0.77"
    stats = ipam.get_pool("p")[1]
    assert (stats.reserved, stats.allocated) == (1, 1)
    with pytest.raises(AddressInUse):
        alloc(ipam, "pod-2", host="h2", handle="web-0")  # old pod still holds it
    ipam.release(container_id="pod-1")
    assert ipam.show("10.0.0.77")["state"] == "reserved"
    assert alloc(ipam, "pod-2", host="h2", handle="web-0") == "10.0.0.77"
    # others never get it, and a handle without an assignment gets a dynamic address
    assert alloc(ipam, "other", handle="web-1") != "10.0.0.77"
    with pytest.raises(AddressInUse):
        alloc(ipam, "x", ip="10.0.0.77")
    with pytest.raises(AddressInUse):
        ipam.assign("p", "10.0.0.78", "web-0")
    with pytest.raises(AddressInUse):
        ipam.unreserve("p", "10.0.0.77")


def test_assign_inside_reserved_range_splits_it(ipam: IPAM) -> None:
    ipam.create_pool(PoolSpec(name="p", cidr="10.0.0.0/24", reserved=["10.0.0.10-10.0.0.20"]))
    ipam.assign("p", "10.0.0.15", "db-0")
    _, res = ipam.reservations("p")
    assert [(r.lo & 255, r.hi & 255, r.handle) for r in res] == [
        (1, 1, None), (10, 14, None), (15, 15, "db-0"), (16, 20, None)]
    assert ipam.get_pool("p")[1].reserved == 12


# --- BGP blocks ------------------------------------------------------------------


def test_bgp_blocks_affinity_claim_and_borrow(ipam: IPAM) -> None:
    ipam.create_pool(PoolSpec(name="p", cidr="10.0.0.0/28", mode="bgp", block_prefix=30))
    # blocks: .0/30 (h1: .2 .3, gateway .1), .4/30, .8/30, .12/30 (.12 .13 .14; .15 broadcast)
    h1 = [alloc(ipam, f"a{i}", host="h1") for i in range(3)]
    assert h1 == ["10.0.0.2", "10.0.0.3", "10.0.0.4"]
    h2 = [alloc(ipam, f"b{i}", host="h2") for i in range(2)]
    assert h2 == ["10.0.0.8", "10.0.0.9"]
    blocks = {(ipaddress.ip_address(b.lo).__str__(), b.host) for b in ipam.blocks("p")}
    assert blocks == {("10.0.0.0", "h1"), ("10.0.0.4", "h1"), ("10.0.0.8", "h2")}
    more = [alloc(ipam, f"c{i}", host="h3") for i in range(3)]
    assert more == ["10.0.0.12", "10.0.0.13", "10.0.0.14"]
    # all blocks claimed: h3 borrows from other hosts' blocks
    assert alloc(ipam, "d", host="h3") == "10.0.0.5"
    stats = ipam.get_pool("p")[1]
    assert stats.free == stats.size - stats.reserved - stats.allocated


def test_one_address_blocks_of_an_older_store_never_hand_out_special_addresses(
        ipam: IPAM) -> None:
    """A /32-block pool (0.1.0 took them; now refused) handed out the network, gateway
    and broadcast addresses, and showed free -2: its blocks of nothing now stay empty."""
    with ipam.store.write() as tx:  # as 0.1.0 stored it
        tx.insert_pool(Pool(name="p", cidr="10.0.0.0/29", gateway="10.0.0.1", mode="bgp",
                            block_prefix=32))
        tx.set_block_cursor("p", ip("10.0.0.0"))
    ipam.reserve("p", "10.0.0.1", note="gateway")
    got = []
    with pytest.raises(PoolExhausted):
        for n in range(10):
            got.append(alloc(ipam, f"c{n}", host="h1"))
    assert got == ["10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.5", "10.0.0.6"]
    stats = ipam.get_pool("p")[1]
    assert stats.free == 0 and stats.utilisation == 1.0


@pytest.mark.parametrize(("cidr", "block_prefix"), [
    ("10.0.0.0/24", 32), ("10.0.0.0/24", 0), ("10.0.0.0/24", 23), ("fd00::/64", 128),
    ("fd00::/64", 63)])
def test_block_sizes_that_hold_nothing_or_are_not_blocks_are_refused(
        ipam: IPAM, cidr: str, block_prefix: int) -> None:
    before = snapshot(ipam)
    with pytest.raises(InvalidInput, match="block prefix"):
        ipam.create_pool(PoolSpec(name="p", cidr=cidr, mode="bgp", block_prefix=block_prefix))
    assert snapshot(ipam) == before


def test_smallest_blocks_are_two_addresses(ipam: IPAM) -> None:
    ipam.create_pool(PoolSpec(name="p", cidr="10.0.0.0/29", mode="bgp", block_prefix=31))
    got = [alloc(ipam, f"c{n}", host="h1") for n in range(5)]
    assert got == ["10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.5", "10.0.0.6"]
    with pytest.raises(PoolExhausted):
        alloc(ipam, "c5", host="h1")


def test_bgp_specific_ip_in_unclaimed_block(ipam: IPAM) -> None:
    ipam.create_pool(PoolSpec(name="p", cidr="10.0.0.0/28", mode="bgp", block_prefix=30))
    assert alloc(ipam, "x", ip="10.0.0.6", host="h9") == "10.0.0.6"
    got = [alloc(ipam, f"a{i}", host="h1") for i in range(4)]
    assert "10.0.0.6" not in got


def test_ipv6_bgp_default_blocks(ipam: IPAM) -> None:
    ipam.create_pool(PoolSpec(name="p", cidr="fd00:2::/64", mode="bgp"))
    a = alloc(ipam, "a", host="h1")
    b = alloc(ipam, "b", host="h2")
    assert ipaddress.ip_address(b) in ipaddress.ip_network("fd00:2::40/122")
    assert a == "fd00:2::2"
    assert [blk.prefix for blk in ipam.blocks("p")] == [122, 122]


# --- scale: a /8 or /64 costs no more than a /24 ------------------------------------


def test_huge_pools_are_cheap(ipam: IPAM, tmp_path: Path) -> None:
    ipam.create_pool(PoolSpec(name="v4", cidr="10.0.0.0/8"))
    ipam.create_pool(PoolSpec(name="v6", cidr="fd00:3::/48"))
    for i in range(50):
        alloc(ipam, f"a{i}", pool="v4")
        alloc(ipam, f"b{i}", pool="v6")
    _, s4 = ipam.get_pool("v4")
    _, s6 = ipam.get_pool("v6")
    assert s4.size == 2**24 - 2 and s4.allocated == 50
    assert s6.size == 2**80 - 1 and s6.free == 2**80 - 1 - 51
    ipam.reserve("v6", "fd00:3:0:1::/64", note="huge")
    assert ipam.get_pool("v6")[1].reserved == 1 + 2**64


def test_history_records_who_held_an_address(ipam: IPAM, clock: Clock) -> None:
    ipam.create_pool(PoolSpec(name="p", cidr="10.0.0.0/30"))
    alloc(ipam, "c1", host="h1")
    clock.now += 10
    ipam.release(container_id="c1")
    clock.now += 10
    alloc(ipam, "c2", host="h2")
    events = [e for e in ipam.history("10.0.0.2") if e.container_id]
    assert [(e.action, e.container_id, e.host) for e in events] == [
        ("allocate", "c1", "h1"), ("release", "c1", "h1"), ("allocate", "c2", "h2")]
    assert all(e.mac == "0a:58:0a:00:00:02" for e in events)


def test_a_pools_history_is_its_own_also_after_it_is_gone(ipam: IPAM) -> None:
    """Per pool: its own and its addresses' events, none of a neighbour's; a pool
    deleted and its CIDR used again under another name: each keeps its own."""
    def acts(**kw: Any) -> list[tuple[str, str, str]]:
        return [(e.pool, e.action, e.container_id) for e in ipam.history(**kw)
                if e.action != "reserve"]  # its network, gateway, broadcast

    ipam.create_pool(PoolSpec(name="p", cidr="10.0.0.0/29"))
    ipam.create_pool(PoolSpec(name="q", cidr="10.0.1.0/29"))
    alloc(ipam, "c1", pool="p")
    alloc(ipam, "c2", pool="q")
    ipam.release(container_id="c1")
    p_events = [("p", "pool-create", ""), ("p", "allocate", "c1"), ("p", "release", "c1")]
    assert acts(pool="p") == p_events
    ipam.delete_pool("p")
    ipam.create_pool(PoolSpec(name="p2", cidr="10.0.0.0/29"))
    alloc(ipam, "c3", pool="p2")
    assert acts(pool="p") == [*p_events, ("p", "pool-delete", "")]
    assert acts(pool="p2") == [("p2", "pool-create", ""), ("p2", "allocate", "c3")]
    assert acts(ip="10.0.0.2") == [*p_events, ("p", "pool-delete", ""),
                                   ("p2", "pool-create", ""), ("p2", "allocate", "c3")]
    assert acts(pool="q") == [("q", "pool-create", ""), ("q", "allocate", "c2")]
    assert len(acts(limit=100)) == 8
    assert [e.action for e in ipam.history(pool="p", limit=2)] == ["release", "pool-delete"]


def test_store_survives_reopen(tmp_path: Path, clock: Clock) -> None:
    db = tmp_path / "ipam.db"
    one = IPAM(SqliteStore(str(db)), clock=clock)
    one.create_pool(PoolSpec(name="p", cidr="10.0.0.0/24"))
    first = alloc(one, "a")
    one.store.close()
    two = IPAM(SqliteStore(str(db)), clock=clock)
    assert alloc(two, "a") == first
    assert alloc(two, "b") != first
    assert (db.stat().st_mode & 0o777) == 0o600


def test_range_reservations_show_in_each_address_history(ipam: IPAM) -> None:
    ipam.create_pool(PoolSpec(name="p", cidr="10.0.0.0/24", reserved=["10.0.0.10-10.0.0.19"]))
    ipam.reserve("p", "10.0.0.100-10.0.0.109", note="vips")
    ipam.unreserve("p", "10.0.0.100-10.0.0.104")
    assert [(e.action, e.note) for e in ipam.history("10.0.0.12")][1:] == [
        ("reserve", "reserved at pool creation")]
    assert [e.action for e in ipam.history("10.0.0.102")] == [
        "pool-create", "reserve", "unreserve"]
    assert [e.action for e in ipam.history("10.0.0.107")] == ["pool-create", "reserve"]
    assert [e.action for e in ipam.history("10.0.0.200")] == ["pool-create"]


def test_paging_goes_across_pools_with_a_cursor_and_pages_are_capped(ipam: IPAM) -> None:
    ipam.create_pool(PoolSpec(name="p", cidr="10.0.0.0/24"))
    ipam.create_pool(PoolSpec(name="q", cidr="10.0.1.0/24"))
    for i in range(3):
        alloc(ipam, f"p{i}")
        alloc(ipam, f"q{i}", pool="q")
    page = ipam.addresses(pool="p", limit=2, after="10.0.0.3")
    assert [a.ip & 255 for a, _ in page] == [4]
    first = ipam.addresses(limit=4)
    assert [(p.name, a.ip & 255) for a, p in first] == [("p", 2), ("p", 3), ("p", 4), ("q", 2)]
    rest = ipam.addresses(limit=4, after=cursor(*first[-1]))
    assert [(p.name, a.ip & 255) for a, p in rest] == [("q", 3), ("q", 4)]
    assert cursor(*first[-1]) == "q/10.0.1.2"
    assert len(every_allocation(ipam)) == 6
    for bad in ("10.0.0.3", "p/nonsense", "NOPE/10.0.0.1"):
        with pytest.raises(InvalidInput):
            ipam.addresses(limit=2, after=bad)
    with pytest.raises(InvalidInput, match="not in pool"):
        ipam.addresses(pool="p", limit=2, after="q/10.0.1.2")
    with pytest.raises(InvalidInput, match="limit must be 1-1000"):
        ipam.addresses(limit=MAX_PAGE + 1)
    # the history pages too, oldest first from an event id
    events = ipam.history(limit=3, after=0)
    assert [e.action for e in events] == ["pool-create", "reserve", "pool-create"]
    assert ipam.history(limit=2, after=events[-1].id)[0].id > events[-1].id
    with pytest.raises(InvalidInput):
        ipam.history(limit=MAX_PAGE + 1)


# --- allowed extra addresses (allowed-address-pairs) --------------------------


def test_allowed_addresses_are_set_checked_and_recorded(ipam: IPAM) -> None:
    ipam.create_pool(PoolSpec(name="p", cidr="10.0.0.0/24"))
    ipam.create_pool(PoolSpec(name="six", cidr="fd00:1::/64"))
    mine, other = alloc(ipam, "db-0"), alloc(ipam, "db-1")
    ipam.reserve("p", "10.0.0.200", note="VIP of db")
    a, _ = ipam.set_allowed(mine, container_id="db-0", allowed=["10.0.0.200", "10.9.9.9"],
                            actor="netctl:alice")
    assert a.allowed == ("10.0.0.200", "10.9.9.9")  # outside every pool is fine
    assert ipam.show(mine)["allowed"] == ["10.0.0.200", "10.9.9.9"]
    event = ipam.history(mine)[-1]
    assert (event.action, event.note, event.actor) == (
        "allow", "allowed: 10.0.0.200, 10.9.9.9", "netctl:alice")
    before = snapshot(ipam)
    for allowed, error, text in [
        (["10.0.0.201"], InvalidInput, "not reserved there"),  # free: a container could get it
        ([other], AddressInUse, "allocated to db-1"),
        ([mine], InvalidInput, "own address"),
        (["fd00:1::5"], InvalidInput, "not IPv4"),
        (["224.0.0.18"], InvalidInput, "not a unicast"),
        (["127.0.0.1"], InvalidInput, "not a unicast"),
        (["nonsense"], InvalidInput, "invalid allowed address"),
        ([f"10.1.0.{i}" for i in range(17)], InvalidInput, "at most 16"),
    ]:
        with pytest.raises(error, match=text):
            ipam.set_allowed(mine, container_id="db-0", allowed=allowed)
    with pytest.raises(AddressInUse, match="held by db-0"):
        ipam.set_allowed(mine, container_id="intruder", allowed=[])
    assert snapshot(ipam) == before  # refused: nothing changed, nothing recorded
    a, _ = ipam.set_allowed(mine, container_id="db-0", allowed=[])
    assert a.allowed == () and ipam.history(mine)[-1].note == "allowed: none"
    # the list goes with the allocation: released, it is gone
    ipam.set_allowed(mine, container_id="db-0", allowed=["10.0.0.200"])
    ipam.release(container_id="db-0")
    assert ipam.show(mine)["state"] == "free"
    assert ipam.show(alloc(ipam, "db-0"))["allowed"] == []


def test_an_older_store_gains_the_allowed_column(tmp_path: Path, clock: Clock) -> None:
    db = tmp_path / "ipam.db"
    one = IPAM(SqliteStore(str(db)), clock=clock)
    one.create_pool(PoolSpec(name="p", cidr="10.0.0.0/24"))
    first = alloc(one, "a")
    one.store.close()
    import sqlite3

    raw = sqlite3.connect(db)  # what the first release wrote: no 'allowed' column
    raw.execute("ALTER TABLE allocations DROP COLUMN allowed")
    raw.execute("UPDATE meta SET v='1' WHERE k='schema'")
    raw.commit()
    raw.close()
    two = IPAM(SqliteStore(str(db)), clock=clock)
    assert ipam_show_allowed(two, first) == []
    two.reserve("p", "10.0.0.200")
    two.set_allowed(first, container_id="a", allowed=["10.0.0.200"])
    assert ipam_show_allowed(two, first) == ["10.0.0.200"]
    meta = sqlite3.connect(db).execute("SELECT v FROM meta WHERE k='schema'").fetchone()
    assert meta == ("2",)


def ipam_show_allowed(ipam: IPAM, ip_text: str) -> list[str]:
    return list(ipam.show(ip_text)["allowed"])


def test_paging_after_needs_a_pool(ipam: IPAM) -> None:
    ipam.create_pool(PoolSpec(name="p", cidr="10.0.0.0/24"))
    for i in range(5):
        alloc(ipam, f"c{i}")
    page = ipam.addresses(pool="p", limit=2, after="10.0.0.3")
    assert [a.ip & 255 for a, _ in page] == [4, 5]
    with pytest.raises(InvalidInput):
        ipam.addresses(limit=2, after="10.0.0.3")
