"""The agent's endpoint core under concurrency and lost state, against real agents.

A one-host lab (``netd lab up --hosts 1``: switch, gateway + IPAM, h1 with bond0 on br0
and its agent). The tests act as the runtime: they exec ``/opt/cni/bin/netd-cni`` with
CNI_* variables and the config on stdin against namespaces they create, and check what
the kernel, the agent's records and the IPAM say after each step. Each test is one of
the holes the endpoint-core issue names, and fails on the behaviour before it.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import subprocess
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from netd import lab as labmod
from netd.cni.server import call as agent_call
from netd.dataplane.veth import host_ifname_for
from netd.lab.procs import stop_pids
from tests.conftest import bin_path
from tests.support.cnilab import (
    GATEWAY,
    NETD_CNI,
    POOL,
    CniRun,
    Lab,
    add_netns,
    del_netns,
    in_ns,
    links,
    ndv_links,
    netd_conf,
    run_plugin,
    running_lab,
    wait_for,
)

pytestmark = [pytest.mark.real, pytest.mark.slow]


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    with running_lab(tmp_path_factory.mktemp("core"), "nk", hosts=1) as the_lab:
        yield the_lab


@contextlib.contextmanager
def containers(lab: Lab, *tags: str) -> Iterator[list[str]]:
    """Per-test container namespaces (paths as a runtime passes them), removed after."""
    names = [lab.ns(f"k{t}") for t in tags]
    try:
        yield [add_netns(n) for n in names]
    finally:
        for n in names:
            del_netns(n)


def cni(lab: Lab, command: str, cid: str | None, netns: str | None, net: str = "", *,
        ifname: str = "eth0", version: str = "1.0.0", **extra: Any) -> CniRun:
    conf = netd_conf(net or f"{lab.prefix}-core", lab.socket("h1"), version=version)
    conf.update(extra)
    return run_plugin(NETD_CNI, command, conf, container_id=cid, netns=netns, ifname=ifname)


def ipam_owner(lab: Lab, cid: str) -> dict[str, Any] | None:
    return lab.by_container().get(cid)


def record(lab: Lab, cid: str) -> dict[str, Any] | None:
    found = [a for a in lab.agent_status("h1")["attachments"] if a["container_id"] == cid]
    assert len(found) <= 1, found
    return found[0] if found else None


def eth0_addresses(netns: str, ifname: str = "eth0") -> list[str]:
    proc = subprocess.run(["ip", "-j", "-n", os.path.basename(netns), "-4", "addr", "show"],
                          capture_output=True, text=True, check=True, timeout=30)
    return [f"{a['local']}/{a['prefixlen']}" for i in json.loads(proc.stdout or "[]")
            if i["ifname"] == ifname for a in i.get("addr_info", [])]


def pings_gateway(netns: str) -> bool:
    return in_ns(os.path.basename(netns), "ping", "-c", "1", "-W", "2", GATEWAY).returncode == 0


def rewrite_agent_config(lab: Lab, **keys: Any) -> Path:
    """Set top-level keys and ``[l2]`` keys (``l2_...``) in h1's agent.toml; returns it."""
    path = Path(lab.host("h1")["config"])
    text = path.read_text()
    top = [f"{k} = {json.dumps(v)}" for k, v in keys.items() if not k.startswith("l2_")]
    l2 = [f"{k[3:]} = {json.dumps(v)}" for k, v in keys.items() if k.startswith("l2_")]
    head, sep, tail = text.partition("[l2]")
    path.write_text(head.rstrip() + "\n" + "\n".join(top) + "\n\n" + sep + tail.rstrip()
                    + "\n" + "\n".join(l2) + "\n")
    return path


@contextlib.contextmanager
def agent_config(lab: Lab, **keys: Any) -> Iterator[None]:
    """h1's agent restarted with these settings, and restarted as it was afterwards."""
    path = Path(lab.host("h1")["config"])
    original = path.read_text()
    try:
        rewrite_agent_config(lab, **keys)
        lab.restart_agent("h1")
        yield
    finally:
        path.write_text(original)
        lab.ensure_agent("h1")
        lab.restart_agent("h1")


# --- 1. concurrent ADDs and DELs of one owner ------------------------------------------


