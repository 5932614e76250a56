"""Containers on br0 cannot spoof: the L2 driver's port guards against real attacks.

A victim and an attacker container on one host's br0, the gateway across the
"physical" switch. The attacker sends what a hostile container would, from raw
packet sockets inside its namespace; the tests look at what arrives at the
gateway and the victim, and at the neighbour and forwarding entries the attacks
aim at. Then the rightful owner's traffic, ARP and gratuitous ARP, and an
allowed extra address (a VRRP address) still work.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from netd.dataplane.driver import Addressing, Attached, Endpoint
from netd.dataplane.guard import PortGuard, table_name
from netd.dataplane.l2driver import L2Driver, L2Settings
from netd.dataplane.netlink import Netlink
from netd.dataplane.nft import Nft, available
from netd.dataplane.veth import host_ifname_for
from tests.conftest import require
from tests.support import frames as fr
from tests.support.nslab import (
    GW_IP,
    GW_MAC,
    Lab,
    in_ns,
    namespaces_of_this_run,
    ping,
    switched_host,
    taken_over,
)

pytestmark = pytest.mark.real

VICTIM = ("198.18.0.21", "0a:58:c6:12:00:15")
ATTACKER = ("198.18.0.22", "0a:58:c6:12:00:16")
VIP = "198.18.0.200"


@pytest.fixture(scope="module", autouse=True)
def _cleanup_run() -> Iterator[None]:
    require(available(), "libnftables (Debian nftables) is missing")
    with namespaces_of_this_run():
        yield


@dataclass
class Pair:
    lab: Lab
    driver: L2Driver
    victim: str  # netns
    attacker: str
    attached: dict[str, Attached]


def attach(driver: L2Driver, ns: str, cid: str, ip: str, mac: str,
           allowed: tuple[str, ...] = ()) -> Attached:
    ep = Endpoint(cid, "eth0", ns, host_ifname_for(cid))
    return driver.attach(ep, Addressing(f"{ip}/24", mac, GW_IP, (), allowed=allowed))


@pytest.fixture
def pair() -> Iterator[Pair]:
    with switched_host() as lab:
        taken_over(lab)
        driver = L2Driver(L2Settings(dad_timeout=0.05), host_netns=lab.host)
        driver.start()
        victim, attacker = lab.container("victim"), lab.container("attacker")
        attached = {"victim": attach(driver, victim, "victim", *VICTIM),
                    "attacker": attach(driver, attacker, "attacker", *ATTACKER,
                                       allowed=(VIP,))}
        try:
            yield Pair(lab, driver, victim, attacker, attached)
        finally:
            driver.stop()


def neigh(ns: str, ip: str) -> str:
    out = in_ns(ns, "ip", "-j", "neigh", "show", ip).stdout
    entries = json.loads(out or "[]")
    return str(entries[0].get("lladdr", "")) if entries else ""


def fdb_port(lab: Lab, mac: str) -> str | None:
    out = in_ns(lab.host, "bridge", "-j", "fdb", "show", "br", "br0").stdout
    for entry in json.loads(out or "[]"):
        if entry.get("mac") == mac and not entry.get("flags", []).count("self"):
            return str(entry.get("ifname"))
    return None


def test_the_guards_are_nft_chains_marked_as_netds(pair: Pair) -> None:
    listing = in_ns(pair.lab.host, "nft", "list", "table", "bridge", table_name("br0")).stdout
    assert f"port_{host_ifname_for('victim')}" in listing
    assert "netd " in listing and "victim/eth0" in listing
    assert "ether saddr != 0a:58:c6:12:00:15 drop" in listing
    for name, att in pair.attached.items():
        ep = Endpoint(name, "eth0", pair.victim if name == "victim" else pair.attacker,
                      host_ifname_for(name))
        assert pair.driver.check(ep, att) == []


def test_a_gratuitous_arp_for_anothers_address_does_not_take_it(pair: Pair) -> None:
    lab, vip, vmac = pair.lab, *VICTIM
    assert ping(lab.gw, vip) and neigh(lab.gw, vip) == vmac
    with fr.Watch(lab.gw, "eth0") as gw:
        fr.send(pair.attacker, "eth0", fr.garp(ATTACKER[1], vip),
                fr.arp_reply(ATTACKER[1], vip, GW_MAC, GW_IP))
        assert gw.matching(fr.is_arp_claiming(vip)) == []
    assert neigh(lab.gw, vip) == vmac and ping(lab.gw, vip)


def test_a_stolen_source_address_does_not_leave_the_port(pair: Pair) -> None:
    lab = pair.lab
    with fr.Watch(lab.gw, "eth0") as gw:
        fr.send(pair.attacker, "eth0",
                fr.icmp_echo(ATTACKER[1], GW_MAC, VICTIM[0], GW_IP),  # the victim's address
                fr.icmp_echo(ATTACKER[1], GW_MAC, "198.18.0.99", GW_IP))  # anyone's
        assert gw.matching(fr.is_icmp_from(VICTIM[0])) == []
        assert gw.matching(fr.is_icmp_from("198.18.0.99"), wait=0) == []
        # its own address passes, through the same guard
        fr.send(pair.attacker, "eth0", fr.icmp_echo(ATTACKER[1], GW_MAC, ATTACKER[0], GW_IP))
        assert gw.matching(fr.is_icmp_from(ATTACKER[0]))


def test_a_cloned_mac_does_not_move_the_victims_forwarding_entry(pair: Pair) -> None:
    lab, vmac = pair.lab, VICTIM[1]
    assert ping(pair.victim, GW_IP)
    victim_port = host_ifname_for("victim")
    assert fdb_port(lab, vmac) == victim_port
    with fr.Watch(lab.gw, "eth0") as gw:
        fr.send(pair.attacker, "eth0", *[fr.icmp_echo(vmac, GW_MAC, VICTIM[0], GW_IP,
                                                      payload=b"cloned")] * 5)
        assert gw.matching(fr.carries(b"cloned")) == []
    assert fdb_port(lab, vmac) == victim_port
    assert ping(pair.victim, GW_IP) and ping(lab.gw, VICTIM[0])


def test_the_gateway_cannot_be_impersonated(pair: Pair) -> None:
    assert ping(pair.victim, GW_IP) and neigh(pair.victim, GW_IP) == GW_MAC
    with fr.Watch(pair.victim, "eth0") as victim:
        fr.send(pair.attacker, "eth0", fr.garp(ATTACKER[1], GW_IP),
                fr.arp_reply(ATTACKER[1], GW_IP, VICTIM[1], VICTIM[0]))
        assert victim.matching(fr.is_arp_claiming(GW_IP)) == []
    assert neigh(pair.victim, GW_IP) == GW_MAC and ping(pair.victim, GW_IP)


def test_ipv6_router_advertisements_and_foreign_advertisements_are_dropped(pair: Pair) -> None:
    lab = pair.lab
    ll = "fe80::858:c6ff:fe12:16"  # the attacker's own link-local address (EUI-64)
    victim_ll = "fe80::858:c6ff:fe12:15"
    with fr.Watch(lab.gw, "eth0") as gw:
        fr.send(pair.attacker, "eth0", fr.router_advert(ATTACKER[1], ll),
                fr.neighbor_advert(ATTACKER[1], ll, victim_ll),
                fr.neighbor_advert(ATTACKER[1], victim_ll, victim_ll))
        assert gw.matching(fr.is_icmpv6_type(134)) == []
        assert gw.matching(fr.is_icmpv6_type(136), wait=0) == []
        # its own address, advertised for itself, passes
        fr.send(pair.attacker, "eth0", fr.neighbor_advert(ATTACKER[1], ll, ll))
        assert len(gw.matching(fr.is_icmpv6_type(136))) == 1


def test_the_owners_traffic_arp_and_gratuitous_arp_work(pair: Pair) -> None:
    lab, vip, vmac = pair.lab, *VICTIM
    in_ns(lab.gw, "ip", "neigh", "replace", vip, "lladdr", "02:00:00:00:99:99", "dev", "eth0",
          "nud", "stale")
    with fr.Watch(lab.gw, "eth0") as gw:
        fr.send(pair.victim, "eth0", fr.garp(vmac, vip))
        assert gw.matching(fr.is_arp_claiming(vip))
    assert neigh(lab.gw, vip) == vmac
    assert ping(pair.victim, GW_IP) and ping(pair.victim, ATTACKER[0])
    assert ping(lab.gw, vip) and ping(pair.attacker, vip)


def test_an_allowed_extra_address_works(pair: Pair) -> None:
    """The attacker's container was given VIP as an allowed address (a VRRP address)."""
    lab = pair.lab
    with Netlink(pair.attacker) as nl:
        nl.add_address("eth0", f"{VIP}/24")
    with fr.Watch(lab.gw, "eth0") as gw:
        fr.send(pair.attacker, "eth0", fr.garp(ATTACKER[1], VIP))
        assert gw.matching(fr.is_arp_claiming(VIP))
    assert in_ns(pair.attacker, "ping", "-c1", "-W1", "-I", VIP, GW_IP,
                 check=False).returncode == 0
    assert ping(lab.gw, VIP) and neigh(lab.gw, VIP) == ATTACKER[1]
    # the victim has no such allowance
    with Netlink(pair.victim) as nl:
        nl.add_address("eth0", "198.18.0.201/24")
    assert in_ns(pair.victim, "ping", "-c1", "-W1", "-I", "198.18.0.201", GW_IP,
                 check=False).returncode != 0


