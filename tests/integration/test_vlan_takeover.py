"""The VLAN mode's uplink takeover on a real host namespace with real OVS 3.1.

``netd lab up --mode vlan --hosts 1 --no-agents`` leaves h1 as a plain host: bond0
198.18.0.11/24, default via 198.18.0.1, its own ovsdb-server and ovs-vswitchd but
no ovs0. The tests start the agent themselves:

1. ``--plan`` prints the steps and changes nothing;
2. with the gateway silent the takeover is rolled back (addresses, routes,
   sysctls and OVSDB as before) and the agent exits with an error;
3. with the gateway back, a continuous ping from the gateway to h1 runs through
   the takeover: no duplicate replies (the kernel answering on bond0 as well as
   through ovs0 was measured at 281 duplicates in 327 pings when done naively),
   the loss bounded and printed.
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from netd.lab.ovs import available
from netd.ovs.ovsdb import Ovsdb
from tests.conftest import bin_path, require
from tests.support.cnilab import Lab, running_lab, wait_for

pytestmark = [pytest.mark.real, pytest.mark.slow]

HOST_ADDRESS, GATEWAY = "198.18.0.11", "198.18.0.1"
INTERVAL = 0.01  # ping interval: 100 a second
MAX_LOST_SECONDS = 2.0  # the bound on the outage the takeover may cause


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    require(available(), "Open vSwitch is missing (apt-get install openvswitch-switch)")
    with running_lab(tmp_path_factory.mktemp("vtk"), "vt", hosts=1, mode="vlan",
                     extra=["--no-agents"]) as the_lab:
        config = Path(the_lab.host("h1")["config"])
        text = config.read_text()  # a short gateway check for the silent-gateway test
        config.write_text(text.replace("[vlan]\n", "[vlan]\ngateway_timeout = 2\n", 1))
        yield the_lab


def host_ns(lab: Lab) -> str:
    return f"{lab.prefix}-h1"


def snapshot(lab: Lab) -> dict[str, Any]:
    """What the takeover changes: h1's links, addresses, routes, uplink sysctls, OVSDB."""
    ns = host_ns(lab)

    def ip(*args: str) -> Any:
        out = subprocess.run(["ip", "-n", ns, "-j", *args], capture_output=True, text=True,
                             check=True).stdout
        return json.loads(out or "[]")

    def sysctl(name: str) -> str:
        return subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-n", name],
                              capture_output=True, text=True, check=True).stdout.strip()

    db = Ovsdb(ovs_url(lab))
    try:
        bridges = sorted(db.api.list_br().execute(check_error=True))
    finally:
        db.close()
    return {
        "links": sorted((li["ifname"], li.get("address"), li.get("mtu"), "UP" in li["flags"])
                        for li in ip("link", "show")),
        "addresses": sorted((a["ifname"], i["local"], i["prefixlen"])
                            for a in ip("addr", "show") for i in a.get("addr_info", [])),
        "routes": sorted(json.dumps(r, sort_keys=True) for r in ip("route", "show", "table",
                                                                     "all")),
        "sysctls": [sysctl(f"net.ipv4.conf.bond0.{k}") for k in ("rp_filter", "arp_ignore")]
                   + [sysctl("net.ipv6.conf.bond0.disable_ipv6")],
        "bridges": bridges,
    }


def ovs_url(lab: Lab) -> str:
    return f"unix:{lab.manifest()['ovs']['h1']['dir']}/db.sock"


def agent(lab: Lab, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", host_ns(lab), bin_path("netd"), "agent",
                           "--config", lab.host("h1")["config"], *args],
                          capture_output=True, text=True, timeout=60)


def set_gateway(lab: Lab, present: bool) -> None:
    gw = lab.manifest()["roles"]["gateway"]
    subprocess.run(["ip", "-n", gw, "addr", "add" if present else "del", f"{GATEWAY}/24",
                    "dev", "lan0"], check=True)


def test_plan_prints_the_takeover_and_changes_nothing(lab: Lab) -> None:
    before = snapshot(lab)
    r = agent(lab, "--plan")
    assert r.returncode == 0, r.stderr
    for step in ("rp_filter", "arp_ignore", "disable_ipv6", "ovs0", "bond0", HOST_ADDRESS):
        assert step in r.stdout, r.stdout
    assert snapshot(lab) == before
    print("\n" + r.stdout)


def test_a_silent_gateway_rolls_the_takeover_back(lab: Lab) -> None:
    before = snapshot(lab)
    set_gateway(lab, present=False)
    try:
        t0 = time.monotonic()
        r = agent(lab)
        took = time.monotonic() - t0
    finally:
        set_gateway(lab, present=True)
    assert r.returncode == 3, (r.returncode, r.stderr[-2000:])
    assert f"gateway {GATEWAY} did not answer ARP" in r.stderr
    assert "previous configuration was restored" in r.stderr
    # bond0's IPv6 comes back with a fresh duplicate address detection: its link-local's
    # local route appears when that is done
    with contextlib.suppress(AssertionError):
        wait_for("bond0 as before", lambda: snapshot(lab) == before, 5, 0.1)
    after = snapshot(lab)
    for key in before:
        assert after[key] == before[key], (key, set(after[key]) ^ set(before[key]))
    print(f"\nsilent gateway: rolled back, agent exited after {took:.1f} s")


def test_a_continuous_ping_runs_through_the_takeover_without_duplicates(lab: Lab) -> None:
    gw = lab.manifest()["roles"]["gateway"]
    ping = subprocess.Popen(["ip", "netns", "exec", gw, "ping", "-n", "-i", str(INTERVAL),
                             "-W", "1", HOST_ADDRESS], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        time.sleep(1)  # a baseline before the takeover
        took = lab.start_agent("h1", timeout=30)
        time.sleep(2)  # and after
    finally:
        ping.send_signal(signal.SIGINT)
        out, _ = ping.communicate(timeout=10)
    stats = re.search(r"(\d+) packets transmitted, (\d+) received(?:, \+(\d+) duplicates)?",
                      out)
    assert stats, out[-2000:]
    sent, received, dups = int(stats[1]), int(stats[2]), int(stats[3] or 0)
    lost = sent - received
    print(f"\ntakeover under ping ({INTERVAL * 1000:g} ms interval): agent ready in "
          f"{took:.2f} s; {sent} sent, {received} received, {lost} lost "
          f"(~{lost * INTERVAL:.2f} s), {dups} duplicates")
    assert dups == 0 and "DUP!" not in out
    assert lost * INTERVAL <= MAX_LOST_SECONDS, f"{lost} lost"
    status = lab.agent_status("h1")
    assert status["mode"] == "vlan"
    # the host's address now lives on ovs0, bond0 is a trunk port of it
    snap = snapshot(lab)
    assert ("ovs0", HOST_ADDRESS, 24) in snap["addresses"]
    assert not [a for a in snap["addresses"] if a[0] == "bond0" and a[1] == HOST_ADDRESS]
    assert snap["bridges"] == ["ovs0"]
    assert snap["sysctls"] == ["1", "1", "1"]
