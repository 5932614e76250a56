"""Podman 4.3 with the CNI backend, made to work on these machines, for tests.

``ensure_podman()`` installs and configures everything, idempotently; the other
helpers run podman with argument lists (never a shell string). What this
machine (Debian 12, a sandboxed VM kernel, no systemd as PID 1, hybrid cgroup
v1/v2 hierarchy, root without CAP_SYS_RESOURCE) needs, found by trying:

* packages ``podman runc containernetworking-plugins busybox-static``, installed
  without recommends: no netavark, so the CNI backend is the only one anyway.
* ``runtime = "runc"``: crun 1.8 refuses to start any container on a hybrid
  cgroup hierarchy ("cgroups in hybrid mode not supported, drop all controllers
  from cgroupv2"), even with ``--cgroups disabled``. runc 1.1 copes.
* ulimits: podman asks the runtime for ``nofile=1048576`` (and ``nproc`` above
  its own limit); without CAP_SYS_RESOURCE the runtime cannot raise a hard
  limit, and every container dies with "setrlimit RLIMIT_NOFILE: Operation not
  permitted". ``--ulimit host`` does NOT help in 4.3.1 (podman still puts its
  defaults in the OCI spec). What works: explicit limits no higher than the
  caller's hard limits, ``nproc`` at most 32768 (podman lowers its own hard
  ``nproc`` to that). ``default_ulimits`` in the drop-in, and ``ulimit_args()``
  on every run.
* ``netns = "none"`` as the default: a ``podman run`` without ``--network``
  would otherwise create ``cni-podman0`` with 10.88.0.0/16, a root-namespace
  route and firewall chains. Tests always name their network.
* ``cgroup_manager = "cgroupfs"`` and ``events_logger = "file"``: there is no
  systemd. Podman guesses both; they are pinned so it never guesses wrong.
* ``--cap-add NET_RAW`` to ping: busybox ping only uses raw sockets, and
  podman's default capabilities leave NET_RAW out.
* the kernel passes bridged frames through iptables
  (``net.bridge.bridge-nf-call-iptables = 1``); once dockerd ran, the root
  namespace's FORWARD policy is DROP, so a root-namespace bridge needs
  ``allow_bridge()`` (a marked ACCEPT rule, removed afterwards).

Command line: ``python -m tests.support.podman setup`` (what ``make
podman-setup`` runs) and ``python -m tests.support.podman cleanup PREFIX``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import resource
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from netd.files import atomic_write

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("podman", "runc", "containernetworking-plugins", "busybox-static")
DROPIN = Path("/etc/containers/containers.conf.d/50-netd.conf")
CNI_CONF_DIR = Path("/etc/cni/net.d")
CNI_PLUGIN_DIRS = ("/opt/cni/bin", "/usr/lib/cni")
CNI_STATE_DIR = Path("/var/lib/cni/networks")
NETNS_DIR = Path("/run/netns")
BUSYBOX = Path("/bin/busybox")
APPLETS = ("sh", "ash", "ping", "ip", "sleep", "cat", "ls", "ifconfig", "arping", "route",
           "echo", "hostname", "ps", "kill", "nc", "wget", "grep", "sed", "awk", "true",
           "false", "uname", "env", "id", "mkdir", "rm", "touch", "date", "printf", "test",
           "head", "tail", "wc", "seq", "tr", "cut", "sort", "netstat", "nslookup", "udhcpc",
           "timeout", "watch", "top", "mount", "dmesg", "vi", "less")
RUNTIME = "runc"
NPROC_MAX = 32768  # podman lowers its own hard RLIMIT_NPROC to this
NOFILE_DEFAULT = 16384  # default_ulimits in the drop-in (capped by the hard limit)
IPTABLES_TAG = "netd-test:"
PREFIX_RE = re.compile(r"^[a-z][a-z0-9]{3,9}$")


class PodmanUnavailable(RuntimeError):
    """Podman cannot be made to work here (not root, packages missing, broken config)."""


class PodmanError(RuntimeError):
    """A podman command failed."""

    def __init__(self, args: Sequence[str], proc: subprocess.CompletedProcess[str]) -> None:
        self.returncode = proc.returncode
        self.stdout = proc.stdout
        self.stderr = proc.stderr
        super().__init__(f"{' '.join(args)} exited {proc.returncode}: "
                         f"{(proc.stderr or proc.stdout).strip()}")


# --- setup ---------------------------------------------------------------------------


def _hard_limit(which: int) -> int:
    hard = resource.getrlimit(which)[1]
    return sys.maxsize if hard == resource.RLIM_INFINITY else int(hard)


def ulimit_args() -> list[str]:
    """``--ulimit`` flags every ``podman run`` here needs (see the module docstring)."""
    nofile = min(_hard_limit(resource.RLIMIT_NOFILE), 1048576)
    nproc = min(_hard_limit(resource.RLIMIT_NPROC), NPROC_MAX)
    return ["--ulimit", f"nofile={nofile}:{nofile}", "--ulimit", f"nproc={nproc}:{nproc}"]


def dropin_text() -> str:
    """The containers.conf drop-in; the same text on every call on one machine."""
    nofile = min(_hard_limit(resource.RLIMIT_NOFILE), NOFILE_DEFAULT)
    nproc = min(_hard_limit(resource.RLIMIT_NPROC), NPROC_MAX)
    dirs = ", ".join(json.dumps(d) for d in CNI_PLUGIN_DIRS)
    return (
        "# Written by netd's tests/support/podman.py (ensure_podman). Podman 4.3 on this\n"
        "# machine: CNI backend, runc (crun cannot run on a hybrid cgroup hierarchy),\n"
        "# limits the runtime may set without CAP_SYS_RESOURCE, no systemd, and no\n"
        "# default network (a run without --network must not touch the root namespace).\n"
        "[containers]\n"
        'netns = "none"\n'
        f'default_ulimits = ["nofile={nofile}:{nofile}", "nproc={nproc}:{nproc}"]\n'
        "\n"
        "[engine]\n"
        f'runtime = "{RUNTIME}"\n'
        'cgroup_manager = "cgroupfs"\n'
        'events_logger = "file"\n'
        "\n"
        "[network]\n"
        'network_backend = "cni"\n'
        f"cni_plugin_dirs = [{dirs}]\n"
        f'network_config_dir = "{CNI_CONF_DIR}"\n'
    )


def missing_packages(packages: Sequence[str] = PACKAGES) -> list[str]:
    missing = []
    for pkg in packages:
        proc = subprocess.run(["dpkg-query", "-W", "-f=${Status}", pkg],
                              capture_output=True, text=True, check=False)
        if "install ok installed" not in proc.stdout:
            missing.append(pkg)
    return missing


_ready: dict[str, Any] | None = None


def ensure_podman(*, install: bool = True) -> dict[str, Any]:
    """Install and configure podman for CNI; idempotent. Returns a summary of ``podman info``.

    Raises :class:`PodmanUnavailable` when it cannot be done (callers turn that
    into ``require(False, ...)``: a skip on a laptop, a failure in CI).
    """
    global _ready
    if _ready is not None:
        return _ready
    if os.geteuid() != 0:
        raise PodmanUnavailable("podman with CNI networks needs root")
    missing = missing_packages() if shutil.which("dpkg-query") else list(PACKAGES)
    if missing:
        if not install or not shutil.which("apt-get"):
            raise PodmanUnavailable(f"packages missing: {' '.join(missing)}")
        proc = subprocess.run([str(REPO / "scripts" / "install-deps"), *missing],
                              capture_output=True, text=True, check=False, timeout=900)
        if proc.returncode != 0:
            raise PodmanUnavailable(f"cannot install {' '.join(missing)}: "
                                    f"{(proc.stderr or proc.stdout).strip()}")
    atomic_write(DROPIN, dropin_text())
    CNI_CONF_DIR.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["podman", "info", "--format", "json"], capture_output=True,
                          text=True, check=False, timeout=60)
    if proc.returncode != 0:
        raise PodmanUnavailable(f"podman info failed: {proc.stderr.strip()}")
    info = json.loads(proc.stdout)
    host = info.get("host", {})
    summary = {
        "version": info.get("version", {}).get("Version"),
        "network_backend": host.get("networkBackend"),
        "runtime": host.get("ociRuntime", {}).get("name"),
        "cgroup_manager": host.get("cgroupManager"),
        "cgroup_version": host.get("cgroupVersion"),
        "events_logger": host.get("eventLogger"),
        "graph_driver": info.get("store", {}).get("graphDriverName"),
    }
    if summary["network_backend"] != "cni":
        raise PodmanUnavailable(f"podman uses network backend {summary['network_backend']!r}, "
                                f"not cni, despite {DROPIN} (CONTAINERS_CONF set?)")
    if summary["runtime"] != RUNTIME:
        raise PodmanUnavailable(f"podman uses runtime {summary['runtime']!r}, not {RUNTIME}")
    _ready = summary
    return summary


def busybox_rootfs(path: Path) -> Path:
    """A root filesystem of ``/bin/busybox`` (busybox-static) and its applets; idempotent.

    Use with ``podman run --rootfs PATH``. Podman adds /etc/hosts, resolv.conf
    and hostname per container (bind mounts), so many containers share one tree.
    """
    if not BUSYBOX.exists():
        raise PodmanUnavailable(f"{BUSYBOX} missing: install busybox-static")
    path = Path(path)
    for sub in ("bin", "etc", "proc", "sys", "dev", "run", "root", "var"):
        (path / sub).mkdir(parents=True, exist_ok=True)
    (path / "tmp").mkdir(exist_ok=True)
    (path / "tmp").chmod(0o1777)
    target = path / "bin" / "busybox"
    src = BUSYBOX.resolve()
    if not target.exists() or target.stat().st_size != src.stat().st_size:
        shutil.copy2(src, target)
    for applet in APPLETS:
        link = path / "bin" / applet
        if not link.is_symlink():
            link.unlink(missing_ok=True)
            link.symlink_to("busybox")
    atomic_write(path / "etc" / "passwd", "root:x:0:0:root:/root:/bin/sh\n")
    atomic_write(path / "etc" / "group", "root:x:0:\n")
    return path


def run_prefix(tag: str = "np") -> str:
    """A per-run name prefix: ``tag`` + 6 hex digits (short enough for link names)."""
    return f"{tag}{secrets.token_hex(3)}"


def _check_prefix(prefix: str) -> None:
    if not PREFIX_RE.match(prefix):
        raise ValueError(f"prefix {prefix!r}: need 4-10 lowercase letters/digits, "
                         f"starting with a letter (it is matched by name when sweeping)")


# --- running podman ------------------------------------------------------------------


def podman(*args: str, check: bool = True,
           timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run ``podman ARGS``; raise :class:`PodmanError` on failure when ``check``."""
    argv = ["podman", *args]
    proc = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=timeout)
    if check and proc.returncode != 0:
        raise PodmanError(argv, proc)
    return proc


