"""Podman with the CNI backend works on this machine: the reference bridge + host-local.

This proves the test machinery (tests/support/podman.py) before any netd code
is involved: two busybox containers on a CNI network made of the reference
``bridge`` and ``host-local`` plugins ping each other, and everything named
with the run's prefix is gone afterwards.
"""

from __future__ import annotations

import ipaddress
import os
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require
from tests.support import podman as pm

pytestmark = [pytest.mark.real]


@pytest.fixture(scope="module")
def podman_info() -> dict[str, Any]:
    require(os.geteuid() == 0, "podman with CNI networks needs root")
    try:
        return pm.ensure_podman()
    except pm.PodmanUnavailable as exc:
        require(False, str(exc))
        raise


@pytest.fixture(scope="module")
def rootfs(podman_info: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return pm.busybox_rootfs(tmp_path_factory.mktemp("rootfs"))


@pytest.fixture
def prefix(podman_info: dict[str, Any]) -> Iterator[str]:
    tag = pm.run_prefix("np")
    try:
        yield tag
    finally:
        pm.cleanup_prefix(tag)


def test_ensure_podman_is_idempotent(podman_info: dict[str, Any]) -> None:
    before = pm.DROPIN.stat().st_mtime_ns
    pm._ready = None  # force the whole path again
    again = pm.ensure_podman()
    assert again == podman_info
    assert pm.DROPIN.stat().st_mtime_ns == before, "a second run rewrote the drop-in"
    assert again["network_backend"] == "cni"
    assert again["runtime"] == "runc"


def test_run_without_network_stays_off_the_root_namespace(rootfs: Path, prefix: str) -> None:
    out = pm.run_container(f"{prefix}-lo", rootfs, ["ls", "/sys/class/net"], detach=False)
    assert out.split() == ["lo"]
    out = pm.run_container(f"{prefix}-lim", rootfs, ["sh", "-c", "ulimit -n"], detach=False)
    assert int(out) > 0


def test_two_containers_ping_over_reference_bridge(rootfs: Path, prefix: str) -> None:
    net = f"{prefix}-ref"
    bridge = f"{prefix}br"
    subnet = ipaddress.ip_network(f"198.18.{random.randint(100, 199)}.0/24")
    pm.write_conflist(net, [{
        "type": "bridge",
        "bridge": bridge,
        "isGateway": False,
        "ipMasq": False,
        "ipam": {"type": "host-local", "ranges": [[{"subnet": str(subnet)}]]},
    }])
    names = [f"{prefix}-a", f"{prefix}-b"]
    with pm.allow_bridge(bridge, prefix):
        latencies = []
        for name in names:
            _, took = pm.timed(pm.run_container, name, rootfs, ["sleep", "300"], network=net)
            latencies.append(took)
        settings = {n: pm.container_network(n, net) for n in names}
        ips = {n: s["IPAddress"] for n, s in settings.items()}
        assert len(set(ips.values())) == 2
        for ip in ips.values():
            assert ipaddress.ip_address(ip) in subnet
        for s in settings.values():
            assert s["IPPrefixLen"] == 24 and s["MacAddress"]
        start = time.monotonic()
        assert pm.ping(names[0], ips[names[1]]), "a cannot ping b"
        exec_took = time.monotonic() - start
        assert pm.ping(names[1], ips[names[0]]), "b cannot ping a"
        # the MAC podman reports is the one inside the container
        link = pm.exec_in(names[0], ["cat", "/sys/class/net/eth0/address"], check=True)
        assert link.stdout.strip() == settings[names[0]]["MacAddress"]
        print(f"\npodman run -d latency: {', '.join(f'{t:.2f}s' for t in latencies)}; "
              f"podman exec ping: {exec_took:.2f}s")
        pm.rm(*names)
    assert pm.containers(name_prefix=prefix) == []
    # host-local released both addresses when podman ran DEL
    state = pm.CNI_STATE_DIR / net
    held = [p.name for p in state.glob("*")] if state.exists() else []
    assert not [h for h in held if h.startswith("198.18.")], held
    pm.remove_network(net)
    pm.cleanup_prefix(prefix)  # the reference plugin leaves its bridge behind
    assert pm.leftovers(prefix) == []
