"""The VLAN trunk mode against real OVS 3.1 (userspace datapath), podman and the agents.

``netd lab up --mode vlan --hosts 2``: each host's bond0 is a trunk of its ovs0
into a tag-transparent switch; a router namespace has one gateway per VLAN.
Containers on VLAN 100 and 200 on both hosts, started by podman through
netd-cni. Each test names what it proves; the figures (times to recover) are
printed.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from netd.dataplane.model import eui64_link_local
from netd.dataplane.netns import run_in_netns
from netd.lab.ovs import OvsInstance, available
from netd.ovs import flows as F
from netd.ovs.openflow import OpenFlow
from netd.ovs.ovsdb import Ovsdb
from tests.conftest import bin_path, require
from tests.support import frames as fr
from tests.support import podman as pm
from tests.support.cnilab import (
    NETD_CNI,
    Lab,
    netd_conf,
    run_plugin,
    running_lab,
    wait_for,
)

pytestmark = [pytest.mark.real, pytest.mark.slow]

GW100, GW200 = "198.18.100.1", "198.18.200.1"
MGMT = "ovs0.mgmt"


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    require(available(), "Open vSwitch is missing (apt-get install openvswitch-switch)")
    require(subprocess.run(["which", "tcpdump"], capture_output=True).returncode == 0,
            "tcpdump is missing")
    with running_lab(tmp_path_factory.mktemp("vlan"), "vl", hosts=2, mode="vlan") as the_lab:
        yield the_lab


def ovs(lab: Lab, host: str) -> OvsInstance:
    rec = lab.manifest()["ovs"][host]
    return OvsInstance(rec["netns"], Path(rec["dir"]))


def run_ctr(lab: Lab, name: str, host: str, vlan: int) -> dict[str, Any]:
    full = f"{lab.prefix}-{name}"
    pm.run_container(full, lab.rootfs, ["sleep", "3600"], network=f"{lab.prefix}-{host}-v{vlan}")
    info = pm.inspect(full)
    net = next(iter(info["NetworkSettings"]["Networks"].values()))
    return {"name": full, "ip": net["IPAddress"], "mac": net["MacAddress"],
            "netns": f"/proc/{info['State']['Pid']}/ns/net", "host": host, "vlan": vlan}


@pytest.fixture(scope="module")
def ctrs(lab: Lab) -> dict[str, dict[str, Any]]:
    """a (h1, 100), b (h2, 100), c (h1, 200), d (h2, 200), x (h1, 100: the attacker)."""
    return {key: run_ctr(lab, key, host, vlan) for key, host, vlan in (
        ("a", "h1", 100), ("b", "h2", 100), ("c", "h1", 200), ("d", "h2", 200),
        ("x", "h1", 100))}


def netctl_argv(lab: Lab) -> list[str]:
    """netctl run in the gateway namespace, where the IPAM listens, with the lab's token."""
    return ["ip", "netns", "exec", lab.manifest()["roles"]["gateway"], bin_path("netctl"),
            "--server", lab.manifest()["ipam_url"], "--token-file", str(lab.dir / "token")]


def ping(ctr: dict[str, Any], ip: str, count: int = 1) -> bool:
    return pm.podman("exec", ctr["name"], "ping", "-c", str(count), "-W", "1", ip,
                     check=False).returncode == 0


def arping(ctr: dict[str, Any], ip: str) -> bool:
    return pm.podman("exec", ctr["name"], "arping", "-c", "2", "-w", "2", "-I", "eth0", ip,
                     check=False).returncode == 0


def neigh(ns: str, ip: str) -> str:
    out = subprocess.run(["ip", "-n", ns, "-j", "neigh", "show", ip], capture_output=True,
                         text=True, check=True).stdout
    entries = json.loads(out or "[]")
    return str(entries[0].get("lladdr", "")) if entries else ""