def test_concurrent_add_and_del_of_one_owner_end_consistent(lab: Lab) -> None:
    """6 ADDs and 6 DELs of one container at once, 40 rounds: after each round the kernel,
    the agent's record and the IPAM agree (0.1.0: eth0 configured and the record ready
    while the IPAM listed the address free, 2 rounds of 38)."""
    rounds, each = 40, 6
    disagreements = []
    with containers(lab, "race") as (netns,), ThreadPoolExecutor(max_workers=2 * each) as pool:
        for n in range(rounds):
            cid = f"{lab.prefix}-race-{n}-{secrets.token_hex(3)}"
            ops = ["ADD", "DEL"] * each
            runs = list(pool.map(lambda op, c=cid: (op, cni(lab, op, c, netns)), ops))
            for op, r in runs:
                # every DEL succeeds; an ADD either succeeds or lost a race to a DEL
                # of its own interface (a runtime never does that; the state must stay sane)
                assert op == "ADD" or r.rc == 0, r
            rec, owner = record(lab, cid), ipam_owner(lab, cid)
            host_end = host_ifname_for(cid) in ndv_links(lab.ns("h1"))
            addrs = eth0_addresses(netns)
            attached = rec is not None and rec["state"] == "ready"
            view = (attached, owner is not None, host_end, bool(addrs))
            if len(set(view)) != 1 or (attached and (rec or {}).get("ip") !=
                                       (owner or {}).get("ip")):
                disagreements.append(f"round {n}: record {rec}, IPAM {owner}, host end "
                                     f"{host_end}, eth0 {addrs}")
            assert cni(lab, "DEL", cid, netns).rc == 0
            assert record(lab, cid) is None and ipam_owner(lab, cid) is None
            assert host_ifname_for(cid) not in ndv_links(lab.ns("h1"))
    assert not disagreements, "\n".join(disagreements)
    assert lab.agent_status("h1")["pending_releases"] == 0


# --- 2. a record that cannot be repaired ---------------------------------------------------


def test_an_unrepairable_record_does_not_stop_the_agent(lab: Lab) -> None:
    """0.1.0: one failing record aborted reconcile and the agent exited, serving nobody."""
    with containers(lab, "bad", "good", "new") as (bad, good, new), \
            agent_config(lab, reconcile_interval=1):
        cbad, cgood, cnew = (f"{lab.prefix}-{t}-{secrets.token_hex(3)}"
                             for t in ("bad", "good", "new"))
        assert cni(lab, "ADD", cbad, bad).rc == 0
        added = cni(lab, "ADD", cgood, good)
        assert added.rc == 0
        lab.kill_agent("h1")
        # while the agent is away: bad's veth is deleted and something else takes its
        # container's interface name, so the agent cannot plumb it again
        host_ns = lab.ns("h1")
        subprocess.run(["ip", "-n", host_ns, "link", "del", host_ifname_for(cbad)], check=True)
        subprocess.run(["ip", "-n", os.path.basename(bad), "link", "add", "eth0", "type",
                        "veth", "peer", "name", "squat1"], check=True)
        lab.start_agent("h1")
        status = lab.agent_status("h1")
        assert [e["container_id"] for e in status["not_reconciled"]] == [cbad], status
        assert "File exists" in status["not_reconciled"][0]["error"]
        # the rest of the host is served: the good one works, new ones are plumbed
        assert pings_gateway(good)
        assert cni(lab, "CHECK", cgood, good, prevResult=added.doc).rc == 0
        assert cni(lab, "ADD", cnew, new).rc == 0 and pings_gateway(new)
        text = subprocess.run([bin_path("netd"), "agent", "--config",
                               lab.host("h1")["config"], "status"], capture_output=True,
                              text=True, timeout=30, check=True).stdout
        assert f"not reconciled yet: {cbad[:12]}" in text
        # the cause goes away: the next pass repairs it
        subprocess.run(["ip", "-n", os.path.basename(bad), "link", "del", "eth0"], check=True)
        wait_for("the record repaired by a later pass",
                 lambda: lab.agent_status("h1")["not_reconciled"] == [], 15, 0.2)
        assert pings_gateway(bad)
        for cid, ns in ((cbad, bad), (cgood, good), (cnew, new)):
            assert cni(lab, "DEL", cid, ns).rc == 0
            assert ipam_owner(lab, cid) is None


# --- 3. lost state_dir; another agent in the same namespace ------------------------------


def test_a_lost_state_dir_adopts_live_containers(lab: Lab) -> None:
    """0.1.0 swept netd-named links it had no record of: live containers lost their veth
    while the IPAM still had them allocated."""
    with containers(lab, "l1", "l2") as (n1, n2):
        cids = [f"{lab.prefix}-lost{i}-{secrets.token_hex(3)}" for i in (1, 2)]
        for cid, ns in zip(cids, (n1, n2), strict=True):
            assert cni(lab, "ADD", cid, ns).rc == 0
        before = {cid: ipam_owner(lab, cid) for cid in cids}
        lab.kill_agent("h1")
        state_dir = lab.dir / "h1" / "state"
        shutil.rmtree(state_dir)
        lab.start_agent("h1")
        # they kept working, and the agent knows them again
        assert all(pings_gateway(ns) for ns in (n1, n2))
        for cid in cids:
            rec = record(lab, cid)
            assert rec is not None and rec["state"] == "ready", rec
            assert rec["ip"] == before[cid]["ip"] and rec["mac"] == before[cid]["mac"]
            assert host_ifname_for(cid) in ndv_links(lab.ns("h1"))
        assert any("adopted" in line for line in lab.agent_status("h1")["repaired_at_start"])
        # CHECK passes on the rebuilt record, and DEL releases
        for cid, ns in zip(cids, (n1, n2), strict=True):
            assert cni(lab, "DEL", cid, ns).rc == 0
            assert ipam_owner(lab, cid) is None
            assert host_ifname_for(cid) not in ndv_links(lab.ns("h1"))


