"""The BGP mode's [bgp] table and its pure pieces (no namespaces)."""

from __future__ import annotations

from typing import Any

import pytest

from netd.bgp.driver import GATEWAY, BgpDriver, BgpSettings, Peer, host_sysctls, parse_bgp_settings
from netd.dataplane.driver import Addressing, Endpoint
from netd.dataplane.registry import driver_class
from netd.errors import InvalidInput


def test_defaults_and_a_full_table() -> None:
    assert parse_bgp_settings({}) == BgpSettings()
    s = parse_bgp_settings({"asn": 64512, "router_id": "198.18.0.11", "restart_time": 60,
                            "peers": [{"address": "198.18.0.1", "asn": 65001},
                                      {"address": "198.18.1.1", "asn": 65001}]})
    assert s.asn == 64512 and s.router_id == "198.18.0.11" and s.restart_time == 60
    assert s.peers == (Peer("198.18.0.1", 65001), Peer("198.18.1.1", 65001))
    assert s.hold_time == 90 and s.mtu == 1500


@pytest.mark.parametrize("table", [
    {"asn": 0}, {"asn": 4294967295}, {"asn": True}, {"asn": "64512"},
    {"router_id": "::1"}, {"router_id": "0.0.0.0"}, {"router_id": "x"},
    {"peers": {"address": "198.18.0.1"}}, {"asn": 1, "peers": [{"address": "198.18.0.1"}]},
    {"asn": 1, "peers": [{"address": "198.18.0.1", "asn": 2, "x": 1}]},
    {"asn": 1, "peers": [{"address": "198.18.0.1", "asn": 2},
                         {"address": "198.18.0.1", "asn": 3}]},
    {"peers": [{"address": "198.18.0.1", "asn": 2}]},  # peers without the host's asn
    {"asn": 1, "peers": [{"address": "198.18.0.1", "asn": 2}]},  # ... or its router_id
    {"rundir": "run/bgp"}, {"local_address": "fe80::1"}, {"metric": -1},
    {"restart_time": 0}, {"restart_time": 5000}, {"hold_time": 2}, {"mtu": 100},
    {"speaker": "bird"},
])
def test_bad_tables_are_refused(table: dict[str, Any]) -> None:
    with pytest.raises(InvalidInput):
        parse_bgp_settings(table)


def test_the_mode_is_registered() -> None:
    assert driver_class("bgp") is BgpDriver


def test_a_container_gets_a_32_and_the_link_local_gateway() -> None:
    drv = BgpDriver(BgpSettings())
    ep = Endpoint("c" * 64, "eth0", "/run/netns/x", "ndv0123456789ab")
    att = drv.expected(ep, Addressing("10.65.0.10/26", "0a:58:0a:41:00:0a", "10.65.0.1",
                                      (("10.0.0.0/8", None),)))
    assert att.address == "10.65.0.10/32" and att.gateway == GATEWAY
    assert att.routes == () and att.vlan is None  # everything goes through the host
    assert drv.dad_timeout == 0.0  # the IPAM is the only source of these addresses
    route = drv.host_route("ndv0123456789ab", att.address)
    assert route.dst == "10.65.0.10/32" and route.ifname == "ndv0123456789ab"


def test_the_host_end_sysctls() -> None:
    got = host_sysctls("ndv0123456789ab")
    assert got["net.ipv4.conf.ndv0123456789ab.proxy_arp"] == "1"
    assert got["net.ipv4.neigh.ndv0123456789ab.proxy_delay"] == "0"
    assert got["net.ipv4.conf.ndv0123456789ab.rp_filter"] == "1"  # strict
