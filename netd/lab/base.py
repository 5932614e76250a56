"""``netd lab``: a data centre in network namespaces, for tests, demos and trials.

``netd lab up --mode l2 --hosts 2`` builds::

    PREFIX-gw  lan0 198.18.0.1/24 (the subnet's gateway) + 198.18.0.2/24, where
       |       the IPAM server listens (:9650, SQLite store and token in DIR)
    PREFIX-sw  Linux bridge PREFIX-br: the "physical" switch
       |
    PREFIX-h1  bond0 198.18.0.11/24, default via .1; agent (DIR/h1/agent.toml)
    PREFIX-h2  bond0 198.18.0.12/24, ...

creates the pool ``lab`` (198.18.0.0/24, .1-.49 reserved for infrastructure)
through ``netctl``, writes one podman network per host (``PREFIX-hN``, type
``netd-cni``, /etc/cni/net.d/PREFIX-hN.conflist) and starts ``netd agent`` in
every host namespace. Everything it makes is recorded, as it is made, in the
manifest ``DIR/lab.json``: ``netd lab down`` reads it and also sweeps by name
(namespaces ``PREFIX-sw|gw|hN``, conflists ``PREFIX-hN.conflist``, every
process living in a lab namespace, a dockerd of the prefix), so it cleans up
after a crash too.

Docker (docs/DOCKER.md): ``--docker`` starts a dockerd in h1's namespace
(:mod:`netd.lab_docker`; socket ``unix:///run/PREFIX/docker.sock``) and h1's
agent serves the plugin ``netd`` for it (``docker_plugin = true``,
``docker_host`` = that socket). ``--docker-host URL`` only configures h1's
agent that way, for a dockerd the caller starts in h1 (the tests do: they
restart theirs). ``netd lab down`` removes the dockerd's containers (while the agent
can still release their addresses), the dockerd, its mounts, cgroups and
directories.

The lab never touches the machine's own interfaces: every link, address and
route lives in its namespaces; 198.18.0.0/24 only exists there.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import click

from netd import lab_docker
from netd.files import atomic_write
from netd.lab_docker import Dockerd, DockerdError

T = TypeVar("T")

DEFAULT_PREFIX = "ndlab"
DEFAULT_DIR = Path("/run/netd-lab")
DEFAULT_CNI_CONF_DIR = Path("/etc/cni/net.d")
DEFAULT_CNI_BIN_DIR = Path("/opt/cni/bin")
NETNS_DIR = Path("/run/netns")
MANIFEST = "lab.json"
MANIFEST_VERSION = 1

SUBNET = ipaddress.ip_network("198.18.0.0/24")
GATEWAY = "198.18.0.1"
IPAM_ADDRESS = "198.18.0.2"
IPAM_PORT = 9650
RESERVED = "198.18.0.1-198.18.0.49"
POOL = "lab"
HOST_OFFSET = 10  # host N gets .(10+N): h1 -> .11
MAX_HOSTS = 39  # .11 .. .49, all inside the reserved range
MODES = ("l2",)
DOCKER_ON = "h1"  # the host whose agent serves the Docker plugin (--docker, --docker-host)
UPLINK = "bond0"
HOST_BRIDGE = "br0"
GW_LINK = "lan0"

PREFIX_RE = re.compile(r"^[a-z][a-z0-9]{1,9}$")
CLONE_NEWNET = 0x40000000


class LabError(click.ClickException):
    """A lab step failed; the message says which and why."""


# --- pure: the plan ------------------------------------------------------------------


@dataclass(frozen=True)
class HostPlan:
    index: int
    name: str  # h1
    netns: str  # PREFIX-h1
    address: str  # 198.18.0.11
    switch_port: str  # PREFIX-h1, the switch side of the host's bond0
    dir: Path
    network: str  # podman network PREFIX-h1
    conflist: Path

    @property
    def config(self) -> Path:
        return self.dir / "agent.toml"

    @property
    def socket(self) -> Path:
        return self.dir / "agent.sock"

    @property
    def state_dir(self) -> Path:
        return self.dir / "state"

    @property
    def log(self) -> Path:
        return self.dir / "agent.log"


@dataclass(frozen=True)
class LabPlan:
    prefix: str
    dir: Path
    mode: str
    hosts: tuple[HostPlan, ...]
    cni_conf_dir: Path
    # h1's agent serves the Docker plugin and asks this dockerd (None: no plugin)
    docker_host: str | None = None
    # ... and the lab starts that dockerd in h1 itself (--docker)
    start_dockerd: bool = False

    @property
    def dockerd(self) -> Dockerd:
        """The dockerd ``--docker`` runs in h1 (names only; nothing is started)."""
        host = next(h for h in self.hosts if h.name == DOCKER_ON)
        return Dockerd(self.prefix, host.netns, host.dir / "dockerd.log")

    @property
    def switch_ns(self) -> str:
        return f"{self.prefix}-sw"

    @property
    def gateway_ns(self) -> str:
        return f"{self.prefix}-gw"

    @property
    def bridge(self) -> str:
        return f"{self.prefix}-br"

    @property
    def gateway_port(self) -> str:
        return f"{self.prefix}-gw"

    @property
    def namespaces(self) -> list[str]:
        return [self.switch_ns, self.gateway_ns, *(h.netns for h in self.hosts)]

    @property
    def ipam_url(self) -> str:
        return f"http://{IPAM_ADDRESS}:{IPAM_PORT}"

    @property
    def token_file(self) -> Path:
        return self.dir / "token"

    @property
    def db(self) -> Path:
        return self.dir / "ipam.db"

    @property
    def ipam_log(self) -> Path:
        return self.dir / "ipam.log"

    @property
    def manifest(self) -> Path:
        return self.dir / MANIFEST


def validate_prefix(prefix: str) -> str:
    if not PREFIX_RE.match(prefix):
        raise click.BadParameter(
            f"{prefix!r}: 2-10 lowercase letters or digits, starting with a letter "
            f"(names like PREFIX-h12 must fit in 15 characters)", param_hint="--prefix")
    return prefix


def plan_lab(prefix: str, hosts: int, directory: Path, mode: str = "l2",
             cni_conf_dir: Path = DEFAULT_CNI_CONF_DIR, *, docker: bool = False,
             docker_host: str | None = None) -> LabPlan:
    """Every name, address and path of a lab (pure).

    ``docker``: the lab starts a dockerd in h1 and h1's agent serves the plugin
    for it; ``docker_host``: h1's agent serves the plugin for that dockerd.
    """
    validate_prefix(prefix)
    if docker and docker_host:
        raise click.BadParameter("give --docker (the lab starts dockerd) or --docker-host "
                                 "(you start it), not both", param_hint="--docker-host")
    if docker_host is not None and not re.fullmatch(r"unix:///\S+", docker_host):
        raise click.BadParameter(f"{docker_host!r}: unix:///PATH of dockerd's socket",
                                 param_hint="--docker-host")
    if mode not in MODES:
        raise click.BadParameter(f"{mode!r}: only {', '.join(MODES)} for now",
                                 param_hint="--mode")
    if not 1 <= hosts <= MAX_HOSTS:
        raise click.BadParameter(f"{hosts}: 1-{MAX_HOSTS} hosts", param_hint="--hosts")
    directory = Path(directory).absolute()
    plans = []
    for i in range(1, hosts + 1):
        name = f"h{i}"
        plans.append(HostPlan(
            index=i, name=name, netns=f"{prefix}-{name}",
            address=str(SUBNET.network_address + HOST_OFFSET + i),
            switch_port=f"{prefix}-{name}", dir=directory / name,
            network=f"{prefix}-{name}",
            conflist=cni_conf_dir / f"{prefix}-{name}.conflist"))
    if docker:
        docker_host = Dockerd(prefix, f"{prefix}-{DOCKER_ON}",
                              directory / DOCKER_ON / "dockerd.log").host
    return LabPlan(prefix=prefix, dir=directory, mode=mode, hosts=tuple(plans),
                   cni_conf_dir=cni_conf_dir, docker_host=docker_host, start_dockerd=docker)


def _toml_str(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def agent_config_text(plan: LabPlan, host: HostPlan) -> str:
    """The host's ``agent.toml`` (keys as in shared/DESIGN.md)."""
    docker = []
    if plan.docker_host and host.name == DOCKER_ON:  # top-level keys: before any table
        docker = ["docker_plugin = true", f"docker_host = {_toml_str(plan.docker_host)}"]
    return "\n".join([
        f"# netd lab {plan.prefix}: agent of {host.name} (namespace {host.netns})",
        f"host = {_toml_str(host.name)}",
        f"mode = {_toml_str(plan.mode)}",
        f"ipam_url = {_toml_str(plan.ipam_url)}",
        f"token_file = {_toml_str(str(plan.token_file))}",
        f"socket = {_toml_str(str(host.socket))}",
        f"state_dir = {_toml_str(str(host.state_dir))}",
        *docker,
        "",
        "[l2]",
        f"uplink = {_toml_str(UPLINK)}",
        f"bridge = {_toml_str(HOST_BRIDGE)}",
        "",
    ])


