"""What every lab mode shares: the plan, the manifest, the IPAM, the agents, up/down/status.

A mode module (:mod:`netd.lab.l2`; the OVS and BGP labs add theirs) says
what is its own: its infrastructure namespaces by role, the topology between
them and the hosts, the pools, and the mode's table in each host's
agent.toml. Everything else happens here the same way for every mode.

Everything the lab makes is recorded, as it is made, in the manifest
``DIR/lab.json``: ``netd lab down`` reads it and also sweeps by name
(namespaces ``PREFIX-<role>`` and ``PREFIX-hN``, conflists
``PREFIX-hN.conflist``, every process living in a lab namespace, a dockerd of
the prefix), so it cleans up after a crash too.

Docker (docs/DOCKER.md): ``--docker`` starts a dockerd in h1's namespace
(:mod:`netd.lab.docker`; socket ``unix:///run/PREFIX/docker.sock``) and h1's
agent serves the plugin ``netd`` for it. ``--docker-host URL`` only
configures h1's agent that way, for a dockerd the caller starts in h1.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import click

from netd.cni.install import conflist
from netd.dataplane.netns import (
    NETNS_RUN_DIR,
    create_netns,
    list_netns,
    pids_in_netns,
    remove_netns,
    run_in_netns,
)
from netd.files import atomic_write
from netd.lab import bgp, l2, vlan
from netd.lab import docker as lab_docker
from netd.lab.containers import lab_containers, podman_available, reachability
from netd.lab.docker import Dockerd, DockerdError
from netd.lab.procs import (
    alive,
    bin_path,
    cmdline,
    now,
    ns_argv,
    recorded_process_alive,
    run,
    start_process,
    stop_pids,
    tail,
)

DEFAULT_PREFIX = "ndlab"
DEFAULT_DIR = Path("/run/netd-lab")
DEFAULT_CNI_CONF_DIR = Path("/etc/cni/net.d")
DEFAULT_CNI_BIN_DIR = Path("/opt/cni/bin")
NETNS_DIR = Path(NETNS_RUN_DIR)
MANIFEST = "lab.json"
MANIFEST_VERSION = 1
IPAM_PORT = 9650
ETCD = "/usr/bin/etcd"
ETCD_MEMBERS = 3
ETCD_BASE_PORT = 23790  # client ports 23790, 23792, 23794; peers one above (IPAM netns)
STORES = ("sqlite", "etcd")
DOCKER_ON = "h1"  # the host whose agent serves the Docker plugin (--docker, --docker-host)
PREFIX_RE = re.compile(r"^[a-z][a-z0-9]{1,9}$")

#: mode -> the module that builds it
MODES: dict[str, ModuleType] = {"l2": l2, "vlan": vlan, "bgp": bgp}

Manifest = dict[str, Any]


class LabError(click.ClickException):
    """A lab step failed; the message says which and why."""


def mode_of(name: str) -> ModuleType:
    try:
        return MODES[name]
    except KeyError:
        raise click.BadParameter(f"{name!r}: the lab builds {', '.join(MODES)}",
                                 param_hint="--mode") from None


# --- pure: the plan ------------------------------------------------------------------


@dataclass(frozen=True)
class NetworkPlan:
    """One podman network of a host: its name, pool and conflist file."""

    name: str  # PREFIX-h1 (l2), PREFIX-h1-v100 (vlan)
    pool: str
    conflist: Path


@dataclass(frozen=True)
class HostPlan:
    index: int
    name: str  # h1
    netns: str  # PREFIX-h1
    address: str  # 198.18.0.11
    dir: Path
    network: str  # the host's first podman network (PREFIX-h1)
    conflist: Path
    rack: str | None = None
    networks: tuple[NetworkPlan, ...] = ()  # every podman network of the host

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
    # the BGP lab's racks: how many, hosts in each, two ToRs per rack
    racks: int = 0
    hosts_per_rack: int = 0
    dual_homed: bool = False
    # the IPAM's store: "sqlite" (a file in the lab dir) or "etcd" (3 members in the
    # IPAM's namespace, on its loopback)
    store: str = "sqlite"

    @property
    def etcd_endpoints(self) -> list[str]:
        return [f"127.0.0.1:{ETCD_BASE_PORT + 2 * i}" for i in range(ETCD_MEMBERS)]

    @property
    def store_url(self) -> str:
        if self.store == "etcd":
            return f"etcd://{','.join(self.etcd_endpoints)}/netd/ipam/"
        return f"sqlite:///{self.db}"

    @property
    def impl(self) -> ModuleType:
        return mode_of(self.mode)

    @property
    def dockerd(self) -> Dockerd:
        """The dockerd ``--docker`` runs in h1 (names only; nothing is started)."""
        host = next(h for h in self.hosts if h.name == DOCKER_ON)
        return Dockerd(self.prefix, host.netns, host.dir / "dockerd.log")

    @property
    def roles(self) -> dict[str, str]:
        """The lab's own infrastructure namespaces, by role (``switch``, ``gateway``...)."""
        out = dict(self.impl.roles(self.prefix))
        if getattr(self.impl, "RACKS", False):
            out |= self.impl.rack_roles(self)
        return out

    @property
    def ipam_ns(self) -> str:
        return self.roles[self.impl.ipam_role()]

    @property
    def gateway_ns(self) -> str:  # the name the tests and benchmarks know
        return self.ipam_ns

    @property
    def namespaces(self) -> list[str]:
        return [*self.roles.values(), *(h.netns for h in self.hosts)]

    @property
    def ipam_address(self) -> str:
        return str(self.impl.IPAM_ADDRESS)

    @property
    def ipam_url(self) -> str:
        return f"http://{self.ipam_address}:{IPAM_PORT}"

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
             docker_host: str | None = None, racks: int | None = None,
             hosts_per_rack: int | None = None, dual_homed: bool = False,
             store: str = "sqlite") -> LabPlan:
    """Every name, address and path of a lab (pure).

    ``docker``: the lab starts a dockerd in h1 and h1's agent serves the plugin
    for it; ``docker_host``: h1's agent serves the plugin for that dockerd.
    """
    validate_prefix(prefix)
    impl = mode_of(mode)
    if store not in STORES:
        raise click.BadParameter(f"{store!r}: one of {', '.join(STORES)}", param_hint="--store")
    if docker and docker_host:
        raise click.BadParameter("give --docker (the lab starts dockerd) or --docker-host "
                                 "(you start it), not both", param_hint="--docker-host")
    if docker_host is not None and not re.fullmatch(r"unix:///\S+", docker_host):
        raise click.BadParameter(f"{docker_host!r}: unix:///PATH of dockerd's socket",
                                 param_hint="--docker-host")
    in_racks = bool(getattr(impl, "RACKS", False))
    if not in_racks and (racks is not None or hosts_per_rack is not None or dual_homed):
        raise click.BadParameter(f"racks are for --mode bgp, not {mode}", param_hint="--racks")
    if in_racks:
        racks, hosts_per_rack = racks or 2, hosts_per_rack or 2
        if not 1 <= racks <= impl.MAX_RACKS or not 1 <= hosts_per_rack <= impl.MAX_PER_RACK:
            raise click.BadParameter(f"1-{impl.MAX_RACKS} racks of 1-{impl.MAX_PER_RACK} "
                                     "hosts", param_hint="--racks")
        hosts = racks * hosts_per_rack
    if not 1 <= hosts <= impl.MAX_HOSTS:
        raise click.BadParameter(f"{hosts}: 1-{impl.MAX_HOSTS} hosts", param_hint="--hosts")
    directory = Path(directory).absolute()
    plans = []
    for i in range(1, hosts + 1):
        name = f"h{i}"
        rack: str | None = None
        address = impl.host_address(i) if not in_racks else ""
        if in_racks:
            assert hosts_per_rack is not None
            rack_no, pos = impl.rack_of(i, hosts_per_rack)
            rack, address = f"r{rack_no}", impl.host_address_in(rack_no, pos)
        networks = tuple(
            NetworkPlan(f"{prefix}-{name}{suffix}", pool,
                        cni_conf_dir / f"{prefix}-{name}{suffix}.conflist")
            for suffix, pool in impl.host_networks())
        plans.append(HostPlan(
            index=i, name=name, netns=f"{prefix}-{name}", address=address,
            dir=directory / name, network=networks[0].name, conflist=networks[0].conflist,
            rack=rack, networks=networks))
    if docker:
        docker_host = Dockerd(prefix, f"{prefix}-{DOCKER_ON}",
                              directory / DOCKER_ON / "dockerd.log").host
    return LabPlan(prefix=prefix, dir=directory, mode=mode, hosts=tuple(plans),
                   cni_conf_dir=cni_conf_dir, docker_host=docker_host, start_dockerd=docker,
                   racks=racks or 0, hosts_per_rack=hosts_per_rack or 0,
                   dual_homed=dual_homed, store=store)


