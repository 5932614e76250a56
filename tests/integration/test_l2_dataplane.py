"""The L2 dataplane against real network namespaces (root).

Topology per test, every namespace named with this run's prefix:

    gw  (eth0 198.18.0.1/24) ──┐
                               sw (Linux bridge sw0, the "physical" switch)
    host (bond0 198.18.0.11/24, default via .1) ──┘
        └─ after the takeover: br0 owns bond0's MAC/address/routes, containers hang off br0

The host namespace behaves like a host where dockerd ran: iptables FORWARD
policy DROP and bridged frames passed to iptables.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from netd.dataplane import arp, l2, veth
from netd.dataplane.driver import Addressing, Attached, Endpoint
from netd.dataplane.errors import (
    AddressConflict,
    DataplaneError,
    LinkNotFound,
    NetnsNotFound,
    TakeoverFailed,
)
from netd.dataplane.l2driver import L2Driver, L2Settings, wait_forwarding
from netd.dataplane.model import RTPROT_NETD, Route
from netd.dataplane.netlink import LinkMonitor, Netlink
from netd.dataplane.netns import list_netns, remove_netns
from netd.dataplane.veth import host_ifname_for
from tests.support.nslab import (
    GW_IP,
    GW_MAC,
    HOST_IP,
    HOST_MAC,
    RUN_PREFIX,
    Lab,
    in_ns,
    namespaces_of_this_run,
    ping,
    switched_host,
    taken_over,
)

pytestmark = pytest.mark.real


@pytest.fixture(scope="module", autouse=True)
def _cleanup_run() -> Iterator[None]:
    with namespaces_of_this_run():
        yield


@pytest.fixture
def lab() -> Iterator[Lab]:
    with switched_host() as the_lab:
        yield the_lab


# ---------------------------------------------------------------------------- netlink


def test_veth_peer_is_created_in_the_target_namespace(lab: Lab) -> None:
    c = lab.container("c")
    pid_proc = subprocess.Popen(["ip", "netns", "exec", c, "sleep", "30"])
    try:
        path = f"/proc/{pid_proc.pid}/ns/net"
        deadline = time.monotonic() + 5
        while os.readlink(path) == os.readlink("/proc/self/ns/net"):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with Netlink(lab.host) as host:
            host.create_veth("ndvtest", "eth7", peer_netns=path, peer_mac="02:00:00:00:07:07")
            assert host.link("eth7") is None
            assert host.link("ndvtest") is not None
        with Netlink(path) as ctr:  # a namespace path works as well as a name
            link = ctr.link("eth7")
            assert link is not None and link.mac == "02:00:00:00:07:07" and link.kind == "veth"
    finally:
        pid_proc.kill()
        pid_proc.wait()
    with Netlink(lab.host) as host:
        assert host.delete_link("ndvtest") is True
        assert host.delete_link("ndvtest") is False  # already gone is fine
    with pytest.raises(NetnsNotFound):
        Netlink(lab.tag + "does-not-exist")
    assert lab.tag + "does-not-exist" not in list_netns(RUN_PREFIX)  # never created


# ---------------------------------------------------------------------------- takeover


def test_takeover_moves_mac_address_and_routes_to_br0(lab: Lab) -> None:
    assert ping(lab.host, GW_IP)
    before = lab.state()
    plan = l2.plan_takeover(before)
    assert "ip link set bond0 master br0" in str(plan)

    result = taken_over(lab)
    assert result.changed and result.gateway == GW_IP and result.plan == plan

    with Netlink(lab.host) as nl:
        br, bond = nl.link("br0"), nl.link("bond0")
        assert br is not None and bond is not None
        assert br.kind == "bridge" and br.up
        assert br.mac == HOST_MAC == bond.mac
        assert bond.master == "br0"
        assert [a.cidr for a in nl.addresses("br0", family=2)] == [f"{HOST_IP}/24"]
        assert nl.addresses("bond0", family=2) == []
        routes = {str(r) for r in nl.routes(family=2)}
    assert f"default via {GW_IP} dev br0 proto static" in routes
    assert f"198.19.0.0/16 via {GW_IP} dev br0 proto static metric 50" in routes
    assert not any("dev bond0" in r for r in routes)
    with Netlink(lab.host) as nl:
        assert [str(r) for r in nl.routes(table=100)] == [
            f"198.19.64.0/18 via {GW_IP} dev br0 table 100 proto static"]
    assert ping(lab.host, GW_IP)
    # the gateway still sees the host at the same MAC
    neigh = in_ns(lab.gw, "ip", "neigh", "show", HOST_IP).stdout
    assert HOST_MAC in neigh

    # idempotent: a restart finds nothing to do
    assert not l2.plan_takeover(lab.state())
    again = taken_over(lab)
    assert not again.changed and not again.plan


def test_takeover_rolls_back_when_gateway_is_silent(lab: Lab) -> None:
    before = lab.state()
    t0 = time.monotonic()
    with pytest.raises(TakeoverFailed, match=r"198\.18\.0\.99 did not answer ARP.*restored"):
        l2.takeover("bond0", "br0", netns=lab.host, gateway="198.18.0.99", arp_timeout=1)
    assert time.monotonic() - t0 < 5
    after = lab.state()
    assert after.bridge is None
    assert after.uplink.master is None
    assert {a.cidr for a in after.uplink_addresses} >= {f"{HOST_IP}/24"}
    assert {r.key() for r in after.uplink_routes} == {r.key() for r in before.uplink_routes}
    assert not l2.plan_rollback(before, after)
    assert ping(lab.host, GW_IP)


def test_gateway_answers_arp(lab: Lab) -> None:
    assert arp.gateway_answers_arp("bond0", GW_IP, 2, netns=lab.host)
    assert arp.arp_resolve("bond0", GW_IP, 2, netns=lab.host) == GW_MAC
    t0 = time.monotonic()
    assert not arp.gateway_answers_arp("bond0", "198.18.0.98", 0.5, netns=lab.host)
    assert 0.4 < time.monotonic() - t0 < 2


def test_manual_apply_and_rollback(lab: Lab) -> None:
    before = lab.state()
    l2.apply_takeover(l2.plan_takeover(before), netns=lab.host)
    assert lab.state().uplink.master == "br0"
    undone = l2.rollback(before, netns=lab.host)
    assert undone
    assert not l2.rollback(before, netns=lab.host)  # nothing left to undo
    assert ping(lab.host, GW_IP)


# ---------------------------------------------------------------------------- containers


def driver(lab: Lab, dad: float = 0.0, bridge: str = "br0") -> L2Driver:
    return L2Driver(L2Settings(bridge=bridge, dad_timeout=dad), host_netns=lab.host)


def endpoint(ns: str | None, cid: str) -> Endpoint:
    if ns is None:
        return Endpoint.handed_over(cid, "eth0", host_ifname_for(cid))
    return Endpoint(cid, "eth0", ns, host_ifname_for(cid))


def addressing(ip: str, mac: str, gateway: str = GW_IP,
               routes: tuple[tuple[str, str | None], ...] = (("198.19.0.0/16", None),)
               ) -> Addressing:
    return Addressing(f"{ip}/24", mac, gateway, routes)


def attach(lab: Lab, ns: str, ip: str, mac: str, cid: str, dad: float = 0.0,
           **kw: object) -> Attached:
    return driver(lab, dad).attach(endpoint(ns, cid), addressing(ip, mac, **kw))  # type: ignore[arg-type]


def test_attach_two_containers_reach_each_other_and_the_gateway(lab: Lab) -> None:
    taken_over(lab)
    c1, c2 = lab.container("c1"), lab.container("c2")
    # a stale ARP entry at the gateway: the gratuitous ARP must correct it
    in_ns(lab.gw, "ip", "neigh", "replace", "198.18.0.21", "lladdr", "02:00:00:00:99:99",
          "dev", "eth0", "nud", "stale")
    a1 = attach(lab, c1, "198.18.0.21", "02:00:C6:12:00:15", "c1-id")
    a2 = attach(lab, c2, "198.18.0.22", "02:00:c6:12:00:16", "c2-id")
    assert a1.mac == "02:00:c6:12:00:15" and a2.mac == "02:00:c6:12:00:16"
    assert a1.host_ifname == host_ifname_for("c1-id") and len(a1.host_ifname) == 15
    assert a1.gateway == GW_IP and a1.routes == (("0.0.0.0/0", GW_IP),
                                                 ("198.19.0.0/16", GW_IP))
    assert a1.data == {"bridge": "br0"}
    assert "02:00:c6:12:00:15" in in_ns(lab.gw, "ip", "neigh", "show", "198.18.0.21").stdout

    with Netlink(c1) as nl:
        link = nl.link("eth0")
        assert link is not None and link.up and link.mac == "02:00:c6:12:00:15"
        assert [a.cidr for a in nl.addresses("eth0", family=2)] == ["198.18.0.21/24"]
        routes = {str(r) for r in nl.routes(family=2) if r.proto == RTPROT_NETD}
    assert routes == {f"default via {GW_IP} dev eth0 proto netd",
                      f"198.19.0.0/16 via {GW_IP} dev eth0 proto netd"}
    with Netlink(lab.host) as nl:
        host_end = nl.link(a1.host_ifname)
        assert host_end is not None and host_end.master == "br0" and host_end.up
        assert host_end.alias == "netd:br0:c1-id:eth0"
        br = nl.link("br0")
        assert br is not None and host_end.mtu == br.mtu == a1.mtu
        assert nl.link("eth0") is None  # the container end never appeared on the host
    assert {o.host_ifname for o in driver(lab).owned()} == {a1.host_ifname, a2.host_ifname}

    assert ping(c1, "198.18.0.22")
    assert ping(c2, "198.18.0.21")
    assert ping(c1, GW_IP)
    assert ping(c2, GW_IP)
    assert ping(c1, HOST_IP)
    assert ping(lab.gw, "198.18.0.22")


def test_forward_drop_blocks_bridged_frames_until_netd_accepts_them(lab: Lab) -> None:
    l2.takeover("bond0", "br0", netns=lab.host, arp_timeout=3, accept_forwarding=False)
    c1 = lab.container("c1")
    attach(lab, c1, "198.18.0.21", "02:00:c6:12:00:15", "c1-id")
    assert not ping(c1, GW_IP)  # dockerd's FORWARD DROP eats bridged frames
    assert l2.ensure_bridge_forwarding("br0", netns=lab.host) is True
    assert l2.ensure_bridge_forwarding("br0", netns=lab.host) is False
    rules = in_ns(lab.host, "iptables", "-S", "FORWARD").stdout
    assert rules.count("netd: accept frames bridged on br0") == 1
    assert ping(c1, GW_IP)
    assert l2.remove_bridge_forwarding("br0", netns=lab.host) is True
    assert "netd" not in in_ns(lab.host, "iptables", "-S", "FORWARD").stdout


def test_dad_probe_finds_the_machine_holding_the_address(lab: Lab) -> None:
    taken_over(lab)
    c1 = lab.container("c1")
    with Netlink(lab.host) as nl:
        nl.create_veth("ndvdad", "eth0", peer_netns=c1, peer_mac="02:00:c6:12:00:31",
                       master="br0")
    with Netlink(c1) as nl:
        nl.set_up("eth0")
    with Netlink(lab.host) as nl:  # else the first probe is lost
        assert wait_forwarding(nl, "ndvdad", timeout=2)
    t0 = time.monotonic()
    assert arp.dad_probe(c1, "eth0", GW_IP, 2) == GW_MAC
    assert time.monotonic() - t0 < 0.5  # the first probe got its answer
    assert arp.dad_probe(c1, "eth0", HOST_IP, 2) == HOST_MAC
    t0 = time.monotonic()
    assert arp.dad_probe(c1, "eth0", "198.18.0.77", 0.3) is None
    assert time.monotonic() - t0 < 1.5


def test_attach_with_a_duplicate_address_leaves_nothing_behind(lab: Lab) -> None:
    taken_over(lab)
    c1 = lab.container("c1")
    with pytest.raises(AddressConflict) as info:
        attach(lab, c1, GW_IP, "02:00:c6:12:00:15", "c1-id", dad=1)
    assert info.value.ip == GW_IP and info.value.mac == GW_MAC
    with Netlink(lab.host) as nl:
        assert nl.link(host_ifname_for("c1-id")) is None
    with Netlink(c1) as nl:
        assert nl.link("eth0") is None
    # a free address passes the probe
    a = attach(lab, c1, "198.18.0.23", "02:00:c6:12:00:17", "c1-id", dad=0.3)
    assert ping(c1, GW_IP) and a.address == "198.18.0.23/24"


def test_attach_failures_leave_nothing_behind(lab: Lab) -> None:
    taken_over(lab)
    d = driver(lab)
    name = host_ifname_for("gone")
    with pytest.raises(NetnsNotFound):
        attach(lab, lab.tag + "gone", "198.18.0.24", "02:00:c6:12:00:18", "gone")
    c1 = lab.container("c1")
    with pytest.raises(ValueError, match="family"):
        d.attach(endpoint(c1, "gone"), addressing("198.18.0.24", "02:00:c6:12:00:18",
                                                  gateway="2001:db8::1", routes=()))
    with pytest.raises(DataplaneError, match="adding route"):  # the kernel refuses the gw
        d.attach(endpoint(c1, "gone"), addressing("198.18.0.24", "02:00:c6:12:00:18",
                                                  routes=(("198.19.0.0/16", "198.18.0.255"),)))
    with Netlink(lab.host) as nl:
        assert nl.link(name) is None
    with Netlink(c1) as nl:
        assert nl.link("eth0") is None
    # the name is taken: refused, and the existing attachment is untouched
    a = attach(lab, c1, "198.18.0.24", "02:00:c6:12:00:18", "c1-id")
    c2 = lab.container("c2")
    with pytest.raises(DataplaneError, match="owned by container c1-id"):
        d.attach(Endpoint("intruder", "eth0", c2, a.host_ifname),
                 addressing("198.18.0.25", "02:00:c6:12:00:19"))
    assert ping(c1, GW_IP) and a.host_ifname == host_ifname_for("c1-id")


def test_detach_is_idempotent_and_only_removes_netd_links(lab: Lab) -> None:
    taken_over(lab)
    d = driver(lab)
    c1 = lab.container("c1")
    a = attach(lab, c1, "198.18.0.21", "02:00:c6:12:00:15", "c1-id")
    assert d.detach(endpoint(c1, "c1-id")) is True
    with Netlink(lab.host) as nl:
        assert nl.link(a.host_ifname) is None
    with Netlink(c1) as nl:
        assert nl.link("eth0") is None
    assert d.detach(endpoint(c1, "c1-id")) is False
    with pytest.raises(DataplaneError, match="refusing"):
        veth.detach("bond0", host=lab.host)
    # the container's namespace disappearing takes the veth with it; detach still succeeds
    c2 = lab.container("c2")
    attach(lab, c2, "198.18.0.22", "02:00:c6:12:00:16", "c2-id")
    remove_netns(c2)
    d.detach(endpoint(c2, "c2-id"))  # True or False: the kernel may be faster
    assert d.detach(endpoint(c2, "c2-id")) is False
    assert d.owned() == []


def test_check_finds_damage_and_repair_mends_it(lab: Lab) -> None:
    taken_over(lab)
    d = driver(lab)
    c1 = lab.container("c1")
    ep = endpoint(c1, "c1-id")
    a = attach(lab, c1, "198.18.0.21", "02:00:c6:12:00:15", "c1-id")
    assert d.check(ep, a) == [] and d.repair(ep, a) is False
    with Netlink(c1) as nl:
        assert len(nl.addresses("eth0", family=2)) == 1
        nl.del_route(Route("0.0.0.0/0", gateway=GW_IP, ifname="eth0"))
        nl.set_mac("eth0", "02:00:c6:12:00:99")
    with Netlink(lab.host) as nl:
        nl.set_master(a.host_ifname, None)
    assert d.check(ep, a) == [
        f"{a.host_ifname} is not on br0 (master None)",
        "eth0 has MAC 02:00:c6:12:00:99, expected 02:00:c6:12:00:15",
        f"route default via {GW_IP} dev eth0 is missing",
    ]
    assert d.repair(ep, a) is True
    assert d.check(ep, a) == [] and ping(c1, GW_IP)
    d.detach(ep)
    assert d.check(ep, a) == [f"host interface {a.host_ifname} is missing",
                              f"the port guard of {a.host_ifname} is missing (nft table "
                              "bridge netd_br0)",
                              f"eth0 is missing in {c1}"]
    assert d.repair(ep, a) is True  # made again from the record
    assert d.check(ep, a) == [] and ping(c1, GW_IP)


def test_prepared_attach_and_its_failures_leave_nothing(lab: Lab) -> None:
    """The agent's ADD: the veth made while the IPAM allocates, finished when it answers."""
    taken_over(lab)
    d = driver(lab, dad=0.05)
    c1, c2 = lab.container("c1"), lab.container("c2")
    ep1 = endpoint(c1, "c1-id")
    pending = d.prepare(ep1)
    with Netlink(c1) as nl:
        link = nl.link("eth0")
        assert link is not None and not link.up and nl.addresses("eth0") == []
    with Netlink(lab.host) as nl:
        host_end = nl.link(ep1.host_ifname)
        assert host_end is not None and host_end.alias == "netd:br0:c1-id:eth0"
        assert host_end.master == "br0"
    a = d.attach(ep1, addressing("198.18.0.21", "02:00:c6:12:00:15"), pending)
    assert pending.ctr is None and pending.fd == -1  # attach closed it
    assert d.check(ep1, a) == []
    assert a.mac == "02:00:c6:12:00:15" and ping(c1, GW_IP)

    # an interrupted attempt's pair is taken over, with the MAC of the new address
    ep2 = endpoint(c2, "c2-id")
    d.prepare(ep2).close()
    b = d.attach(ep2, addressing("198.18.0.22", "02:00:c6:12:00:16"), d.prepare(ep2))
    assert d.check(ep2, b) == [] and ping(c2, "198.18.0.21")

    # someone else's interface of that name: refused, nothing touched
    with pytest.raises(DataplaneError, match="owned by container c1-id"):
        d.prepare(Endpoint("other", "eth1", c2, ep1.host_ifname))
    # a duplicate address: the prepared veth is removed as well
    c3 = lab.container("c3")
    ep3 = endpoint(c3, "c3-id")
    p3 = d.prepare(ep3)
    with pytest.raises(AddressConflict):
        driver(lab, dad=1).attach(ep3, addressing(GW_IP, "02:00:c6:12:00:17"), p3)
    with Netlink(lab.host) as nl:
        assert nl.link(ep3.host_ifname) is None
    with Netlink(c3) as nl:
        assert nl.link("eth0") is None
    with pytest.raises(NetnsNotFound):
        d.prepare(endpoint(lab.tag + "gone", "x"))
    assert {o.host_ifname for o in d.owned()} == {ep1.host_ifname, ep2.host_ifname}


