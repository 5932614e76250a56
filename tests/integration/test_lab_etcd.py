"""A lab whose IPAM runs on etcd: ``netd lab up --store etcd`` (real etcd 3.4, podman).

Three etcd members on the IPAM namespace's loopback, the IPAM server on
``etcd://``; the agents and netd-cni do not know or care. Containers on both
hosts get addresses from the etcd-backed IPAM, reach each other, and give them
back; ``netd ipam check`` finds the store consistent; ``lab down`` leaves no
etcd behind.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest

from netd.lab import procs
from tests.conftest import bin_path, require
from tests.support import etcd
from tests.support import podman as pm
from tests.support.cnilab import Lab, running_lab, wait_for

pytestmark = [pytest.mark.real, pytest.mark.slow]


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    require(etcd.ensure_etcd(), "etcd is missing (apt-get install etcd-server)")
    with running_lab(tmp_path_factory.mktemp("labetcd"), "le",
                     extra=["--store", "etcd"]) as the_lab:
        yield the_lab


def etcd_pids(lab: Lab) -> list[int]:
    members = lab.manifest()["etcd"]["lab"]["processes"].values()
    return [int(m["pid"]) for m in members if procs.alive(int(m["pid"]))]


def test_containers_on_an_etcd_backed_ipam(lab: Lab) -> None:
    manifest = lab.manifest()
    assert manifest["store"].startswith("etcd://127.0.0.1:23790,")
    assert len(etcd_pids(lab)) == 3
    a, b = f"{lab.prefix}-a", f"{lab.prefix}-b"
    pm.run_container(a, lab.rootfs, ["sleep", "3600"], network=lab.network("h1"))
    pm.run_container(b, lab.rootfs, ["sleep", "3600"], network=lab.network("h2"))
    ip_a = next(iter(pm.inspect(a)["NetworkSettings"]["Networks"].values()))["IPAddress"]
    ip_b = next(iter(pm.inspect(b)["NetworkSettings"]["Networks"].values()))["IPAddress"]
    held = {x["ip"]: x for x in lab.allocations()}
    assert held[ip_a]["host"] == "h1" and held[ip_b]["host"] == "h2"
    assert pm.ping(a, ip_b) and pm.ping(b, ip_a)
    # the store itself, checked from the IPAM's namespace
    check = subprocess.run(["ip", "netns", "exec", manifest["roles"]["gateway"],
                            bin_path("netd"), "ipam", "check", "--store", manifest["store"]],
                           capture_output=True, text=True, timeout=120, check=False)
    assert check.returncode == 0 and "consistent" in check.stdout, check.stdout + check.stderr
    pm.rm(a, b)
    wait_for("both addresses released", lambda: not {ip_a, ip_b} & {
        x["ip"] for x in lab.allocations()}, 20, 0.2)


def test_down_stops_the_etcd_members(lab: Lab) -> None:
    pids = etcd_pids(lab)
    assert pids
    lab.cli("down", "--prefix", lab.prefix, "--dir", str(lab.dir))
    wait_for("etcd gone", lambda: not any(procs.alive(p) for p in pids), 20, 0.1)
    assert not (lab.dir / "etcd").exists()