def test_guards_are_removed_on_detach_checked_and_repaired(pair: Pair) -> None:
    lab, driver = pair.lab, pair.driver
    ep = Endpoint("victim", "eth0", pair.victim, host_ifname_for("victim"))
    att = pair.attached["victim"]
    with Nft(lab.host) as nft:  # someone removes the guard behind netd's back
        nft.run(f"delete element bridge {table_name('br0')} ports "
                f"{{ \"{ep.host_ifname}\" }}")
    assert any("port guard" in p for p in driver.check(ep, att))
    assert driver.repair(ep, att) is True and driver.check(ep, att) == []
    assert driver.detach(ep) is True
    listing = in_ns(lab.host, "nft", "list", "table", "bridge", table_name("br0")).stdout
    assert ep.host_ifname not in listing
    assert host_ifname_for("attacker") in listing
    # and the sweep removes a guard no record explains
    keep = {host_ifname_for("attacker")}
    pair.driver.guards().install(PortGuard("ndvstale0000000", "0a:58:c6:12:00:63",
                                           ("198.18.0.99",), "stale/eth0"))
    assert any("ndvstale0000000" in line for line in pair.driver.sweep(keep))
    assert "ndvstale" not in in_ns(lab.host, "nft", "list", "table", "bridge",
                                   table_name("br0")).stdout