def test_handed_over_endpoint_waits_in_the_host_namespace(lab: Lab) -> None:
    """Docker's Join: the container end stays on the host for Docker to move; probed too."""
    taken_over(lab)
    d = driver(lab, dad=0.05)
    ep = endpoint(None, "e1" * 32)
    a = d.attach(ep, addressing("198.18.0.31", "02:42:c6:12:00:1f"))
    assert a.ifname == ep.peer_ifname and a.address == "198.18.0.31/24"
    with Netlink(lab.host) as nl:
        peer = nl.link(str(ep.peer_ifname))
        host_end = nl.link(ep.host_ifname)
        assert peer is not None and peer.mac == "02:42:c6:12:00:1f" and not peer.up
        assert nl.addresses(str(ep.peer_ifname)) == []  # the runtime configures it
        assert host_end is not None and host_end.master == "br0" and host_end.up
    assert d.check(ep, a) == []
    # the probe runs from the waiting end too: the gateway's address is refused
    with pytest.raises(AddressConflict):
        d.attach(endpoint(None, "e2" * 32), addressing(GW_IP, "02:42:c6:12:00:20"))
    with Netlink(lab.host) as nl:
        assert nl.link(host_ifname_for("e2" * 32)) is None
    # moved into a container and configured there, as Docker does, it works
    c1 = lab.container("c1")
    with Netlink(lab.host) as nl:
        index = nl.index(str(ep.peer_ifname))
        in_ns(lab.host, "ip", "link", "set", str(ep.peer_ifname), "netns", c1, "name", "eth0")
    with Netlink(c1) as nl:
        nl.set_up("eth0")
        nl.add_address("eth0", "198.18.0.31/24")
    assert index and ping(c1, GW_IP) and d.check(ep, a) == []
    assert d.detach(ep) is True