def dump_flows(lab: Lab, host: str) -> list[F.Flow]:
    of = OpenFlow(str(ovs(lab, host).mgmt("ovs0")))
    try:
        return of.dump()
    finally:
        of.close()


# --- layer 2 by VLAN, routing between VLANs, tags on the trunk ---------------------------


def test_a_vlan_reaches_across_hosts_and_another_only_through_the_router(
        lab: Lab, ctrs: dict[str, dict[str, Any]]) -> None:
    a, b, c, d = ctrs["a"], ctrs["b"], ctrs["c"], ctrs["d"]
    assert a["ip"].startswith("198.18.100.") and c["ip"].startswith("198.18.200.")
    assert ping(a, b["ip"]) and ping(c, d["ip"])  # same VLAN, across hosts
    assert ping(a, GW100) and ping(c, GW200)
    # another VLAN: nothing at layer 2 (an ARP for it goes unanswered, also across hosts)
    assert not arping(a, c["ip"]) and not arping(a, d["ip"])
    assert arping(a, b["ip"])  # while the same VLAN answers
    # ... but routed through the router's VLAN gateways
    assert ping(a, c["ip"]) and ping(b, d["ip"])
    # and the hosts' own network (untagged) through the gateway
    assert ping(a, "198.18.0.12")


def test_frames_on_the_trunk_carry_their_vlan_tag(lab: Lab,
                                                  ctrs: dict[str, dict[str, Any]]) -> None:
    """Captured on the switch's side of h1's bond0: 802.1Q tags 100 and 200."""
    sw = lab.manifest()["roles"]["switch"]
    port = f"{lab.prefix}-h1"
    # "vlan" only: a filter such as "icmp and vlan 100" tests the untagged ethertype
    # before the vlan keyword shifts its offsets, and matches nothing
    cmd = ["ip", "netns", "exec", sw, "tcpdump", "-nn", "-e", "-l", "-i", port, "vlan"]
    dump = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        time.sleep(1.0)
        assert ping(ctrs["a"], ctrs["b"]["ip"], 2) and ping(ctrs["c"], ctrs["d"]["ip"], 2)
        time.sleep(0.5)
        dump.send_signal(signal.SIGINT)
        out, _ = dump.communicate(timeout=15)
    finally:
        dump.kill()
        dump.wait()
    icmp = [line for line in out.splitlines() if "ICMP echo" in line]
    assert any("vlan 100" in line and ctrs["b"]["ip"] in line for line in icmp), out
    assert any("vlan 200" in line and ctrs["d"]["ip"] in line for line in icmp), out
    assert "ethertype 802.1Q" in out, out


def _receive(port: int, ready: threading.Event, got: dict[str, Any]) -> None:
    with socket.socket() as srv:
        srv.bind(("0.0.0.0", port))
        srv.listen(1)
        ready.set()
        srv.settimeout(30)
        conn, _ = srv.accept()
        with conn:
            digest, n = hashlib.sha256(), 0
            while chunk := conn.recv(1 << 16):
                digest.update(chunk)
                n += len(chunk)
        got["bytes"], got["sha"] = n, digest.hexdigest()


def test_tcp_between_containers_across_hosts(lab: Lab, ctrs: dict[str, dict[str, Any]]) -> None:
    """16 MiB over TCP from a (h1) to b (h2), checked by hash: the userspace datapath
    carries TCP (with the veth's default offloads, SYNs arrived with bad checksums)."""
    a, b = ctrs["a"], ctrs["b"]
    data = os.urandom(16 << 20)
    ready, got = threading.Event(), {}
    rx = threading.Thread(target=lambda: run_in_netns(b["netns"], lambda: _receive(
        5301, ready, got)), daemon=True)
    rx.start()
    assert ready.wait(10)

    def send() -> float:
        t0 = time.monotonic()
        with socket.create_connection((b["ip"], 5301), timeout=30) as s:
            s.sendall(data)
        return time.monotonic() - t0

    took = run_in_netns(a["netns"], send)
    rx.join(60)
    assert got.get("bytes") == len(data) and got["sha"] == hashlib.sha256(data).hexdigest()
    print(f"\n16 MiB across hosts over TCP in {took:.2f} s "
          f"({len(data) * 8 / took / 1e9:.2f} Gbit/s)")