def _toml_str(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid TOML basic string


def agent_config_text(plan: LabPlan, host: HostPlan) -> str:
    """The host's ``agent.toml`` (keys as in shared/DESIGN.md); the mode's table last."""
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
        *plan.impl.agent_table(plan, host),
        "",
    ])


def conflist_doc(plan: LabPlan, host: HostPlan,
                 network: NetworkPlan | None = None) -> dict[str, Any]:
    """A podman network of one host: ``netd-cni`` on its pool via that host's agent."""
    net = network or host.networks[0]
    doc: dict[str, Any] = conflist(net.name, net.pool, str(host.socket))
    return doc


def is_lab_netns(prefix: str, name: str) -> bool:
    """Whether namespace ``name`` is one a lab with ``prefix`` makes (any mode)."""
    roles = {r for impl in MODES.values() for r in impl.roles(prefix).values()}
    return name in roles or re.fullmatch(
        rf"{re.escape(prefix)}-(h[0-9]+|sw-r[0-9]+|tor-r[0-9]+[ab]?)", name) is not None


def is_lab_conflist(prefix: str, filename: str) -> bool:
    return re.fullmatch(rf"{re.escape(prefix)}-h[0-9]+(-[a-z0-9]+)?\.conflist",
                        filename) is not None


def render_table(header: list[str], rows: list[list[Any]]) -> str:
    """Aligned columns, two spaces apart."""
    table = [list(map(str, header)), *[list(map(str, r)) for r in rows]]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in table)


