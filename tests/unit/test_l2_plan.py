"""Pure parts of the L2 dataplane: takeover/rollback plans, ARP frames."""

from __future__ import annotations

import pytest

from netd.dataplane import arp
from netd.dataplane.errors import PlanError
from netd.dataplane.l2 import (
    AddAddress,
    CreateBridge,
    DelAddress,
    DeleteLink,
    DelRoute,
    L2State,
    ReplaceRoute,
    SetMac,
    SetMaster,
    SetUp,
    default_gateway,
    plan_rollback,
    plan_takeover,
)
from netd.dataplane.model import (
    RT_SCOPE_LINK,
    RTPROT_KERNEL,
    RTPROT_NETD,
    Address,
    Link,
    Route,
    normalize_mac,
)

MAC = "02:00:c6:12:00:0b"
STATIC = 4
BOOT = 3


def uplink(**kw: object) -> Link:
    args: dict[str, object] = {"index": 2, "name": "bond0", "mac": MAC, "kind": "veth",
                               "up": True, "mtu": 9000}
    args.update(kw)
    return Link(**args)  # type: ignore[arg-type]


def bridge(**kw: object) -> Link:
    args: dict[str, object] = {"index": 5, "name": "br0", "mac": MAC, "kind": "bridge",
                               "up": True, "mtu": 9000}
    args.update(kw)
    return Link(**args)  # type: ignore[arg-type]


ADDR = Address("198.18.0.11/24", broadcast="198.18.0.255")
ADDR6 = Address("2001:db8::11/64")
LL6 = Address("fe80::c6ff:fe12:b/64", scope=RT_SCOPE_LINK)
DEFAULT = Route("0.0.0.0/0", gateway="198.18.0.1", ifname="bond0", proto=BOOT)
EXTRA = Route("198.19.0.0/16", gateway="198.18.0.1", ifname="bond0", proto=STATIC, metric=50)
LINKROUTE = Route("198.18.100.0/24", ifname="bond0", proto=STATIC, scope=RT_SCOPE_LINK)
CONNECTED = Route("198.18.0.0/24", ifname="bond0", proto=RTPROT_KERNEL, scope=RT_SCOPE_LINK,
                  prefsrc="198.18.0.11")
LL6ROUTE = Route("fe80::/64", ifname="bond0", proto=RTPROT_KERNEL, metric=256)


def fresh() -> L2State:
    return L2State(uplink=uplink(), bridge_name="br0",
                   uplink_addresses=(ADDR, ADDR6, LL6),
                   uplink_routes=(DEFAULT, CONNECTED, EXTRA, LINKROUTE, LL6ROUTE))


def taken_over() -> L2State:
    """What a fresh host looks like after the takeover."""
    return L2State(uplink=uplink(master="br0"), bridge_name="br0", bridge=bridge(),
                   uplink_addresses=(LL6,), uplink_routes=(LL6ROUTE,),
                   bridge_addresses=(ADDR, ADDR6, LL6),
                   bridge_routes=(DEFAULT.on("br0"), CONNECTED.on("br0"), EXTRA.on("br0"),
                                  LINKROUTE.on("br0"), LL6ROUTE.on("br0")))


def test_fresh_host_full_plan_in_safe_order() -> None:
    plan = plan_takeover(fresh())
    steps = list(plan)
    assert steps[0] == CreateBridge("br0", MAC, 9000, note=steps[0].note)
    assert steps[1] == SetMaster("bond0", "br0")
    kinds = [type(s) for s in steps]
    # addresses reach the bridge before routes move, the uplink loses them last
    assert kinds == [CreateBridge, SetMaster, AddAddress, AddAddress, ReplaceRoute,
                     ReplaceRoute, ReplaceRoute, DelAddress, DelAddress]
    added = [s.address for s in steps if isinstance(s, AddAddress)]
    assert added == [ADDR, ADDR6]  # link-local stays with the device
    moved = [s.route for s in steps if isinstance(s, ReplaceRoute)]
    # device routes first, then via gateways, the default route last; kernel routes not at all
    assert moved == [LINKROUTE.on("br0"), EXTRA.on("br0"), DEFAULT.on("br0")]
    assert all(r.ifname == "br0" for r in moved)
    assert moved[-1].proto == BOOT  # the operator's routes keep their protocol
    removed = [s.address for s in steps if isinstance(s, DelAddress)]
    assert removed == [ADDR, ADDR6]
    assert all(s.ifname == "bond0" for s in steps if isinstance(s, DelAddress))


