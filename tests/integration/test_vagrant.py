"""vagrant/: the multi-VM lab's Vagrantfile and provisioning, tested as far as a machine
without nested virtualisation allows.

- ``vagrant validate`` (Debian vagrant with vagrant-libvirt) for each NETD_MODE, on a
  copy of vagrant/ (validate writes .vagrant/ beside the file), and a wrong mode fails;
- vagrant/lab.json (what the Vagrantfile reads) agrees with vagrant/fabric.toml (what
  ``netd fabric config`` reads);
- every provisioning script run here for real in its dry mode (NETD_DRY_RUN=1: nothing
  installed or started, files under a temporary root): the routers' FRR files are the
  generator's (checked by vtysh -C), each host's agent.toml is one the agent accepts,
  its conflist names the mode's pool, and the IPAM's netctl commands create the pools
  on a real IPAM server.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from tests.conftest import REPO, bin_path, require, start_server

pytestmark = [pytest.mark.real]

VAGRANT_DIR = REPO / "vagrant"
PACKAGES = ("vagrant", "vagrant-libvirt")
MODES = ("l2", "vlan", "bgp")


def lab() -> dict:  # type: ignore[type-arg]
    return json.loads((VAGRANT_DIR / "lab.json").read_text())


@pytest.fixture(scope="module")
def vagrant() -> str:
    if shutil.which("vagrant") is None and os.geteuid() == 0:
        subprocess.run([str(REPO / "scripts" / "install-deps"), *PACKAGES], check=False,
                       timeout=900)
    found = shutil.which("vagrant")
    require(found is not None, f"vagrant is missing (apt-get install {' '.join(PACKAGES)})")
    assert found is not None
    return found


def validate(vagrant: str, where: Path, mode: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([vagrant, "validate"], cwd=where, capture_output=True, text=True,
                          timeout=300, check=False,
                          env={**os.environ, "NETD_MODE": mode, "VAGRANT_HOME": str(
                              where / ".vagrant.d")})


@pytest.mark.parametrize("mode", MODES)
def test_vagrant_validates_the_vagrantfile(vagrant: str, tmp_path: Path, mode: str) -> None:
    copy = tmp_path / "vagrant"
    shutil.copytree(VAGRANT_DIR, copy, ignore=shutil.ignore_patterns(".vagrant", ".netd-*"))
    proc = validate(vagrant, copy, mode)
    assert proc.returncode == 0 and "validated successfully" in proc.stdout, \
        proc.stdout[-2000:] + proc.stderr[-2000:]


def test_vagrant_refuses_a_mode_it_does_not_know(vagrant: str, tmp_path: Path) -> None:
    copy = tmp_path / "vagrant"
    shutil.copytree(VAGRANT_DIR, copy, ignore=shutil.ignore_patterns(".vagrant", ".netd-*"))
    proc = validate(vagrant, copy, "ovs")
    assert proc.returncode != 0 and "NETD_MODE must be l2, vlan or bgp" in (
        proc.stdout + proc.stderr)


def test_the_labs_plan_and_the_fabric_description_agree() -> None:
    fabric = tomllib.loads((VAGRANT_DIR / "fabric.toml").read_text())
    racks = lab()["racks"]
    assert [r["name"] for r in fabric["racks"]] == [r["name"] for r in racks]
    for f, r in zip(fabric["racks"], racks, strict=True):
        net = ipaddress.ip_network(f["hosts"])
        assert r["subnet"] == f["hosts"] and r["gateway"] == str(net.network_address + 1)
        (tor,) = f["tors"]
        assert r["tor"] == tor["name"]
        link = ipaddress.ip_network(tor["core_link"])
        assert r["core_link"] == [str(link.network_address), str(link.network_address + 1)]


def dry(script: str, *args: str, root: Path, **env: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        ["bash", str(VAGRANT_DIR / "provision" / script), *args], capture_output=True,
        text=True, timeout=300, check=False,
        env={**os.environ, "NETD_DRY_RUN": "1", "NETD_ROOT": str(root),
             "NETD_SRC": str(REPO), "NETD_BIN": bin_path("netd"), **env})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc


def test_the_routers_get_the_generators_frr_configuration(tmp_path: Path) -> None:
    require(shutil.which("vtysh") is not None, "FRR is missing (make deps installs frr)")
    for name, args in [("core", []), *[(r["tor"], ["vlan", str(r["vlan"]), r["gateway"],
                                                   r["vlan_gateway"]]) for r in lab()["racks"]]]:
        root = tmp_path / name
        proc = dry("router.sh", name, *args, root=root)
        assert "vtysh -C" in proc.stdout + proc.stderr  # the generator checked its files
        frr = (root / "etc/frr/frr.conf").read_text()
        assert frr == (root / f"etc/frr/netd/{name}.conf").read_text()
        assert f"hostname {name}" in frr
        if name != "core":  # the rack VLAN's gateway on an 802.1q interface
            r = next(r for r in lab()["racks"] if r["tor"] == name)
            assert f"+ ip addr add {r['vlan_gateway']}/24 dev eth3.{r['vlan']}" in proc.stdout


@pytest.mark.parametrize("mode", MODES)
def test_each_hosts_agent_config_and_conflist_are_what_netd_accepts(
        tmp_path: Path, mode: str) -> None:
    from netd.agent.config import load_config

    r = lab()["racks"][1]
    root = tmp_path / "r2-h1"
    proc = dry("host.sh", mode, "r2-h1", "198.18.2.11", r["gateway"], r["name"],
               lab()["ipam"], root=root, NETD_TOKEN="t" * 64)
    assert "+ ip link add bond0 type bond mode active-backup miimon 100" in proc.stdout
    config = load_config(str(root / "etc/netd/agent.toml"))
    assert (config.mode, config.host, config.ipam_url) == (
        mode, "r2-h1", f"http://{lab()['ipam']}:9650")
    pool = {"l2": "r2", "vlan": f"r2-v{r['vlan']}", "bgp": lab()["bgp_pool"]["name"]}[mode]
    conf = json.loads((root / "etc/cni/net.d/10-netd.conflist").read_text())
    assert conf["plugins"][0]["pool"] == pool
    assert (root / "opt/cni/bin/netd-cni").exists()
    assert (root / "etc/netd/ipam.token").read_text().strip() == "t" * 64
    assert oct((root / "etc/netd/ipam.token").stat().st_mode & 0o777) == "0o600"


@pytest.mark.parametrize("mode", MODES)
def test_the_ipam_provisioning_creates_the_modes_pools(tmp_path: Path, mode: str) -> None:
    """ipam.sh's netctl commands, sent to a real IPAM server."""
    proc = dry("ipam.sh", mode, root=tmp_path / "core", NETD_TOKEN="t" * 64)
    commands = [shlex.split(line[len("+ netctl "):]) for line in proc.stdout.splitlines()
                if line.startswith("+ netctl ")]
    assert commands
    server = start_server(tmp_path)
    try:
        token = tmp_path / "token"
        token.write_text(server.token)
        for args in commands:
            got = subprocess.run([bin_path("netctl"), "--server", server.url,
                                  "--token-file", str(token), *args], capture_output=True,
                                 text=True, timeout=60, check=False)
            assert got.returncode == 0, got.stderr
        listed = subprocess.run([bin_path("netctl"), "--server", server.url, "--token-file",
                                 str(token), "--json", "pool", "list"], capture_output=True,
                                text=True, timeout=60, check=True)
        pools = {p["name"]: p for p in json.loads(listed.stdout)["pools"]}
    finally:
        server.stop()
    racks = lab()["racks"]
    if mode == "l2":
        assert set(pools) == {r["name"] for r in racks}
    elif mode == "vlan":
        assert {p["vlan"] for p in pools.values()} == {r["vlan"] for r in racks}
    else:
        assert [p["mode"] for p in pools.values()] == ["bgp"]
