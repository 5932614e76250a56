"""Kubernetes' path: the test plays kubelet against containerd 1.6's CRI on a lab's two hosts.

kubelet never runs CNI plugins; it calls the runtime over CRI and containerd's
CRI plugin runs them (libcni). So each lab host gets a containerd of its own
(tests/support/cri: private root, state and socket; CNI bin dir with netd-cni
and the reference loopback plugin; one conflist naming that host's agent), and
the tests send what kubelet sends: RunPodSandbox, PodSandboxStatus,
StopPodSandbox, RemovePodSandbox. What is checked is what Kubernetes users rely
on: the IP the runtime reports is the IPAM's, with the pod's namespace/name
recorded; stopping releases; the remove's second DEL (no namespace left)
succeeds; a StatefulSet-style pod whose address was assigned to its handle
gets it back wherever it is recreated.
"""

from __future__ import annotations

import ipaddress
import secrets
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require
from tests.support import cri
from tests.support.cnilab import (
    GATEWAY,
    HANDED_OUT,
    NETD_CNI,
    POOL,
    Lab,
    in_ns,
    ndv_links,
    running_lab,
)

pytestmark = [pytest.mark.real]

HOSTS = ("h1", "h2")
LOOPBACK = Path("/usr/lib/cni/loopback")


@dataclass
class Cluster:
    lab: Lab
    nodes: dict[str, cri.Containerd]
    tmp: Path
    image: Path
    pb2: Any
    grpc_mod: Any

    def conflist(self, host: str, version: str = "1.0.0") -> dict[str, Any]:
        # containerd 1.6's go-cni reads results up to 1.0.0: a 1.1.0 conflist fails
        return {"cniVersion": version, "name": f"{self.lab.prefix}-k8s",
                "plugins": [{"type": "netd-cni", "pool": POOL,
                             "agentSocket": self.lab.socket(host)}]}

    def node(self, host: str, version: str = "1.0.0", name: str | None = None
             ) -> cri.Containerd:
        node = cri.Containerd(self.tmp / (name or host))
        node.start(self.conflist(host, version),
                   {"netd-cni": NETD_CNI, "loopback": LOOPBACK}, self.image, self.pb2,
                   self.grpc_mod)
        return node


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    try:
        cri.ensure_containerd()
    except cri.Unavailable as exc:
        require(False, str(exc))
    require(LOOPBACK.exists(), f"{LOOPBACK} missing (containernetworking-plugins)")
    tmp = tmp_path_factory.mktemp("cri")
    try:
        pb2, grpc_mod = cri.compiled(tmp / "gen")
    except cri.Unavailable as exc:
        require(False, str(exc))
    image = cri.pause_image(tmp / "pause.tar")
    with running_lab(tmp, "cr") as lab:
        c = Cluster(lab, {}, tmp, image, pb2, grpc_mod)
        try:
            for h in HOSTS:
                c.nodes[h] = c.node(h)
            yield c
        finally:
            problems = [p for node in c.nodes.values() for p in node.stop()]
            assert not problems, problems


def pod_name(c: Cluster, what: str) -> str:
    return f"{c.lab.prefix}-{what}"


def allocation_of(c: Cluster, sandbox: str) -> dict[str, Any] | None:
    return c.lab.by_container().get(sandbox)