def conflist_doc(plan: LabPlan, host: HostPlan) -> dict[str, Any]:
    """The podman network of one host: ``netd-cni`` on pool ``lab`` via that host's agent."""
    return {
        "cniVersion": "1.0.0",
        "name": host.network,
        "plugins": [{"type": "netd-cni", "pool": POOL, "agentSocket": str(host.socket),
                     "capabilities": {"ips": True, "mac": True}}],
    }


def is_lab_netns(prefix: str, name: str) -> bool:
    """Whether namespace ``name`` is one a lab with ``prefix`` makes."""
    return re.fullmatch(rf"{re.escape(prefix)}-(sw|gw|h[0-9]+)", name) is not None


def is_lab_conflist(prefix: str, filename: str) -> bool:
    return re.fullmatch(rf"{re.escape(prefix)}-h[0-9]+\.conflist", filename) is not None


def render_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """Aligned columns, two spaces apart."""
    table = [list(map(str, header)), *[list(map(str, r)) for r in rows]]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in table)


def render_matrix(sources: Sequence[str], targets: Sequence[str],
                  results: dict[tuple[str, str], str]) -> str:
    """Rows ping columns: ok, FAIL, noraw (no NET_RAW to ping), noexec, or - (itself)."""
    rows = [[src, *(results.get((src, tgt), "-") for tgt in targets)] for src in sources]
    return render_table(["from \\ to", *targets], rows)