def test_plan_prints_like_commands() -> None:
    text = str(plan_takeover(fresh()))
    assert text.splitlines()[0] == "take over bond0 with br0:"
    assert f"ip link add br0 address {MAC} mtu 9000 up type bridge" in text
    assert "ip link set bond0 master br0" in text
    assert "ip addr add 198.18.0.11/24 brd 198.18.0.255 dev br0" in text
    assert "ip route replace default via 198.18.0.1 dev br0 proto boot" in text
    assert "ip route replace 198.19.0.0/16 via 198.18.0.1 dev br0 proto static metric 50" in text
    assert "ip addr del 198.18.0.11/24 dev bond0" in text
    assert "# bond0's MAC" in text
    assert "  1. " in text


def test_taken_over_host_gives_empty_plan() -> None:
    plan = plan_takeover(taken_over())
    assert not plan
    assert len(plan) == 0
    assert str(plan) == "take over bond0 with br0: nothing to change"


def test_partial_takeover_finishes_only_what_is_missing() -> None:
    # crashed after moving the address and the default route, before cleaning bond0
    state = L2State(uplink=uplink(master="br0"), bridge_name="br0", bridge=bridge(),
                    uplink_addresses=(ADDR, LL6), uplink_routes=(DEFAULT, EXTRA, CONNECTED),
                    bridge_addresses=(ADDR,), bridge_routes=(DEFAULT.on("br0"),))
    steps = list(plan_takeover(state))
    assert steps == [ReplaceRoute(EXTRA.on("br0"), note=steps[0].note), DelAddress("bond0", ADDR),
                     DelRoute(DEFAULT, note=steps[2].note)]


def test_bridge_with_other_mac_or_down_is_fixed() -> None:
    state = L2State(uplink=uplink(master="br0", up=False), bridge_name="br0",
                    bridge=bridge(mac="02:00:00:00:00:99", up=False))
    steps = list(plan_takeover(state))
    assert [type(s) for s in steps] == [SetMac, SetUp, SetUp]
    assert steps[0] == SetMac("br0", MAC, note=steps[0].note)
    assert steps[1] == SetUp("br0") and steps[2] == SetUp("bond0")


def test_mac_comparison_ignores_case() -> None:
    state = L2State(uplink=uplink(master="br0", mac=MAC.upper()), bridge_name="br0",
                    bridge=bridge())
    assert not plan_takeover(state)


@pytest.mark.parametrize(("state", "message"), [
    (L2State(uplink=uplink(master="bond1"), bridge_name="br0"), "enslaved to bond1"),
    (L2State(uplink=uplink(), bridge_name="br0", bridge=bridge(kind="veth")), "not a bridge"),
    (L2State(uplink=uplink(mac=None), bridge_name="br0"), "no MAC"),
    (L2State(uplink=uplink(), bridge_name="br0",
             unsupported=("0.0.0.0/0 table 254 multipath via bond0, eth9",)), "multipath"),
])
def test_unsafe_states_are_refused(state: L2State, message: str) -> None:
    with pytest.raises(PlanError, match=message):
        plan_takeover(state)


def test_rollback_of_a_full_takeover_restores_everything() -> None:
    steps = list(plan_rollback(fresh(), taken_over()))
    assert steps[0] == SetMaster("bond0", None)
    assert [s for s in steps if isinstance(s, AddAddress)] == [
        AddAddress("bond0", ADDR), AddAddress("bond0", ADDR6)]
    assert [s.route for s in steps if isinstance(s, ReplaceRoute)] == [LINKROUTE, EXTRA, DEFAULT]
    assert [s for s in steps if isinstance(s, DelAddress)] == [
        DelAddress("br0", ADDR), DelAddress("br0", ADDR6)]
    assert steps[-1] == DeleteLink("br0", note=steps[-1].note)
    assert "ip link set bond0 nomaster" in str(plan_rollback(fresh(), taken_over()))


