"""Pure parts of the VLAN mode: settings, flows, the takeover and rollback plans.

The real thing (OVS 3.1 in namespaces, attacks, TCP, restarts) is
tests/integration/test_vlan_dataplane.py and test_vlan_lab.py."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from netd.dataplane.errors import PlanError
from netd.dataplane.model import RT_SCOPE_LINK, RTPROT_KERNEL, Address, Link, Route
from netd.dataplane.uplink import AddAddress, DelAddress, ReplaceRoute, SetSysctl, SetUp
from netd.errors import InvalidInput
from netd.ovs import flows as F
from netd.ovs.driver import VlanSettings, parse_vlan_settings
from netd.ovs.ovsdb import OvsBridge, OvsPort
from netd.ovs.takeover import (
    UPLINK_OFPORT,
    AddTrunk,
    BaseFlows,
    DeleteBridge,
    DelTrunk,
    EnsureBridge,
    TxChecksumOff,
    VlanState,
    plan_rollback,
    plan_takeover,
    trunks_of,
    uplink_sysctls,
)

MAC = "02:00:c6:12:00:0b"


# --- settings ----------------------------------------------------------------------------


def test_defaults_and_parsing() -> None:
    assert parse_vlan_settings({}) == VlanSettings()
    s = parse_vlan_settings({"trunks": [200, 100], "datapath_type": "netdev",
                             "ovsdb": "unix:/run/x/db.sock", "rundir": "/run/x"})
    assert s.trunks == (200, 100) and s.carries(100) and not s.carries(300)
    assert s.mgmt == "/run/x/ovs0.mgmt"
    assert VlanSettings().carries(4094)  # no trunks: every VLAN
    # the container ends write their own checksums on the userspace datapath without TSO
    assert s.offloads_off and not VlanSettings().offloads_off
    assert not parse_vlan_settings({"datapath_type": "netdev",
                                    "userspace_tso": True}).offloads_off


@pytest.mark.parametrize("table", [
    {"bridge": 5}, {"trunks": [0]}, {"trunks": [4095]}, {"trunks": [True]},
    {"datapath_type": "dpdk"}, {"mtu": 100}, {"ovsdb": "tcp:1.2.3.4:6640"},
    {"rundir": "run"}, {"uplink": "bond0", "bridge": "bond0"}, {"bridge": "a/b"},
    {"takeover": "yes"}, {"controller": "tcp:127.0.0.1:6653"}, {"dad_timeout": 2},
    {"flow_check_interval": 0}, {"userspace_tso": True}, {"userspace_tso": "yes",
                                                          "datapath_type": "netdev"},
])
def test_bad_settings_are_refused(table: dict[str, Any]) -> None:
    with pytest.raises(InvalidInput):
        parse_vlan_settings(table)


# --- flows -------------------------------------------------------------------------------


def test_cookies_tell_netd_ports_from_the_rest() -> None:
    ck = F.cookie(F.KIND_PORT, 123)
    assert F.port_of(ck) == 123 and ck & F.COOKIE_MASK_NETD == F.NETD
    assert F.port_of(F.cookie(F.KIND_BASE)) is None and F.port_of(0x1234) is None


def test_port_security_flows() -> None:
    sec = F.PortSecurity(101, "0A:58:C6:12:64:0A", ("198.18.100.10",), extra=("198.18.100.200",))
    flows = sec.flows()
    assert all(f.cookie == F.cookie(F.KIND_PORT, 101) for f in flows)
    jump = flows[0]
    assert (jump.table, dict(jump.match), jump.goto) == (F.CLASSIFY, {"in_port": 101},
                                                         F.PORT_SECURITY)
    allowed = [dict(f.match) for f in flows if f.normal]
    # only untagged frames from its own MAC pass
    assert all(m["eth_src"] == "0a:58:c6:12:64:0a" and m["vlan_vid"] == F.OFPVID_NONE
               for m in allowed)
    spa = sorted(m["arp_spa"] for m in allowed if m.get("eth_type") == F.ETH_ARP)
    assert spa == ["0.0.0.0", "198.18.100.10", "198.18.100.200"]
    assert all(m["arp_sha"] == "0a:58:c6:12:64:0a" for m in allowed
               if m.get("eth_type") == F.ETH_ARP)
    assert sorted(m["ipv4_src"] for m in allowed if "ipv4_src" in m) == [
        "198.18.100.10", "198.18.100.200"]
    assert {m["ipv6_nd_target"] for m in allowed if "ipv6_nd_target" in m} == {
        "fe80::858:c6ff:fe12:640a"}
    drops = [f for f in flows if not f.normal and f.goto is None]
    assert {dict(f.match).get("icmpv6_type") for f in drops} >= {F.ND_ROUTER_ADVERT,
                                                                 F.ND_REDIRECT,
                                                                 F.ND_NEIGHBOR_ADVERT}
    last = min(flows, key=lambda f: (f.table != F.PORT_SECURITY, f.priority))
    assert dict(last.match) == {"in_port": 101} and not last.normal  # the rest: dropped
    # an own NA outranks the drop of the others' NAs, RAs outrank everything
    by = {(f.normal, dict(f.match).get("icmpv6_type")): f.priority for f in flows
          if f.table == F.PORT_SECURITY}
    assert by[(True, F.ND_NEIGHBOR_ADVERT)] > by[(False, F.ND_NEIGHBOR_ADVERT)]
    assert by[(False, F.ND_ROUTER_ADVERT)] > by[(True, F.ND_NEIGHBOR_ADVERT)]


def test_bad_port_security_is_refused() -> None:
    with pytest.raises(ValueError):
        F.PortSecurity(0, "0a:58:c6:12:64:0a", ("198.18.100.10",))
    with pytest.raises(ValueError):
        F.PortSecurity(100, "0a:58:c6:12:64:0a", ("not-an-ip",))


def test_desired_and_stale() -> None:
    a = F.PortSecurity(100, "0a:58:c6:12:64:0a", ("198.18.100.10",))
    b = F.PortSecurity(101, "0a:58:c6:12:64:0b", ("198.18.100.11",))
    want = F.desired(1, [a])
    assert F.CANARY_COOKIE in {f.cookie for f in want}
    present = [*want, *b.flows(), F.Flow(0, 5, (("in_port", 7),), 0x1234)]  # someone else's
    assert F.stale(present, want) == b.flows()


# --- takeover plans ------------------------------------------------------------------------


def link(name: str, **kw: Any) -> Link:
    args: dict[str, Any] = {"index": 2, "name": name, "mac": MAC, "kind": "veth", "up": True,
                            "mtu": 1500}
    args.update(kw)
    return Link(**args)


ADDR = Address("198.18.0.11/24", broadcast="198.18.0.255")
DEFAULT = Route("0.0.0.0/0", gateway="198.18.0.1", ifname="bond0", proto=4)
CONNECTED = Route("198.18.0.0/24", ifname="bond0", proto=RTPROT_KERNEL, scope=RT_SCOPE_LINK,
                  prefsrc="198.18.0.11")
SYSCTLS = tuple((k, "0") for k in uplink_sysctls("bond0"))


def fresh() -> VlanState:
    return VlanState(link("bond0"), "ovs0", None, None, None, (ADDR,), (DEFAULT, CONNECTED),
                     sysctls=SYSCTLS)


def taken() -> VlanState:
    bridge = OvsBridge("ovs0", "netdev", "secure", ("OpenFlow10", "OpenFlow13"),
                       {"hwaddr": MAC}, ("ovs0", "bond0"))
    port = OvsPort("bond0", "ovs0", UPLINK_OFPORT, None, (), "", {"netd": "ovs0"})
    return VlanState(link("bond0"), "ovs0", bridge, port,
                     link("ovs0", index=7, kind="tun"), (), (), (ADDR,),
                     (DEFAULT.on("ovs0"),), sysctls=tuple((k, v) for k, v in
                                                          uplink_sysctls("bond0").items()),
                     internal_tx_off=True)


def test_takeover_plan_order() -> None:
    plan = plan_takeover(fresh(), datapath_type="netdev", trunks=(), mtu=1500, scope="ovs0")
    kinds = [type(s) for s in plan]
    assert kinds[:3] == [SetSysctl] * 3  # before anything: no second stack answering
    assert kinds.index(EnsureBridge) < kinds.index(BaseFlows) < kinds.index(AddTrunk)
    assert kinds.index(BaseFlows) < kinds.index(AddAddress)  # flows before the host moves
    assert kinds.index(AddAddress) < kinds.index(ReplaceRoute) < kinds.index(DelAddress)
    # the uplink joins the bridge once the host is off it: never two stacks answering
    assert kinds.index(DelAddress) < kinds.index(AddTrunk) == len(kinds) - 1
    bridge = next(s for s in plan if isinstance(s, EnsureBridge))
    assert bridge.hwaddr == MAC and bridge.datapath_type == "netdev"
    assert any(isinstance(s, SetUp) and s.ifname == "ovs0" for s in plan)
    assert "fail_mode=secure" in str(plan) and "sysctl -w" in str(plan)


def test_a_taken_over_host_plans_nothing() -> None:
    assert not plan_takeover(taken(), datapath_type="netdev", trunks=(), mtu=1500,
                             scope="ovs0")


def test_the_userspace_datapath_gets_the_bridge_port_writing_its_checksums() -> None:
    """netdev only: a tap of the userspace datapath hands TCP over unchecksummed."""
    def steps(datapath: str, state: VlanState) -> list[object]:
        return [s for s in plan_takeover(state, datapath_type=datapath, trunks=(), mtu=1500,
                                         scope="ovs0") if isinstance(s, TxChecksumOff)]

    assert len(steps("netdev", fresh())) == 1
    assert not steps("system", fresh())
    assert not [s for s in plan_takeover(fresh(), datapath_type="netdev", trunks=(), mtu=1500,
                                         scope="ovs0", tx_off=False)  # userspace TSO
                if isinstance(s, TxChecksumOff)]
    lost = replace(taken(), internal_tx_off=False)  # ovs0 recreated with tx on
    assert [s.ifname for s in steps("netdev", lost)] == ["ovs0"]


@pytest.mark.parametrize(("change", "why"), [
    ({"uplink": link("bond0", master="br0")}, "enslaved"),
    ({"uplink_port": OvsPort("bond0", "br-other", 3, None, (), "", {})}, "already a port"),
    ({"unsupported": ("multipath route",)}, "multipath"),
])
def test_unsafe_takeovers_are_refused(change: dict[str, Any], why: str) -> None:
    state = VlanState(**{**vars(fresh()), **change})
    with pytest.raises(PlanError, match=why):
        plan_takeover(state, datapath_type="netdev", trunks=(), mtu=1500, scope="ovs0")


def test_trunks() -> None:
    assert trunks_of(()) == [] and trunks_of((200, 100, 100)) == [0, 100, 200]


def test_rollback_restores_what_the_takeover_changed() -> None:
    plan = plan_rollback(fresh(), taken())
    kinds = [type(s) for s in plan]
    assert AddAddress in kinds and DelTrunk in kinds and DeleteBridge in kinds
    assert sum(isinstance(s, SetSysctl) and s.value == "0" for s in plan) == 3
    assert any(isinstance(s, DelAddress) and s.ifname == "ovs0" for s in plan)