# --- edges: namespaces, links, processes ---------------------------------------------


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def load_manifest(directory: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads((directory / MANIFEST).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise LabError(f"cannot read {directory / MANIFEST}: {exc}") from None
    return doc if isinstance(doc, dict) else None


def save_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    atomic_write(directory / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n",
                  0o600)


def list_netns() -> list[str]:
    from pyroute2 import netns

    return list(netns.listnetns())


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def in_netns(name: str, fn: Callable[[], T]) -> T:
    """Run ``fn`` in a short-lived thread that has entered namespace ``name``."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            fd = os.open(NETNS_DIR / name, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _libc().setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns({name}): {os.strerror(err)}")
            finally:
                os.close(fd)
            box["value"] = fn()
        except BaseException as exc:  # handed to the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=target, name=f"netns-{name}", daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]  # type: ignore[no-any-return]


def http_status_in_netns(netns_name: str, host: str, port: int, path: str,
                         timeout: float = 2.0) -> int:
    """HTTP GET from inside a namespace; returns the status code (0: no answer)."""
    def get() -> int:
        try:
            with socket.create_connection((host, port), timeout=timeout) as sock:
                sock.sendall(f"GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
                line = sock.makefile("rb").readline().decode("latin-1").split()
                return int(line[1]) if len(line) >= 2 and line[1].isdigit() else 0
        except OSError:
            return 0

    return in_netns(netns_name, get)


def _create_netns(name: str) -> None:
    from pyroute2 import IPRoute, netns

    netns.create(name)
    with IPRoute(netns=name) as ipr:
        ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")


def _remove_netns(name: str) -> None:
    from pyroute2 import netns

    with contextlib.suppress(FileNotFoundError):
        netns.remove(name)


def build_topology(plan: LabPlan, manifest: dict[str, Any]) -> None:
    """Namespaces, the switch bridge, the gateway's and the hosts' uplinks."""
    from pyroute2 import IPRoute

    for name in plan.namespaces:
        manifest["namespaces"].append(name)  # recorded before it exists: down tolerates both
        save_manifest(plan.dir, manifest)
        _create_netns(name)
    prefixlen = SUBNET.prefixlen
    with IPRoute(netns=plan.switch_ns) as sw:
        sw.link("add", ifname=plan.bridge, kind="bridge", br_stp_state=0, br_forward_delay=0)
        bridge = sw.link_lookup(ifname=plan.bridge)[0]
        sw.link("set", index=bridge, state="up")
        ports = [(plan.gateway_port, GW_LINK, plan.gateway_ns)]
        ports += [(h.switch_port, UPLINK, h.netns) for h in plan.hosts]
        for port, peer, peer_ns in ports:
            sw.link("add", ifname=port, kind="veth",
                    peer={"ifname": peer, "net_ns_fd": peer_ns})
            index = sw.link_lookup(ifname=port)[0]
            sw.link("set", index=index, master=bridge)
            sw.link("set", index=index, state="up")
    with IPRoute(netns=plan.gateway_ns) as gw:
        index = gw.link_lookup(ifname=GW_LINK)[0]
        for address in (GATEWAY, IPAM_ADDRESS):
            gw.addr("add", index=index, address=address, prefixlen=prefixlen)
        gw.link("set", index=index, state="up")
    for host in plan.hosts:
        with IPRoute(netns=host.netns) as ipr:
            index = ipr.link_lookup(ifname=UPLINK)[0]
            ipr.addr("add", index=index, address=host.address, prefixlen=prefixlen)
            ipr.link("set", index=index, state="up")
            ipr.route("add", dst="0.0.0.0/0", gateway=GATEWAY)


def host_addresses(netns_name: str) -> dict[str, list[str]]:
    """{ifname: [address/prefixlen, ...]} of a namespace (IPv4)."""
    from pyroute2 import IPRoute

    out: dict[str, list[str]] = {}
    with IPRoute(netns=netns_name) as ipr:
        names = {link["index"]: link.get("ifname") for link in ipr.get_links()}
        for addr in ipr.get_addr(family=socket.AF_INET):
            ifname = names.get(addr["index"], str(addr["index"]))
            out.setdefault(ifname, []).append(f"{addr.get('address')}/{addr['prefixlen']}")
    return out


def _bin(name: str) -> str:
    """A console script next to this interpreter (the venv), else on PATH."""
    local = Path(sys.executable).parent / name
    if os.access(local, os.X_OK):
        return str(local)
    found = shutil.which(name)
    if not found:
        raise LabError(f"{name} not found next to {sys.executable} nor on PATH")
    return found


def _ns_argv(netns_name: str, argv: Sequence[str]) -> list[str]:
    return ["ip", "netns", "exec", netns_name, *argv]


def start_process(netns_name: str, argv: Sequence[str], log: Path) -> dict[str, Any]:
    """Start ``argv`` inside a namespace, detached (own session), output to ``log``.

    ``ip netns exec`` execs the command in place, so the pid is the daemon's.
    """
    full = _ns_argv(netns_name, argv)
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        proc = subprocess.Popen(full, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    return {"pid": proc.pid, "argv": list(argv), "netns": netns_name, "log": str(log),
            "started": _now()}


def _proc_state(pid: int) -> str | None:
    """The process state letter (R, S, Z...), None when there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def alive(pid: int | None) -> bool:
    return pid is not None and _proc_state(pid) not in (None, "Z", "X")


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [p.decode(errors="replace") for p in raw.split(b"\0") if p]


def _recorded_process_alive(rec: dict[str, Any] | None) -> int | None:
    """The pid of a recorded process when it still runs the recorded command."""
    if not rec or not isinstance(rec.get("pid"), int):
        return None
    pid = int(rec["pid"])
    if not alive(pid):
        return None
    argv = rec.get("argv") or []
    cmd = _cmdline(pid)
    # the daemon is a Python console script: its cmdline is [python, script, args...]
    if argv and not any(cmd[i:i + len(argv) - 1] == argv[1:] for i in range(len(cmd))):
        return None
    return pid


def _netns_ids(names: Iterable[str]) -> set[tuple[int, int]]:
    ids = set()
    for name in names:
        with contextlib.suppress(OSError):
            st = os.stat(NETNS_DIR / name)
            ids.add((st.st_dev, st.st_ino))
    return ids


def pids_in_netns(names: Iterable[str]) -> list[int]:
    """Every live process whose network namespace is one of ``names``."""
    ids = _netns_ids(names)
    if not ids:
        return []
    found = []
    me = os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        with contextlib.suppress(OSError):
            st = os.stat(entry / "ns" / "net")
            if (st.st_dev, st.st_ino) in ids and alive(int(entry.name)):
                found.append(int(entry.name))
    return found


def stop_pids(pids: Iterable[int], timeout: float = 10.0) -> list[int]:
    """SIGTERM, wait up to ``timeout``, then SIGKILL. Returns the pids signalled."""
    targets = [p for p in set(pids) if alive(p)]
    for pid in targets:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(alive(p) for p in targets):
        time.sleep(0.05)
    for pid in targets:
        if alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(alive(p) for p in targets):
        time.sleep(0.05)
    return targets


def _tail(path: Path | str, lines: int = 15) -> str:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.rstrip().splitlines()[-lines:])


def _run(argv: Sequence[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, check=False,
                          timeout=timeout)


# --- podman (status and down) --------------------------------------------------------


def podman_available() -> bool:
    return shutil.which("podman") is not None


def lab_containers(networks: Sequence[str]) -> list[dict[str, Any]]:
    """Containers (any state) on the lab's networks: name, id, network, ip, mac, state."""
    if not networks or not podman_available():
        return []
    seen: dict[str, dict[str, Any]] = {}
    for network in networks:
        proc = _run(["podman", "ps", "--all", "--format", "json", "--filter",
                     f"network={network}"])
        if proc.returncode != 0 or not proc.stdout.strip():
            continue
        for c in json.loads(proc.stdout):
            names = c.get("Names") or [c.get("Id", "?")[:12]]
            seen.setdefault(c["Id"], {"name": names[0], "id": c["Id"][:12],
                                      "state": c.get("State", "?"), "network": network})
    if not seen:
        return []
    proc = _run(["podman", "inspect", "--type", "container", *seen])
    details = json.loads(proc.stdout) if proc.returncode == 0 and proc.stdout.strip() else []
    for d in details:
        entry = seen.get(d.get("Id", ""))
        if entry is None:
            continue
        net = (d.get("NetworkSettings", {}).get("Networks") or {}).get(entry["network"]) or {}
        entry["ip"] = net.get("IPAddress") or ""
        entry["mac"] = net.get("MacAddress") or ""
    return sorted(seen.values(), key=lambda c: (c["network"], c["name"]))


# One exec per source container: ping every target at once, in the background.
# The script is constant; the addresses are its positional arguments.
PING_SCRIPT = (
    'for a in "$@"; do ('
    'o=$(ping -c 1 -W 1 "$a" 2>&1); r=$?; '
    'case "$o" in *"ermission denied"*) echo "noraw $a";; '
    '*) if [ $r -eq 0 ]; then echo "ok $a"; else echo "FAIL $a"; fi;; esac'
    ') & done; wait'
)


def ping_all_from(container: str, addresses: Sequence[str]) -> dict[str, str]:
    """{address: ok | FAIL | noraw | noexec} as seen from inside ``container``.

    ``noraw``: the container lacks NET_RAW, which busybox ping needs;
    ``noexec``: ``podman exec`` itself failed (no ``sh`` or ``ping`` in the image?).
    """
    try:
        proc = _run(["podman", "exec", container, "sh", "-c", PING_SCRIPT, "ping-all",
                     *addresses], timeout=30)
    except subprocess.TimeoutExpired:
        return dict.fromkeys(addresses, "FAIL")
    seen: dict[str, str] = {}
    for line in proc.stdout.splitlines():
        verdict, _, address = line.partition(" ")
        if address in addresses and verdict in ("ok", "FAIL", "noraw"):
            seen[address] = verdict
    missing = "noexec" if proc.returncode not in (0, 1) and not seen else "FAIL"
    return {a: seen.get(a, missing) for a in addresses}


def reachability(containers: Sequence[dict[str, Any]]) -> tuple[list[str], list[str],
                                                                dict[tuple[str, str], str]]:
    """Ping every running container's IP and the gateway from every running container."""
    running = [c for c in containers if c.get("state") == "running" and c.get("ip")]
    sources = [c["name"] for c in running]
    targets = ["gw", *sources]
    address = {"gw": GATEWAY, **{c["name"]: c["ip"] for c in running}}

    def probe(src: str) -> dict[tuple[str, str], str]:
        others = [t for t in targets if t != src]
        seen = ping_all_from(src, [address[t] for t in others])
        return {(src, t): seen[address[t]] for t in others}

    results: dict[tuple[str, str], str] = {}
    with ThreadPoolExecutor(max_workers=4) as pool:
        for part in pool.map(probe, sources):
            results.update(part)
    return sources, targets, results


# --- up / down / status --------------------------------------------------------------


def _require_root() -> None:
    if os.geteuid() != 0:
        raise LabError("the lab creates network namespaces: run it as root")
    if shutil.which("ip") is None:
        raise LabError("'ip' (iproute2) is needed to start processes in namespaces")


def agent_available(netd: str) -> bool:
    try:
        return _run([netd, "agent", "--help"], timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _wait(what: str, check: Callable[[], bool], timeout: float,
          failed: Callable[[], str | None] = lambda: None) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return
        why = failed()
        if why:
            raise LabError(f"{what}: {why}")
        if time.monotonic() > deadline:
            raise LabError(f"{what}: not ready after {timeout:.0f}s")
        time.sleep(0.05)


def _start_ipam(plan: LabPlan, manifest: dict[str, Any], netd: str,
                cooldown: float | None) -> None:
    token = secrets.token_hex(24)
    atomic_write(plan.token_file, token + "\n", 0o600)
    argv = [netd, "ipam", "serve", "--listen", f"{IPAM_ADDRESS}:{IPAM_PORT}",
            "--store", f"sqlite:///{plan.db}", "--token-file", str(plan.token_file)]
    if cooldown is not None:
        argv += ["--cooldown", str(cooldown)]
    manifest["ipam"] = start_process(plan.gateway_ns, argv, plan.ipam_log)
    save_manifest(plan.dir, manifest)
    pid = manifest["ipam"]["pid"]

    def failed() -> str | None:
        return None if alive(pid) else f"exited:\n{_tail(plan.ipam_log)}"

    _wait("IPAM server", lambda: http_status_in_netns(
        plan.gateway_ns, IPAM_ADDRESS, IPAM_PORT, "/healthz") == 200, 30, failed)


def _netctl(plan: LabPlan, netctl: str, *args: str) -> subprocess.CompletedProcess[str]:
    return _run(_ns_argv(plan.gateway_ns, [netctl, "--server", plan.ipam_url,
                                           "--token-file", str(plan.token_file), *args]))


def _create_pool(plan: LabPlan, netctl: str) -> None:
    proc = _netctl(plan, netctl, "pool", "create", POOL, "--cidr", str(SUBNET),
                   "--gateway", GATEWAY, "--mode", "l2", "--reserve", RESERVED,
                   "--label", f"lab={plan.prefix}")
    if proc.returncode != 0:
        raise LabError(f"netctl pool create {POOL} failed: {(proc.stderr or proc.stdout).strip()}")


def _check_hosts_reach_ipam(plan: LabPlan) -> None:
    for host in plan.hosts:
        def reaches(netns_name: str = host.netns) -> bool:
            return http_status_in_netns(netns_name, IPAM_ADDRESS, IPAM_PORT, "/healthz") == 200

        _wait(f"{host.name} -> IPAM over {UPLINK}", reaches, 10)


def _start_agent(plan: LabPlan, host: HostPlan, manifest: dict[str, Any], netd: str,
                 timeout: float) -> None:
    record = next(h for h in manifest["hosts"] if h["name"] == host.name)
    host.socket.unlink(missing_ok=True)
    record["agent"] = start_process(host.netns, [netd, "agent", "--config", str(host.config)],
                                    host.log)
    save_manifest(plan.dir, manifest)
    pid = record["agent"]["pid"]

    def failed() -> str | None:
        return None if alive(pid) else f"exited:\n{_tail(host.log)}"

    _wait(f"agent of {host.name}", host.socket.exists, timeout, failed)


def _start_dockerd(plan: LabPlan, manifest: dict[str, Any],
                   echo: Callable[[str], None]) -> None:
    """dockerd in h1 (recorded before it starts), answering on its socket."""
    dockerd = plan.dockerd
    record = {**dockerd.record(), "argv": dockerd.argv()}
    manifest["docker"]["dockerd"] = record
    save_manifest(plan.dir, manifest)
    try:
        proc = dockerd.start()
        record["pid"], record["started"] = proc.pid, _now()
        save_manifest(plan.dir, manifest)
        took = dockerd.wait(proc.pid)
    except DockerdError as exc:
        raise LabError(f"dockerd in {dockerd.netns}: {exc}") from None
    echo(f"dockerd in {dockerd.netns} answering at {dockerd.host} after {took:.1f}s")


def lab_up(plan: LabPlan, *, agents: bool = True, install_cni: bool = True,
           cni_bin_dir: Path = DEFAULT_CNI_BIN_DIR, cooldown: float | None = None,
           agent_timeout: float = 30.0, keep_on_failure: bool = False,
           echo: Callable[[str], None] = click.echo) -> dict[str, Any]:
    """Build the lab; on failure remove what was built (unless ``keep_on_failure``)."""
    _require_root()
    netd, netctl = _bin("netd"), _bin("netctl")
    if agents and not agent_available(netd):
        raise LabError(f"'{netd} agent' is not available (yet): use --no-agents")
    if plan.docker_host and not agents:
        raise LabError("--docker and --docker-host need the agents (h1's serves the plugin)")
    if plan.start_dockerd and not os.access(lab_docker.DOCKERD, os.X_OK):
        raise LabError(f"{lab_docker.DOCKERD} is missing: install docker.io (make deps)")
    previous = load_manifest(plan.dir)
    if previous is not None and previous.get("prefix") not in (None, plan.prefix):
        raise LabError(f"{plan.dir} holds lab {previous.get('prefix')!r}; "
                       f"take it down first or use another --dir")
    leftover = [n for n in list_netns() if is_lab_netns(plan.prefix, n)]
    if previous is not None or leftover:
        echo(f"removing the previous lab {plan.prefix} first")
        lab_down(plan.dir, plan.prefix, cni_conf_dir=plan.cni_conf_dir, echo=echo)
    if plan.dir.exists() and any(plan.dir.iterdir()):
        raise LabError(f"{plan.dir} is not empty and holds no lab manifest: use another --dir")
    if plan.docker_host and lab_docker.plugin_served():
        raise LabError(f"{lab_docker.PLUGIN_SOCKET} is already served (another lab's or "
                       "host's agent): one Docker plugin 'netd' per machine")
    plan.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    started = time.monotonic()
    manifest: dict[str, Any] = {
        "version": MANIFEST_VERSION, "prefix": plan.prefix, "dir": str(plan.dir),
        "mode": plan.mode, "state": "building", "created": _now(),
        "subnet": str(SUBNET), "gateway": GATEWAY, "pool": POOL,
        "switch": {"netns": plan.switch_ns, "bridge": plan.bridge},
        "ipam": None, "ipam_url": plan.ipam_url, "token_file": str(plan.token_file),
        "namespaces": [], "conflists": [], "docker": None,
        "hosts": [{"name": h.name, "netns": h.netns, "address": h.address,
                   "uplink": UPLINK, "config": str(h.config), "socket": str(h.socket),
                   "network": h.network, "conflist": str(h.conflist), "agent": None}
                  for h in plan.hosts],
    }
    save_manifest(plan.dir, manifest)
    try:
        build_topology(plan, manifest)
        _start_ipam(plan, manifest, netd, cooldown)
        _check_hosts_reach_ipam(plan)
        _create_pool(plan, netctl)
        if install_cni:
            proc = _run([netd, "install-cni", "--bin-dir", str(cni_bin_dir)])
            if proc.returncode != 0:
                raise LabError(f"netd install-cni failed: {proc.stderr.strip()}")
        for host in plan.hosts:
            host.state_dir.mkdir(parents=True, exist_ok=True)
            atomic_write(host.config, agent_config_text(plan, host))
            manifest["conflists"].append(str(host.conflist))
            save_manifest(plan.dir, manifest)
            atomic_write(host.conflist, json.dumps(conflist_doc(plan, host), indent=2) + "\n")
        if plan.docker_host:
            manifest["docker"] = {"on": DOCKER_ON, "docker_host": plan.docker_host,
                                  "plugin_socket": str(lab_docker.PLUGIN_SOCKET),
                                  "dockerd": None}
            save_manifest(plan.dir, manifest)
        if agents:
            for host in plan.hosts:
                _start_agent(plan, host, manifest, netd, agent_timeout)
        if plan.start_dockerd:
            _start_dockerd(plan, manifest, echo)
        manifest["state"] = "up"
        manifest["agents"] = agents
        manifest["up_seconds"] = round(time.monotonic() - started, 2)
        save_manifest(plan.dir, manifest)
    except BaseException:
        if not keep_on_failure:
            with contextlib.suppress(Exception):
                lab_down(plan.dir, plan.prefix, cni_conf_dir=plan.cni_conf_dir,
                         echo=lambda _: None)
        raise
    return manifest


def _remove_dir_contents(directory: Path, manifest: dict[str, Any] | None) -> None:
    """Remove what the lab put into ``directory``, then the directory when empty."""
    names = {MANIFEST, "token", "ipam.db", "ipam.db-wal", "ipam.db-shm", "ipam.db-journal",
             "ipam.log"}
    for entry in list(directory.iterdir()) if directory.is_dir() else []:
        if entry.name in names or entry.name.startswith(f".{MANIFEST}."):
            entry.unlink(missing_ok=True)
        elif entry.is_dir() and re.fullmatch(r"h[0-9]+", entry.name):
            shutil.rmtree(entry, ignore_errors=True)
    with contextlib.suppress(OSError):
        directory.rmdir()


def lab_down(directory: Path, prefix: str | None = None, *,
             cni_conf_dir: Path = DEFAULT_CNI_CONF_DIR,
             echo: Callable[[str], None] = click.echo) -> list[str]:
    """Remove a lab: from its manifest, and by name. Safe to run twice and after a crash."""
    _require_root()
    directory = Path(directory).absolute()
    try:
        manifest = load_manifest(directory)
    except LabError as exc:
        echo(f"warning: {exc.message}; sweeping by name")
        manifest = None
    prefix = prefix or (manifest or {}).get("prefix") or DEFAULT_PREFIX
    validate_prefix(prefix)
    if manifest is not None and manifest.get("prefix") not in (None, prefix):
        raise LabError(f"{directory} holds lab {manifest.get('prefix')!r}, not {prefix!r}")
    removed: list[str] = []
    namespaces = {n for n in list_netns() if is_lab_netns(prefix, n)}
    namespaces |= {n for n in (manifest or {}).get("namespaces", []) if isinstance(n, str)}
    conflists = {Path(p) for p in (manifest or {}).get("conflists", []) if isinstance(p, str)}
    if cni_conf_dir.is_dir():
        conflists |= {p for p in cni_conf_dir.iterdir() if is_lab_conflist(prefix, p.name)}
    networks = sorted(p.name.removesuffix(".conflist") for p in conflists)

    # 1. containers first, while the agents can still unplug them
    names = [c["name"] for c in lab_containers(networks)]
    if names:
        proc = _run(["podman", "rm", "--force", "--ignore", "--time", "0", *names], timeout=300)
        if proc.returncode != 0:
            echo(f"warning: podman rm: {proc.stderr.strip()}")
        removed += [f"container {n}" for n in names]
    # 1b. the lab's dockerd: its containers (through its API, while h1's agent serves
    # the plugin), then dockerd, containerd, shims, mounts, cgroups, dirs (by name)
    docker = (manifest or {}).get("docker") or {}
    dockerd = docker.get("dockerd") or {}
    if dockerd.get("socket") and lab_docker.ping(dockerd["socket"]):
        removed += [f"docker container {n}"
                    for n in lab_docker.remove_containers(dockerd["socket"])]
    removed += [f"dockerd's {line}" for line in lab_docker.sweep(prefix)]
    # 2. processes: recorded ones, then anything else living in a lab namespace
    recorded = [(manifest or {}).get("ipam")]
    recorded += [h.get("agent") for h in (manifest or {}).get("hosts", [])]
    pids = [p for p in map(_recorded_process_alive, recorded) if p is not None]
    pids += pids_in_netns(namespaces)
    removed += [f"process {p} ({' '.join(_cmdline(p)[:4])})" for p in sorted(set(pids))]
    stop_pids(pids)
    # 3. namespaces (their links go with them), conflists, files
    for name in sorted(namespaces):
        if (NETNS_DIR / name).exists():
            _remove_netns(name)
            removed.append(f"netns {name}")
    for path in sorted(conflists):
        if path.exists():
            path.unlink()
            removed.append(f"conflist {path}")
    # a plugin socket h1's agent left behind (killed): dockerd would still try it
    plugin = Path(docker.get("plugin_socket") or lab_docker.PLUGIN_SOCKET)
    if docker and plugin.exists() and not lab_docker.plugin_served(plugin):
        plugin.unlink(missing_ok=True)
        removed.append(f"stale plugin socket {plugin}")
    _remove_dir_contents(directory, manifest)
    return removed


def lab_status(directory: Path, *, ping: bool = True) -> dict[str, Any]:
    """What runs: hosts, IPAM, containers and (``ping``) the reachability matrix."""
    directory = Path(directory).absolute()
    manifest = load_manifest(directory)
    if manifest is None:
        raise LabError(f"no lab in {directory} (no {MANIFEST}); start one with 'netd lab up'")
    present = set(list_netns())
    hosts = []
    for h in manifest.get("hosts", []):
        entry = {k: h.get(k) for k in ("name", "netns", "address", "network", "socket")}
        entry["netns_present"] = h.get("netns") in present
        agent = h.get("agent") or {}
        entry["agent_pid"] = agent.get("pid")
        entry["agent_running"] = _recorded_process_alive(agent) is not None
        entry["socket_present"] = Path(h.get("socket", "")).exists()
        entry["addresses"] = {}
        if entry["netns_present"]:
            with contextlib.suppress(Exception):
                entry["addresses"] = host_addresses(h["netns"])
        hosts.append(entry)
    ipam = manifest.get("ipam") or {}
    gw_ns = f"{manifest['prefix']}-gw"
    healthy = gw_ns in present and http_status_in_netns(
        gw_ns, IPAM_ADDRESS, IPAM_PORT, "/healthz") == 200
    networks = [h["network"] for h in manifest.get("hosts", [])]
    containers = lab_containers(networks)
    host_of = {h["network"]: h["name"] for h in manifest.get("hosts", [])}
    for c in containers:
        c["host"] = host_of.get(c["network"], "?")
    status: dict[str, Any] = {
        "prefix": manifest.get("prefix"), "dir": str(directory), "mode": manifest.get("mode"),
        "state": manifest.get("state"), "created": manifest.get("created"),
        "ipam": {"url": manifest.get("ipam_url"), "pid": ipam.get("pid"),
                 "running": _recorded_process_alive(ipam) is not None, "healthy": healthy},
        "gateway": manifest.get("gateway"), "pool": manifest.get("pool"),
        "hosts": hosts, "containers": containers, "podman": podman_available(),
        "docker": _docker_status(manifest.get("docker")),
    }
    if ping and containers:
        sources, targets, results = reachability(containers)
        status["reachability"] = {
            "sources": sources, "targets": targets,
            "results": [{"from": s, "to": t, "result": r} for (s, t), r in results.items()]}
    return status


def _docker_status(docker: dict[str, Any] | None) -> dict[str, Any] | None:
    if not docker:
        return None
    dockerd = docker.get("dockerd") or {}
    pid = dockerd.get("pid")
    return {"on": docker.get("on"), "docker_host": docker.get("docker_host"),
            "plugin_socket": docker.get("plugin_socket"),
            "plugin_served": lab_docker.plugin_served(Path(docker.get("plugin_socket") or
                                                           lab_docker.PLUGIN_SOCKET)),
            "dockerd_started_by_lab": bool(dockerd), "dockerd_pid": pid,
            "dockerd_answering": lab_docker.ping(lab_docker.socket_path(
                str(docker.get("docker_host") or "")))}


def format_status(status: dict[str, Any]) -> str:
    out = [f"lab {status['prefix']} ({status['mode']}, {status['state']}, "
           f"created {status['created']}) in {status['dir']}"]
    ipam = status["ipam"]
    out.append(f"ipam {ipam['url']}  pid {ipam['pid']}  "
               f"{'healthy' if ipam['healthy'] else 'NOT ANSWERING'}  "
               f"gateway {status['gateway']}  pool {status['pool']}")
    out.append("")
    rows = []
    for h in status["hosts"]:
        addrs = ", ".join(f"{k} {' '.join(v)}" for k, v in sorted(h["addresses"].items())
                          if k != "lo")
        agent = ("-" if h["agent_pid"] is None
                 else f"{h['agent_pid']} {'up' if h['agent_running'] else 'DOWN'}")
        rows.append([h["name"], h["netns"] if h["netns_present"] else f"{h['netns']} (GONE)",
                     h["address"], agent, "yes" if h["socket_present"] else "no", addrs or "-"])
    out.append(render_table(["HOST", "NETNS", "ADDRESS", "AGENT", "SOCKET", "ADDRESSES"], rows))
    docker = status.get("docker")
    if docker:
        who = (f"dockerd pid {docker['dockerd_pid']} (the lab's)"
               if docker["dockerd_started_by_lab"] else "dockerd (yours)")
        out.append(f"docker: {who} {docker['docker_host']} "
                   f"{'answering' if docker['dockerd_answering'] else 'NOT ANSWERING'}; "
                   f"plugin netd by {docker['on']}'s agent "
                   f"{'served' if docker['plugin_served'] else 'NOT SERVED'}")
    out.append("")
    if not status["podman"]:
        out.append("containers: podman is not installed")
    elif not status["containers"]:
        out.append("containers: none (podman run --network PREFIX-hN ...)")
    else:
        out.append(render_table(
            ["CONTAINER", "ID", "HOST", "NETWORK", "IP", "MAC", "STATE"],
            [[c["name"], c["id"], c["host"], c["network"], c.get("ip", ""), c.get("mac", ""),
              c["state"]] for c in status["containers"]]))
    reach = status.get("reachability")
    if reach and reach["sources"]:
        results = {(r["from"], r["to"]): r["result"] for r in reach["results"]}
        out.append("")
        out.append(f"reachability (ping from row to column; gw = {status['gateway']}):")
        out.append(render_matrix(reach["sources"], reach["targets"], results))
        if "noraw" in results.values():
            out.append("noraw: the container cannot ping without NET_RAW "
                       "(podman run --cap-add NET_RAW)")
    return "\n".join(out)


# --- click ---------------------------------------------------------------------------


def _dir_option() -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return click.option("--dir", "directory", type=click.Path(file_okay=False, path_type=Path),
                        default=DEFAULT_DIR, show_default=True,
                        help="Lab state: manifest, IPAM store, token, agent configs and logs.")


@click.group("lab")
def lab_cli() -> None:
    """A data centre in network namespaces: switch, gateway, IPAM, hosts with agents."""


@lab_cli.command("up")
@click.option("--mode", type=click.Choice(MODES), default="l2", show_default=True)
@click.option("--hosts", type=click.IntRange(1, MAX_HOSTS), default=2, show_default=True)
@click.option("--prefix", default=DEFAULT_PREFIX, show_default=True,
              help="Name prefix of every namespace, link and podman network.")
@_dir_option()
@click.option("--agents/--no-agents", default=True, show_default=True,
              help="Start 'netd agent' in every host namespace.")
@click.option("--install-cni/--no-install-cni", default=True, show_default=True,
              help="Install netd-cni and netd-ipam into --cni-bin-dir.")
@click.option("--cni-bin-dir", type=click.Path(file_okay=False, path_type=Path),
              default=DEFAULT_CNI_BIN_DIR, show_default=True)
@click.option("--cni-conf-dir", type=click.Path(file_okay=False, path_type=Path),
              default=DEFAULT_CNI_CONF_DIR, show_default=True,
              help="Where the per-host podman network conflists go.")
@click.option("--cooldown", type=click.FloatRange(min=0), default=None,
              help="IPAM: seconds a released address rests (server default when unset).")
@click.option("--docker", is_flag=True,
              help=f"Start a dockerd in {DOCKER_ON}'s namespace (Debian docker.io) and have "
                   f"{DOCKER_ON}'s agent serve the Docker plugin 'netd' for it.")
@click.option("--docker-host", default=None, metavar="unix:///PATH",
              help=f"Have {DOCKER_ON}'s agent serve the Docker plugin 'netd' for a dockerd "
                   "you start (in its namespace) with this socket.")
@click.option("--keep-on-failure", is_flag=True, help="Leave a half-built lab for debugging.")
def up_cmd(mode: str, hosts: int, prefix: str, directory: Path, agents: bool,
           install_cni: bool, cni_bin_dir: Path, cni_conf_dir: Path, cooldown: float | None,
           docker: bool, docker_host: str | None, keep_on_failure: bool) -> None:
    """Build the lab (a previous one with the same prefix is removed first)."""
    plan = plan_lab(prefix, hosts, directory, mode, cni_conf_dir, docker=docker,
                    docker_host=docker_host)
    manifest = lab_up(plan, agents=agents, install_cni=install_cni, cni_bin_dir=cni_bin_dir,
                      cooldown=cooldown, keep_on_failure=keep_on_failure)
    click.echo(f"lab {plan.prefix} up in {manifest['up_seconds']}s: IPAM {plan.ipam_url} "
               f"in {plan.gateway_ns}, pool {POOL} {SUBNET} (gateway {GATEWAY})")
    for h in plan.hosts:
        agent = (f"agent pid {manifest['hosts'][h.index - 1]['agent']['pid']}" if agents
                 else "no agent")
        click.echo(f"  {h.name}: netns {h.netns}, {UPLINK} {h.address}, {agent}, "
                   f"podman network {h.network}")
    if plan.docker_host:
        started = "the lab's dockerd" if plan.start_dockerd else "your dockerd"
        click.echo(f"  docker: {DOCKER_ON}'s agent serves plugin netd for {started} at "
                   f"{plan.docker_host}")
        click.echo(f"try: docker -H {plan.docker_host} network create -d netd --ipam-driver "
                   f"netd --ipam-opt pool={POOL} --subnet {SUBNET} NAME")
    click.echo(f"try: podman run -d --network {plan.hosts[0].network} --cap-add NET_RAW "
               f"--rootfs DIR sleep 300; netd lab status --dir {plan.dir}")


@lab_cli.command("status")
@_dir_option()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--ping/--no-ping", default=True, show_default=True,
              help="Ping every container and the gateway from every container.")
def status_cmd(directory: Path, as_json: bool, ping: bool) -> None:
    """Hosts, IPAM, containers and the reachability matrix."""
    status = lab_status(directory, ping=ping)
    click.echo(json.dumps(status, indent=2, sort_keys=True) if as_json
               else format_status(status))


@lab_cli.command("down")
@click.option("--prefix", default=None,
              help=f"Lab to remove (default: the manifest's, else {DEFAULT_PREFIX}).")
@_dir_option()
@click.option("--cni-conf-dir", type=click.Path(file_okay=False, path_type=Path),
              default=DEFAULT_CNI_CONF_DIR, show_default=True)
def down_cmd(prefix: str | None, directory: Path, cni_conf_dir: Path) -> None:
    """Remove everything the lab made (also after a crash)."""
    if prefix is not None:
        validate_prefix(prefix)
    removed = lab_down(directory, prefix, cni_conf_dir=cni_conf_dir)
    for line in removed:
        click.echo(f"removed {line}")
    click.echo("lab down" if removed else "nothing to remove")
