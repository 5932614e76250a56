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
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from netd.lab.ovs import OvsInstance, available
from netd.ovs.ovsdb import Ovsdb
from tests.conftest import bin_path, require
from tests.support.cnilab import NETD_CNI, Lab, netd_conf, run_plugin, running_lab, wait_for

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
        text = text.replace("[vlan]\n", "[vlan]\ngateway_timeout = 2\n", 1)
        # this host runs without userspace TSO (the other VLAN tests run with it): the
        # container ends then write their own checksums, proven with TCP below
        config.write_text(text.replace("userspace_tso = true", "userspace_tso = false"))
        rec = the_lab.manifest()["ovs"]["h1"]
        ovs = OvsInstance(rec["netns"], Path(rec["dir"]))
        subprocess.run(["ovs-vsctl", f"--db={ovs.url}", "set", "Open_vSwitch", ".",
                        "other_config:userspace-tso-enable=false"], check=True, timeout=30)
        ovs.restart_vswitchd()  # it reads the setting at start only
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

    # the kernel adds an IPv6 address's local route once its duplicate detection is
    # over (~1-2 s after the link came up): a snapshot taken before would differ from
    # one taken after without anyone having changed anything
    wait_for(f"{ns}'s addresses to finish duplicate detection",
             lambda: not any(i.get("tentative") for a in ip("addr", "show")
                             for i in a.get("addr_info", [])), timeout=15)
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
    # the IPAM's 198.18.0.2 is a secondary address of lan0: without promotion, taking
    # the primary 198.18.0.1 away would take the IPAM's address with it
    subprocess.run(["ip", "netns", "exec", gw, "sysctl", "-qw",
                    "net.ipv4.conf.lan0.promote_secondaries=1"], check=True)
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


SERVER = """
import hashlib, socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 5301)); s.listen(1); s.settimeout(30)
c, _ = s.accept(); c.settimeout(30); h = hashlib.sha256(); n = 0
while chunk := c.recv(65536):
    h.update(chunk); n += len(chunk)
print(n, h.hexdigest())
"""
CLIENT = """
import socket, sys
c = socket.create_connection((sys.argv[1], 5301), timeout=30)
c.sendall(open(sys.argv[2], "rb").read()); c.close()
"""


def test_tcp_from_a_container_without_userspace_tso(lab: Lab, tmp_path: Path) -> None:
    """The userspace datapath without TSO: TCP works because the agent turned transmit
    checksumming off on the container end (with the default offloads SYNs carried
    checksums nobody completed while ping worked)."""
    assert lab.agent_ready("h1"), "the previous test starts the agent"
    ns = f"{lab.prefix}-tc"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    cid = f"{lab.prefix}-tcp"
    conf = netd_conf(f"{lab.prefix}-h1-v100", lab.socket("h1"), pool="vlan100")
    router = lab.manifest()["roles"]["router"]
    data = tmp_path / "payload"
    data.write_bytes(os.urandom(4 << 20))
    try:
        r = run_plugin(NETD_CNI, "ADD", conf, container_id=cid, netns=f"/run/netns/{ns}")
        assert r.code is None, str(r)
        server = subprocess.Popen(["ip", "netns", "exec", router, sys.executable, "-c",
                                   SERVER, "198.18.100.1"], stdout=subprocess.PIPE,
                                  text=True)
        time.sleep(0.5)
        subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", CLIENT,
                        "198.18.100.1", str(data)], check=True, timeout=60)
        out, _ = server.communicate(timeout=60)
        n, digest = out.split()
        assert int(n) == data.stat().st_size
        assert digest == hashlib.sha256(data.read_bytes()).hexdigest()
    finally:
        run_plugin(NETD_CNI, "DEL", conf, container_id=cid, netns=f"/run/netns/{ns}")
        subprocess.run(["ip", "netns", "del", ns], check=False)