# --- port security ---------------------------------------------------------------------


def test_spoofing_is_dropped_while_the_owners_traffic_flows(
        lab: Lab, ctrs: dict[str, dict[str, Any]]) -> None:
    """x (attacker, h1 VLAN 100) against a (victim, h1 VLAN 100) and the gateway."""
    rt = lab.manifest()["roles"]["router"]
    a, x = ctrs["a"], ctrs["x"]
    assert ping(a, GW100) and ping(x, GW100)
    assert neigh(rt, a["ip"]) == a["mac"]
    with fr.Watch(rt, "v100") as router:
        fr.send(x["netns"], "eth0",
                fr.garp(x["mac"], a["ip"]),  # take the victim's address
                fr.arp_reply(x["mac"], GW100, a["mac"], a["ip"]),  # impersonate the gateway
                fr.icmp_echo(x["mac"], "ff:ff:ff:ff:ff:ff", a["ip"], GW100),  # its source
                fr.icmp_echo(a["mac"], "ff:ff:ff:ff:ff:ff", a["ip"], GW100,  # its MAC
                             payload=b"cloned"),
                fr.icmp_echo(x["mac"], "ff:ff:ff:ff:ff:ff", "198.18.100.99", GW100))
        assert router.matching(fr.is_arp_claiming(a["ip"])) == []
        assert router.matching(fr.is_icmp_from(a["ip"]), wait=0) == []
        assert router.matching(fr.carries(b"cloned"), wait=0) == []
        assert router.matching(fr.is_icmp_from("198.18.100.99"), wait=0) == []
        # the attacker's own traffic passes the same flows
        fr.send(x["netns"], "eth0", fr.garp(x["mac"], x["ip"]))
        assert router.matching(fr.is_arp_claiming(x["ip"]))
    with fr.Watch(a["netns"], "eth0") as victim:
        fr.send(x["netns"], "eth0", fr.garp(x["mac"], GW100))
        assert victim.matching(fr.is_arp_claiming(GW100)) == []
    assert neigh(rt, a["ip"]) == a["mac"]  # the router still knows the victim's MAC
    assert ping(a, GW100) and ping(a, ctrs["b"]["ip"])  # and the victim keeps its traffic


def test_ipv6_router_advertisements_and_foreign_advertisements_are_dropped(
        lab: Lab, ctrs: dict[str, dict[str, Any]]) -> None:
    rt = lab.manifest()["roles"]["router"]
    a, x = ctrs["a"], ctrs["x"]
    own, victim = eui64_link_local(x["mac"]), eui64_link_local(a["mac"])
    with fr.Watch(rt, "v100") as router:
        fr.send(x["netns"], "eth0", fr.router_advert(x["mac"], own),
                fr.neighbor_advert(x["mac"], own, victim),
                fr.neighbor_advert(x["mac"], victim, victim))
        assert router.matching(fr.is_icmpv6_type(134)) == []
        assert router.matching(fr.is_icmpv6_type(136), wait=0) == []
        fr.send(x["netns"], "eth0", fr.neighbor_advert(x["mac"], own, own))
        assert len(router.matching(fr.is_icmpv6_type(136))) == 1


