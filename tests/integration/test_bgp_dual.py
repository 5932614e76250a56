"""Dual-homed hosts in the BGP lab: two FRR ToRs per rack, every host peering with both.

``netd lab up --mode bgp --racks 2 --hosts-per-rack 1 --dual-homed``. Proves:
the host's default is ECMP through both ToRs; a ToR that loses its uplink
withdraws the default it only passes down (it never originates one), so the
hosts move to the other ToR and a continuous ping loses (next to) nothing; and
a ToR whose bgpd restarts has the host's routes back within 5 s of the session
coming up again.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from netd.lab import save_manifest
from netd.lab.bgp import FRR_BASE
from netd.lab.procs import alive, start_process
from tests.conftest import require
from tests.support import podman as pm
from tests.support.cnilab import Lab, running_lab, wait_for

pytestmark = [pytest.mark.real, pytest.mark.slow]


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    require(Path("/usr/lib/frr/bgpd").exists(), "FRR is missing (apt-get install frr)")
    with running_lab(tmp_path_factory.mktemp("bgpdual"), "bd", mode="bgp",
                     extra=["--racks", "2", "--hosts-per-rack", "1", "--dual-homed"]) as lb:
        yield lb


@pytest.fixture(scope="module")
def ctrs(lab: Lab) -> dict[str, dict[str, Any]]:
    out = {}
    for key, host in (("a", "h1"), ("b", "h2")):
        name = f"{lab.prefix}-{key}"
        pm.run_container(name, lab.rootfs, ["sleep", "3600"], network=f"{lab.prefix}-{host}")
        net = next(iter(pm.inspect(name)["NetworkSettings"]["Networks"].values()))
        out[key] = {"name": name, "ip": net["IPAddress"]}
    return out


def default_hops(lab: Lab, host: str) -> set[str]:
    out = subprocess.run(["ip", "-n", f"{lab.prefix}-{host}", "-j", "route", "show",
                          "default", "proto", "78"], capture_output=True, text=True,
                         check=True).stdout
    hops: set[str] = set()
    for r in json.loads(out or "[]"):
        if r.get("gateway"):
            hops.add(r["gateway"])
        hops |= {h["gateway"] for h in r.get("nexthops", []) if h.get("gateway")}
    return hops


def frr(lab: Lab, node: str, command: str) -> Any:
    out = subprocess.run(["vtysh", "--vty_socket", str(FRR_BASE / lab.prefix / node), "-c",
                          command], capture_output=True, text=True, timeout=30,
                         check=True).stdout
    return json.loads(out)


def pinging(ctr: dict[str, Any], ip: str, count: int) -> subprocess.Popen[str]:
    return subprocess.Popen(["podman", "exec", ctr["name"], "ping", "-i", "0.05", "-c",
                             str(count), "-W", "1", ip], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def lost(proc: subprocess.Popen[str]) -> tuple[int, int]:
    out, _ = proc.communicate(timeout=120)
    stats = re.search(r"(\d+) packets transmitted, (\d+) packets received", out)
    assert stats, out[-800:]
    return int(stats[1]), int(stats[1]) - int(stats[2])


def test_the_default_is_ecmp_through_both_tors(lab: Lab, ctrs: dict[str, Any]) -> None:
    wait_for("ECMP default on h1", lambda: default_hops(lab, "h1") == {"198.18.1.1",
                                                                        "198.18.1.2"}, 30, 0.2)
    assert pm.podman("exec", ctrs["a"]["name"], "ping", "-c1", "-W2", ctrs["b"]["ip"],
                     check=False).returncode == 0


def test_a_tor_losing_its_uplink_loses_no_ping(lab: Lab, ctrs: dict[str, Any]) -> None:
    a, b = ctrs["a"], ctrs["b"]
    tor = f"{lab.prefix}-tor-r1a"
    there, back = pinging(a, b["ip"], 200), pinging(b, a["ip"], 200)  # 10 s each
    try:
        time.sleep(2)
        subprocess.run(["ip", "-n", tor, "link", "set", "up0", "down"], check=True)
        took = wait_for("h1 down to one ToR", lambda: default_hops(lab, "h1") ==
                        {"198.18.1.2"}, 20, 0.05)
    finally:
        sent_there, lost_there = lost(there)
        sent_back, lost_back = lost(back)
        subprocess.run(["ip", "-n", tor, "link", "set", "up0", "up"], check=True)
    print(f"\ntor-r1a lost its uplink: h1's default down to tor-r1b after {took:.2f} s; "
          f"a -> b lost {lost_there}/{sent_there}, b -> a lost {lost_back}/{sent_back} "
          "(50 ms apart)")
    assert lost_there <= 2 and lost_back <= 2
    wait_for("ECMP again", lambda: default_hops(lab, "h1") == {"198.18.1.1", "198.18.1.2"},
             60, 0.2)


def test_a_restarted_tor_has_the_routes_back_within_5_s(lab: Lab, ctrs: dict[str, Any]
                                                        ) -> None:
    rec = lab.manifest()["frr"]["tor-r1b"]["processes"]["bgpd"]
    blocks = {b["cidr"] for b in lab.ipam(lambda c: c.blocks(pool="bgp", host="h1"))[
        "blocks"]}
    assert blocks

    def have() -> bool:
        return blocks <= set(frr(lab, "tor-r1b", "show bgp ipv4 unicast json").get(
            "routes") or {})

    assert have()
    subprocess.run(["kill", "-9", str(rec["pid"])], check=True)
    wait_for("bgpd gone", lambda: not alive(rec["pid"]), 10, 0.05)
    new = start_process(rec["netns"], rec["argv"], Path(rec["log"]))
    try:
        wait_for("bgpd answering", lambda: (FRR_BASE / lab.prefix / "tor-r1b" /
                                            "bgpd.vty").exists(), 20, 0.05)

        def established() -> bool:
            try:
                n = frr(lab, "tor-r1b", "show bgp neighbors json").get("198.18.1.11", {})
            except subprocess.CalledProcessError:
                return False
            return bool(n.get("bgpState") == "Established")

        wait_for("h1's session to tor-r1b", established, 120, 0.1)
        t0 = time.monotonic()
        took = wait_for("h1's blocks at tor-r1b", have, 10, 0.05)
        print(f"\ntor-r1b's bgpd restarted: h1's blocks back {took:.2f} s after the "
              "session came up")
        assert time.monotonic() - t0 <= 5
    finally:
        manifest = lab.manifest()
        manifest["frr"]["tor-r1b"]["processes"]["bgpd"] = new
        save_manifest(lab.dir, manifest)
    # the restarted ToR forwards again once its own sessions are back (its bgpd kept no
    # forwarding state: FRR without preserve-fw-state); report when
    back = wait_for("a -> b again", lambda: pm.podman(
        "exec", ctrs["a"]["name"], "ping", "-c1", "-W1", ctrs["b"]["ip"],
        check=False).returncode == 0, 60, 0.2)
    print(f"a -> b answered again {back:.2f} s after that")
