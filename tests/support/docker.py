"""A throw-away dockerd (Debian ``docker.io`` 20.10) inside a lab host namespace, for tests.

``ensure_docker()`` installs the packages; :class:`TestDockerd` runs one
dockerd with per-run names and removes every trace of it. Its command line,
its per-run paths and the removal by name are :mod:`netd.lab.docker`'s (which
``netd lab up --docker`` uses too); the lab's h1 agent is configured for it
with ``netd lab up --docker-host``. What this machine
(Debian 12, no systemd, cgroup v1, root filesystem mounted ``private``) needs,
found by trying:

* dockerd is started with ``nsenter --net=/run/netns/NS``, not ``ip netns
  exec``: the latter mounts a fresh sysfs in a new mount namespace, where
  dockerd finds no cgroup mounts ("Devices cgroup isn't mounted"). So dockerd
  shares the root mount namespace and only the network namespace is the lab
  host's: its iptables chains (``--iptables=true``, Docker's default), its
  ip_forward and the veths it moves live there. With ``--bridge=none`` dockerd
  leaves the FORWARD policy alone; tests set it to DROP in that namespace, as
  a Docker host with docker0 has it.
* ``--bridge=none``: no docker0; every test container uses a netd network.
* per-run ``--data-root /var/lib/PREFIX-docker``, ``--exec-root
  /run/PREFIX-docker`` (its own supervised containerd lives under it),
  ``--host unix:///run/PREFIX/docker.sock``, ``--pidfile``, and
  ``--cgroup-parent PREFIX-docker``, so nothing is shared with another dockerd.
* ``--live-restore`` by default: a dockerd restart leaves containers running
  (and their addresses with them); ``live_restore=False`` shows Docker's
  other behaviour (stop on shutdown, fresh endpoints on start).
* ``--storage-driver overlay2`` (the data root is on ext4); dockerd
  bind-mounts its data root onto itself and mounts layers and netns files
  under its roots: :meth:`TestDockerd.cleanup` unmounts them before removing.
* no registry: the test image is ``/bin/busybox`` (busybox-static) and its
  applets, imported with ``docker import`` (:meth:`TestDockerd.import_busybox`).
* busybox ``sleep`` as PID 1 ignores SIGTERM: tests run containers with
  ``--stop-signal KILL`` (``docker import`` cannot set STOPSIGNAL), and dockerd
  has ``--shutdown-timeout 2``, so stops and restarts take no 10 s.

Docker finds the plugin ``netd`` at ``/run/docker/plugins/netd.sock`` (a
path every dockerd on the machine shares, which is fine for tests; the lab's
agent serves it).

Command line: ``python -m tests.support.docker cleanup PREFIX``.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from netd.lab import docker as lab_docker
from netd.lab.procs import tail

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("docker.io", "busybox-static", "iptables")
DOCKERD = lab_docker.DOCKERD
PLUGIN_SOCKET = lab_docker.PLUGIN_SOCKET
IMAGE = "netd-busybox:test"
BUSYBOX = Path("/bin/busybox")
APPLETS = ("sh", "ping", "ip", "sleep", "cat", "ls", "ifconfig", "arping", "route", "echo",
           "hostname", "ps", "kill", "true", "false", "env", "id", "mkdir", "wget", "nc",
           "grep", "awk", "sed", "timeout", "arp")
PREFIX_RE = re.compile(r"^[a-z][a-z0-9]{3,9}$")


class DockerUnavailable(RuntimeError):
    """dockerd cannot be installed or started here."""


def missing_packages(packages: Sequence[str] = PACKAGES) -> list[str]:
    missing = []
    for pkg in packages:
        proc = subprocess.run(["dpkg-query", "-W", "-f=${Status}", pkg],
                              capture_output=True, text=True, check=False)
        if "install ok installed" not in proc.stdout:
            missing.append(pkg)
    return missing


def ensure_docker() -> None:
    """Install Debian's docker.io (dockerd 20.10, containerd, runc) and busybox-static."""
    if os.geteuid() != 0:
        raise DockerUnavailable("dockerd needs root")
    missing = missing_packages() if shutil.which("dpkg-query") else list(PACKAGES)
    if missing:
        proc = subprocess.run([str(REPO / "scripts" / "install-deps"), *missing],
                              capture_output=True, text=True, check=False, timeout=900)
        if proc.returncode != 0:
            raise DockerUnavailable(f"cannot install {' '.join(missing)}: "
                                    f"{(proc.stderr or proc.stdout).strip()}")
    for path in (DOCKERD, str(BUSYBOX), "/usr/bin/nsenter"):
        if not os.access(path, os.X_OK):
            raise DockerUnavailable(f"{path} is missing")
    try:
        import docker  # noqa: F401
    except ImportError as exc:
        raise DockerUnavailable("the docker SDK is not installed: pip install -e '.[dev]'"
                                ) from exc