def test_an_allowed_extra_address_passes(lab: Lab, ctrs: dict[str, dict[str, Any]]) -> None:
    """keepalived's VIP: dropped until allowed through netctl, then it flows."""
    x = ctrs["x"]
    vip = "198.18.100.240"
    netctl = netctl_argv(lab)
    in_x = ["nsenter", f"--net={x['netns']}", "ip"]  # podman exec has no CAP_NET_ADMIN
    subprocess.run([*in_x, "addr", "add", f"{vip}/24", "dev", "eth0"], check=True)

    def from_vip() -> bool:
        return pm.podman("exec", x["name"], "ping", "-c1", "-W1", "-I", vip, GW100,
                         check=False).returncode == 0

    try:
        assert not from_vip()
        cid = pm.inspect(x["name"])["Id"]
        for args in (["ip", "reserve", "vlan100", vip, "--note", "VIP"],
                     ["ip", "allow", x["ip"], vip, "--owner", cid]):
            proc = subprocess.run([*netctl, *args], capture_output=True, text=True,
                                  timeout=60, check=False)
            assert proc.returncode == 0, proc.stderr
        wait_for("the VIP through the flows", from_vip, 15, 0.2)
        subprocess.run([*netctl, "ip", "allow", x["ip"], "--owner", cid, "--none"],
                       check=True, capture_output=True)
        wait_for("the VIP dropped again", lambda: not from_vip(), 15, 0.2)
    finally:
        subprocess.run([*in_x, "addr", "del", f"{vip}/24", "dev", "eth0"], check=False)
        subprocess.run([*netctl, "ip", "unreserve", "vlan100", vip], capture_output=True,
                       check=False)


# --- restarts: the agent, ovs-vswitchd -------------------------------------------------------


def netd_flows(lab: Lab, host: str) -> list[F.Flow]:
    return [f for f in dump_flows(lab, host) if f.cookie & F.COOKIE_MASK_NETD == F.NETD]


def port_cookies(lab: Lab, host: str) -> set[int]:
    return {p for f in netd_flows(lab, host) if (p := F.port_of(f.cookie)) is not None}


def ports_of(lab: Lab, host: str) -> set[int]:
    db = Ovsdb(ovs(lab, host).url)
    try:
        return {p.ofport for p in db.ports("ovs0") if p.owner is not None and p.ofport}
    finally:
        db.close()


def test_agent_kill_and_restart_keep_the_containers_and_leave_no_stale_flows(
        lab: Lab, ctrs: dict[str, dict[str, Any]]) -> None:
    a, b = ctrs["a"], ctrs["b"]
    before = netd_flows(lab, "h1")
    lab.kill_agent("h1")
    # the flows live in ovs-vswitchd: nothing opens or closes while the agent is away
    assert ping(a, b["ip"]) and ping(a, GW100)
    took = lab.start_agent("h1")
    assert ping(a, b["ip"])
    after = netd_flows(lab, "h1")
    assert {(f.key, f.cookie) for f in after} == {(f.key, f.cookie) for f in before}
    assert port_cookies(lab, "h1") == ports_of(lab, "h1")  # no flows of gone ports
    print(f"\nagent of h1 back in {took:.2f} s; containers never lost their network")


def test_ovs_vswitchd_restart_is_detected_and_the_flows_reprogrammed(
        lab: Lab, ctrs: dict[str, dict[str, Any]]) -> None:
    """ovs-vswitchd comes back with no flows (fail_mode=secure: everything dropped, the
    host's own address too) until the agent's watchdog puts them back."""
    a, b = ctrs["a"], ctrs["b"]
    inst = ovs(lab, "h1")
    host_ns = f"{lab.prefix}-h1"
    t0 = time.monotonic()
    inst.restart_vswitchd(kill=True)
    restarted = time.monotonic() - t0
    back = wait_for("a container reaches across hosts again",
                    lambda: ping(a, b["ip"]), 30, 0.1)
    host_back = wait_for("the host reaches its gateway again", lambda: subprocess.run(
        ["ip", "netns", "exec", host_ns, "ping", "-c1", "-W1", "198.18.0.1"],
        capture_output=True).returncode == 0, 30, 0.1)
    assert port_cookies(lab, "h1") == ports_of(lab, "h1")
    assert any(f.cookie == F.CANARY_COOKIE for f in netd_flows(lab, "h1"))
    status = lab.agent_status("h1")
    print(f"\novs-vswitchd killed and restarted in {restarted:.2f} s; containers back "
          f"{back:.2f} s and the host {host_back:.2f} s after that; agent: "
          f"{(status.get('driver', {}).get('reprogrammed') or ['?'])[-1]}")


