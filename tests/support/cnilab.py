"""A runtime's view of a netd lab, for the tests that act as the runtime.

The tests exec ``/opt/cni/bin/netd-cni`` (and the reference plugins) as libcni
does (:func:`run_plugin`: CNI_* in the environment, the config on stdin) against
namespaces they create (:func:`add_netns`), and drive the lab's processes
(:class:`Lab`: its IPAM through the gateway namespace, agents killed and
restarted with the commands the lab recorded). Used by test_cni_podman.py and
test_agent_core.py.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from netd import lab as labmod
from netd.cni.server import call as agent_call
from netd.ipam.client import Client
from tests.conftest import bin_path, require
from tests.support import podman as pm

T = TypeVar("T")

NETD_CNI = Path("/opt/cni/bin/netd-cni")
NETD_IPAM = Path("/opt/cni/bin/netd-ipam")
REFERENCE_PLUGINS = ("bridge", "macvlan", "portmap", "bandwidth")
CNI_PATH = ":".join(pm.CNI_PLUGIN_DIRS)
GATEWAY = labmod.GATEWAY
IPAM_URL = f"http://{labmod.IPAM_ADDRESS}:{labmod.IPAM_PORT}"
POOL = labmod.POOL
# the addresses the lab's pool hands out (.1-.49 are reserved for infrastructure)
HANDED_OUT = (ipaddress.ip_address("198.18.0.50"), ipaddress.ip_address("198.18.0.254"))


# --- helpers: links, plugins ---------------------------------------------------------


def links(netns: str | None) -> dict[str, dict[str, Any]]:
    """{ifname: ``ip -j link`` entry} of a namespace (None: the root namespace)."""
    argv = ["ip", "-j"] + (["-n", netns] if netns else []) + ["link", "show"]
    out = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=30).stdout
    return {entry["ifname"]: entry for entry in json.loads(out or "[]")}


def ndv_links(netns: str) -> set[str]:
    """netd's container veth host ends (``ndv*``) in a host namespace."""
    return {name for name in links(netns) if name.startswith("ndv")}


def netd_marked_root_links() -> set[str]:
    """Root-namespace links that carry netd's marks (``ndv*`` name or ``netd:`` alias)."""
    return {name for name, entry in links(None).items()
            if name.startswith("ndv") or str(entry.get("ifalias", "")).startswith("netd:")}


def add_netns(name: str) -> str:
    """``ip netns add NAME`` with lo up; returns the path a runtime passes as CNI_NETNS."""
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True, timeout=30)
    subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True,
                   capture_output=True, timeout=30)
    return str(labmod.NETNS_DIR / name)


def del_netns(name: str) -> None:
    subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False, timeout=30)


def in_ns(netns: str, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", netns, *argv], capture_output=True,
                          text=True, timeout=timeout, check=False)


@dataclass
class CniRun:
    """One plugin execution: exit code, stdout, stderr and its wall time."""

    rc: int
    out: str
    err: str
    took: float

    @property
    def doc(self) -> dict[str, Any]:
        try:
            doc = json.loads(self.out)
        except ValueError:
            return {}
        return doc if isinstance(doc, dict) else {}

    @property
    def code(self) -> int | None:
        """The CNI error code (None when the plugin succeeded)."""
        return None if self.rc == 0 else self.doc.get("code")

    def __str__(self) -> str:
        return f"rc={self.rc} took={self.took:.2f}s out={self.out.strip()!r} " \
               f"err={self.err.strip()[-400:]!r}"


