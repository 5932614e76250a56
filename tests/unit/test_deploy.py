"""deploy/: the systemd units and the Kubernetes manifests, checked as far as this
machine allows without systemd as PID 1 or a cluster.

- Units: ``systemd-analyze verify`` (the unit parser and its checks, offline) on the
  units with ``/opt/netd`` pointed at this checkout's venv, and each ExecStart run
  with ``--help`` (its options exist).
- Manifests: every document against the Kubernetes OpenAPI schemas (kubernetes-validate,
  strict: an unknown field is an error), for the oldest and newest Kubernetes we claim;
  the init container's own shell command run here with host paths under a temporary
  directory (it installs the plugins, writes the conflist and renders an agent config
  that the agent's parser accepts); the IPAM's and agent's commands run with --help.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, bin_path, require

DEPLOY = REPO / "deploy"
UNITS = sorted((DEPLOY / "systemd").glob("*.service"))
MANIFEST = DEPLOY / "kubernetes" / "netd.yaml"
K8S_VERSIONS = ("1.28.0", "1.33.0")


def venv_prefix() -> Path:
    return Path(bin_path("netd")).parent.parent


def exec_start(unit: Path) -> list[str]:
    text = unit.read_text().replace("\\\n", " ")
    line = next(line for line in text.splitlines() if line.startswith("ExecStart="))
    return shlex.split(line.split("=", 1)[1])


# --- systemd ------------------------------------------------------------------------


def test_there_is_a_unit_for_the_ipam_and_one_for_the_agent() -> None:
    assert [u.name for u in UNITS] == ["netd-agent.service", "netd-ipam.service"]


@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.name)
def test_systemd_accepts_the_unit(unit: Path, tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    require(analyze is not None, "systemd-analyze is missing (Debian systemd)")
    copy_ = tmp_path / unit.name
    copy_.write_text(unit.read_text().replace("/opt/netd", str(venv_prefix())))
    proc = subprocess.run([str(analyze), "verify", str(copy_)], capture_output=True,
                          text=True, timeout=60, check=False)
    assert proc.returncode == 0 and not proc.stderr.strip(), proc.stderr


def test_systemd_verify_does_find_a_broken_unit(tmp_path: Path) -> None:
    """The check above checks something: a typo and a missing program are reported."""
    analyze = shutil.which("systemd-analyze")
    require(analyze is not None, "systemd-analyze is missing (Debian systemd)")
    broken = tmp_path / "netd-agent.service"
    broken.write_text((DEPLOY / "systemd" / "netd-agent.service").read_text()
                      .replace("Restart=always", "Restrat=always"))
    proc = subprocess.run([str(analyze), "verify", str(broken)], capture_output=True,
                          text=True, timeout=60, check=False)
    assert "Unknown key 'Restrat'" in proc.stderr
    assert "/opt/netd/bin/netd is not executable" in proc.stderr or proc.returncode != 0


@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.name)
def test_the_units_command_exists_with_its_options(unit: Path) -> None:
    argv = exec_start(unit)
    assert argv[0] == "/opt/netd/bin/netd"
    argv = [bin_path("netd"), *(a.replace("${CREDENTIALS_DIRECTORY}", "/run/creds")
                                for a in argv[1:])]
    proc = subprocess.run([*argv, "--help"], capture_output=True, text=True, timeout=60,
                          check=False)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.name)
def test_the_unit_restarts_waits_for_the_network_and_is_hardened(unit: Path) -> None:
    text = unit.read_text()
    for line in ("After=network-online.target", "Wants=network-online.target",
                 "NoNewPrivileges=yes", "ProtectHome=yes", "ProtectKernelModules=yes",
                 "SystemCallArchitectures=native", "WantedBy=multi-user.target"):
        assert line in text, f"{unit.name}: {line}"
    assert re.search(r"^Restart=(always|on-failure)$", text, re.M)
    if unit.name == "netd-ipam.service":  # needs no privilege at all
        assert "DynamicUser=yes" in text and re.search(r"^CapabilityBoundingSet=$", text,
                                                       re.M)
        assert "LoadCredential=token:" in text  # the token never in the command line
    else:
        assert "RuntimeDirectoryMode=0700" in text  # the agent socket: root only
        assert "Before=containerd.service" in text


# --- Kubernetes -----------------------------------------------------------------------


def documents() -> list[dict[str, Any]]:
    import yaml

    return [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]


def by_kind(kind: str) -> dict[str, Any]:
    return next(d for d in documents() if d["kind"] == kind)


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_manifest_is_valid_kubernetes(version: str) -> None:
    import kubernetes_validate

    kinds = []
    for doc in documents():
        kubernetes_validate.validate(doc, version, strict=True)
        kinds.append(doc["kind"])
    assert kinds == ["Namespace", "ConfigMap", "Service", "Deployment", "DaemonSet"]


def test_the_schema_check_does_find_a_wrong_field() -> None:
    import kubernetes_validate

    ds = copy.deepcopy(by_kind("DaemonSet"))
    ds["spec"]["template"]["spec"]["hostNetwrok"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(ds, K8S_VERSIONS[-1], strict=True)


def test_no_rbac_and_no_api_token_since_nothing_talks_to_the_api() -> None:
    assert not [d for d in documents() if d["kind"] in (
        "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding")]
    for kind in ("Deployment", "DaemonSet"):
        spec = by_kind(kind)["spec"]["template"]["spec"]
        assert spec["automountServiceAccountToken"] is False
        assert spec["hostNetwork"] is True  # up before any pod network exists


def test_the_agent_keeps_its_state_and_socket_on_the_host() -> None:
    spec = by_kind("DaemonSet")["spec"]["template"]["spec"]
    paths = {v["name"]: v.get("hostPath", {}).get("path") for v in spec["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in spec["containers"][0]["volumeMounts"]}
    assert paths[mounts["/var/lib/netd"]] == "/var/lib/netd"
    assert paths[mounts["/run/netd"]] == "/run/netd"
    assert paths[mounts["/var/run/netns"]] == "/var/run/netns"
    secret = by_kind("Deployment")["spec"]["template"]["spec"]["volumes"]
    assert {"secretName": "netd-ipam-token", "defaultMode": 0o400} in [
        v.get("secret") for v in secret]


def test_the_init_containers_command_installs_the_plugins_and_renders_the_config(
        tmp_path: Path) -> None:
    """Its own shell line, with the host's directories under tmp_path: plugins (static
    native front), a conflist the runtime reads, an agent config the agent accepts."""
    from netd.agent.config import load_config

    spec = by_kind("DaemonSet")["spec"]["template"]["spec"]
    init = spec["initContainers"][0]
    config = by_kind("ConfigMap")["data"]
    script = init["args"][0]
    for inside in ("/host/opt/cni/bin", "/host/etc/cni/net.d", "/etc/netd/template",
                   "/etc/netd/run"):
        script = script.replace(inside, str(tmp_path / inside.strip("/")))
    (tmp_path / "etc/netd/template").mkdir(parents=True)
    (tmp_path / "etc/netd/run").mkdir(parents=True)
    (tmp_path / "etc/netd/template/agent.toml").write_text(config["agent.toml"])
    env = {"PATH": f"{Path(bin_path('netd')).parent}:{os.environ['PATH']}",
           "NETD_POOL": config["pool"], "NETD_CNI_VERSION": config["cni-version"],
           "NETD_IPAM_SERVICE_HOST": "10.96.0.50", "NETD_IPAM_SERVICE_PORT": "9650"}
    proc = subprocess.run(["/bin/sh", "-c", script], env=env, capture_output=True,
                          text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    bin_dir = tmp_path / "host/opt/cni/bin"
    assert sorted(p.name for p in bin_dir.iterdir()) == ["netd-cni", "netd-ipam"]
    if shutil.which("cc"):
        assert (bin_dir / "netd-cni").read_bytes()[:4] == b"\x7fELF"
        assert "static" in proc.stdout
    conf = json.loads((tmp_path / "host/etc/cni/net.d/10-netd.conflist").read_text())
    assert conf["cniVersion"] == "1.0.0"
    assert conf["plugins"][0] == {"type": "netd-cni", "pool": "rack1",
                                  "agentSocket": "/run/netd/agent.sock",
                                  "capabilities": {"ips": True, "mac": True}}
    agent = load_config(str(tmp_path / "etc/netd/run/agent.toml"))
    assert agent.ipam_url == "http://10.96.0.50:9650" and agent.mode == "l2"
    assert agent.socket == "/run/netd/agent.sock" and agent.state_dir == "/var/lib/netd"


def test_the_workloads_commands_exist_with_their_options() -> None:
    for kind in ("Deployment", "DaemonSet"):
        container = by_kind(kind)["spec"]["template"]["spec"]["containers"][0]
        argv = [bin_path("netd"), *container["command"][1:]]
        proc = subprocess.run([*argv, "--help"], capture_output=True, text=True, timeout=60,
                              check=False)
        assert proc.returncode == 0, f"{kind}: {proc.stderr}"


@pytest.mark.parametrize("args, says", [
    (["--pool", "a b"], "is not a name"),
    ([], "name its --pool"),
    (["--pool", "p", "--agent-socket", "run/netd.sock"], "not an absolute path"),
])
def test_install_cni_refuses_a_bad_conflist_and_writes_nothing(
        tmp_path: Path, args: list[str], says: str) -> None:
    bin_dir, conf_dir = tmp_path / "bin", tmp_path / "net.d"
    proc = subprocess.run([bin_path("netd"), "install-cni", "--bin-dir", str(bin_dir),
                           "--conf-dir", str(conf_dir), *args], capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 2 and says in proc.stderr, proc.stderr
    assert not bin_dir.exists() and not conf_dir.exists()