def render_matrix(sources: list[str], targets: list[str],
                  results: dict[tuple[str, str], str]) -> str:
    """Rows ping columns: ok, FAIL, noraw (no NET_RAW to ping), noexec, or - (itself)."""
    rows = [[src, *(results.get((src, tgt), "-") for tgt in targets)] for src in sources]
    return render_table(["from \\ to", *targets], rows)


# --- edges: manifest, namespaces -----------------------------------------------------


def load_manifest(directory: Path) -> Manifest | None:
    try:
        doc = json.loads((directory / MANIFEST).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise LabError(f"cannot read {directory / MANIFEST}: {exc}") from None
    return doc if isinstance(doc, dict) else None


def save_manifest(directory: Path, manifest: Manifest) -> None:
    atomic_write(directory / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True) + "\n",
                 0o600)


def in_netns(name: str, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` in a short-lived thread that has entered namespace ``name``."""
    return run_in_netns(name, fn)


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

    return int(run_in_netns(netns_name, get))


def host_addresses(netns_name: str) -> dict[str, list[str]]:
    """{ifname: [address/prefixlen, ...]} of a namespace (IPv4)."""
    from netd.dataplane.netlink import Netlink

    out: dict[str, list[str]] = {}
    with Netlink(netns_name) as nl:
        for link in nl.links():
            found = [a.cidr for a in nl.addresses(link.name, family=socket.AF_INET)]
            if found:
                out[link.name] = found
    return out


# --- up ------------------------------------------------------------------------------


def _require_root() -> None:
    if os.geteuid() != 0:
        raise LabError("the lab creates network namespaces: run it as root")
    if shutil.which("ip") is None:
        raise LabError("'ip' (iproute2) is needed to start processes in namespaces")


def agent_available(netd: str) -> bool:
    try:
        return run([netd, "agent", "--help"], timeout=30).returncode == 0
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


def build_namespaces(plan: LabPlan, manifest: Manifest) -> None:
    for name in plan.namespaces:
        manifest["namespaces"].append(name)  # recorded before it exists: down tolerates both
        save_manifest(plan.dir, manifest)
        create_netns(name)


def _start_etcd(plan: LabPlan, manifest: Manifest) -> None:
    """A 3-member etcd on the IPAM namespace's loopback (``--store etcd``)."""
    if not os.access(ETCD, os.X_OK):
        raise LabError(f"{ETCD} is missing: install etcd-server (make deps)")
    names = [f"m{i}" for i in range(ETCD_MEMBERS)]
    peers = [f"http://127.0.0.1:{ETCD_BASE_PORT + 2 * i + 1}" for i in range(ETCD_MEMBERS)]
    initial = ",".join(f"{n}={u}" for n, u in zip(names, peers, strict=True))
    procs: dict[str, Any] = {}
    for name, peer, client in zip(names, peers, plan.etcd_endpoints, strict=True):
        data = plan.dir / "etcd" / name
        data.mkdir(parents=True, mode=0o700, exist_ok=True)
        argv = [ETCD, "--name", name, "--data-dir", str(data),
                "--listen-client-urls", f"http://{client}",
                "--advertise-client-urls", f"http://{client}",
                "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                "--initial-cluster", initial, "--initial-cluster-state", "new",
                "--initial-cluster-token", plan.prefix, "--max-txn-ops", "10000",
                "--auto-compaction-mode", "periodic", "--auto-compaction-retention", "1h"]
        procs[name] = start_process(plan.ipam_ns, argv, plan.dir / "etcd" / f"{name}.log")
    manifest["etcd"] = {"lab": {"processes": procs, "endpoints": plan.etcd_endpoints}}
    save_manifest(plan.dir, manifest)

    def listening() -> bool:
        def probe() -> bool:
            for ep in plan.etcd_endpoints:
                host, port = ep.rsplit(":", 1)
                with socket.socket() as sock:
                    sock.settimeout(0.5)
                    if sock.connect_ex((host, int(port))) != 0:
                        return False
            return True

        return bool(in_netns(plan.ipam_ns, probe))

    def failed() -> str | None:
        dead = [n for n, rec in procs.items() if not alive(rec["pid"])]
        return f"member {dead[0]} exited:\n{tail(plan.dir / 'etcd' / f'{dead[0]}.log')}" \
            if dead else None

    _wait("etcd", listening, 30, failed)


def _start_ipam(plan: LabPlan, manifest: Manifest, netd: str, cooldown: float | None) -> None:
    token = secrets.token_hex(24)
    atomic_write(plan.token_file, token + "\n", 0o600)
    if plan.store == "etcd":
        _start_etcd(plan, manifest)
    argv = [netd, "ipam", "serve", "--listen", f"{plan.ipam_address}:{IPAM_PORT}",
            "--store", plan.store_url, "--token-file", str(plan.token_file)]
    if cooldown is not None:
        argv += ["--cooldown", str(cooldown)]
    manifest["ipam"] = start_process(plan.ipam_ns, argv, plan.ipam_log)
    save_manifest(plan.dir, manifest)
    pid = manifest["ipam"]["pid"]

    def failed() -> str | None:
        return None if alive(pid) else f"exited:\n{tail(plan.ipam_log)}"

    _wait("IPAM server", lambda: http_status_in_netns(
        plan.ipam_ns, plan.ipam_address, IPAM_PORT, "/healthz") == 200, 30, failed)


def _netctl(plan: LabPlan, netctl: str, *args: str) -> subprocess.CompletedProcess[str]:
    return run(ns_argv(plan.ipam_ns, [netctl, "--server", plan.ipam_url,
                                      "--token-file", str(plan.token_file), *args]))


def _create_pools(plan: LabPlan, netctl: str) -> None:
    for pool in plan.impl.pools(plan):
        proc = _netctl(plan, netctl, "pool", "create", str(pool["name"]), *pool["args"])
        if proc.returncode != 0:
            raise LabError(f"netctl pool create {pool['name']} failed: "
                           f"{(proc.stderr or proc.stdout).strip()}")


def _check_hosts_reach_ipam(plan: LabPlan) -> None:
    for host in plan.hosts:
        def reaches(netns_name: str = host.netns) -> bool:
            return http_status_in_netns(netns_name, plan.ipam_address, IPAM_PORT,
                                        "/healthz") == 200

        _wait(f"{host.name} -> IPAM", reaches, 10)


def _start_agent(plan: LabPlan, host: HostPlan, manifest: Manifest, netd: str,
                 timeout: float) -> None:
    record = next(h for h in manifest["hosts"] if h["name"] == host.name)
    host.socket.unlink(missing_ok=True)
    record["agent"] = start_process(host.netns, [netd, "agent", "--config", str(host.config)],
                                    host.log)
    save_manifest(plan.dir, manifest)
    pid = record["agent"]["pid"]

    def failed() -> str | None:
        return None if alive(pid) else f"exited:\n{tail(host.log)}"

    _wait(f"agent of {host.name}", host.socket.exists, timeout, failed)


def _start_dockerd(plan: LabPlan, manifest: Manifest, echo: Callable[[str], None]) -> None:
    """dockerd in h1 (recorded before it starts), answering on its socket."""
    dockerd = plan.dockerd
    record = {**dockerd.record(), "argv": dockerd.argv()}
    manifest["docker"]["dockerd"] = record
    save_manifest(plan.dir, manifest)
    try:
        proc = dockerd.start()
        record["pid"], record["started"] = proc.pid, now()
        save_manifest(plan.dir, manifest)
        took = dockerd.wait(proc.pid)
    except DockerdError as exc:
        raise LabError(f"dockerd in {dockerd.netns}: {exc}") from None
    echo(f"dockerd in {dockerd.netns} answering at {dockerd.host} after {took:.1f}s")


def lab_up(plan: LabPlan, *, agents: bool = True, install_cni: bool = True,
           cni_bin_dir: Path = DEFAULT_CNI_BIN_DIR, cooldown: float | None = None,
           agent_timeout: float = 30.0, keep_on_failure: bool = False,
           echo: Callable[[str], None] = click.echo) -> Manifest:
    """Build the lab; on failure remove what was built (unless ``keep_on_failure``)."""
    _require_root()
    try:
        netd, netctl = bin_path("netd"), bin_path("netctl")
    except FileNotFoundError as exc:
        raise LabError(str(exc)) from None
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
    pools = [{k: v for k, v in p.items() if k != "args"} for p in plan.impl.pools(plan)]
    manifest: Manifest = {
        "version": MANIFEST_VERSION, "prefix": plan.prefix, "dir": str(plan.dir),
        "mode": plan.mode, "state": "building", "created": now(),
        "subnet": str(plan.impl.SUBNET), "gateway": plan.impl.GATEWAY,
        "pool": plan.impl.POOL, "pools": pools, "roles": plan.roles,
        "ipam": None, "ipam_url": plan.ipam_url, "token_file": str(plan.token_file),
        "store": plan.store_url,
        "namespaces": [], "conflists": [], "docker": None,
        "hosts": [{"name": h.name, "netns": h.netns, "address": h.address, "rack": h.rack,
                   "config": str(h.config), "socket": str(h.socket),
                   "network": h.network, "pool": h.networks[0].pool,
                   "conflist": str(h.conflist),
                   "networks": [{"name": n.name, "pool": n.pool, "conflist": str(n.conflist)}
                                for n in h.networks],
                   "agent": None}
                  for h in plan.hosts],
    }
    save_manifest(plan.dir, manifest)
    try:
        build_namespaces(plan, manifest)
        plan.impl.build(plan, manifest)
        save_manifest(plan.dir, manifest)
        _start_ipam(plan, manifest, netd, cooldown)
        _check_hosts_reach_ipam(plan)
        _create_pools(plan, netctl)
        if install_cni:
            proc = run([netd, "install-cni", "--bin-dir", str(cni_bin_dir)])
            if proc.returncode != 0:
                raise LabError(f"netd install-cni failed: {proc.stderr.strip()}")
        for host in plan.hosts:
            host.state_dir.mkdir(parents=True, exist_ok=True)
            atomic_write(host.config, agent_config_text(plan, host))
            for net in host.networks:
                manifest["conflists"].append(str(net.conflist))
                save_manifest(plan.dir, manifest)
                atomic_write(net.conflist,
                             json.dumps(conflist_doc(plan, host, net), indent=2) + "\n")
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


# --- down ----------------------------------------------------------------------------


def _remove_dir_contents(directory: Path) -> None:
    """Remove what the lab put into ``directory``, then the directory when empty."""
    names = {MANIFEST, "token", "ipam.db", "ipam.db-wal", "ipam.db-shm", "ipam.db-journal",
             "ipam.log"}
    for entry in list(directory.iterdir()) if directory.is_dir() else []:
        if entry.name in names or entry.name.startswith(f".{MANIFEST}."):
            entry.unlink(missing_ok=True)
        elif entry.is_dir() and re.fullmatch(r"h[0-9]+|ovs-[a-z]+|etcd", entry.name):
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
        proc = run(["podman", "rm", "--force", "--ignore", "--time", "0", *names], timeout=300)
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
    for kind in ("ovs", "frr", "etcd"):  # the vlan lab's OVS, the BGP lab's FRR, etcd
        for instance in ((manifest or {}).get(kind) or {}).values():
            recorded += list(((instance or {}).get("processes") or {}).values())
    pids = [p for p in map(recorded_process_alive, recorded) if p is not None]
    pids += pids_in_netns(namespaces, alive)
    removed += [f"process {p} ({' '.join(cmdline(p)[:4])})" for p in sorted(set(pids))]
    stop_pids(pids)
    # 3. namespaces (their links go with them), conflists, files
    for name in sorted(namespaces):
        if (NETNS_DIR / name).exists():
            remove_netns(name)
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
    _remove_dir_contents(directory)
    removed += bgp.remove_frr_files(prefix)
    return removed


# --- status ----------------------------------------------------------------------------


def lab_status(directory: Path, *, ping: bool = True) -> dict[str, Any]:
    """What runs: hosts, IPAM, containers and (``ping``) the reachability matrix.

    The keys scripts rely on (``netd lab status --json``): ``mode``, ``prefix``,
    ``hosts`` (``name``, ``netns``, ``address``, ``agent_socket``,
    ``agent_pid``, ``rack``), ``pools`` (``name``, ``cidr``, ``gateway``,
    ``vlan``), ``networks`` (``name``, ``host``, ``pool``) and ``namespaces``
    (the lab's own infrastructure namespaces by role).
    """
    directory = Path(directory).absolute()
    manifest = load_manifest(directory)
    if manifest is None:
        raise LabError(f"no lab in {directory} (no {MANIFEST}); start one with 'netd lab up'")
    prefix = str(manifest.get("prefix"))
    impl = mode_of(str(manifest.get("mode") or "l2"))
    roles = manifest.get("roles") or dict(impl.roles(prefix))
    present = set(list_netns())
    hosts = []
    for h in manifest.get("hosts", []):
        entry = {k: h.get(k) for k in ("name", "netns", "address", "network", "socket")}
        entry["agent_socket"] = h.get("socket")
        entry["rack"] = h.get("rack")
        entry["netns_present"] = h.get("netns") in present
        agent = h.get("agent") or {}
        entry["agent_pid"] = agent.get("pid")
        entry["agent_running"] = recorded_process_alive(agent) is not None
        entry["socket_present"] = Path(h.get("socket", "")).exists()
        entry["dataplane"] = _driver_status(h) if entry["agent_running"] else None
        entry["addresses"] = {}
        if entry["netns_present"]:
            with contextlib.suppress(Exception):
                entry["addresses"] = host_addresses(h["netns"])
        hosts.append(entry)
    ipam = manifest.get("ipam") or {}
    ipam_ns = roles.get(impl.ipam_role(), f"{prefix}-gw")
    healthy = ipam_ns in present and http_status_in_netns(
        ipam_ns, str(impl.IPAM_ADDRESS), IPAM_PORT, "/healthz") == 200
    nets = [(n, h) for h in manifest.get("hosts", []) for n in _host_networks(h)]
    networks = [n["name"] for n, _ in nets]
    containers = lab_containers(networks)
    host_of = {n["name"]: h["name"] for n, h in nets}
    for c in containers:
        c["host"] = host_of.get(c["network"], "?")
    pools = manifest.get("pools") or [{"name": manifest.get("pool"),
                                       "cidr": manifest.get("subnet"),
                                       "gateway": manifest.get("gateway"), "vlan": None}]
    status: dict[str, Any] = {
        "prefix": prefix, "dir": str(directory), "mode": manifest.get("mode"),
        "state": manifest.get("state"), "created": manifest.get("created"),
        "ipam": {"url": manifest.get("ipam_url"), "pid": ipam.get("pid"),
                 "store": manifest.get("store"),
                 "running": recorded_process_alive(ipam) is not None, "healthy": healthy},
        "gateway": manifest.get("gateway"), "pool": manifest.get("pool"),
        "pools": pools,
        "networks": [{"name": n["name"], "host": h.get("name"),
                      "pool": n.get("pool") or manifest.get("pool")} for n, h in nets],
        "namespaces": roles,
        "hosts": hosts, "containers": containers, "podman": podman_available(),
        "docker": _docker_status(manifest.get("docker")),
    }
    if ping and containers:
        sources, targets, results = reachability(containers, str(manifest.get("gateway")))
        status["reachability"] = {
            "sources": sources, "targets": targets,
            "results": [{"from": s, "to": t, "result": r} for (s, t), r in results.items()]}
    return status


def _driver_status(host: dict[str, Any]) -> dict[str, Any] | None:
    """The host's dataplane as its agent reports it (the BGP mode: sessions, routes)."""
    from netd.cni.server import call

    try:
        answer = call(str(host.get("socket", "")), {"command": "AGENT_STATUS"}, timeout=3)
    except Exception:
        return None
    driver = (answer.get("result") or {}).get("driver")
    return dict(driver) if isinstance(driver, dict) else None


def bgp_summary(dataplane: dict[str, Any] | None) -> str:
    """``198.18.1.1 up 3 rcvd`` per peer, and the routes installed (lab status)."""
    speaker = (dataplane or {}).get("speaker") or {}
    peers = speaker.get("peers") or {}
    if not peers:
        return "-"
    text = ", ".join(f"{p} {v.get('state')} {v.get('received', 0)} rcvd"
                     for p, v in sorted(peers.items()))
    return f"{text}; {(dataplane or {}).get('routes_installed', 0)} installed"


def _host_networks(host: dict[str, Any]) -> list[dict[str, Any]]:
    """A host record's networks (a manifest written before hosts had several: its one)."""
    return list(host.get("networks") or [{"name": host.get("network"),
                                          "pool": host.get("pool")}])


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
               + "  ".join(f"pool {p['name']} {p.get('cidr', '')}"
                           + (f" VLAN {p['vlan']}" if p.get("vlan") else "")
                           + f" gateway {p.get('gateway') or '-'}" for p in status["pools"]))
    out.append("")
    rows = []
    for h in status["hosts"]:
        addrs = ", ".join(f"{k} {' '.join(v)}" for k, v in sorted(h["addresses"].items())
                          if k != "lo")
        agent = ("-" if h["agent_pid"] is None
                 else f"{h['agent_pid']} {'up' if h['agent_running'] else 'DOWN'}")
        row = [h["name"], h["netns"] if h["netns_present"] else f"{h['netns']} (GONE)",
               h["address"], agent, "yes" if h["socket_present"] else "no", addrs or "-"]
        if status.get("mode") == "bgp":
            row[1:1] = [h.get("rack") or "-"]
            row.append(bgp_summary(h.get("dataplane")))
        rows.append(row)
    header = ["HOST", "NETNS", "ADDRESS", "AGENT", "SOCKET", "ADDRESSES"]
    if status.get("mode") == "bgp":
        header = ["HOST", "RACK", *header[1:], "BGP"]
    out.append(render_table(header, rows))
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