def test_sweep_touches_only_this_drivers_objects(lab: Lab) -> None:
    """Another agent on another bridge in the same namespace, and unmarked links, are safe."""
    taken_over(lab)
    mine, theirs = driver(lab), driver(lab, bridge="br1")
    with Netlink(lab.host) as nl:
        nl.create_bridge("br1")
    c1, c2, c3 = lab.container("c1"), lab.container("c2"), lab.container("c3")
    keep = mine.attach(endpoint(c1, "keep"), addressing("198.18.0.41", "02:00:c6:12:00:29"))
    orphan = mine.attach(endpoint(c2, "orphan"), addressing("198.18.0.42", "02:00:c6:12:00:2a"))
    other = theirs.attach(endpoint(c3, "other"), addressing("198.18.0.43", "02:00:c6:12:00:2b"))
    with Netlink(lab.host) as nl:  # an operator's veth with a netd-looking name, unmarked
        nl.create_veth("ndvoperator0000", "ndvoperator0001", master="br0")
    assert {o.host_ifname for o in mine.owned()} == {keep.host_ifname, orphan.host_ifname}
    assert [o.host_ifname for o in theirs.owned()] == [other.host_ifname]
    removed = mine.sweep({keep.host_ifname})
    assert removed == [f"removed orphaned interface {orphan.host_ifname} "
                       f"(netd:br0:orphan:eth0)",
                       f"removed the port guard of {orphan.host_ifname} (no record)"]
    with Netlink(lab.host) as nl:
        assert nl.link(keep.host_ifname) is not None
        assert nl.link(other.host_ifname) is not None
        assert nl.link("ndvoperator0000") is not None
        assert nl.link(orphan.host_ifname) is None
    # a first-release mark (no scope) on this driver's bridge is this driver's, for the
    # owner it names: a DEL without a record removes it, another owner's DEL does not
    with Netlink(lab.host) as nl:
        nl.set_alias(keep.host_ifname, "netd:keep:eth0")
    assert [o.host_ifname for o in mine.owned()] == [keep.host_ifname]
    assert [o.mark.scope for o in theirs.owned()] == ["br1"]
    assert mine.detach(Endpoint("stranger", "eth0", c1, keep.host_ifname),
                       owner_only=True) is False
    assert mine.detach(endpoint(c1, "keep"), owner_only=True) is True
    with Netlink(lab.host) as nl:
        assert nl.link(keep.host_ifname) is None