# --- bad input ---------------------------------------------------------------------------


def test_a_pool_without_a_vlan_or_on_an_untrunked_vlan_is_refused_and_changes_nothing(
        lab: Lab, tmp_path: Path) -> None:
    netctl = netctl_argv(lab)
    for args in (["pool", "create", "novlan", "--cidr", "198.19.10.0/24"],
                 ["pool", "create", "vlan300", "--cidr", "198.19.30.0/24", "--vlan", "300",
                  "--mode", "vlan"]):
        subprocess.run([*netctl, *args], capture_output=True, check=True)
    ns = f"{lab.prefix}-kbad"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        event = lab.last_event()
        links = subprocess.run(["ip", "-n", f"{lab.prefix}-h1", "-br", "link"],
                               capture_output=True, text=True).stdout
        ports = ports_of(lab, "h1")
        for pool, why in (("novlan", "has no VLAN"), ("vlan300", "does not carry")):
            conf = netd_conf(f"{lab.prefix}-bad", lab.socket("h1"), pool=pool)
            r = run_plugin(NETD_CNI, "ADD", conf, container_id=f"{lab.prefix}-bad-{pool}",
                           netns=f"/run/netns/{ns}")
            assert r.code == 7 and why in r.doc["msg"], str(r)
        assert lab.last_event() == event  # nothing allocated or released
        assert subprocess.run(["ip", "-n", f"{lab.prefix}-h1", "-br", "link"],
                              capture_output=True, text=True).stdout == links
        assert ports_of(lab, "h1") == ports
        assert subprocess.run(["ip", "-n", ns, "-br", "link"], capture_output=True,
                              text=True).stdout.count("\n") == 1  # lo only
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


def test_lab_status_describes_the_vlan_lab(lab: Lab) -> None:
    status = json.loads(lab.cli("status", "--dir", str(lab.dir), "--json").stdout)
    assert status["mode"] == "vlan"
    assert {p["name"]: p["vlan"] for p in status["pools"]} == {"vlan100": 100,
                                                               "vlan200": 200}
    assert {n["name"] for n in status["networks"]} == {
        f"{lab.prefix}-h{h}-v{v}" for h in (1, 2) for v in (100, 200)}
    assert set(status["namespaces"]) == {"switch", "gateway", "router"}



def test_the_agents_metrics_show_its_ports_and_flows(
        lab: Lab, ctrs: dict[str, dict[str, Any]]) -> None:
    """Last in the module (it restarts h1's agent): the OVS gauges against the bridge."""
    from tests.support.cnilab import enable_agent_metrics, metric, scrape_agent

    enable_agent_metrics(lab, "h1", 9653)
    wait_for("h1's flows back", lambda: lab.agent_status("h1")["driver"].get(
        "flows_intact") is True, 30, 0.2)
    got = scrape_agent(lab, "h1", 9653)
    status = lab.agent_status("h1")
    ready = sum(1 for a in status["attachments"] if a["state"] == "ready")
    assert ready >= 3  # a, c and x run on h1
    assert metric(got, "netd_agent_ovs_ports") == ready
    assert metric(got, "netd_agent_ovs_flows_intact") == 1
    ours = [f for f in dump_flows(lab, "h1") if f.cookie & F.COOKIE_MASK_NETD == F.NETD]
    assert metric(got, "netd_agent_ovs_flows") == len(ours) > ready
    assert metric(got, "netd_agent_attachments", mode="vlan", state="ready") == ready
