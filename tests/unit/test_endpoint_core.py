"""Pure parts of the endpoint core and the driver interface: names, marks, addressing,
what a driver reports, the mode registry, the L2 table, and the owner locks."""

from __future__ import annotations

import threading
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from netd.agent.config import parse_config
from netd.agent.locks import OwnerLocks
from netd.dataplane.driver import Addressing, Attached, Endpoint
from netd.dataplane.l2driver import L2Driver, L2Settings
from netd.dataplane.model import Link
from netd.dataplane.registry import driver_class, modes
from netd.dataplane.veth import (
    Mark,
    container_route,
    host_ifname_for,
    interface,
    is_netd_link,
    peer_ifname_for,
    route_specs,
)
from netd.errors import InvalidInput

# ------------------------------------------------------------------ names and marks


def test_host_ifname_is_deterministic_short_and_prefixed() -> None:
    name = host_ifname_for("f00d" * 16)
    assert name == host_ifname_for("f00d" * 16, "eth0")
    assert len(name) == 15 and name.startswith("ndv")
    assert name != host_ifname_for("f00d" * 16, "net1")
    assert name != host_ifname_for("f00d" * 16, salt=1)
    assert peer_ifname_for("f00d" * 16) == "ndp" + name[3:]
    with pytest.raises(ValueError):
        host_ifname_for("")


@given(st.lists(st.text(min_size=1, max_size=80), min_size=2, max_size=50, unique=True))
def test_host_ifnames_do_not_collide(ids: list[str]) -> None:
    names = [host_ifname_for(i) for i in ids]
    assert len(set(names)) == len(ids)
    assert all(len(n) <= 15 and n.isascii() and n.isalnum() for n in names)


def test_marks_round_trip_and_read_the_first_releases() -> None:
    mark = Mark("br0", "abc-123", "eth0")
    assert mark.alias() == "netd:br0:abc-123:eth0"
    assert Mark.parse(mark.alias()) == mark and mark.owner == ("abc-123", "eth0")
    assert Mark.parse("netd:abc-123:eth0") == Mark("", "abc-123", "eth0")  # 0.1.0's CNI mark
    assert Mark.parse("netd-docker:" + "e" * 64) == Mark("", "e" * 64, "eth0")  # its Docker's
    for alias in (None, "", "uplink to rack 3", "netd:", "netd:a", "netd:a:b:c:d", "netd::b"):
        assert Mark.parse(alias) is None, alias
    assert mark.same_owner(Mark("", "abc-123", "eth0")) and not mark.same_owner(None)


def test_netd_links_are_recognised_by_name_or_mark() -> None:
    def link(name: str, kind: str | None = "veth", alias: str | None = None) -> Link:
        return Link(index=3, name=name, mac=None, kind=kind, alias=alias)

    assert is_netd_link(link(host_ifname_for("c")))
    assert is_netd_link(link(peer_ifname_for("c")))
    assert is_netd_link(link("ndd0123456789ab"))  # the first release's Docker host end
    assert is_netd_link(link("veth0", alias="netd:br0:c:eth0"))
    assert not is_netd_link(link("bond0"))
    assert not is_netd_link(link(host_ifname_for("c"), kind="bridge"))
    assert not is_netd_link(link("ndvshort"))


# ------------------------------------------------------------------ addressing


def test_routes_default_to_the_gateway_and_off_subnet_gateways_are_onlink() -> None:
    assert route_specs(["198.19.0.0/16", ("10.0.0.0/8", "198.18.0.2")], "198.18.0.1") == [
        ("198.19.0.0/16", "198.18.0.1"), ("10.0.0.0/8", "198.18.0.2")]
    iface = interface("198.18.0.50/32")
    route = container_route("0.0.0.0/0", "169.254.1.1", "eth0", iface)
    assert route.onlink and str(route) == "default via 169.254.1.1 dev eth0 proto netd onlink"
    on_subnet = container_route("0.0.0.0/0", "198.18.0.1", "eth0", interface("198.18.0.50/24"))
    assert not on_subnet.onlink
    with pytest.raises(ValueError, match="prefix"):
        interface("198.18.0.50")


