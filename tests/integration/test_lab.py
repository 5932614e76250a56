"""``netd lab up|status|down`` builds a data centre in namespaces and removes it again.

Everything runs through the real command line, as root, in namespaces named
with a per-run prefix; whatever a test leaves behind is swept by that prefix.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import bin_path, require
from tests.support import podman as pm
from tests.support.cnilab import netd_lab

pytestmark = [pytest.mark.real]

CNI_CONF_DIR = Path("/etc/cni/net.d")


@dataclass
class Lab:
    prefix: str
    dir: Path

    def netd(self, *args: str, check: bool = True,
             timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return netd_lab(*args, check=check, timeout=timeout)

    def up(self, *extra: str) -> subprocess.CompletedProcess[str]:
        return self.netd("up", "--mode", "l2", "--hosts", "2", "--prefix", self.prefix,
                         "--dir", str(self.dir), *extra)

    def down(self, *extra: str) -> subprocess.CompletedProcess[str]:
        return self.netd("down", "--dir", str(self.dir), *extra)

    def status(self, *extra: str) -> dict[str, Any]:
        return dict(json.loads(self.netd("status", "--dir", str(self.dir), "--json",
                                         *extra).stdout))

    def manifest(self) -> dict[str, Any]:
        return dict(json.loads((self.dir / "lab.json").read_text()))

    def ns(self, name: str) -> str:
        return f"{self.prefix}-{name}"

    def in_ns(self, name: str, *argv: str,
              timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ip", "netns", "exec", self.ns(name), *argv],
                              capture_output=True, text=True, timeout=timeout, check=False)

    def netctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.in_ns("gw", bin_path("netctl"), "--server", "http://198.18.0.2:9650",
                          "--token-file", str(self.dir / "token"), *args)


def lab_namespaces(prefix: str) -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                         check=True).stdout
    return sorted(line.split()[0] for line in out.splitlines()
                  if line.split() and line.split()[0].startswith(f"{prefix}-"))


def process_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def agent_available() -> bool:
    proc = subprocess.run([bin_path("netd"), "agent", "--help"], capture_output=True,
                          check=False, timeout=60)
    return proc.returncode == 0


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    require(os.geteuid() == 0, "the lab needs root (network namespaces)")
    require(subprocess.run(["which", "ip"], capture_output=True,
                           check=False).returncode == 0, "iproute2 'ip' missing")
    the_lab = Lab(prefix=pm.run_prefix("nl"), dir=tmp_path / "lab")
    try:
        yield the_lab
    finally:
        the_lab.netd("down", "--prefix", the_lab.prefix, "--dir", str(the_lab.dir),
                     check=False)
        pm.cleanup_prefix(the_lab.prefix)


def test_up_builds_switch_gateway_ipam_and_hosts(lab: Lab) -> None:
    out = lab.up("--no-agents").stdout
    assert f"lab {lab.prefix} up" in out
    assert lab_namespaces(lab.prefix) == sorted(lab.ns(n) for n in ("sw", "gw", "h1", "h2"))

    for i, host in enumerate(("h1", "h2"), start=1):
        address = f"198.18.0.{10 + i}"
        addr = lab.in_ns(host, "ip", "-4", "-o", "addr", "show", "dev", "bond0")
        assert f"inet {address}/24" in addr.stdout, addr.stdout
        route = lab.in_ns(host, "ip", "route", "get", "198.18.0.1")
        assert "dev bond0" in route.stdout, route.stdout
        default = lab.in_ns(host, "ip", "route", "show", "default")
        assert "via 198.18.0.1 dev bond0" in default.stdout, default.stdout
        ping = lab.in_ns(host, "ping", "-c", "1", "-W", "2", "198.18.0.1")
        assert ping.returncode == 0, ping.stdout + ping.stderr
        health = lab.in_ns(host, "curl", "-fsS", "--max-time", "5",
                           "http://198.18.0.2:9650/healthz")
        assert health.returncode == 0 and "ok" in health.stdout, health.stderr

    gw = lab.in_ns("gw", "ip", "-4", "-o", "addr", "show")
    assert "198.18.0.1/24" in gw.stdout and "198.18.0.2/24" in gw.stdout
    # the lab's addresses never reach the machine's own namespace
    root = subprocess.run(["ip", "-4", "-o", "addr", "show"], capture_output=True,
                          text=True, check=True).stdout
    assert "198.18.0." not in root

    pool = lab.netctl("--json", "pool", "show", "lab")
    assert pool.returncode == 0, pool.stderr
    doc = json.loads(pool.stdout)
    assert doc["pool"]["cidr"] == "198.18.0.0/24" and doc["pool"]["gateway"] == "198.18.0.1"
    assert doc["pool"]["mode"] == "l2" and doc["pool"]["reserved"] == 49
    assert [r["range"] for r in doc["reserved"]] == ["198.18.0.1-198.18.0.49"]
    # mutations need the token: the server was started with the lab's token file
    denied = lab.in_ns("gw", bin_path("netctl"), "--server", "http://198.18.0.2:9650",
                       "--token", "wrong", "pool", "delete", "lab")
    assert denied.returncode != 0

    manifest = lab.manifest()
    assert manifest["state"] == "up" and manifest["prefix"] == lab.prefix
    assert sorted(manifest["namespaces"]) == lab_namespaces(lab.prefix)
    assert process_alive(manifest["ipam"]["pid"])
    for i, host in enumerate(manifest["hosts"], start=1):
        conf = tomllib.loads(Path(host["config"]).read_text())
        assert conf == {
            "host": f"h{i}", "mode": "l2", "ipam_url": "http://198.18.0.2:9650",
            "token_file": str(lab.dir / "token"),
            "socket": str(lab.dir / f"h{i}" / "agent.sock"),
            "state_dir": str(lab.dir / f"h{i}" / "state"),
            "l2": {"uplink": "bond0", "bridge": "br0"},
        }
        conflist = json.loads((CNI_CONF_DIR / f"{lab.prefix}-h{i}.conflist").read_text())
        assert conflist == {"cniVersion": "1.0.0", "name": f"{lab.prefix}-h{i}",
                            "plugins": [{"type": "netd-cni", "pool": "lab",
                                         "agentSocket": conf["socket"],
                                         "capabilities": {"ips": True, "mac": True}}]}
        assert host["conflist"] in manifest["conflists"]
        assert host["agent"] is None

    status = lab.status()
    assert status["ipam"]["healthy"] and status["state"] == "up"
    assert [h["name"] for h in status["hosts"]] == ["h1", "h2"]
    assert all(h["netns_present"] for h in status["hosts"])
    assert status["hosts"][0]["addresses"]["bond0"] == ["198.18.0.11/24"]
    # the keys scripts rely on (netd lab status --json)
    assert status["mode"] == "l2" and status["prefix"] == lab.prefix
    for i, h in enumerate(status["hosts"], start=1):
        assert {k: h[k] for k in ("name", "netns", "address", "agent_socket", "agent_pid",
                                  "rack")} == {
            "name": f"h{i}", "netns": lab.ns(f"h{i}"), "address": f"198.18.0.{10 + i}",
            "agent_socket": str(lab.dir / f"h{i}" / "agent.sock"), "agent_pid": None,
            "rack": None}
    assert status["pools"] == [{"name": "lab", "cidr": "198.18.0.0/24",
                                "gateway": "198.18.0.1", "vlan": None}]
    assert status["networks"] == [{"name": lab.ns(f"h{i}"), "host": f"h{i}", "pool": "lab"}
                                  for i in (1, 2)]
    assert status["namespaces"] == {"switch": lab.ns("sw"), "gateway": lab.ns("gw")}
    text = lab.netd("status", "--dir", str(lab.dir)).stdout
    assert "healthy" in text and "h2" in text


def test_agent_config_is_accepted_by_the_agent_parser(lab: Lab) -> None:
    lab.up("--no-agents")
    from netd.agent.config import load_config

    for host in lab.manifest()["hosts"]:
        cfg = load_config(host["config"])
        settings = cfg.driver_settings
        assert cfg.mode == "l2" and settings.uplink == "bond0" and settings.bridge == "br0"
        assert cfg.ipam_url == "http://198.18.0.2:9650"


def assert_gone(lab: Lab, ipam_pid: int | None = None) -> None:
    assert lab_namespaces(lab.prefix) == []
    assert list(CNI_CONF_DIR.glob(f"{lab.prefix}*")) == []
    assert pm.leftovers(lab.prefix) == []
    assert not lab.dir.exists(), list(lab.dir.rglob("*"))
    if ipam_pid is not None:
        deadline = time.monotonic() + 5
        while process_alive(ipam_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not process_alive(ipam_pid)


def test_down_removes_everything_and_is_idempotent(lab: Lab) -> None:
    lab.up("--no-agents")
    pid = lab.manifest()["ipam"]["pid"]
    out = lab.down().stdout
    assert "removed netns" in out and "removed conflist" in out and "removed process" in out
    assert_gone(lab, pid)
    again = lab.down("--prefix", lab.prefix)
    assert "nothing to remove" in again.stdout


def test_down_after_a_crash_still_cleans(lab: Lab) -> None:
    lab.up("--no-agents")
    manifest = lab.manifest()
    os.kill(manifest["ipam"]["pid"], signal.SIGKILL)
    # something else the crashed lab left running in one of its namespaces
    stray = subprocess.Popen(["ip", "netns", "exec", lab.ns("h1"), "sleep", "600"],
                             start_new_session=True)
    try:
        out = lab.down().stdout
        assert f"removed process {stray.pid}" in out
        assert stray.wait(10) is not None
    finally:
        if stray.poll() is None:
            stray.kill()
    assert_gone(lab, manifest["ipam"]["pid"])


def test_down_without_a_manifest_sweeps_by_prefix(lab: Lab) -> None:
    lab.up("--no-agents")
    pid = lab.manifest()["ipam"]["pid"]
    (lab.dir / "lab.json").unlink()  # the manifest is lost too
    out = lab.down("--prefix", lab.prefix).stdout
    assert "removed netns" in out
    assert_gone(lab, pid)


def test_up_twice_replaces_the_previous_lab(lab: Lab) -> None:
    lab.up("--no-agents")
    first = lab.manifest()["ipam"]["pid"]
    out = lab.up("--no-agents").stdout
    assert f"lab {lab.prefix} up" in out
    assert not process_alive(first)
    assert lab.status()["ipam"]["healthy"]


def test_up_refuses_a_foreign_directory_and_builds_nothing(lab: Lab) -> None:
    lab.dir.mkdir(parents=True)
    (lab.dir / "precious").write_text("not the lab's\n")
    proc = lab.netd("up", "--hosts", "1", "--prefix", lab.prefix, "--dir", str(lab.dir),
                    "--no-agents", check=False)
    assert proc.returncode != 0 and "not empty" in proc.stderr
    assert lab_namespaces(lab.prefix) == []
    assert (lab.dir / "precious").exists()


def podman_ready() -> None:
    try:
        pm.ensure_podman()
    except pm.PodmanUnavailable as exc:
        require(False, str(exc))


def test_lab_with_agents_and_podman_containers(lab: Lab, tmp_path: Path) -> None:
    require(agent_available(), "'netd agent' is not available")
    podman_ready()
    lab.up()
    manifest = lab.manifest()
    assert all(process_alive(h["agent"]["pid"]) for h in manifest["hosts"])
    rootfs = pm.busybox_rootfs(tmp_path / "rootfs")
    names = []
    for host in ("h1", "h2"):
        name = f"{lab.prefix}-c{host}"
        pm.run_container(name, rootfs, ["sleep", "300"], network=lab.ns(host))
        names.append(name)
    status = lab.status()
    for h in status["hosts"]:
        assert h["agent_running"] and h["socket_present"]
        held = [a for addrs in h["addresses"].values() for a in addrs]
        assert f"{h['address']}/24" in held, h
    found = {c["name"]: c for c in status["containers"]}
    assert sorted(found) == sorted(names)
    assert found[names[0]]["host"] == "h1" and found[names[1]]["host"] == "h2"
    assert all(c["ip"].startswith("198.18.0.") for c in found.values())
    results = status["reachability"]["results"]
    assert len(results) == 4, results  # 2 containers x (gateway + the other one)
    assert all(r["result"] == "ok" for r in results), results
    text = lab.netd("status", "--dir", str(lab.dir)).stdout
    assert "reachability" in text and "FAIL" not in text
    out = lab.down().stdout
    assert all(f"removed container {n}" in out for n in names), out
    assert pm.containers(name_prefix=lab.prefix) == []
    assert_gone(lab)


def test_down_after_agents_and_ipam_died_removes_containers(lab: Lab, tmp_path: Path) -> None:
    require(agent_available(), "'netd agent' is not available")
    podman_ready()
    lab.up()
    rootfs = pm.busybox_rootfs(tmp_path / "rootfs")
    name = f"{lab.prefix}-c1"
    pm.run_container(name, rootfs, ["sleep", "300"], network=lab.ns("h1"))
    manifest = lab.manifest()
    for rec in [manifest["ipam"], *(h["agent"] for h in manifest["hosts"])]:
        os.kill(rec["pid"], signal.SIGKILL)
    out = lab.down().stdout
    assert f"removed container {name}" in out, out
    assert pm.containers(name_prefix=lab.prefix) == []
    assert_gone(lab)


def test_plan_names_addresses_and_renderers() -> None:
    from netd import lab as labmod
    from netd.lab import base, l2

    plan = labmod.plan_lab("nltest", 3, Path("/x/lab"))
    assert plan.namespaces == ["nltest-sw", "nltest-gw", "nltest-h1", "nltest-h2", "nltest-h3"]
    assert plan.roles == {"switch": "nltest-sw", "gateway": "nltest-gw"}
    assert [h.address for h in plan.hosts] == ["198.18.0.11", "198.18.0.12", "198.18.0.13"]
    assert all(len(n) <= 15 for n in (l2.bridge_name("nltest"), "nltest-gw",
                                      *(f"nltest-{h.name}" for h in plan.hosts)))
    assert base.is_lab_netns("nltest", "nltest-h12")
    assert not base.is_lab_netns("nltest", "nltest2-h1")
    assert not base.is_lab_netns("nltest", "nltest-c1")
    assert base.is_lab_conflist("nltest", "nltest-h2.conflist")
    assert not base.is_lab_conflist("nltest", "nltest-ref.conflist")
    with pytest.raises(Exception, match="15 characters"):
        labmod.plan_lab("averyveryverylong", 1, Path("/x"))
    with pytest.raises(Exception, match="the lab builds l2"):
        labmod.plan_lab("nltest", 1, Path("/x"), mode="ovs")
    matrix = base.render_matrix(["a", "b"], ["gw", "a", "b"],
                                  {("a", "gw"): "ok", ("a", "b"): "FAIL", ("b", "gw"): "ok",
                                   ("b", "a"): "noraw"})
    lines = matrix.splitlines()
    assert lines[0].split() == ["from", "\\", "to", "gw", "a", "b"]
    assert lines[1].split() == ["a", "ok", "-", "FAIL"]
    assert lines[2].split() == ["b", "ok", "noraw", "-"]


def test_reachability_matrix_from_real_containers(tmp_path: Path) -> None:
    """The matrix code against podman containers on a reference bridge (no agent needed)."""
    require(os.geteuid() == 0, "needs root")
    try:
        pm.ensure_podman()
    except pm.PodmanUnavailable as exc:
        require(False, str(exc))
    from netd.lab import containers

    prefix = pm.run_prefix("nl")
    net, bridge = f"{prefix}-ref", f"{prefix}br"
    try:
        pm.write_conflist(net, [{"type": "bridge", "bridge": bridge, "isGateway": False,
                                 "ipMasq": False, "ipam": {"type": "host-local", "ranges": [
                                     [{"subnet": "198.18.201.0/24"}]]}}])
        rootfs = pm.busybox_rootfs(tmp_path / "rootfs")
        with pm.allow_bridge(bridge, prefix):
            for name, raw in (("a", True), ("b", True), ("c", False)):
                pm.run_container(f"{prefix}-{name}", rootfs, ["sleep", "300"], network=net,
                                 net_raw=raw)
            found = containers.lab_containers([net])
            assert [c["name"] for c in found] == [f"{prefix}-{n}" for n in "abc"]
            assert all(c["ip"].startswith("198.18.201.") and c["mac"] for c in found)
            sources, targets, results = containers.reachability(found, "198.18.201.1")
        a, b, c = (f"{prefix}-{n}" for n in "abc")
        assert sources == [a, b, c] and targets == ["gw", a, b, c]
        assert results[(a, b)] == "ok" and results[(b, c)] == "ok" and results[(a, c)] == "ok"
        # there is no gateway on this bridge, and c may not open raw sockets
        assert results[(a, "gw")] == "FAIL"
        assert results[(c, a)] == "noraw"
    finally:
        pm.cleanup_prefix(prefix)
    assert pm.leftovers(prefix) == []


def test_a_failed_up_removes_what_it_built(lab: Lab, monkeypatch: pytest.MonkeyPatch) -> None:
    from netd import lab as labmod
    from netd.lab import base

    def broken_pool(plan: Any, netctl: str) -> None:
        raise labmod.LabError("injected: pool creation failed")

    monkeypatch.setattr(base, "_create_pools", broken_pool)
    plan = labmod.plan_lab(lab.prefix, 2, lab.dir)
    with pytest.raises(labmod.LabError, match="injected"):
        labmod.lab_up(plan, agents=False, echo=lambda _: None)
    assert_gone(lab)


def test_lab_up_docker_runs_dockerd_in_h1_and_down_removes_it(lab: Lab,
                                                              tmp_path: Path) -> None:
    """``--docker``: dockerd in h1, h1's agent serves the plugin; ``down`` removes it all."""
    from netd.lab import docker as lab_docker
    from tests.support import docker as dk

    try:
        dk.ensure_docker()
    except dk.DockerUnavailable as exc:
        require(False, str(exc))
    require(not lab_docker.plugin_served(), f"{lab_docker.PLUGIN_SOCKET} is already served")
    out = lab.netd("up", "--mode", "l2", "--hosts", "1", "--prefix", lab.prefix, "--dir",
                   str(lab.dir), "--no-install-cni", "--cni-conf-dir", str(tmp_path / "cni"),
                   "--docker", timeout=300).stdout
    host = f"unix:///run/{lab.prefix}/docker.sock"
    assert f"answering at {host}" in out and "network create -d netd" in out, out
    manifest = lab.manifest()
    dockerd = manifest["docker"]["dockerd"]
    assert manifest["docker"]["on"] == "h1" and manifest["docker"]["docker_host"] == host
    assert process_alive(dockerd["pid"]) and dockerd["data_root"] == f"/var/lib/{lab.prefix}-docker"
    config = tomllib.loads(Path(manifest["hosts"][0]["config"]).read_text())
    assert config["docker_plugin"] is True and config["docker_host"] == host
    # dockerd lives in h1's network namespace, not the machine's
    assert os.stat(f"/proc/{dockerd['pid']}/ns/net").st_ino == os.stat(
        f"/run/netns/{lab.ns('h1')}").st_ino
    status = lab.status("--no-ping")
    assert status["docker"]["dockerd_answering"] and status["docker"]["plugin_served"]
    assert "docker: dockerd pid" in lab.netd("status", "--dir", str(lab.dir), "--no-ping").stdout

    def docker(*args: str) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(["docker", "-H", host, *args], capture_output=True, text=True,
                              timeout=120, check=False)
        assert proc.returncode == 0, proc.stderr
        return proc

    import docker as docker_sdk

    client = docker_sdk.DockerClient(base_url=host, version="auto", timeout=120)
    try:
        dk.import_busybox(client)
    finally:
        client.close()
    docker("network", "create", "-d", "netd", "--ipam-driver", "netd", "--ipam-opt",
           "pool=lab", "--subnet", "198.18.0.0/24", "dnet")
    name = f"{lab.prefix}-c1"
    docker("run", "-d", "--name", name, "--network", "dnet", "--stop-signal", "KILL",
           dk.IMAGE, "sleep", "600")
    ip = docker("inspect", "-f", "{{.NetworkSettings.Networks.dnet.IPAddress}}",
                name).stdout.strip()
    assert ip.startswith("198.18.0."), ip

    # netd agent status lists the endpoint (plugin docker), with the container's name
    agent = [bin_path("netd"), "agent", "--config", manifest["hosts"][0]["config"], "status"]
    deadline = time.monotonic() + 30
    while True:
        st = json.loads(subprocess.run([*agent, "--json"], capture_output=True, text=True,
                                       check=True, timeout=30).stdout)
        eps = st["attachments"]
        if (eps and eps[0]["name"] == name) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert st["docker_plugin"] is True
    assert [(e["plugin"], e["ip"], e["name"], e["state"], e["netns"]) for e in eps] == [
        ("docker", ip, name, "ready", None)]
    table = subprocess.run(agent, capture_output=True, text=True, check=True,
                           timeout=30).stdout
    row = next(line for line in table.splitlines() if line.startswith("docker "))
    assert name in row and ip in row and "ready" in row, table

    # down with the container still running: container, dockerd and its traces go
    out = lab.down().stdout
    assert f"removed docker container {name}" in out and "removed dockerd's" in out, out
    assert lab_docker.leftovers(lab.prefix) == []
    assert not process_alive(dockerd["pid"])
    assert not lab_docker.plugin_served()
    assert_gone(lab)