def test_pods_started_in_parallel_get_the_ipams_addresses_and_stop_releases_them(
        cluster: Cluster) -> None:
    c = cluster
    before = c.lab.pool()["allocated"]
    names = [pod_name(c, f"p{i}") for i in range(8)]
    host_of = {n: HOSTS[i % 2] for i, n in enumerate(names)}
    t0 = time.monotonic()
    with ThreadPoolExecutor(max_workers=len(names)) as ex:
        pods = dict(zip(names, ex.map(
            lambda n: c.nodes[host_of[n]].run_pod("default", n, secrets.token_hex(8)),
            names), strict=True))
    print(f"\n{len(names)} pods in parallel on 2 containerd nodes: "
          f"{time.monotonic() - t0:.2f} s")
    ips = {n: c.nodes[host_of[n]].cri.ip(pods[n]) for n in names}  # type: ignore[union-attr]
    assert len(set(ips.values())) == len(names), ips
    assert c.lab.pool()["allocated"] == before + len(names)
    for n in names:
        assert HANDED_OUT[0] <= ipaddress.ip_address(ips[n]) <= HANDED_OUT[1]
        a = allocation_of(c, pods[n])
        assert a is not None, f"no allocation for {n}'s sandbox"
        assert a["ip"] == ips[n] and a["host"] == host_of[n] and a["ifname"] == "eth0"
        assert a["labels"]["k8s.pod"] == f"default/{n}", a["labels"]
    # the pods are on the network: the gateway and a pod on the other host answer
    first, other = names[0], names[1]
    netns = Path(c.nodes[host_of[first]].cri.netns(pods[first])).name  # type: ignore[union-attr]
    for target in (GATEWAY, ips[other]):
        assert in_ns(netns, "ping", "-c", "1", "-W", "2", target).returncode == 0, target

    # StopPodSandbox: the DEL with the namespace; the address is released
    stopped = names[:4]
    for n in stopped:
        c.nodes[host_of[n]].cri.stop_pod(pods[n])  # type: ignore[union-attr]
    assert c.lab.pool()["allocated"] == before + len(names) - len(stopped)
    for n in stopped:
        assert allocation_of(c, pods[n]) is None
    # RemovePodSandbox: containerd runs DEL again, the namespace gone (CNI_NETNS="")
    for n in stopped:
        c.nodes[host_of[n]].cri.remove_pod(pods[n])  # type: ignore[union-attr]
        listed = {p.id for p in c.nodes[host_of[n]].cri.pods()}  # type: ignore[union-attr]
        assert pods[n] not in listed
    for n in names[4:]:  # and the rest, removed without a stop first (kubelet may)
        c.nodes[host_of[n]].cri.remove_pod(pods[n])  # type: ignore[union-attr]
    assert c.lab.pool()["allocated"] == before
    for h in HOSTS:
        assert not ndv_links(c.lab.ns(h)), f"veths left on {h}: {ndv_links(c.lab.ns(h))}"


def test_a_pod_gets_its_assigned_address_back_when_recreated_on_either_host(
        cluster: Cluster) -> None:
    """A StatefulSet's web-0: its address assigned to the handle namespace/name."""
    c = cluster
    name = pod_name(c, "web-0")
    fixed = "198.18.0.240"
    c.lab.ipam(lambda cl: cl.assign(POOL, fixed, f"default/{name}", "web-0's address"))
    try:
        for host in ("h1", "h2", "h1"):
            node = c.nodes[host]
            pod = node.run_pod("default", name, secrets.token_hex(8))
            assert node.cri.ip(pod) == fixed, host  # type: ignore[union-attr]
            a = allocation_of(c, pod)
            assert a is not None and a["host"] == host and a["ip"] == fixed
            node.cri.stop_pod(pod)  # type: ignore[union-attr]
            node.cri.remove_pod(pod)  # type: ignore[union-attr]
            assert allocation_of(c, pod) is None
        shown = c.lab.ipam(lambda cl: cl.show(fixed))
        assert shown["state"] == "reserved" and shown["handle"] == f"default/{name}"
    finally:
        c.lab.ipam(lambda cl: cl.unreserve(POOL, fixed))


def test_a_conflist_of_cni_1_1_0_fails_on_containerd_1_6_and_leaves_nothing(
        cluster: Cluster) -> None:
    """go-cni in containerd 1.6 cannot read a 1.1.0 result: RunPodSandbox fails, and
    containerd's DEL after the failure gives the address back (docs: which cniVersion
    suits which runtime)."""
    c = cluster
    before = c.lab.pool()["allocated"]
    node = c.node("h1", version="1.1.0", name="h1-cni110")
    try:
        with pytest.raises(Exception) as failed:
            node.run_pod("default", pod_name(c, "v110"), secrets.token_hex(8))
        why = str(failed.value)
        print(f"\ncontainerd 1.6 with a 1.1.0 conflist: {why[:300]}")
        assert "1.1.0" in why or "version" in why.lower(), why
        assert c.lab.pool()["allocated"] == before
        assert not ndv_links(c.lab.ns("h1"))
    finally:
        assert not node.stop()