def run_plugin(plugin: Path | str, command: str | None, stdin: bytes | dict[str, Any], *,
               container_id: str | None = None, netns: str | None = None,
               ifname: str | None = "eth0", in_netns: str | None = None,
               timeout: float = 150) -> CniRun:
    """Exec a CNI plugin as a runtime does: CNI_* in the environment, the config on stdin.

    ``None`` leaves a variable out. ``in_netns`` runs the plugin inside that
    namespace (the role of a runtime that lives in the host's namespace).
    """
    env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
           "CNI_PATH": CNI_PATH}
    for key, value in (("CNI_COMMAND", command), ("CNI_CONTAINERID", container_id),
                       ("CNI_NETNS", netns), ("CNI_IFNAME", ifname)):
        if value is not None:
            env[key] = value
    data = stdin if isinstance(stdin, bytes) else json.dumps(stdin).encode()
    argv = [str(plugin)] if in_netns is None else ["ip", "netns", "exec", in_netns, str(plugin)]
    start = time.monotonic()
    proc = subprocess.run(argv, input=data, capture_output=True, env=env, timeout=timeout,
                          check=False)
    return CniRun(proc.returncode, proc.stdout.decode(errors="replace"),
                  proc.stderr.decode(errors="replace"), time.monotonic() - start)


def netd_conf(name: str, socket: str, pool: str = POOL,
              version: str = "1.0.0") -> dict[str, Any]:
    return {"cniVersion": version, "name": name, "type": "netd-cni", "pool": pool,
            "agentSocket": socket}