def test_forward_serves_the_labs_web_view_on_loopback(lab: Lab) -> None:
    """`netd lab forward` (make demo prints its URL): the lab's IPAM and web view on
    127.0.0.1, the far end opened inside the IPAM's namespace, nothing added to any
    interface of the machine."""
    import httpx

    from tests.conftest import bin_path, free_port

    lab.up("--no-agents")
    port = free_port()
    proc = subprocess.Popen([bin_path("netd"), "lab", "forward", "--dir", str(lab.dir),
                             "--port", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                health = httpx.get(url + "/healthz", timeout=2)
                break
            except httpx.TransportError:
                time.sleep(0.05)
        assert health.status_code == 200
        login = httpx.get(url + "/ui/", timeout=5, follow_redirects=True)
        assert login.status_code == 401 and 'name="token"' in login.text
        token = (lab.dir / "token").read_text().strip()
        pools = httpx.get(url + "/ui/", headers={"Authorization": f"Bearer {token}"},
                          timeout=5)
        assert pools.status_code == 200 and 'data-pool="lab"' in pools.text
    finally:
        proc.terminate()
        proc.wait(10)
    root = subprocess.run(["ip", "-4", "-o", "addr", "show"], capture_output=True,
                          text=True, check=True).stdout
    assert "198.18.0." not in root
