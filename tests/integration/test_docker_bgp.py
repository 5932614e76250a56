"""Docker on the BGP mode: real dockerd 20.10 in h1, the netd network and IPAM driver.

``netd lab up --mode bgp --racks 2 --hosts-per-rack 1 --docker-host ...``: h1
(rack r1) serves the Docker plugin to a dockerd in its namespace, h2 (rack r2)
runs podman. A Docker container gets what a CNI container gets in this mode, as
Calico's libnetwork plugin gives it: its address as a /32, the default route via
169.254.1.1 on the link, a /32 route on the host, its block announced; it
reaches a podman container in the other rack through the core.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require
from tests.support import docker as dk
from tests.support import podman as pm
from tests.support.cnilab import Lab, wait_for

pytestmark = [pytest.mark.real, pytest.mark.slow]

SUBNET = "10.65.0.0/16"  # the lab's pool "bgp"


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Lab, dk.TestDockerd]]:
    require(Path("/usr/lib/frr/bgpd").exists(), "FRR is missing (apt-get install frr)")
    with dk.running_docker_lab(
            tmp_path_factory.mktemp("dbgp"), "db", mode="bgp",
            extra=["--racks", "2", "--hosts-per-rack", "1"],
            networks=[["-d", "netd", "--ipam-driver", "netd", "--ipam-opt", "pool=bgp",
                       "--subnet", SUBNET, "routed"]]) as lab_and_dockerd:
        yield lab_and_dockerd


def cli(dockerd: dk.TestDockerd, *args: str) -> str:
    proc = dockerd.cli(*args)
    assert proc.returncode == 0, f"docker {' '.join(args)}: {proc.stderr}"
    return str(proc.stdout)


def exec_out(dockerd: dk.TestDockerd, name: str, *argv: str) -> tuple[int, str]:
    code, out = dockerd.client().containers.get(name).exec_run(list(argv))
    return int(code), out.decode()


def host_routes(lab: Lab, host: str) -> list[dict[str, Any]]:
    out = subprocess.run(["ip", "-n", f"{lab.prefix}-{host}", "-j", "route", "show", "proto",
                          "78"], capture_output=True, text=True, check=True).stdout
    return list(json.loads(out or "[]"))


def test_a_docker_container_is_routed_as_a_32_and_reaches_another_rack(
        lab: tuple[Lab, dk.TestDockerd]) -> None:
    the_lab, dockerd = lab
    name = f"{the_lab.prefix}-d1"
    cli(dockerd, "run", "-d", "--name", name, "--network", "routed", "--stop-signal", "KILL",
        dk.IMAGE, "sleep", "3600")
    c = dockerd.client().containers.get(name)
    ep = c.attrs["NetworkSettings"]["Networks"]["routed"]
    ip = ep["IPAddress"]
    assert ep["IPPrefixLen"] == 32 and ep["Gateway"] == "169.254.1.1", ep
    blocks = {b["cidr"] for b in the_lab.ipam(
        lambda cl: cl.blocks(pool="bgp", host="h1"))["blocks"]}
    assert any(ipaddress.ip_address(ip) in ipaddress.ip_network(b) for b in blocks)
    held = {a["ip"]: a for a in the_lab.allocations("h1", "bgp")}
    assert held[ip]["mac"] == ep["MacAddress"]
    # inside: the /32, the gateway on the link, the default through it
    code, addr = exec_out(dockerd, name, "ip", "-4", "addr", "show", "eth0")
    assert code == 0 and f"inet {ip}/32" in addr, addr
    code, table = exec_out(dockerd, name, "ip", "-4", "route")
    assert code == 0, table
    assert "default via 169.254.1.1 dev eth0" in table, table
    assert "169.254.1.1 dev eth0" in table, table
    # on h1: the /32 to the container, in netd's protocol
    assert any(r["dst"] == ip and r.get("scope") == "link" for r in host_routes(the_lab, "h1"))
    # a podman container in the other rack, both ways
    p = f"{the_lab.prefix}-p2"
    pm.run_container(p, the_lab.rootfs, ["sleep", "3600"], network=f"{the_lab.prefix}-h2")
    p_ip = next(iter(pm.inspect(p)["NetworkSettings"]["Networks"].values()))["IPAddress"]
    assert exec_out(dockerd, name, "ping", "-c1", "-W2", p_ip)[0] == 0
    assert pm.podman("exec", p, "ping", "-c1", "-W2", ip, check=False).returncode == 0
    # docker rm: the route and the address gone
    c.remove(force=True)
    wait_for("d1's route gone", lambda: not any(
        r["dst"] == ip for r in host_routes(the_lab, "h1")), 15, 0.1)
    wait_for("d1's address released", lambda: ip not in
             {a["ip"] for a in the_lab.allocations("h1", "bgp")}, 15, 0.1)
    pm.rm(p)
