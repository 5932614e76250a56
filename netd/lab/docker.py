"""A dockerd in a lab host's network namespace: ``netd lab up --docker``, and the tests'.

Debian's ``docker.io`` (dockerd 20.10) on a machine that is not a Docker host
(no systemd, cgroup v1, root filesystem mounted ``private``). What it needs,
found by trying (tests/support/docker.py runs its dockerd the same way):

* ``nsenter --net=/run/netns/NS``, not ``ip netns exec``: the latter mounts a
  fresh sysfs in a new mount namespace, where dockerd finds no cgroup mounts
  ("Devices cgroup isn't mounted"). dockerd shares the root mount namespace;
  only its network namespace is the lab host's: its iptables chains, its
  ip_forward and the veths it moves live there, never on the machine's own
  interfaces.
* ``--bridge=none`` (no docker0; ``docker network create -d bridge --subnet
  CIDR NAME`` still works), ``--iptables=true`` (Docker's default; in that
  namespace), ``--live-restore``, ``--shutdown-timeout 2``.
* every path named by the prefix: ``--data-root /var/lib/PREFIX-docker``
  (overlay2 needs a real filesystem), ``--exec-root /run/PREFIX-docker`` (its
  own supervised containerd lives under it), ``--host
  unix:///run/PREFIX/docker.sock``, ``--pidfile /run/PREFIX/docker.pid``,
  ``--cgroup-parent PREFIX-docker``: nothing is shared with another dockerd,
  and :func:`sweep` finds everything again by name (processes by those paths
  in their command lines, container processes by the cgroup parent, mounts
  under the roots), also after a crash.

Docker finds the plugin ``netd`` at ``/run/docker/plugins/netd.sock``, a path
every dockerd on the machine shares: one lab (or test) at a time can serve it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from netd.lab.procs import alive, cmdline, stop_pids, tail

DOCKERD = "/usr/sbin/dockerd"
PLUGIN_SOCKET = Path("/run/docker/plugins/netd.sock")
PREFIX_RE = re.compile(r"^[a-z][a-z0-9]{1,9}$")
CGROUP_ROOT = Path("/sys/fs/cgroup")


class DockerdError(RuntimeError):
    """dockerd could not be started or did not answer."""


def _check_prefix(prefix: str) -> None:
    if not PREFIX_RE.match(prefix):
        raise ValueError(f"prefix {prefix!r}: 2-10 lowercase letters/digits, starting with a "
                         "letter")


@dataclass(frozen=True)
class Dockerd:
    """One dockerd in network namespace ``netns``, with every path named by ``prefix``."""

    prefix: str
    netns: str
    log: Path

    def __post_init__(self) -> None:
        _check_prefix(self.prefix)

    @property
    def data_root(self) -> Path:
        return Path(f"/var/lib/{self.prefix}-docker")

    @property
    def exec_root(self) -> Path:
        return Path(f"/run/{self.prefix}-docker")

    @property
    def run_dir(self) -> Path:
        return Path(f"/run/{self.prefix}")

    @property
    def socket(self) -> Path:
        return self.run_dir / "docker.sock"

    @property
    def pidfile(self) -> Path:
        return self.run_dir / "docker.pid"

    @property
    def host(self) -> str:
        """The ``DOCKER_HOST`` / ``docker -H`` URL."""
        return f"unix://{self.socket}"

    def argv(self, *, live_restore: bool = True) -> list[str]:
        args = ["nsenter", f"--net=/run/netns/{self.netns}", DOCKERD,
                "--host", self.host, "--data-root", str(self.data_root),
                "--exec-root", str(self.exec_root), "--pidfile", str(self.pidfile),
                "--bridge=none", "--iptables=true", "--ip6tables=false",
                "--userland-proxy=false", "--storage-driver", "overlay2",
                "--cgroup-parent", f"{self.prefix}-docker", "--shutdown-timeout", "2",
                "--log-level", "info"]
        if live_restore:
            args.append("--live-restore")
        return args

    def record(self) -> dict[str, Any]:
        """What a manifest keeps of it (before it starts: a crash leaves names to sweep)."""
        return {"netns": self.netns, "host": self.host, "socket": str(self.socket),
                "data_root": str(self.data_root), "exec_root": str(self.exec_root),
                "run_dir": str(self.run_dir), "log": str(self.log), "pid": None}

    def start(self, *, live_restore: bool = True) -> subprocess.Popen[bytes]:
        """Start dockerd detached (own session), output appended to ``log``."""
        missing = [p for p in (DOCKERD,) if not os.access(p, os.X_OK)]
        if missing or shutil.which("nsenter") is None:
            raise DockerdError(f"{', '.join(missing) or 'nsenter'} is missing: install "
                               "docker.io (make deps)")
        self.run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as out:
            return subprocess.Popen(self.argv(live_restore=live_restore),
                                    stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)

    def wait(self, pid: int, timeout: float = 60.0) -> float:
        """Wait until dockerd answers ``/_ping``; returns the seconds it took."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if not alive(pid):
                raise DockerdError(f"dockerd exited:\n{self.tail()}")
            if ping(self.socket):
                return time.monotonic() - start
            time.sleep(0.1)
        raise DockerdError(f"dockerd did not answer within {timeout:.0f}s:\n{self.tail()}")

    def tail(self, lines: int = 30) -> str:
        return tail(self.log, lines)