def _check_prefix(prefix: str) -> None:
    if not PREFIX_RE.match(prefix):
        raise ValueError(f"prefix {prefix!r}: 4-10 lowercase letters/digits, starting with a "
                         "letter")


class TestDockerd:
    """One dockerd in network namespace ``netns``, with every path named by ``prefix``."""

    __test__ = False  # not a pytest test class

    def __init__(self, prefix: str, netns: str, log_dir: Path) -> None:
        _check_prefix(prefix)
        self.spec = lab_docker.Dockerd(prefix, netns, Path(log_dir) / "dockerd.log")
        self.prefix = prefix
        self.netns = netns
        self.data_root = self.spec.data_root
        self.exec_root = self.spec.exec_root
        self.run_dir = self.spec.run_dir
        self.socket = self.spec.socket
        self.pidfile = self.spec.pidfile
        self.log = self.spec.log
        self.proc: subprocess.Popen[bytes] | None = None
        self._client: Any = None

    @property
    def host(self) -> str:
        return self.spec.host

    def argv(self, *, live_restore: bool = True) -> list[str]:
        return self.spec.argv(live_restore=live_restore)

    def start(self, *, live_restore: bool = True, timeout: float = 60.0) -> float:
        """Start dockerd and wait until it answers; returns the seconds it took."""
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError("dockerd already runs")
        start = time.monotonic()
        try:
            self.proc = self.spec.start(live_restore=live_restore)
        except lab_docker.DockerdError as exc:
            raise DockerUnavailable(str(exc)) from exc
        while time.monotonic() - start < timeout:
            if self.proc.poll() is not None:
                raise DockerUnavailable(f"dockerd exited {self.proc.returncode}:\n"
                                        f"{self.tail()}")
            if self.socket.exists():
                with contextlib.suppress(Exception):
                    if self.client().ping():
                        return time.monotonic() - start
            time.sleep(0.1)
        raise DockerUnavailable(f"dockerd did not answer within {timeout:.0f}s:\n{self.tail()}")

    def stop(self, timeout: float = 30.0) -> None:
        """Stop dockerd (SIGTERM, then SIGKILL) and wait for it."""
        if self._client is not None:
            with contextlib.suppress(Exception):
                self._client.close()
            self._client = None
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def restart(self, *, live_restore: bool = True) -> float:
        self.stop()
        return self.start(live_restore=live_restore)

    def tail(self, lines: int = 30) -> str:
        return tail(self.log, lines)

    def client(self) -> Any:
        """A docker SDK client for this dockerd (API version negotiated)."""
        import docker

        if self._client is None:
            self._client = docker.DockerClient(base_url=self.host, version="auto", timeout=120)
        return self._client

    def new_client(self) -> Any:
        """A separate client (one per thread for parallel runs)."""
        import docker

        return docker.DockerClient(base_url=self.host, version="auto", timeout=120)

    def cli(self, *args: str, check: bool = False,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """The docker.io CLI against this dockerd (what a user sees, errors included)."""
        docker_bin = "/usr/bin/docker" if os.access("/usr/bin/docker", os.X_OK) else "docker"
        proc = subprocess.run([docker_bin, "-H", self.host, *args], capture_output=True,
                              text=True, timeout=timeout, check=False)
        if check and proc.returncode != 0:
            raise AssertionError(f"docker {' '.join(args)} exited {proc.returncode}: "
                                 f"{proc.stderr.strip()}")
        return proc

    def import_busybox(self, tag: str = IMAGE) -> str:
        """Build the test image from busybox-static with ``docker import``; returns its tag."""
        return import_busybox(self.client(), tag)

    def cleanup(self) -> list[str]:
        """Remove every trace: containers, dockerd and its children, mounts, directories."""
        removed: list[str] = []
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(Exception):
                for c in self.client().containers.list(all=True):
                    c.remove(force=True)
                    removed.append(f"container {c.name}")
        self.stop()
        removed += cleanup_prefix(self.prefix)
        return removed


def busybox_tar() -> bytes:
    """A root filesystem of busybox-static and its applets, as ``docker import`` takes it."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for d in ("bin", "etc", "proc", "sys", "dev", "tmp", "run", "root"):
            info = tarfile.TarInfo(d)
            info.type, info.mode = tarfile.DIRTYPE, 0o1777 if d == "tmp" else 0o755
            tar.addfile(info)
        tar.add(str(BUSYBOX.resolve()), arcname="bin/busybox")
        for applet in APPLETS:
            info = tarfile.TarInfo(f"bin/{applet}")
            info.type, info.linkname = tarfile.SYMTYPE, "busybox"
            tar.addfile(info)
        for name, text in (("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n"),
                           ("etc/group", "root:x:0:\n")):
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def import_busybox(client: Any, tag: str = IMAGE) -> str:
    """``docker import`` of :func:`busybox_tar` through a docker SDK client; returns the tag."""
    repo, tag_name = tag.split(":", 1)
    client.api.import_image_from_data(busybox_tar(), repository=repo, tag=tag_name,
                                      changes=['CMD ["sh"]'])
    return tag


def cleanup_prefix(prefix: str) -> list[str]:
    """Remove what a run with ``prefix`` left: processes, cgroups, mounts, directories."""
    _check_prefix(prefix)
    return lab_docker.sweep(prefix)


def main(argv: Sequence[str]) -> int:
    if len(argv) != 2 or argv[0] != "cleanup":
        print("usage: python -m tests.support.docker cleanup PREFIX", file=sys.stderr)
        return 2
    for line in cleanup_prefix(argv[1]):
        print(f"removed {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))


@contextlib.contextmanager
def running_docker_lab(base: Path, tag: str, *, mode: str, extra: Sequence[str] = (),
                       networks: Sequence[Sequence[str]] = ()) -> Iterator[tuple[Any, TestDockerd]]:
    """``netd lab up --mode MODE --docker-host ...`` with a dockerd of its own in h1, the
    busybox image imported and ``docker network create ARGS`` for each of ``networks``;
    containers, dockerd, the lab and the plugin socket removed after."""
    from tests.conftest import require
    from tests.support import podman as pm
    from tests.support.cnilab import running_lab

    try:
        ensure_docker()
    except DockerUnavailable as exc:
        require(False, str(exc))
    prefix = pm.run_prefix(tag)
    dockerd = TestDockerd(prefix, f"{prefix}-h1", base)
    try:
        with running_lab(base, tag, mode=mode, prefix=prefix,
                         extra=[*extra, "--docker-host", dockerd.host]) as the_lab:
            try:
                took = dockerd.start()
            except DockerUnavailable as exc:
                require(False, f"cannot start dockerd: {exc}")
            print(f"dockerd answering after {took:.1f}s")
            dockerd.import_busybox()
            try:
                for args in networks:
                    proc = dockerd.cli("network", "create", *args)
                    assert proc.returncode == 0, f"docker network create: {proc.stderr}"
                yield the_lab, dockerd
            finally:
                with contextlib.suppress(Exception):  # while the agent can still release
                    for c in dockerd.client().containers.list(all=True):
                        c.remove(force=True)
                dockerd.cleanup()
    finally:
        if os.path.exists(PLUGIN_SOCKET):
            with contextlib.suppress(OSError):
                Path(PLUGIN_SOCKET).unlink()