def run_container(name: str, rootfs: Path, cmd: Sequence[str], *, network: str | None = None,
                  detach: bool = True, labels: Mapping[str, str] | None = None,
                  extra: Sequence[str] = (), net_raw: bool = True, timeout: float = 120) -> str:
    """``podman run`` a busybox container; returns its id (detached) or its stdout.

    ``net_raw`` adds CAP_NET_RAW, which busybox ping and arping need.
    """
    args = ["run", "--name", name, *ulimit_args(), "--network", network or "none"]
    if net_raw:
        args += ["--cap-add", "NET_RAW"]
    for key, value in (labels or {}).items():
        args += ["--label", f"{key}={value}"]
    args += ["-d"] if detach else ["--rm"]
    args += [*extra, "--rootfs", str(rootfs), *cmd]
    out = podman(*args, timeout=timeout).stdout
    return out.strip() if detach else out


def exec_in(name: str, cmd: Sequence[str], *, check: bool = False,
            timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """``podman exec NAME CMD...``."""
    return podman("exec", name, *cmd, check=check, timeout=timeout)


def ping(name: str, address: str, *, count: int = 1, wait: int = 2) -> bool:
    """Whether container ``name`` gets an answer from ``address``."""
    proc = exec_in(name, ["ping", "-c", str(count), "-W", str(wait), address],
                   timeout=count * wait + 15)
    return proc.returncode == 0


def rm(*names: str, timeout: float = 120) -> None:
    """Remove containers (running or not); missing ones are fine."""
    if names:
        podman("rm", "--force", "--ignore", "--time", "0", *names, timeout=timeout)


def inspect(name: str) -> dict[str, Any]:
    data = json.loads(podman("inspect", "--type", "container", name).stdout)
    return dict(data[0])


def container_network(name: str, network: str) -> dict[str, Any]:
    """The container's settings on ``network`` (IPAddress, IPPrefixLen, MacAddress, Gateway)."""
    nets = inspect(name).get("NetworkSettings", {}).get("Networks") or {}
    if network not in nets:
        raise KeyError(f"container {name} is not on network {network} (has {sorted(nets)})")
    return dict(nets[network])


def container_ip(name: str, network: str) -> str:
    return str(container_network(name, network)["IPAddress"])


def containers(*, name_prefix: str | None = None, network: str | None = None,
               all_states: bool = True) -> list[dict[str, Any]]:
    """``podman ps`` as dicts, filtered by name prefix and/or network."""
    args = ["ps", "--format", "json"]
    if all_states:
        args.append("--all")
    if name_prefix:
        args += ["--filter", f"name=^{re.escape(name_prefix)}"]
    if network:
        args += ["--filter", f"network={network}"]
    out = podman(*args).stdout.strip()
    return list(json.loads(out)) if out else []


# --- CNI networks --------------------------------------------------------------------


def conflist_path(name: str) -> Path:
    return CNI_CONF_DIR / f"{name}.conflist"


def write_conflist(name: str, plugins: Sequence[Mapping[str, Any]], *,
                   cni_version: str = "1.0.0") -> Path:
    """Write ``/etc/cni/net.d/NAME.conflist`` (atomically); podman sees it as network NAME."""
    doc = {"cniVersion": cni_version, "name": name, "plugins": [dict(p) for p in plugins]}
    path = conflist_path(name)
    atomic_write(path, json.dumps(doc, indent=2) + "\n")
    return path


def remove_network(name: str) -> None:
    """Remove a conflist and the host-local state podman's plugins left for it."""
    conflist_path(name).unlink(missing_ok=True)
    shutil.rmtree(CNI_STATE_DIR / name, ignore_errors=True)


def _iptables(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["iptables", "-w", "5", *args], capture_output=True, text=True,
                          check=False, timeout=30)


@contextlib.contextmanager
def allow_bridge(bridge: str, prefix: str) -> Iterator[None]:
    """Accept frames bridged on ``bridge`` in the root namespace's FORWARD chain.

    This kernel sends bridged frames through iptables, and after dockerd the
    FORWARD policy is DROP. The rule carries the run's prefix in a comment so
    :func:`cleanup_prefix` removes it after a crash.
    """
    _check_prefix(prefix)
    rule = ["FORWARD", "-i", bridge, "-o", bridge, "-m", "comment", "--comment",
            f"{IPTABLES_TAG}{prefix}", "-j", "ACCEPT"]
    proc = _iptables("-I", *rule)
    if proc.returncode != 0:
        raise PodmanUnavailable(f"iptables -I failed: {proc.stderr.strip()}")
    try:
        yield
    finally:
        _iptables("-D", *rule)


def _remove_tagged_rules(prefix: str) -> None:
    tag = f"{IPTABLES_TAG}{prefix}"
    proc = _iptables("-S", "FORWARD")
    for line in proc.stdout.splitlines():
        if line.startswith("-A FORWARD ") and tag in line:
            spec = line.split()[1:]
            _iptables("-D", *[s.strip('"') for s in spec])


def cleanup_prefix(prefix: str) -> list[str]:
    """Remove everything a run with ``prefix`` made; returns what was removed.

    Containers named ``PREFIX*``, conflists ``PREFIX*.conflist`` and their
    host-local state, root-namespace links named ``PREFIX*`` (bridges the
    reference plugin left), namespaces ``PREFIX-*`` and tagged iptables rules.
    """
    _check_prefix(prefix)
    removed: list[str] = []
    with contextlib.suppress(PodmanError, FileNotFoundError, subprocess.TimeoutExpired):
        names = [n for c in containers(name_prefix=prefix) for n in c.get("Names", [])]
        if names:
            rm(*names)
            removed += [f"container {n}" for n in names]
    for path in sorted(CNI_CONF_DIR.glob(f"{prefix}*.conflist")):
        remove_network(path.name.removesuffix(".conflist"))
        removed.append(f"conflist {path}")
    for path in sorted(CNI_STATE_DIR.glob(f"{prefix}*")):
        shutil.rmtree(path, ignore_errors=True)
    from pyroute2 import IPRoute, netns

    with IPRoute() as ipr:
        for link in ipr.get_links():
            ifname = link.get("ifname") or ""
            if ifname.startswith(prefix):
                with contextlib.suppress(Exception):
                    ipr.link("del", index=link["index"])
                    removed.append(f"link {ifname}")
    for name in netns.listnetns():
        if name.startswith(f"{prefix}-"):
            with contextlib.suppress(OSError):
                netns.remove(name)
                removed.append(f"netns {name}")
    _remove_tagged_rules(prefix)
    return removed


def leftovers(prefix: str) -> list[str]:
    """Anything still named with ``prefix``: containers, conflists, links, namespaces."""
    _check_prefix(prefix)
    from pyroute2 import IPRoute, netns

    found = [f"conflist {p}" for p in CNI_CONF_DIR.glob(f"{prefix}*.conflist")]
    with contextlib.suppress(PodmanError, FileNotFoundError):
        found += [f"container {n}" for c in containers(name_prefix=prefix)
                  for n in c.get("Names", [])]
    with IPRoute() as ipr:
        found += [f"link {link.get('ifname')}" for link in ipr.get_links()
                  if (link.get("ifname") or "").startswith(prefix)]
    found += [f"netns {n}" for n in netns.listnetns() if n.startswith(f"{prefix}-")]
    return found


def timed(fn: Any, *args: Any, **kwargs: Any) -> tuple[Any, float]:
    """(result, seconds) of one call."""
    start = time.monotonic()
    result = fn(*args, **kwargs)
    return result, time.monotonic() - start


def main(argv: Sequence[str]) -> int:
    if not argv or argv[0] not in ("setup", "cleanup"):
        print("usage: python -m tests.support.podman setup | cleanup PREFIX", file=sys.stderr)
        return 2
    try:
        if argv[0] == "setup":
            for key, value in ensure_podman().items():
                print(f"{key}: {value}")
            print(f"drop-in: {DROPIN}")
        else:
            if len(argv) != 2:
                print("usage: python -m tests.support.podman cleanup PREFIX", file=sys.stderr)
                return 2
            for line in cleanup_prefix(argv[1]):
                print(f"removed {line}")
    except (PodmanUnavailable, ValueError) as exc:
        print(f"podman setup: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