def test_netlink_errors_and_link_events(lab: Lab) -> None:
    with Netlink(lab.host) as nl:
        with pytest.raises(DataplaneError, match="creating veth"):
            nl.create_veth("bond0", "x0")  # name taken
        with pytest.raises(LinkNotFound):
            nl.set_up("nosuch0")
        assert nl.delete_link("nosuch0") is False
        assert nl.link_brief("nosuch0") is None
        nl.create_veth("ndvmon", "ndvmon-p")
        index = nl.index("ndvmon")
        with LinkMonitor(lab.host) as monitor:
            assert nl.delete_link_index(index) is True
            assert monitor.wait_deleted(index, 2)
        assert nl.delete_link_index(index) is False
        with LinkMonitor(lab.host) as monitor:  # nothing happens: times out quickly
            started = time.monotonic()
            assert monitor.wait_deleted(index, 0.05) is False
            assert time.monotonic() - started < 1


def test_concurrent_attaches(lab: Lab) -> None:
    taken_over(lab)
    n = 16
    d = driver(lab)
    spaces = [lab.container(f"p{i}") for i in range(n)]

    def one(i: int) -> Attached:
        return attach(lab, spaces[i], f"198.18.0.{100 + i}", f"02:00:c6:12:01:{i:02x}",
                      f"p{i}")

    with ThreadPoolExecutor(max_workers=n) as pool:
        done = list(pool.map(one, range(n)))
    assert len({a.host_ifname for a in done}) == n
    assert all(d.check(endpoint(spaces[i], f"p{i}"), a) == [] for i, a in enumerate(done))
    assert ping(spaces[0], f"198.18.0.{100 + n - 1}") and ping(spaces[-1], GW_IP)
    with ThreadPoolExecutor(max_workers=n) as pool:
        assert all(pool.map(lambda i: d.detach(endpoint(spaces[i], f"p{i}")), range(n)))
    assert d.owned() == []


def test_failed_apply_is_rolled_back(lab: Lab, monkeypatch: pytest.MonkeyPatch) -> None:
    before = lab.state()

    def broken(self: l2.ReplaceRoute, nl: Netlink) -> None:
        raise DataplaneError("injected failure")

    monkeypatch.setattr(l2.ReplaceRoute, "apply", broken)
    with pytest.raises(TakeoverFailed, match=r"injected failure.*restored"):
        l2.takeover("bond0", "br0", netns=lab.host, arp_timeout=1)
    after = lab.state()
    assert after.bridge is None and after.uplink.master is None
    assert not l2.plan_rollback(before, after)
    assert ping(lab.host, GW_IP)
