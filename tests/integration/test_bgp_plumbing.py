"""The BGP mode's container plumbing in real namespaces (no FRR needed for this half).

A "host" namespace and container namespaces made per run; the driver is
:class:`netd.bgp.driver.BgpDriver`, called as the agent calls it. Proves the
Calico-style layout: a /32 per container with 169.254.1.1 on-link as default
route, answered by proxy ARP from the host end (fixed MAC, no delay), a /32
route per container on the host in netd's protocol, strict reverse-path
filtering (a spoofed source dies on the host), and check/repair/detach/sweep.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from netd.bgp.driver import GATEWAY, HOST_MAC, BgpDriver, parse_bgp_settings
from netd.dataplane.driver import Addressing, Attached, Endpoint
from netd.dataplane.model import RTPROT_NETD
from netd.dataplane.veth import host_ifname_for
from tests.conftest import require
from tests.support import frames as fr
from tests.support.cnilab import add_netns, del_netns, in_ns
from tests.support.podman import run_prefix

pytestmark = [pytest.mark.real]

POOL_PREFIX = 26  # a host block: what the IPAM answers with, the container gets a /32


@dataclass
class Host:
    prefix: str
    netns: str
    driver: BgpDriver

    def ns(self, name: str) -> str:
        return f"{self.prefix}-{name}"


@pytest.fixture
def host() -> Iterator[Host]:
    require(subprocess.run(["id", "-u"], capture_output=True, text=True).stdout.strip()
            == "0", "namespaces need root")
    prefix = run_prefix("bp")
    made: list[str] = []
    try:
        hns = f"{prefix}-h"
        add_netns(hns)
        made.append(hns)
        for c in ("a", "b", "c", "u"):
            add_netns(f"{prefix}-{c}")
            made.append(f"{prefix}-{c}")
        # an uplink with the host's default route: proxy ARP answers for 169.254.1.1
        # because the host routes it elsewhere (on a BGP host, the ToRs' default)
        for argv in (["link", "add", "up0", "type", "veth", "peer", "name", "eth0",
                      "netns", f"{prefix}-u"],
                     ["addr", "add", "198.18.77.2/24", "dev", "up0"],
                     ["link", "set", "up0", "up"],
                     ["route", "add", "default", "via", "198.18.77.1"]):
            subprocess.run(["ip", "-n", hns, *argv], check=True, capture_output=True)
        drv = BgpDriver(parse_bgp_settings({}), host_netns=hns)
        drv.start()
        yield Host(prefix, hns, drv)
    finally:
        for ns in made:
            del_netns(ns)


def endpoint(h: Host, name: str) -> Endpoint:
    cid = f"{h.prefix}{name}" * 4
    return Endpoint(cid, "eth0", h.ns(name), host_ifname_for(cid, "eth0"))


def attach(h: Host, name: str, ip: str, mac: str) -> tuple[Endpoint, Attached]:
    ep = endpoint(h, name)
    att = h.driver.attach(ep, Addressing(f"{ip}/{POOL_PREFIX}", mac, "10.65.0.1"))
    return ep, att


def ip_json(netns: str, *args: str) -> list[dict[str, object]]:
    out = subprocess.run(["ip", "-n", netns, "-j", *args], capture_output=True, text=True,
                         check=True).stdout
    return list(json.loads(out or "[]"))


def test_containers_are_routed_as_32s_through_the_host(host: Host) -> None:
    ep_a, a = attach(host, "a", "10.65.0.10", "0a:58:0a:41:00:0a")
    ep_b, b = attach(host, "b", "10.65.0.11", "0a:58:0a:41:00:0b")
    assert a.address == "10.65.0.10/32" and a.gateway == GATEWAY
    # the container: a /32, default via 169.254.1.1 on-link, nothing else
    addrs = [(i["local"], i["prefixlen"]) for li in ip_json(host.ns("a"), "addr", "show",
                                                              "eth0")
             for i in li["addr_info"] if i["family"] == "inet"]  # type: ignore[index]
    assert addrs == [("10.65.0.10", 32)]
    routes = ip_json(host.ns("a"), "route", "show")
    assert [(r["dst"], r.get("gateway"), "onlink" in r.get("flags", [])) for r in routes] \
        == [("default", GATEWAY, True)]
    # the host: a /32 per container in netd's protocol, via its host end
    host_routes = {r["dst"]: r for r in ip_json(host.netns, "route", "show", "proto",
                                                str(RTPROT_NETD))}
    assert host_routes["10.65.0.10"]["dev"] == ep_a.host_ifname
    assert host_routes["10.65.0.11"]["dev"] == ep_b.host_ifname
    # routed through the host, the gateway's MAC is the host end's (proxy ARP)
    assert in_ns(host.ns("a"), "ping", "-c1", "-W2", "10.65.0.11").returncode == 0
    neigh = ip_json(host.ns("a"), "neigh", "show", GATEWAY)
    assert neigh and str(neigh[0]["lladdr"]).lower() == HOST_MAC
    assert host.driver.check(ep_a, a) == [] and host.driver.check(ep_b, b) == []
    # DEL: the veth and the /32 gone
    assert host.driver.detach(ep_a)
    assert "10.65.0.10" not in {r["dst"] for r in ip_json(host.netns, "route", "show")}
    assert in_ns(host.ns("b"), "ping", "-c1", "-W1", "10.65.0.10").returncode != 0


def test_a_spoofed_source_dies_on_the_host(host: Host) -> None:
    ep_a, a = attach(host, "a", "10.65.0.10", "0a:58:0a:41:00:0a")
    attach(host, "b", "10.65.0.11", "0a:58:0a:41:00:0b")
    with fr.Watch(host.ns("b"), "eth0") as watch:
        for src in ("10.65.0.10", "10.65.0.11", "10.65.0.99", "198.51.100.7"):
            fr.send(host.ns("a"), "eth0", fr.icmp_echo(a.mac, HOST_MAC, src, "10.65.0.11"))
        got = watch.matching(lambda f: fr.is_icmp_from("10.65.0.10")(f)
                             or fr.is_icmp_from("10.65.0.99")(f)
                             or fr.is_icmp_from("198.51.100.7")(f)
                             or fr.is_icmp_from("10.65.0.11")(f), wait=1.0)
    sources = {".".join(str(x) for x in f[26:30]) for f in got}
    assert sources == {"10.65.0.10"}, sources  # only the owner's own address gets through
    assert host.driver.check(ep_a, a) == []


def test_check_repair_and_sweep(host: Host) -> None:
    ep_a, a = attach(host, "a", "10.65.0.10", "0a:58:0a:41:00:0a")
    ep_c, _ = attach(host, "c", "10.65.0.12", "0a:58:0a:41:00:0c")
    subprocess.run(["ip", "-n", host.netns, "route", "del", "10.65.0.10/32"], check=True)
    subprocess.run(["ip", "netns", "exec", host.netns, "sysctl", "-qw",
                    f"net.ipv4.conf.{ep_a.host_ifname}.proxy_arp=0"], check=True)
    problems = host.driver.check(ep_a, a)
    assert any("route 10.65.0.10/32" in p for p in problems), problems
    assert any("proxy_arp" in p for p in problems), problems
    assert host.driver.repair(ep_a, a)
    assert host.driver.check(ep_a, a) == []
    assert not host.driver.repair(ep_a, a)  # nothing to do
    # the sweep removes what no record keeps, in its own scope only
    owned = {o.host_ifname for o in host.driver.owned()}
    assert owned == {ep_a.host_ifname, ep_c.host_ifname}
    removed = host.driver.sweep({ep_a.host_ifname})
    assert len(removed) == 1 and ep_c.host_ifname in removed[0]
    assert {o.host_ifname for o in host.driver.owned()} == {ep_a.host_ifname}
    assert host.driver.check(ep_a, a) == []


def test_one_blackhole_per_block_and_only_netds(host: Host) -> None:
    subprocess.run(["ip", "-n", host.netns, "route", "add", "blackhole", "10.66.0.0/24"],
                   check=True)  # the operator's: not netd's protocol
    drv = host.driver
    assert drv.sync_blocks(["10.65.0.0/26", "10.65.0.64/26"])
    assert drv.blackholes() == {"10.65.0.0/26", "10.65.0.64/26"}
    assert drv.covers("10.65.0.70") and not drv.covers("10.65.1.1")
    assert drv.sync_blocks(["10.65.0.0/26", "10.65.0.64/26"]) == []  # idempotent
    attach(host, "a", "10.65.0.10", "0a:58:0a:41:00:0a")
    # the container's /32 wins over its block's blackhole
    assert in_ns(host.ns("a"), "ping", "-c1", "-W2", "198.18.77.2").returncode == 0
    assert drv.sync_blocks(["10.65.0.0/26"]) == ["ip route del blackhole 10.65.0.64/26  "
                                                "# block released"]
    routes = {r["dst"]: r for r in ip_json(host.netns, "route", "show", "type", "blackhole")}
    assert set(routes) == {"10.65.0.0/26", "10.66.0.0/24"}
    drv.sync_blocks([])
    assert set(r["dst"] for r in ip_json(host.netns, "route", "show", "type",
                                         "blackhole")) == {"10.66.0.0/24"}
