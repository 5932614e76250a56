"""A real agent in BGP mode, through netd-cni, against a real IPAM server.

The BGP racks lab is not built yet; this runs a second agent (``mode = "bgp"``,
its own socket and state) in host h1 of a one-host L2 lab, which gives it a
real IPAM server and a default route (proxy ARP answers for 169.254.1.1
because the host routes it elsewhere). A BGP pool with per-host blocks: the
container's address comes from h1's block, as a /32 with 169.254.1.1 on-link;
it reaches the host's own address through the host end; CHECK passes; DEL
removes the veth and the /32 and releases the address. The host's block gets
its blackhole route with the ADD that claimed it.
"""

from __future__ import annotations

import ipaddress
import json
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from netd import lab as labmod
from netd.dataplane.veth import host_ifname_for
from netd.lab.procs import stop_pids
from tests.conftest import bin_path
from tests.support.cnilab import (
    NETD_CNI,
    Lab,
    add_netns,
    del_netns,
    in_ns,
    netd_conf,
    run_plugin,
    running_lab,
    wait_for,
)

pytestmark = [pytest.mark.real, pytest.mark.slow]

POOL = "bgp1"
CIDR = "10.65.0.0/16"


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Lab, Path]]:
    with running_lab(tmp_path_factory.mktemp("bgpa"), "ba", hosts=1) as lab:
        gw = lab.manifest()["roles"]["gateway"]
        netctl = ["ip", "netns", "exec", gw, bin_path("netctl"), "--server",
                  lab.manifest()["ipam_url"], "--token-file", str(lab.dir / "token")]
        subprocess.run([*netctl, "pool", "create", POOL, "--cidr", CIDR, "--mode", "bgp",
                        "--block-prefix", "26"], check=True, capture_output=True)
        d = lab.dir / "h1" / "bgp"
        d.mkdir()
        config = d / "agent.toml"
        config.write_text("\n".join([
            'host = "h1"', 'mode = "bgp"', f'ipam_url = "{lab.manifest()["ipam_url"]}"',
            f'token_file = "{lab.dir / "token"}"', f'socket = "{d / "agent.sock"}"',
            f'state_dir = "{d / "state"}"', "", "[bgp]", "asn = 64512", ""]))
        proc = labmod.start_process(lab.ns("h1"), [bin_path("netd"), "agent", "--config",
                                                   str(config)], d / "agent.log")
        try:
            wait_for("the bgp agent", lambda: (d / "agent.sock").exists(), 20, 0.05)
            yield lab, d
        finally:
            stop_pids([proc["pid"]])


def held(lab: Lab) -> dict[str, dict[str, Any]]:
    return {a["container_id"]: a for a in lab.allocations(pool=POOL)}


def test_an_add_through_netd_cni_in_bgp_mode(agent: tuple[Lab, Path]) -> None:
    lab, d = agent
    host_ns = lab.ns("h1")
    ns = lab.ns(f"kb{secrets.token_hex(2)}")
    path = add_netns(ns)
    cid = f"{lab.prefix}-bgp-{secrets.token_hex(4)}"
    conf = netd_conf(f"{lab.prefix}-bgpnet", str(d / "agent.sock"), pool=POOL)
    try:
        r = run_plugin(NETD_CNI, "ADD", conf, container_id=cid, netns=path)
        assert r.rc == 0, str(r)
        ip = r.doc["ips"][0]["address"]
        assert ip.endswith("/32") and r.doc["ips"][0]["gateway"] == "169.254.1.1"
        # from h1's block of the pool
        blocks = lab.ipam(lambda c: c.blocks(pool=POOL, host="h1"))["blocks"]
        assert any(ipaddress.ip_interface(ip).ip in ipaddress.ip_network(b["cidr"])
                   for b in blocks), (ip, blocks)
        assert held(lab)[cid]["host"] == "h1"
        # the block's blackhole, in netd's protocol, installed with the ADD
        black = json.loads(subprocess.run(["ip", "-n", host_ns, "-j", "route", "show",
                                           "type", "blackhole", "proto", "78"],
                                          capture_output=True, text=True, check=True).stdout)
        assert {r["dst"] for r in black} == {b["cidr"] for b in blocks}
        # the container reaches the host's own address through its host end
        assert in_ns(ns, "ping", "-c1", "-W2", "198.18.0.11").returncode == 0
        routes = json.loads(subprocess.run(["ip", "-n", host_ns, "-j", "route", "show",
                                            ip.split("/")[0]], capture_output=True,
                                           text=True, check=True).stdout)
        assert routes and routes[0]["dev"] == host_ifname_for(cid)
        check = {**conf, "prevResult": r.doc}
        assert run_plugin(NETD_CNI, "CHECK", check, container_id=cid, netns=path).rc == 0
        assert run_plugin(NETD_CNI, "DEL", conf, container_id=cid, netns=path).rc == 0
        assert cid not in held(lab)
        assert subprocess.run(["ip", "-n", host_ns, "route", "show", ip.split("/")[0]],
                              capture_output=True, text=True).stdout.strip() == ""
    finally:
        run_plugin(NETD_CNI, "DEL", conf, container_id=cid, netns=path)
        del_netns(ns)
