"""The BGP mode in its racks lab: real FRR 8.4 (core and ToRs), exabgp 5, podman.

``netd lab up --mode bgp --racks 2 --hosts-per-rack 2``: h1, h2 in rack r1 under
tor-r1, h3, h4 in r2 under tor-r2, the core above, the IPAM behind the core.
Every FRR file is ``netd fabric config``'s. Proves: containers in different
racks reach each other; the route counts (each host: its containers + its
blocks' blackholes + the default + exceptions; each ToR its rack; the core all);
an address borrowed from another rack's block reachable across racks (its /32
announced, passed down, installed as an exception); an agent kill -9 and
restart withdraws nothing and loses no ping; an agent stopped for good has its blocks
withdrawn at the restart time it announced.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from netd.lab.bgp import FRR_BASE, RESTART_TIME
from netd.lab.procs import alive
from tests.conftest import require
from tests.support import podman as pm
from tests.support.cnilab import Lab, running_lab, wait_for

pytestmark = [pytest.mark.real, pytest.mark.slow]


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    require(Path("/usr/lib/frr/bgpd").exists(), "FRR is missing (apt-get install frr)")
    with running_lab(tmp_path_factory.mktemp("bgplab"), "bl", mode="bgp") as the_lab:
        yield the_lab


def run_ctr(lab: Lab, name: str, host: str, *extra: str) -> dict[str, Any]:
    full = f"{lab.prefix}-{name}"
    pm.run_container(full, lab.rootfs, ["sleep", "3600"], network=f"{lab.prefix}-{host}",
                     extra=list(extra))
    net = next(iter(pm.inspect(full)["NetworkSettings"]["Networks"].values()))
    return {"name": full, "ip": net["IPAddress"], "host": host}


@pytest.fixture(scope="module")
def ctrs(lab: Lab) -> dict[str, dict[str, Any]]:
    """a on h1 (rack r1), b on h3 (rack r2), c on h2 (r1)."""
    return {k: run_ctr(lab, k, h) for k, h in (("a", "h1"), ("b", "h3"), ("c", "h2"))}


def ping(ctr: dict[str, Any], ip: str) -> bool:
    return pm.podman("exec", ctr["name"], "ping", "-c1", "-W2", ip,
                     check=False).returncode == 0


def routes(ns: str, *sel: str) -> list[dict[str, Any]]:
    out = subprocess.run(["ip", "-n", ns, "-j", "route", "show", *sel], capture_output=True,
                         text=True, check=True).stdout
    return list(json.loads(out or "[]"))


def frr(lab: Lab, node: str, command: str) -> Any:
    out = subprocess.run(["vtysh", "--vty_socket", str(FRR_BASE / lab.prefix / node), "-c",
                          command], capture_output=True, text=True, timeout=30,
                         check=True).stdout
    return json.loads(out)


def bgp_prefixes(lab: Lab, node: str) -> set[str]:
    return set(frr(lab, node, "show bgp ipv4 unicast json").get("routes") or {})


def blocks(lab: Lab, host: str) -> set[str]:
    return {b["cidr"] for b in lab.ipam(lambda c: c.blocks(pool="bgp", host=host))["blocks"]}


def test_containers_in_different_racks_reach_each_other(
        lab: Lab, ctrs: dict[str, dict[str, Any]]) -> None:
    a, b, c = ctrs["a"], ctrs["b"], ctrs["c"]
    assert ping(a, b["ip"]) and ping(b, a["ip"])  # across racks, through the core
    assert ping(a, c["ip"])  # same rack, through the ToR
    assert ping(a, "198.18.0.2")  # the IPAM, behind the core


def test_route_counts_host_tor_core(lab: Lab, ctrs: dict[str, dict[str, Any]]) -> None:
    h1 = f"{lab.prefix}-h1"
    mine = routes(h1, "proto", "78")
    own = blocks(lab, "h1")
    assert {r["dst"] for r in mine if r.get("type") == "blackhole"} == own
    assert next(r for r in mine if r["dst"] == "default")["gateway"] == "198.18.1.1"
    containers = [r for r in mine if r.get("scope") == "link"]
    assert {r["dst"] for r in containers} == {ctrs["a"]["ip"]}
    # containers + blackholes + default, nothing else (no exceptions yet)
    assert len(mine) == len(containers) + len(own) + 1
    # the ToR holds its rack's blocks, the core every block; hosts hold none of another's
    r1 = blocks(lab, "h1") | blocks(lab, "h2")
    every = r1 | blocks(lab, "h3") | blocks(lab, "h4")
    assert r1 <= bgp_prefixes(lab, "tor-r1")
    assert every <= bgp_prefixes(lab, "core")
    assert not (blocks(lab, "h3") & {r["dst"] for r in routes(h1)})


def test_an_address_borrowed_from_another_racks_block(
        lab: Lab, ctrs: dict[str, dict[str, Any]]) -> None:
    """h3 runs a container on an address of h1's block: h3 announces its /32, the core
    passes it down (longer than a block), h1 installs it as an exception."""
    h1_block = ipaddress.ip_network(sorted(blocks(lab, "h1"))[0])
    ip = str(h1_block.network_address + 40)
    d = run_ctr(lab, "d", "h3", "--ip", ip)
    assert d["ip"] == ip
    wait_for("the /32 at the core", lambda: f"{ip}/32" in bgp_prefixes(lab, "core"), 20, 0.2)
    wait_for("the exception on h1", lambda: any(
        r["dst"] == ip and r.get("gateway") == "198.18.1.1"
        for r in routes(f"{lab.prefix}-h1", "proto", "78")), 20, 0.2)
    assert ping(ctrs["a"], ip) and ping(d, ctrs["a"]["ip"])
    pm.rm(d["name"])
    wait_for("the /32 withdrawn", lambda: f"{ip}/32" not in bgp_prefixes(lab, "core"), 20,
             0.2)
    wait_for("the exception removed", lambda: not any(
        r["dst"] == ip for r in routes(f"{lab.prefix}-h1", "proto", "78")), 20, 0.2)


def test_agent_kill_and_restart_withdraws_nothing_and_loses_no_ping(
        lab: Lab, ctrs: dict[str, dict[str, Any]]) -> None:
    a, b = ctrs["a"], ctrs["b"]
    before = bgp_prefixes(lab, "core")
    count = 150  # 15 s at 10 a second: the whole restart
    pinger = subprocess.Popen(["podman", "exec", b["name"], "ping", "-i", "0.1", "-c",
                               str(count), "-W", "1", a["ip"]],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        time.sleep(1)
        lab.kill_agent("h1")
        time.sleep(2)  # exabgp died with it: the ToR holds the routes (graceful restart)
        assert bgp_prefixes(lab, "core") >= before
        took = lab.start_agent("h1", timeout=30)
        wait_for("h1's session back", lambda: frr(lab, "tor-r1", "show bgp neighbors json")
                 .get("198.18.1.11", {}).get("bgpState") == "Established", 30, 0.2)
    finally:
        out, _ = pinger.communicate(timeout=60)
    stats = re.search(r"(\d+) packets transmitted, (\d+) packets received", out)
    assert stats, out[-1000:]
    sent, got = int(stats[1]), int(stats[2])
    print(f"\nh1's agent back in {took:.2f} s; ping b -> a: {sent} sent, {got} received")
    assert bgp_prefixes(lab, "core") >= before
    assert sent - got <= 1, out[-1000:]


def test_lab_status_describes_the_racks_and_the_sessions(lab: Lab) -> None:
    status = json.loads(lab.cli("status", "--dir", str(lab.dir), "--json",
                                "--no-ping").stdout)
    assert status["mode"] == "bgp"
    assert [h["rack"] for h in status["hosts"]] == ["r1", "r1", "r2", "r2"]
    assert {"core", "gateway", "tor-r1", "tor-r2", "sw-r1", "sw-r2"} <= set(
        status["namespaces"])
    h1 = status["hosts"][0]["dataplane"]
    peer = h1["speaker"]["peers"]["198.18.1.1"]
    assert peer["state"] == "up" and peer["eor"] and peer["received"] >= 1
    assert h1["routes_installed"] >= 1 and h1["blocks"]
    text = lab.cli("status", "--dir", str(lab.dir), "--no-ping").stdout
    assert "198.18.1.1 up" in text and "RACK" in text


def test_a_bad_peer_is_reported_and_the_agent_keeps_serving(lab: Lab) -> None:
    """h4 told the wrong AS of its ToR, and a peer that does not exist: the sessions do not
    come up, the agent says why (status, log) and still attaches containers."""
    config = Path(lab.host("h4")["config"])
    good = config.read_text()
    bad = re.sub(r"peers = \[.*\]", 'peers = [{ address = "198.18.2.1", asn = 65099 }, '
                 '{ address = "198.18.2.99", asn = 65001 }]', good)
    assert bad != good
    config.write_text(bad)
    try:
        lab.restart_agent("h4")

        def refused() -> bool:
            p = lab.agent_status("h4")["driver"]["speaker"]["peers"]
            return bool(p["198.18.2.1"]["reason"]) and not p["198.18.2.1"]["up"]

        log = Path(lab.host("h4")["config"]).parent / "agent.log"
        try:
            wait_for("the ToR's refusal", refused, 60, 0.5)
        except AssertionError:
            print(log.read_text()[-3000:], lab.agent_status("h4"))
            raise
        peers = lab.agent_status("h4")["driver"]["speaker"]["peers"]
        print(f"\nwrong AS: {peers['198.18.2.1']['reason']!r}; unreachable peer: "
              f"{peers['198.18.2.99']['state']!r}")
        assert not peers["198.18.2.99"]["up"]
        assert "session with 198.18.2.1 down" in log.read_text()
        e = run_ctr(lab, "e", "h4")  # the agent still serves
        assert e["ip"]
        pm.rm(e["name"])
    finally:
        config.write_text(good)
        lab.restart_agent("h4")


def test_an_agent_stopped_for_good_has_its_routes_withdrawn_at_the_restart_time(
        lab: Lab, ctrs: dict[str, dict[str, Any]]) -> None:
    """h2's agent stopped and not started again: the ToR keeps h2's blocks for the
    graceful-restart time h2 announced (the lab's RESTART_TIME), then withdraws them, at
    the core too."""
    h2 = blocks(lab, "h2")
    assert h2 and h2 <= bgp_prefixes(lab, "tor-r1") and h2 <= bgp_prefixes(lab, "core")
    pid = lab.agent_pid("h2")
    try:
        os.kill(pid, signal.SIGTERM)
        stopped = time.monotonic()
        wait_for("h2's agent gone", lambda: not alive(pid), 20, 0.01)
        gone: dict[str, float] = {}
        while len(gone) < 2 and time.monotonic() - stopped < RESTART_TIME + 15:
            for node in ("tor-r1", "core"):
                if node not in gone and not h2 & bgp_prefixes(lab, node):
                    gone[node] = time.monotonic() - stopped
            time.sleep(0.05)
        print(f"\nh2 stopped: its blocks gone at tor-r1 after {gone.get('tor-r1')} s, at the "
              f"core after {gone.get('core')} s (restart time {RESTART_TIME} s)")
        assert set(gone) == {"tor-r1", "core"}, gone
        for took in gone.values():
            assert abs(took - RESTART_TIME) <= 1.0, gone
        # h1's own routes untouched
        assert blocks(lab, "h1") <= bgp_prefixes(lab, "core")
    finally:
        lab.ensure_agent("h2")
    wait_for("h2's blocks back", lambda: h2 <= bgp_prefixes(lab, "core"), 60, 0.2)


def test_the_agents_metrics_show_its_sessions_and_routes(
        lab: Lab, ctrs: dict[str, dict[str, Any]]) -> None:
    """Last in the module (it restarts h1's agent): the BGP gauges against FRR's view."""
    from tests.support.cnilab import enable_agent_metrics, metric, scrape_agent

    enable_agent_metrics(lab, "h1", 9652)
    wait_for("h1's session back", lambda: frr(lab, "tor-r1", "show bgp neighbors json")
             .get("198.18.1.11", {}).get("bgpState") == "Established", 30, 0.2)
    status = lab.agent_status("h1")
    peers = status["driver"]["speaker"]["peers"]

    def settled() -> bool:
        # up is not enough: a restarted agent's session is Established before the
        # ToR's routes (the downward default) have arrived
        got = scrape_agent(lab, "h1", 9652)
        return all(metric(got, "netd_agent_bgp_session_up", peer=p) == 1
                   and metric(got, "netd_agent_bgp_routes_received", peer=p) >= 1
                   for p in peers) \
            and metric(got, "netd_agent_bgp_routes_announced") >= 1
    wait_for("the gauges to show the sessions up with routes", settled, 30, 0.5)
    got = scrape_agent(lab, "h1", 9652)
    status = lab.agent_status("h1")
    for peer, p in status["driver"]["speaker"]["peers"].items():
        assert metric(got, "netd_agent_bgp_routes_received", peer=peer) == p["received"] >= 1
    assert metric(got, "netd_agent_bgp_routes_announced") == \
        status["driver"]["speaker"]["announced"]
    ready = sum(1 for a in status["attachments"] if a["state"] == "ready")
    assert metric(got, "netd_agent_attachments", mode="bgp", state="ready") == ready >= 1
