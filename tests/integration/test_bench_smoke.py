"""Every benchmark runs, in a tiny smoke mode, as ``make bench`` runs it.

A benchmark nobody runs rots (``make bench`` once broke unnoticed on a store method
that had been renamed). These run each module exactly as the Makefile does, with
``--smoke`` (tiny counts, targets not judged), and check that it finished, trusted its
own measurement, tore down what it built, and reported the figures it exists for.
Figures are never asserted on: those are the benchmarks' business (README, Performance).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, require

pytestmark = [pytest.mark.real, pytest.mark.slow]


def smoke(module: str, out: Path, timeout: float) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-m", f"tests.bench.{module}", "--smoke",
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, check=False)
    assert proc.returncode == 0, f"{module} --smoke exited {proc.returncode}:\n" \
                                 f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    doc = json.loads(out.read_text())
    for bad in ("error", "errors", "teardown_problems"):
        assert bad not in doc, f"{module}: {bad}: {doc[bad]}"
    assert doc["params"]["smoke"] is True
    return dict(doc)


def test_ipam_bench_smoke(tmp_path: Path) -> None:
    require(shutil.which("ip") is not None, "iproute2")
    doc = smoke("ipam_bench", tmp_path / "ipam.json", 300)
    assert doc["http"]["clients_16"]["allocs_per_s"] > 0
    assert doc["http"]["verify"]["ok"] and doc["host_local"]["verify"]["ok"]
    assert {"s24-0", "s8-0", "s24-90", "s8-90"} <= set(doc["inproc"])
    assert doc["targets"] == []


def test_cni_bench_smoke(tmp_path: Path) -> None:
    require(os.geteuid() == 0, "the CNI benchmark builds a lab (root)")
    require(os.access("/usr/lib/cni/bridge", os.X_OK), "reference plugins "
            "(containernetworking-plugins)")
    doc = smoke("cni_bench", tmp_path / "cni.json", 600)
    seq = doc["sequential"]
    for plugin in ("netd-cni", "bridge+host-local"):
        assert seq[plugin]["ADD"]["n"] == 3 and seq[plugin]["DEL"]["n"] == 3
    assert doc["targets"] == {}


def test_docker_bench_smoke(tmp_path: Path) -> None:
    require(os.geteuid() == 0, "the Docker benchmark runs dockerd in a lab (root)")
    require(os.access("/usr/sbin/dockerd", os.X_OK), "dockerd (docker.io)")
    doc = smoke("docker_bench", tmp_path / "docker.json", 900)
    for driver in doc["run"].values():
        assert driver["n"] == 2
    assert doc["targets"] == {}


def test_vlan_bench_smoke(tmp_path: Path) -> None:
    require(os.geteuid() == 0, "the VLAN benchmark builds a lab (root)")
    require(shutil.which("ovs-vswitchd") is not None or os.access("/usr/sbin/ovs-vswitchd",
                                                                  os.X_OK),
            "Open vSwitch (openvswitch-switch)")
    require(shutil.which("iperf3") is not None, "iperf3")
    doc = smoke("vlan_bench", tmp_path / "vlan.json", 600)
    seq = doc["sequential"]
    for plugin in ("netd-cni", "bridge+host-local"):
        assert seq[plugin]["ADD"]["n"] == 3 and seq[plugin]["DEL"]["n"] == 3
    assert len(doc["throughput_gbps"]) == 3
    assert all(t["median"] > 0 for t in doc["throughput_gbps"].values())
    assert doc["targets"] == {}


def test_bgp_bench_smoke(tmp_path: Path) -> None:
    require(os.geteuid() == 0, "the BGP benchmark builds a lab (root)")
    require(os.access("/usr/lib/frr/bgpd", os.X_OK), "FRR (frr)")
    require(shutil.which("iperf3") is not None, "iperf3")
    doc = smoke("bgp_bench", tmp_path / "bgp.json", 600)
    seq = doc["sequential"]
    for plugin in ("netd-cni", "bridge+host-local"):
        assert seq[plugin]["ADD"]["n"] == 3 and seq[plugin]["DEL"]["n"] == 3
    assert doc["propagation"]["add_to_core_fib"]["n"] == 2
    assert doc["propagation"]["del_to_gone"]["n"] == 2
    rean = doc["reannounce"]
    assert rean["routes"] >= 20 and rean["core_lowest"] == rean["routes"]
    assert rean["start_to_eor_s"] >= rean["start_to_established_s"] > 0
    assert all(t["median"] > 0 for t in doc["throughput_gbps"].values())
    assert doc["targets"] == {}


def test_etcd_bench_smoke(tmp_path: Path) -> None:
    from tests.support import etcd

    require(etcd.ensure_etcd(), "etcd (etcd-server)")
    doc = smoke("etcd_bench", tmp_path / "etcd.json", 600)
    for store in ("sqlite", "etcd"):
        assert doc[store]["clients_16"]["ok"] > 0 and doc[store]["verified"] > 0
    assert doc["failover"]["leader"]["gap_s"] > 0 and doc["failover"]["follower"]["gap_s"] > 0
    assert doc["targets"] == {}


def test_ui_bench_smoke(tmp_path: Path) -> None:
    doc = smoke("ui_bench", tmp_path / "ui.json", 300)
    assert doc["params"]["n"] == 500
    assert all(p["ok"] for p in doc["pages"].values()), doc["pages"]