def test_addressing_and_what_a_driver_attached() -> None:
    a = Addressing("198.18.0.50/24", "0a:58:c6:12:00:32", "198.18.0.1",
                   (("198.19.0.0/16", None), ("10.0.0.0/8", "198.18.0.2"), ("0.0.0.0/0", None)))
    assert a.ip == "198.18.0.50"
    assert a.all_routes() == (("0.0.0.0/0", "198.18.0.1"), ("198.19.0.0/16", "198.18.0.1"),
                              ("10.0.0.0/8", "198.18.0.2"))
    ep = Endpoint("c1", "eth0", "/run/netns/c1", host_ifname_for("c1"))
    driver = L2Driver(L2Settings())
    got = driver.expected(ep, a)
    assert got.address == a.address and got.routes == a.all_routes()
    assert got.pool_routes() == (("198.19.0.0/16", "198.18.0.1"), ("10.0.0.0/8", "198.18.0.2"))
    assert got.data == {"bridge": "br0"} and got.ifname == "eth0"
    assert Attached.from_dict(got.to_dict()) == got
    handed = Endpoint.handed_over("e1", "eth0", host_ifname_for("e1"))
    assert handed.handover and driver.expected(handed, a).ifname == peer_ifname_for("e1")
    assert driver.mark(ep) == Mark("br0", "c1", "eth0")


# ------------------------------------------------------------------ modes and tables


def test_the_registry_knows_its_modes_and_refuses_others() -> None:
    assert modes() == ("l2", "vlan", "bgp")
    assert driver_class("l2") is L2Driver
    assert driver_class("vlan").__name__ == "VlanDriver"
    assert driver_class("bgp").__name__ == "BgpDriver"
    with pytest.raises(InvalidInput,
                       match="unknown mode 'ovs': this agent knows 'l2', 'vlan', 'bgp'"):
        driver_class("ovs")
    with pytest.raises(InvalidInput, match="unknown mode 'calico'"):
        parse_config({"host": "h1", "mode": "calico"})


def test_the_l2_table_belongs_to_the_l2_driver() -> None:
    cfg = parse_config({"host": "h1", "l2": {"bridge": "br9", "dad_timeout": 0}})
    assert cfg.driver_settings == L2Settings(bridge="br9", dad_timeout=0.0)
    assert L2Driver(cfg.driver_settings).dad_timeout == 0.0
    assert parse_config({"host": "h1"}).driver_settings.dad_timeout == 0.01
    # another mode's table may be there (one file for a fleet); it is not this driver's
    assert parse_config({"host": "h1", "vlan": {"anything": 1}}).mode == "l2"
    for bad, text in [({"l2": {"colour": "red"}}, "unknown [l2] keys: colour"),
                      ({"l2": {"bridge": "br:0"}}, "invalid interface name"),
                      ({"l2": {"uplink": "x" * 16}}, "invalid interface name"),
                      ({"l2": {"dad_timeout": -1}}, "dad_timeout"),
                      ({"l2": {"dad_timeout": True}}, "dad_timeout"),
                      ({"l2": {"takeover": "yes"}}, "takeover"),
                      ({"l2": "br0"}, "must be a table"),
                      ({"reconcile_interval": 0}, "reconcile_interval"),
                      ({"ipam_timeout": True}, "ipam_timeout"),
                      ({"surprise": 1}, "unknown agent config keys: surprise")]:
        with pytest.raises(InvalidInput, match=text.replace("[", r"\[").replace("]", r"\]")):
            parse_config({"host": "h1", **bad})


# ------------------------------------------------------------------ owner locks


def test_owner_locks_serialise_waiters_and_forget_idle_owners() -> None:
    """The lock map of 0.1.0 dropped an entry while threads still waited on it, so a newcomer
    got a fresh lock and ran alongside them. Here every holder of one owner is alone."""
    locks = OwnerLocks()
    inside = 0
    overlaps = 0
    guard = threading.Lock()

    def work() -> None:
        nonlocal inside, overlaps
        for _ in range(50):
            with locks.hold(("c1", "eth0")):
                with guard:
                    inside += 1
                    overlaps += inside > 1
                time.sleep(0.0002)
                with guard:
                    inside -= 1

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert overlaps == 0
    assert len(locks) == 0  # nothing left behind once idle
    with locks.hold(("c1", "eth0")), locks.hold(("c2", "eth0")):  # other owners are free
        assert len(locks) == 2


@pytest.mark.parametrize("listen", ["0.0.0.0:9651", "10.0.0.1:9651", "127.0.0.1",
                                    "localhost:9651", "127.0.0.1:0", "[::]:9651"])
def test_metrics_listen_is_loopback_only(listen: str) -> None:
    with pytest.raises(InvalidInput, match="loopback HOST:PORT"):
        parse_config({"host": "h1", "metrics_listen": listen})


def test_metrics_are_off_unless_asked_for() -> None:
    assert parse_config({"host": "h1"}).metrics_listen is None
    assert parse_config({"host": "h1", "metrics_listen": "[::1]:9651"}).metrics_listen == \
        "[::1]:9651"