def test_a_second_agent_on_another_bridge_leaves_the_first_ones_alone(lab: Lab) -> None:
    """Two agents in one namespace, each its own bridge, socket and state: neither sweeps
    the other's interfaces (0.1.0 deleted every ndv* link it had no record of)."""
    host_ns = lab.ns("h1")
    second = lab.dir / "h1" / "second"
    second.mkdir(exist_ok=True)
    config = second / "agent.toml"
    config.write_text("\n".join([
        'host = "h1"', 'mode = "l2"', f'ipam_url = "{lab.manifest()["ipam_url"]}"',
        f'token_file = "{lab.dir / "token"}"', f'socket = "{second / "agent.sock"}"',
        f'state_dir = "{second / "state"}"', "", "[l2]", 'bridge = "br9"', "takeover = false",
        "dad_timeout = 0", ""]))
    subprocess.run(["ip", "-n", host_ns, "link", "add", "br9", "type", "bridge"], check=True)
    subprocess.run(["ip", "-n", host_ns, "link", "set", "br9", "up"], check=True)
    proc = None
    with containers(lab, "a1", "a2") as (first_ns, second_ns):
        try:
            first = f"{lab.prefix}-first-{secrets.token_hex(3)}"
            assert cni(lab, "ADD", first, first_ns).rc == 0
            proc = labmod.start_process(host_ns, [bin_path("netd"), "agent", "--config",
                                                  str(config)], second / "agent.log")
            wait_for("the second agent", lambda: (second / "agent.sock").exists(), 20, 0.05)
            # it started next to the first's attachment and left it alone
            assert host_ifname_for(first) in ndv_links(host_ns) and pings_gateway(first_ns)
            other = f"{lab.prefix}-other-{secrets.token_hex(3)}"
            conf = netd_conf(f"{lab.prefix}-second", str(second / "agent.sock"))
            assert run_plugin(NETD_CNI, "ADD", conf, container_id=other,
                              netns=second_ns).rc == 0
            assert links(host_ns)[host_ifname_for(other)].get("master") == "br9"
            # the first agent restarts: the second's interface stays
            lab.restart_agent("h1")
            assert host_ifname_for(other) in ndv_links(host_ns)
            assert host_ifname_for(first) in ndv_links(host_ns)
            assert run_plugin(NETD_CNI, "DEL", conf, container_id=other,
                              netns=second_ns).rc == 0
            assert cni(lab, "DEL", first, first_ns).rc == 0
            assert {host_ifname_for(first), host_ifname_for(other)}.isdisjoint(
                ndv_links(host_ns))
        finally:
            if proc is not None:
                stop_pids([proc["pid"]])
            subprocess.run(["ip", "-n", host_ns, "link", "del", "br9"], check=False,
                           capture_output=True)


# --- 4. one owner on two networks ------------------------------------------------------------


@pytest.mark.parametrize("first_del", ["refused network first", "first network first"])
def test_one_owner_on_two_networks_is_refused_and_both_del_orders_are_safe(
        lab: Lab, first_del: str) -> None:
    """0.1.0: the second ADD "succeeded" on the first network's veth, and its DEL removed
    the first network's interface and address."""
    net_a, net_b = f"{lab.prefix}-neta", f"{lab.prefix}-netb"
    with containers(lab, "two") as (netns,):
        cid = f"{lab.prefix}-two-{secrets.token_hex(3)}"
        assert cni(lab, "ADD", cid, netns, net_a).rc == 0
        owner = ipam_owner(lab, cid)
        refused = cni(lab, "ADD", cid, netns, net_b)
        assert refused.code == 106 and net_a in refused.doc.get("msg", ""), refused
        assert ipam_owner(lab, cid) == owner and pings_gateway(netns)
        if first_del == "refused network first":
            assert cni(lab, "DEL", cid, netns, net_b).rc == 0
            assert ipam_owner(lab, cid) == owner and pings_gateway(netns)
            assert host_ifname_for(cid) in ndv_links(lab.ns("h1"))
            assert cni(lab, "DEL", cid, netns, net_a).rc == 0
        else:
            assert cni(lab, "DEL", cid, netns, net_a).rc == 0
            assert cni(lab, "DEL", cid, netns, net_b).rc == 0
        assert ipam_owner(lab, cid) is None
        assert host_ifname_for(cid) not in ndv_links(lab.ns("h1"))
        assert eth0_addresses(netns) == []


