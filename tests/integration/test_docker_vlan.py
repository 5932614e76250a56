"""Docker on the VLAN mode: real dockerd 20.10 in h1, the netd network and IPAM driver.

``netd lab up --mode vlan --hosts 2 --docker-host ...``: h1's agent serves the
Docker plugin; dockerd runs in h1's namespace. Docker networks on the pools
``vlan100`` and ``vlan200`` put their containers on access ports of ovs0 tagged
with the pool's VLAN, next to podman's containers (h2 here): the same VLAN meets
at layer 2 across hosts and runtimes, another VLAN only through the router.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from netd.lab.ovs import available
from netd.ovs import flows as F
from netd.ovs.openflow import OpenFlow
from netd.ovs.ovsdb import Ovsdb, OvsPort
from tests.conftest import bin_path, require
from tests.support import docker as dk
from tests.support import podman as pm
from tests.support.cnilab import Lab, wait_for

pytestmark = [pytest.mark.real, pytest.mark.slow]

GW100 = "198.18.100.1"


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Lab, dk.TestDockerd]]:
    require(available(), "Open vSwitch is missing (apt-get install openvswitch-switch)")
    with dk.running_docker_lab(
            tmp_path_factory.mktemp("dvlan"), "dv", mode="vlan",
            networks=[["-d", "netd", "--ipam-driver", "netd", "--ipam-opt", f"pool=vlan{v}",
                       "--subnet", f"198.18.{v}.0/24", f"v{v}"] for v in (100, 200)]
    ) as lab_and_dockerd:
        yield lab_and_dockerd


def cli(dockerd: dk.TestDockerd, *args: str) -> str:
    proc = dockerd.cli(*args)
    assert proc.returncode == 0, f"docker {' '.join(args)}: {proc.stderr}"
    return str(proc.stdout)


def run(dockerd: dk.TestDockerd, name: str, network: str) -> dict[str, Any]:
    cli(dockerd, "run", "-d", "--name", name, "--network", network, "--cap-add", "NET_RAW",
        "--stop-signal", "KILL", dk.IMAGE, "sleep", "3600")
    c = dockerd.client().containers.get(name)
    ep = c.attrs["NetworkSettings"]["Networks"][network]
    return {"name": name, "id": c.id, "ip": ep["IPAddress"], "mac": ep["MacAddress"]}


def sh(dockerd: dk.TestDockerd, name: str, *argv: str) -> int:
    code, _ = dockerd.client().containers.get(name).exec_run(list(argv))
    return int(code)


def ports(lab: Lab) -> dict[str, OvsPort]:
    """h1's netd ports of ovs0 by their container's address (Docker's owner is the
    endpoint, which the container does not show)."""
    rec = lab.manifest()["ovs"]["h1"]
    db = Ovsdb(f"unix:{rec['dir']}/db.sock")
    try:
        return {p.external_ids["ip"].split("/")[0]: p for p in db.ports("ovs0")
                if p.owner is not None}
    finally:
        db.close()


def port_flows(lab: Lab, ofport: int) -> list[F.Flow]:
    rec = lab.manifest()["ovs"]["h1"]
    of = OpenFlow(f"{rec['dir']}/ovs0.mgmt")
    try:
        return of.dump(F.cookie(F.KIND_PORT, ofport), 0xFFFFFFFFFFFFFFFF)
    finally:
        of.close()


def test_docker_containers_on_two_vlans_next_to_podman(
        lab: tuple[Lab, dk.TestDockerd]) -> None:
    the_lab, dockerd = lab
    d1 = run(dockerd, f"{the_lab.prefix}-d1", "v100")
    d2 = run(dockerd, f"{the_lab.prefix}-d2", "v200")
    p = f"{the_lab.prefix}-p1"  # podman on h2, VLAN 100
    pm.run_container(p, the_lab.rootfs, ["sleep", "3600"], network=f"{the_lab.prefix}-h2-v100")
    p_ip = next(iter(pm.inspect(p)["NetworkSettings"]["Networks"].values()))["IPAddress"]
    assert d1["ip"].startswith("198.18.100.") and d2["ip"].startswith("198.18.200.")
    # the IPAM's MAC and an access port of the pool's VLAN, marked with the owner
    held = {a["ip"]: a for a in the_lab.allocations("h1", "vlan100")}
    assert held[d1["ip"]]["mac"] == d1["mac"]
    by_ip = ports(the_lab)
    port1, port2 = by_ip[d1["ip"]], by_ip[d2["ip"]]
    assert (port1.tag, port2.tag) == (100, 200)
    assert port1.external_ids["attached-mac"] == d1["mac"]
    assert port_flows(the_lab, port1.ofport)
    # VLAN 100 across hosts and runtimes; the gateway; VLAN 200 only through the router
    assert sh(dockerd, d1["name"], "ping", "-c1", "-W2", p_ip) == 0
    assert sh(dockerd, d1["name"], "ping", "-c1", "-W2", GW100) == 0
    assert sh(dockerd, d2["name"], "arping", "-c2", "-w2", "-I", "eth0", d1["ip"]) != 0
    assert sh(dockerd, d2["name"], "ping", "-c1", "-W2", d1["ip"]) == 0
    # docker rm: port, flows and address gone
    dockerd.client().containers.get(d1["name"]).remove(force=True)
    wait_for("d1's port gone", lambda: d1["ip"] not in ports(the_lab), 15, 0.1)
    assert not port_flows(the_lab, port1.ofport)
    wait_for("d1's address released", lambda: d1["ip"] not in
             {a["ip"] for a in the_lab.allocations("h1", "vlan100")}, 15, 0.1)
    pm.rm(p)


def test_a_network_on_a_pool_without_a_vlan_is_refused_at_creation(
        lab: tuple[Lab, dk.TestDockerd], tmp_path: Path) -> None:
    the_lab, dockerd = lab
    netctl = ["ip", "netns", "exec", the_lab.manifest()["roles"]["gateway"], bin_path("netctl"),
              "--server", the_lab.manifest()["ipam_url"], "--token-file",
              str(the_lab.dir / "token")]
    subprocess.run([*netctl, "pool", "create", "dnovlan", "--cidr", "198.19.20.0/24"],
                   check=True, capture_output=True)
    before = ports(the_lab), the_lab.last_event()
    proc = dockerd.cli("network", "create", "-d", "netd", "--ipam-driver", "netd",
                       "--ipam-opt", "pool=dnovlan", "--subnet", "198.19.20.0/24", "nov")
    assert proc.returncode != 0 and "has no VLAN" in proc.stderr, proc.stderr
    assert not dockerd.client().networks.list(names=["nov"])
    assert (ports(the_lab), the_lab.last_event()) == before