# --- dockerd's API, the little the lab needs -----------------------------------------


def _request(sock_path: Path | str, method: str, path: str,
             timeout: float = 5.0) -> tuple[int, bytes]:
    """One HTTP/1.0 request over dockerd's unix socket: (status, body)."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(timeout)
        s.connect(str(sock_path))
        s.sendall(f"{method} {path} HTTP/1.0\r\nHost: docker\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    parts = head.split(b"\r\n", 1)[0].split()
    return (int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0), body


def ping(sock_path: Path | str, timeout: float = 2.0) -> bool:
    try:
        status, body = _request(sock_path, "GET", "/_ping", timeout)
    except OSError:
        return False
    return status == 200 and body.strip() == b"OK"


def remove_containers(sock_path: Path | str, timeout: float = 30.0) -> list[str]:
    """``docker rm -f`` of every container, while the plugin can still release (names)."""
    try:
        status, body = _request(sock_path, "GET", "/containers/json?all=1", timeout)
        containers = json.loads(body) if status == 200 else []
    except (OSError, ValueError):
        return []
    removed = []
    for c in containers:
        name = ((c.get("Names") or ["/?"])[0]).lstrip("/")
        with contextlib.suppress(OSError):
            status, _ = _request(sock_path, "DELETE", f"/containers/{c['Id']}?force=1&v=1",
                                 timeout)
            if status in (204, 404):
                removed.append(name)
    return removed


def plugin_served(path: Path = PLUGIN_SOCKET) -> bool:
    """Whether something (an agent) accepts connections on the plugin socket."""
    if not path.exists():
        return False
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(2)
        try:
            s.connect(str(path))
        except OSError:
            return False
    return True


# --- removal by name --------------------------------------------------------------------


def our_pids(prefix: str) -> list[int]:
    """dockerd, containerd and shims of ``prefix`` (by their per-prefix paths)."""
    _check_prefix(prefix)
    marks = (f"/run/{prefix}-docker", f"/run/{prefix}/docker", f"/var/lib/{prefix}-docker")
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            cmd = " ".join(cmdline(int(entry.name)))
            if any(f"{m} " in f"{cmd} " or f"{m}/" in cmd or f"{m}." in cmd for m in marks):
                pids.append(int(entry.name))
    return pids


def _cgroup_dirs(prefix: str) -> list[Path]:
    """The cgroup parent in every hierarchy (v1 ``*/PREFIX-docker``, v2 ``PREFIX-docker``)."""
    found = [*CGROUP_ROOT.glob(f"*/{prefix}-docker"), *CGROUP_ROOT.glob(f"{prefix}-docker")]
    return [p for p in found if p.is_dir()]


def cgroup_pids(prefix: str) -> list[int]:
    """Container processes left in the cgroup parent of ``prefix``."""
    pids: set[int] = set()
    for root in _cgroup_dirs(prefix):
        for procs in root.rglob("cgroup.procs"):
            with contextlib.suppress(OSError, ValueError):
                pids.update(int(p) for p in procs.read_text().split())
    return sorted(pids)


def roots(prefix: str) -> list[Path]:
    return [Path(f"/var/lib/{prefix}-docker"), Path(f"/run/{prefix}-docker"),
            Path(f"/run/{prefix}")]


def mounts_under(paths: Sequence[Path]) -> list[str]:
    out = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        target = line.split()[4].replace("\\040", " ")
        if any(target == str(p) or target.startswith(f"{p}/") for p in paths):
            out.append(target)
    return sorted(set(out), key=len, reverse=True)


def leftovers(prefix: str) -> list[str]:
    """What a dockerd of ``prefix`` would leave: processes, cgroups, mounts, directories."""
    found = [f"process {p}" for p in our_pids(prefix)]
    found += [f"container process {p}" for p in cgroup_pids(prefix)]
    found += [f"cgroup {p}" for p in _cgroup_dirs(prefix)]
    found += [f"mount {m}" for m in mounts_under(roots(prefix))]
    found += [f"dir {r}" for r in roots(prefix) if r.exists()]
    return found


def sweep(prefix: str) -> list[str]:
    """Remove what a dockerd of ``prefix`` left: processes, cgroups, mounts, directories.

    Safe to run when there is nothing (it finds nothing) and after a crash.
    """
    _check_prefix(prefix)
    removed: list[str] = []
    pids = our_pids(prefix)
    if pids:
        stop_pids(pids)
        removed += [f"process {p}" for p in pids]
    stray = cgroup_pids(prefix)
    if stray:
        stop_pids(stray, timeout=5)
        removed += [f"container process {p}" for p in stray]
    for root in _cgroup_dirs(prefix):
        subdirs = sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: -len(str(p)))
        for d in [*subdirs, root]:
            with contextlib.suppress(OSError):
                d.rmdir()
    for target in mounts_under(roots(prefix)):
        proc = subprocess.run(["umount", "-l", target], capture_output=True, text=True,
                              check=False)
        if proc.returncode == 0:
            removed.append(f"mount {target}")
    for root in roots(prefix):
        if root.exists():
            shutil.rmtree(root, ignore_errors=True)
            removed.append(f"dir {root}")
    return removed


def socket_path(docker_host: str) -> str:
    """``unix:///PATH`` -> ``/PATH`` ("" for anything else)."""
    return docker_host[len("unix://"):] if docker_host.startswith("unix:///") else ""