# --- 5. GC while an ADD is in flight -----------------------------------------------------------


def test_gc_never_releases_what_an_add_in_flight_holds(lab: Lab) -> None:
    """0.1.0's GC listed the owners it knew before the IPAM's addresses, without owner
    locks: an ADD in between lost its fresh allocation. Here the ADD is slowed by a long
    duplicate-address probe, so GC runs while the address is allocated and the ADD busy."""
    with containers(lab, "gc") as (netns,), agent_config(lab, l2_dad_timeout=1.5):
        cid = f"{lab.prefix}-gc-{secrets.token_hex(3)}"
        done: list[CniRun] = []
        adder = threading.Thread(target=lambda: done.append(cni(lab, "ADD", cid, netns)))
        adder.start()
        wait_for("the ADD's allocation", lambda: ipam_owner(lab, cid) is not None, 10, 0.02)
        gc = cni(lab, "GC", None, None, version="1.1.0",
                 **{"cni.dev/valid-attachments": []})
        assert gc.rc == 0, gc
        adder.join(30)
        assert done and done[0].rc == 0, done
        assert ipam_owner(lab, cid) is not None and pings_gateway(netns)
        rec = record(lab, cid)
        assert rec is not None and rec["state"] == "ready"
        # a GC that does not list it now removes it
        assert cni(lab, "GC", None, None, version="1.1.0",
                   **{"cni.dev/valid-attachments": []}).rc == 0
        assert ipam_owner(lab, cid) is None and record(lab, cid) is None
        assert host_ifname_for(cid) not in ndv_links(lab.ns("h1"))


def test_an_allowed_address_set_with_netctl_reaches_the_port_guard(lab: Lab) -> None:
    """keepalived's VRRP address: refused by the guard until an operator allows it."""
    vip = "198.18.0.240"
    netctl = ["ip", "netns", "exec", lab.ns("gw"), bin_path("netctl"), "--server",
              lab.manifest()["ipam_url"], "--token-file", str(lab.dir / "token")]
    with containers(lab, "vrrp") as (netns,), agent_config(lab, sync_interval=0.3):
        cid = f"{lab.prefix}-vrrp-{secrets.token_hex(3)}"
        added = cni(lab, "ADD", cid, netns)
        assert added.rc == 0
        ip = added.doc["ips"][0]["address"].split("/")[0]
        ns = os.path.basename(netns)
        subprocess.run(["ip", "-n", ns, "addr", "add", f"{vip}/24", "dev", "eth0"],
                       check=True)

        def from_vip() -> bool:
            return in_ns(ns, "ping", "-c", "1", "-W", "1", "-I", vip,
                         GATEWAY).returncode == 0

        assert not from_vip()  # the guard drops what the IPAM did not give it
        for args in (["ip", "reserve", POOL, vip, "--note", "VIP of vrrp"],
                     ["ip", "allow", ip, vip, "--owner", cid]):
            proc = subprocess.run([*netctl, *args], capture_output=True, text=True,
                                  timeout=60, check=False)
            assert proc.returncode == 0, proc.stderr
        wait_for("the VIP through the guard", from_vip, 15, 0.2)
        assert pings_gateway(netns)
        shown = json.loads(subprocess.run([*netctl, "--json", "ip", "show", ip],
                                          capture_output=True, text=True, check=True).stdout)
        assert shown["allowed"] == [vip]
        history = subprocess.run([*netctl, "ip", "history", ip], capture_output=True,
                                 text=True, check=True).stdout
        assert f"allowed: {vip}" in history
        subprocess.run([*netctl, "ip", "allow", ip, "--owner", cid, "--none"], check=True,
                       capture_output=True)
        wait_for("the VIP dropped again", lambda: not from_vip(), 15, 0.2)
        assert cni(lab, "DEL", cid, netns).rc == 0
        subprocess.run([*netctl, "ip", "unreserve", POOL, vip], check=True,
                       capture_output=True)


def test_agent_answers_status_over_its_socket(lab: Lab) -> None:
    st = agent_call(lab.socket("h1"), {"command": "AGENT_STATUS"}, timeout=10)["result"]
    assert st["mode"] == "l2" and st["host"] == "h1" and st["not_reconciled"] == []
    assert lab.pool()["name"] == POOL