def test_a_port_is_dropped_until_its_guard_knows_its_addresses(pair: Pair) -> None:
    lab, driver = pair.lab, pair.driver
    ns = lab.container("early")
    ep = Endpoint("early", "eth0", ns, host_ifname_for("early"))
    prepared = driver.prepare(ep)  # the veth exists; the IPAM has not answered yet
    try:
        with Netlink(ns) as nl:
            nl.set_up("eth0")
            nl.add_address("eth0", "198.18.0.23/24")
        time.sleep(0.05)
        assert not ping(ns, GW_IP)  # blocked, not open
    finally:
        prepared.close()
    with Netlink(ns) as nl:
        nl.set_down("eth0")
        nl.del_address("eth0", "198.18.0.23/24")
    att = driver.attach(ep, Addressing("198.18.0.23/24", "0a:58:c6:12:00:17", GW_IP))
    assert driver.check(ep, att) == [] and ping(ns, GW_IP)


def test_a_replaced_guard_is_judged_by_its_new_rules(pair: Pair) -> None:
    """Replacing a port's guard (an allowed address added, then taken away) leaves
    nothing of the old one that CHECK could mistake for the new (a chain comment kept
    the first guard's digest once)."""
    guards = pair.driver.guards()
    port = "ndvreplaced0000"
    first = PortGuard(port, "0a:58:c6:12:00:64", ("198.18.0.100",), "r/eth0")
    wider = PortGuard(port, "0a:58:c6:12:00:64", ("198.18.0.100", VIP), "r/eth0")
    try:
        guards.install(first)
        assert guards.check(first) == [] and guards.check(wider) != []
        guards.install(wider)
        assert guards.check(wider) == [] and guards.check(first) != []
        assert guards.check(wider, max_age=0.0) == [] and guards.check(first, max_age=0.0)
        guards.install(first)
        assert guards.check(first) == [] and guards.check(wider) != []
    finally:
        guards.remove(port)
