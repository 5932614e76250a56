"""The wheel and sdist build from the repository, and the wheel installed into a fresh
venv runs ``netd``, ``netctl`` and ``netd install-cni`` (the native front built on the
target; the Python fallback without a compiler), as an operator's host would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO, require

pytestmark = [pytest.mark.real, pytest.mark.slow]


def run(*argv: str | Path, env: dict[str, str] | None = None,
        timeout: float = 600) -> subprocess.CompletedProcess[str]:
    # from /: the checkout in the working directory would shadow the wheel's netd
    proc = subprocess.run([str(a) for a in argv], capture_output=True, text=True,
                          timeout=timeout, check=False, env=env, cwd="/")
    assert proc.returncode == 0, f"{argv}: {proc.stdout[-2000:]}{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    out = tmp_path_factory.mktemp("dist")
    require(subprocess.run([sys.executable, "-m", "build", "--version"], capture_output=True,
                           check=False).returncode == 0, "python -m build is missing (dev)")
    run(sys.executable, "-m", "build", "--sdist", "--wheel", "--outdir", out, REPO,
        timeout=900)
    yield out


@pytest.fixture(scope="module")
def venv(dist: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv (no netd checkout on its path) with the wheel installed."""
    v = tmp_path_factory.mktemp("venv") / "netd"
    run(sys.executable, "-m", "venv", v)
    wheel = next(dist.glob("netd-*.whl"))
    run(v / "bin" / "pip", "install", "-q", wheel, timeout=900)
    return v


def clean_env(venv: Path) -> dict[str, str]:
    """Nothing of this checkout: no PYTHONPATH, the working directory elsewhere."""
    return {"PATH": f"{venv / 'bin'}:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root",
            "LANG": "C.UTF-8"}


def test_the_wheel_and_sdist_carry_what_an_install_needs(dist: Path) -> None:
    wheel = next(dist.glob("netd-*.whl"))
    with zipfile.ZipFile(wheel) as whl:
        names = whl.namelist()
        entry = next(n for n in names if n.endswith("entry_points.txt"))
        points = whl.read(entry).decode()
    for needed in ("netd/cli/main.py", "netd/ipam/etcd_store.py", "netd/cni/shim.py",
                   "netd/cni/netd-cni.c", "netd/bgp/__init__.py", "netd/ovs/__init__.py",
                   "netd/ipam/templates/base.html", "netd/ipam/templates/pools.html"):
        assert needed in names, needed
    for script in ("netd = netd.cli.main:main", "netctl = netd.cli.netctl:main"):
        assert script in points
    sdist = next(dist.glob("netd-*.tar.gz"))
    with tarfile.open(sdist) as tar:
        members = tar.getnames()
    for needed in ("cni/netd-cni.c", "deploy/systemd/netd-agent.service",
                   "deploy/kubernetes/netd.yaml", "pyproject.toml", "README.md"):
        assert any(m.endswith("/" + needed) for m in members), needed


def test_the_installed_commands_run_from_the_wheel(venv: Path, tmp_path: Path) -> None:
    env = clean_env(venv)
    where = run(venv / "bin" / "python", "-c", "import netd, sys; print(netd.__file__)",
                env=env).stdout
    assert where.startswith(str(venv)), where  # the wheel's netd, not this checkout's
    for argv in (["netd", "--help"], ["netctl", "--help"], ["netd", "ipam", "serve", "--help"],
                 ["netd", "agent", "--help"]):
        run(venv / "bin" / argv[0], *argv[1:], env=env)
    # the etcd store and the BGP and OVS modes import from the wheel
    run(venv / "bin" / "python", "-c", "import netd.ipam.etcd_store, netd.bgp, netd.ovs",
        env=env)
    # the web view renders from the wheel's templates
    page = run(venv / "bin" / "python", "-c", (
        "from netd.ipam.ui import _env; print(_env.get_template('login.html')"
        ".render(open=False, next='/ui/', title='Log in'))"), env=env).stdout
    assert 'name="token"' in page


def plugin_version(plugin: Path) -> dict[str, object]:
    proc = subprocess.run([str(plugin)], input=b'{"cniVersion": "1.0.0"}', cwd="/",
                          env={"CNI_COMMAND": "VERSION", "PATH": "/usr/bin:/bin"},
                          capture_output=True, timeout=30, check=False)
    assert proc.returncode == 0, proc.stderr
    doc: dict[str, object] = json.loads(proc.stdout)
    return doc


def test_install_cni_from_the_wheel_builds_the_native_front(venv: Path,
                                                              tmp_path: Path) -> None:
    require(os.access("/usr/bin/cc", os.X_OK), "no C compiler (make deps installs gcc)")
    bin_dir = tmp_path / "bin"
    out = run(venv / "bin" / "netd", "install-cni", "--bin-dir", bin_dir,
              env=clean_env(venv)).stdout
    assert "native" in out
    plugin = bin_dir / "netd-cni"
    assert plugin.read_bytes()[:4] == b"\x7fELF"
    assert "1.0.0" in plugin_version(plugin)["supportedVersions"]  # type: ignore[operator]


def test_install_cni_from_the_wheel_without_a_compiler_installs_the_python_plugin(
        venv: Path, tmp_path: Path) -> None:
    """PATH without cc (a host with no compiler): the Python plugin alone, which runs."""
    bin_dir = tmp_path / "bin"
    nocc = tmp_path / "nocc"
    nocc.mkdir()
    for tool in ("python3",):
        (nocc / tool).symlink_to(f"/usr/bin/{tool}")
    env = {**clean_env(venv), "PATH": f"{venv / 'bin'}:{nocc}"}
    proc = run(venv / "bin" / "netd", "install-cni", "--bin-dir", bin_dir, env=env)
    assert "no C compiler" in proc.stderr and "python" in proc.stdout.lower()
    plugin = bin_dir / "netd-cni"
    assert plugin.read_bytes().startswith(b"#!/usr/bin/python3 -IS")
    assert "1.1.0" in plugin_version(plugin)["supportedVersions"]  # type: ignore[operator]