def test_rollback_keeps_a_bridge_that_existed() -> None:
    before = L2State(uplink=uplink(), bridge_name="br0",
                     bridge=bridge(mac="02:00:00:00:00:99", up=False),
                     uplink_addresses=(ADDR,), uplink_routes=(DEFAULT,))
    after = L2State(uplink=uplink(master="br0"), bridge_name="br0", bridge=bridge(),
                    bridge_addresses=(ADDR,), bridge_routes=(DEFAULT.on("br0"),))
    steps = list(plan_rollback(before, after))
    assert not any(isinstance(s, DeleteLink) for s in steps)
    assert SetMac("br0", "02:00:00:00:00:99") in steps
    assert SetUp("br0", False) in steps


def test_rollback_of_unchanged_state_is_empty() -> None:
    assert not plan_rollback(fresh(), fresh())
    assert not plan_rollback(taken_over(), taken_over())


def test_default_gateway() -> None:
    assert default_gateway(fresh()) == "198.18.0.1"
    assert default_gateway(taken_over()) == "198.18.0.1"
    assert default_gateway(L2State(uplink=uplink(), bridge_name="br0")) is None
    low = Route("0.0.0.0/0", gateway="198.18.0.254", ifname="bond0", metric=10)
    high = Route("0.0.0.0/0", gateway="198.18.0.1", ifname="bond0", metric=100)
    state = L2State(uplink=uplink(), bridge_name="br0", uplink_routes=(high, low))
    assert default_gateway(state) == "198.18.0.254"


def test_route_printing() -> None:
    r = Route("198.19.0.0/16", gateway="198.18.0.1", ifname="eth0", metric=5, onlink=True)
    assert str(r) == "198.19.0.0/16 via 198.18.0.1 dev eth0 proto netd metric 5 onlink"
    assert r.proto == RTPROT_NETD == 78
    assert str(CONNECTED) == "198.18.0.0/24 dev bond0 proto kernel scope link src 198.18.0.11"


# ------------------------------------------------------------------ values


def test_normalize_mac() -> None:
    assert normalize_mac("02-00-C6-12-00-0B") == MAC
    assert normalize_mac("0200.c612.000b") == MAC
    with pytest.raises(ValueError):
        normalize_mac("02:00:c6:12:00")


# ------------------------------------------------------------------ ARP frames


def test_probe_frame_is_rfc5227() -> None:
    frame = arp.probe_frame(MAC, "198.18.0.21")
    assert len(frame) == 60
    pkt = arp.parse_arp(frame)
    assert pkt is not None and pkt.is_probe
    assert (pkt.op, pkt.sender_mac, pkt.sender_ip, pkt.target_mac, pkt.target_ip) == (
        arp.ARPOP_REQUEST, MAC, "0.0.0.0", "00:00:00:00:00:00", "198.18.0.21")
    assert pkt.eth_dst == arp.BROADCAST and pkt.eth_src == MAC


def test_announcement_has_sender_equal_target() -> None:
    pkt = arp.parse_arp(arp.announce_frame(MAC, "198.18.0.21"))
    assert pkt is not None and not pkt.is_probe
    assert pkt.sender_ip == pkt.target_ip == "198.18.0.21"


def test_parse_rejects_other_frames() -> None:
    assert arp.parse_arp(b"\0" * 10) is None
    ip_frame = bytearray(arp.announce_frame(MAC, "198.18.0.21"))
    ip_frame[12:14] = b"\x08\x00"
    assert arp.parse_arp(bytes(ip_frame)) is None


def test_conflict_detection() -> None:
    other = "02:00:00:00:00:01"
    reply = arp.parse_arp(arp.build_arp(arp.ARPOP_REPLY, other, "198.18.0.21", MAC, "0.0.0.0",
                                        eth_dst=MAC))
    assert reply is not None
    assert arp.conflict_mac(reply, "198.18.0.21", MAC) == other
    assert arp.conflict_mac(reply, "198.18.0.22", MAC) is None
    rival_probe = arp.parse_arp(arp.probe_frame(other, "198.18.0.21"))
    assert rival_probe is not None
    assert arp.conflict_mac(rival_probe, "198.18.0.21", MAC) == other
    own = arp.parse_arp(arp.probe_frame(MAC, "198.18.0.21"))
    assert own is not None
    assert arp.conflict_mac(own, "198.18.0.21", MAC) is None