def wait_for(what: str, check: Callable[[], bool], timeout: float,
             interval: float = 0.1) -> float:
    """Poll ``check`` until true; returns the seconds it took, fails after ``timeout``."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"{what}: not within {timeout:g}s")
        time.sleep(interval)
    return time.monotonic() - start


def container_view(name: str) -> tuple[str, str]:
    """(ip, mac) of eth0 as the container itself sees it."""
    proc = pm.exec_in(name, ["sh", "-c", "cat /sys/class/net/eth0/address; "
                                         "ip -4 -o addr show dev eth0"], check=True)
    mac, _, rest = proc.stdout.strip().partition("\n")
    found = re.search(r"inet ([0-9.]+)/", rest)
    assert found, proc.stdout
    return found.group(1), mac.strip().lower()


# One `podman exec` per source: ping every target at once, each a second time on a miss.
PING_ALL = ('for a in "$@"; do ('
            'if ping -c 1 -W 2 "$a" >/dev/null 2>&1 || ping -c 2 -W 2 "$a" >/dev/null 2>&1; '
            'then echo "ok $a"; else echo "FAIL $a"; fi) & done; wait')


def ping_all(container: str, targets: Sequence[str]) -> dict[str, str]:
    proc = pm.exec_in(container, ["sh", "-c", PING_ALL, "ping-all", *targets], timeout=60)
    seen = {}
    for line in proc.stdout.splitlines():
        verdict, _, target = line.partition(" ")
        if verdict in ("ok", "FAIL"):
            seen[target] = verdict
    return {t: seen.get(t, f"noanswer ({proc.stderr.strip()[:80]})") for t in targets}


# --- the lab -------------------------------------------------------------------------


@dataclass
class Lab:
    prefix: str
    dir: Path
    rootfs: Path
    _guard: threading.Lock = field(default_factory=threading.Lock)

    def cli(self, *args: str, check: bool = True,
            timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return netd_lab(*args, check=check, timeout=timeout)

    def ns(self, name: str) -> str:
        return f"{self.prefix}-{name}"

    def manifest(self) -> dict[str, Any]:
        doc = labmod.load_manifest(self.dir)
        assert doc is not None, f"no lab manifest in {self.dir}"
        return doc

    def host(self, name: str) -> dict[str, Any]:
        return next(h for h in self.manifest()["hosts"] if h["name"] == name)

    def socket(self, host: str) -> str:
        return str(self.host(host)["socket"])

    def network(self, host: str) -> str:
        """The podman network (conflist) the lab made for a host."""
        return str(self.host(host)["network"])

    # IPAM, reached from inside the gateway namespace (198.18.0.0/24 exists only there)
    def ipam(self, fn: Callable[[Client], T]) -> T:
        token = (self.dir / "token").read_text().strip()

        def run() -> T:
            with Client(IPAM_URL, token=token, actor="test:cni-podman", timeout=10) as client:
                return fn(client)

        return labmod.in_netns(self.ns("gw"), run)

    def pool(self) -> dict[str, Any]:
        return self.ipam(lambda c: c.get_pool(POOL))

    def allocations(self, host: str | None = None,
                    pool: str | None = None) -> list[dict[str, Any]]:
        """The allocations of ``pool`` (the lab's first pool by default)."""
        name = pool or str(self.manifest().get("pool") or POOL)
        return list(self.ipam(lambda c: c.all_addresses(pool=name, host=host)))

    def by_container(self) -> dict[str, dict[str, Any]]:
        return {a["container_id"]: a for a in self.allocations()}

    def last_event(self) -> int:
        events = self.ipam(lambda c: c.pool_history(limit=1))["events"]
        return int(events[-1]["id"]) if events else 0

    def ipam_healthy(self) -> bool:
        return labmod.http_status_in_netns(self.ns("gw"), labmod.IPAM_ADDRESS,
                                           labmod.IPAM_PORT, "/healthz", timeout=1) == 200

    # processes, restarted with the commands the lab recorded in its manifest
    def agent_pid(self, host: str) -> int:
        return int(self.host(host)["agent"]["pid"])

    def agent_status(self, host: str) -> dict[str, Any]:
        return dict(agent_call(self.socket(host), {"command": "AGENT_STATUS"},
                               timeout=10)["result"])

    def agent_ready(self, host: str) -> bool:
        try:
            return "result" in agent_call(self.socket(host), {"command": "AGENT_STATUS"},
                                          timeout=5)
        except (OSError, ValueError):
            return False

    def kill_agent(self, host: str) -> None:
        pid = self.agent_pid(host)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        wait_for(f"agent {pid} gone", lambda: not labmod.alive(pid), 10, 0.01)

    def start_agent(self, host: str, timeout: float = 20) -> float:
        """Start the host's agent as the lab did; returns the seconds until it answers."""
        with self._guard:
            manifest = self.manifest()
            rec = next(h for h in manifest["hosts"] if h["name"] == host)
            old = rec["agent"] or {  # a lab up with --no-agents: start it as lab up would
                "pid": 0, "netns": rec["netns"],
                "log": str(Path(rec["config"]).parent / "agent.log"),
                "argv": [bin_path("netd"), "agent", "--config", rec["config"]]}
            assert not labmod.alive(old["pid"]), "the agent still runs"
            rec["agent"] = labmod.start_process(old["netns"], old["argv"], Path(old["log"]))
            labmod.save_manifest(self.dir, manifest)
        pid = rec["agent"]["pid"]

        def ready() -> bool:
            assert labmod.alive(pid), f"agent exited:\n{labmod.tail(old['log'])}"
            return self.agent_ready(host)

        return wait_for(f"agent of {host} answering", ready, timeout, 0.02)

    def restart_agent(self, host: str) -> float:
        self.kill_agent(host)
        return self.start_agent(host)

    def ensure_agent(self, host: str) -> None:
        if not labmod.alive(self.agent_pid(host)):
            self.start_agent(host)

    def ipam_signal(self, signum: int) -> None:
        os.kill(int(self.manifest()["ipam"]["pid"]), signum)

    def stop_ipam(self) -> None:
        pid = int(self.manifest()["ipam"]["pid"])
        os.kill(pid, signal.SIGCONT)  # in case it was frozen
        os.kill(pid, signal.SIGTERM)
        wait_for("IPAM server stopped", lambda: not labmod.alive(pid), 15, 0.05)

    def start_ipam(self) -> float:
        with self._guard:
            manifest = self.manifest()
            old = manifest["ipam"]
            assert not labmod.alive(old["pid"]), "the IPAM server still runs"
            manifest["ipam"] = labmod.start_process(old["netns"], old["argv"],
                                                    Path(old["log"]))
            labmod.save_manifest(self.dir, manifest)
        return wait_for("IPAM server healthy", self.ipam_healthy, 30, 0.1)

    def ensure_ipam(self) -> None:
        pid = int(self.manifest()["ipam"]["pid"])
        if labmod.alive(pid):
            os.kill(pid, signal.SIGCONT)
        else:
            self.start_ipam()




def netd_lab(*args: str, check: bool = True,
             timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``netd lab ARGS`` as an operator runs it (the installed console script)."""
    proc = subprocess.run([bin_path("netd"), "lab", *args], capture_output=True, text=True,
                          timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"netd lab {' '.join(args)} exited {proc.returncode}:\n"
                             f"{proc.stdout}\n{proc.stderr}")
    return proc


def reference_plugin_dir(name: str) -> Path | None:
    for d in pm.CNI_PLUGIN_DIRS:
        if (Path(d) / name).is_file():
            return Path(d)
    return None


@contextlib.contextmanager
def running_lab(base: Path, tag: str, hosts: int = 2, mode: str = "l2",
                extra: Sequence[str] = (), prefix: str | None = None) -> Iterator[Lab]:
    """``netd lab up --mode MODE --hosts N`` with a per-run prefix; everything removed
    after."""
    require(os.geteuid() == 0, "CNI plugins, podman and the lab need root")
    require(subprocess.run([bin_path("netd"), "agent", "--help"], capture_output=True,
                           check=False, timeout=60).returncode == 0,
            "'netd agent' is not available")
    the_lab = Lab(prefix=prefix or pm.run_prefix(tag), dir=base / "lab",
                  rootfs=pm.busybox_rootfs(base / "rootfs"))
    try:
        start = time.monotonic()
        the_lab.cli("up", "--mode", mode, "--hosts", str(hosts), "--prefix", the_lab.prefix,
                    "--dir", str(the_lab.dir), *extra)
        print(f"\nlab {the_lab.prefix} up in {time.monotonic() - start:.1f}s")
        require(os.access(NETD_CNI, os.X_OK) and os.access(NETD_IPAM, os.X_OK),
                f"{NETD_CNI} / {NETD_IPAM} not installed by 'netd lab up'")
        yield the_lab
    finally:
        # containers first, while the agents can still unplug them
        with contextlib.suppress(Exception):
            names = [n for c in pm.containers(name_prefix=the_lab.prefix)
                     for n in c.get("Names", [])]
            if names:
                pm.rm(*names)
        the_lab.cli("down", "--prefix", the_lab.prefix, "--dir", str(the_lab.dir),
                    check=False)
        pm.cleanup_prefix(the_lab.prefix)


# --- the agent's metrics ---------------------------------------------------------------


def enable_agent_metrics(lab: Lab, host: str, port: int) -> None:
    """``metrics_listen`` into the host's agent.toml (a top-level key: first), restarted."""
    config = Path(lab.host(host)["config"])
    text = config.read_text()
    if "metrics_listen" not in text:
        config.write_text(f'metrics_listen = "127.0.0.1:{port}"\n' + text)
    lab.restart_agent(host)


def scrape_agent(lab: Lab, host: str, port: int) -> dict[str, float]:
    """``name{labels}`` -> value, scraped inside the host's namespace (its loopback)."""
    proc = in_ns(lab.ns(host), "curl", "-fsS", "--max-time", "5",
                 f"http://127.0.0.1:{port}/metrics")
    assert proc.returncode == 0, proc.stderr
    out = {}
    for line in proc.stdout.splitlines():
        m = re.match(r"^([a-z_]+(?:\{[^}]*\})?) (\S+)$", line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


def metric(scraped: dict[str, float], name: str, **labels: str) -> float:
    """The one sample of ``name`` whose labels include ``labels`` (KeyError: none)."""
    for key, value in scraped.items():
        base, _, rest = key.partition("{")
        if base == name and all(f'{k}="{v}"' in rest for k, v in labels.items()):
            return value
    raise KeyError(f"{name} {labels} not in the scrape")

