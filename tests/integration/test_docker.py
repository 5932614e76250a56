"""The Docker network and IPAM driver ``netd`` with a real dockerd (issue 4).

A two-host L2 lab (``netd lab up``): switch, gateway 198.18.0.1 with the IPAM
at 198.18.0.2, hosts h1 and h2 whose ``bond0`` is on ``br0``. dockerd 20.10
(Debian docker.io) runs in h1's network namespace (tests/support/docker.py
says how and why), and h1's agent serves the plugin socket
``/run/docker/plugins/netd.sock`` (``docker_plugin = true``). Every container
is a busybox-static image made with ``docker import``. ``netd lab up
--docker-host`` writes h1's agent config with the plugin on; the tests start
(and restart) their own dockerd.

The lab pool ``lab`` (198.18.0.0/24) is the hosts' own subnet, so Docker
networks on it name ``--subnet 198.18.0.0/24``: libnetwork checks a pool it
was not told against the host's routes and would give it back forever (the
driver refuses that loop with a message saying so, tested below).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import shutil
import socket
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from netd import lab as labmod
from netd.dataplane.arp import ArpSocket
from tests.conftest import bin_path, require
from tests.support import docker as dk

pytestmark = [pytest.mark.real, pytest.mark.slow]

POOL = "lab"
SUBNET = "198.18.0.0/24"
GATEWAY = "198.18.0.1"
H2 = "198.18.0.12"
IPAM_URL = "http://198.18.0.2:9650"
NET = "dnet"


def wait_for(what: str, check: Callable[[], bool], timeout: float,
             interval: float = 0.05) -> float:
    start = time.monotonic()
    while True:
        if check():
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise AssertionError(f"{what}: not within {timeout}s")
        time.sleep(interval)


@dataclass
class DockerLab:
    prefix: str
    dir: Path
    dockerd: dk.TestDockerd
    config: Path
    _guard: threading.Lock = field(default_factory=threading.Lock)

    # --- lab and IPAM ------------------------------------------------------------------

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([bin_path("netd"), "lab", *args], capture_output=True,
                              text=True, timeout=300, check=False)
        if check and proc.returncode != 0:
            raise AssertionError(f"netd lab {' '.join(args)}: {proc.stdout}\n{proc.stderr}")
        return proc

    def ns(self, name: str) -> str:
        return f"{self.prefix}-{name}"

    def netctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(["ip", "netns", "exec", self.ns("gw"), bin_path("netctl"),
                               "--server", IPAM_URL, "--token-file", str(self.dir / "token"),
                               *args], capture_output=True, text=True, timeout=60,
                              check=False)
        if check and proc.returncode != 0:
            raise AssertionError(f"netctl {' '.join(args)}: {proc.stdout}\n{proc.stderr}")
        return proc

    def allocations(self, pool: str = POOL) -> dict[str, dict[str, Any]]:
        """``netctl --json ip list``: the pool's allocations by IP."""
        doc = json.loads(self.netctl("--json", "ip", "list", "--pool", pool).stdout)
        return {a["ip"]: a for a in doc["allocated"]}

    def ipam_view(self, pool: str = POOL) -> Any:
        """Everything about a pool that a failed operation must leave as it was."""
        doc = json.loads(self.netctl("--json", "ip", "list", "--pool", pool).stdout)
        stats = json.loads(self.netctl("--json", "pool", "show", pool).stdout)["pool"]
        keep = ("free", "reserved", "allocated")
        assert all(k in stats for k in keep), stats
        return doc, {k: stats[k] for k in keep}

    # --- h1: its agent and its links ---------------------------------------------------

    def h1_links(self) -> dict[str, str | None]:
        """{name: master} of h1's interfaces."""
        def read() -> dict[str, str | None]:
            from netd.dataplane.netlink import Netlink

            with Netlink() as nl:
                return {link.name: link.master for link in nl.links()}

        return labmod.in_netns(self.ns("h1"), read)

    def docker_links(self) -> set[str]:
        """netd's veth ends in h1: the host ends on br0 and ends waiting for a Join."""
        return {n for n in self.h1_links() if n.startswith(("ndv", "ndp"))}

    def bridge_ports(self) -> set[str]:
        return {n for n, m in self.h1_links().items() if m == "br0"}

    def agent_record(self) -> dict[str, Any]:
        manifest = labmod.load_manifest(self.dir)
        assert manifest is not None
        return dict(next(h for h in manifest["hosts"] if h["name"] == "h1"))

    def kill_agent(self, sig: int = 9) -> None:
        pid = int(self.agent_record()["agent"]["pid"])
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        wait_for(f"agent {pid} gone", lambda: not labmod.alive(pid), 15)

    def start_agent(self) -> None:
        """Start h1's agent with the docker config, recorded in the lab manifest."""
        with self._guard:
            manifest = labmod.load_manifest(self.dir)
            assert manifest is not None
            rec = next(h for h in manifest["hosts"] if h["name"] == "h1")
            argv = [bin_path("netd"), "agent", "--config", str(self.config)]
            rec["agent"] = labmod.start_process(self.ns("h1"), argv, self.dir / "h1" /
                                                "agent.log")
            labmod.save_manifest(self.dir, manifest)
        pid = rec["agent"]["pid"]

        def serving() -> bool:
            assert labmod.alive(pid), labmod.tail(self.dir / "h1" / "agent.log")
            return plugin_answers()

        wait_for("the agent's docker plugin", serving, 30)

    def state_rows(self, table: str, where: str = "") -> list[tuple[Any, ...]]:
        db = sqlite3.connect(self.dir / "h1" / "state" / "agent.db")
        try:
            return list(db.execute(f"SELECT * FROM {table} {where}"))
        finally:
            db.close()

    # --- docker ----------------------------------------------------------------------

    def run(self, name: str, *extra: str, network: str = NET) -> subprocess.CompletedProcess[str]:
        return self.dockerd.cli("run", "-d", "--name", name, "--network", network,
                                "--cap-add", "NET_RAW", "--stop-signal", "KILL", *extra,
                                dk.IMAGE, "sleep", "3600")

    def run_ok(self, name: str, *extra: str, network: str = NET) -> dict[str, Any]:
        """Run a container; returns its endpoint once the IPAM shows its name."""
        proc = self.run(name, *extra, network=network)
        assert proc.returncode == 0, proc.stderr
        ep = self.endpoint(name, network)
        pool = POOL if network == NET else network
        self.wait_labelled({name: ep["IPAddress"]}, pool)
        return ep

    def wait_labelled(self, names: dict[str, str], pool: str = POOL) -> None:
        """Wait until the IPAM labels each address with its container's name."""
        def done() -> bool:
            allocs = self.allocations(pool)
            return all(allocs.get(ip, {}).get("labels", {}).get("container_name") == n
                       for n, ip in names.items())

        wait_for(f"container names {sorted(names)} in the IPAM", done, 30, 0.1)

    def endpoint(self, name: str, network: str = NET) -> dict[str, Any]:
        c = self.dockerd.client().containers.get(name)
        return dict(c.attrs["NetworkSettings"]["Networks"][network])

    def ping(self, name: str, address: str) -> bool:
        c = self.dockerd.client().containers.get(name)
        code, _ = c.exec_run(["ping", "-c", "1", "-W", "2", address])
        return int(code) == 0

    def rm(self, *names: str) -> None:
        client = self.dockerd.client()
        for n in names:
            with contextlib.suppress(Exception):
                client.containers.get(n).remove(force=True)

    def rm_all(self) -> None:
        for c in self.dockerd.client().containers.list(all=True):
            c.remove(force=True)

    def in_container(self, name: str, *argv: str) -> str:
        c = self.dockerd.client().containers.get(name)
        code, out = c.exec_run(list(argv))
        assert int(code) == 0, out
        return str(out.decode())


def plugin_answers() -> bool:
    """Whether something answers Plugin.Activate on the plugin socket."""
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(2)
            s.connect(str(dk.PLUGIN_SOCKET))
            s.sendall(b"POST /Plugin.Activate HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n"
                      b"Connection: close\r\n\r\n")
            data = b""
            while chunk := s.recv(4096):
                data += chunk
        return b"NetworkDriver" in data
    except OSError:
        return False


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DockerLab]:
    require(os.geteuid() == 0, "dockerd and the lab need root")
    for tool in ("ip", "iptables", "nsenter"):
        require(shutil.which(tool) is not None, f"{tool} is missing")
    try:
        dk.ensure_docker()
    except dk.DockerUnavailable as exc:
        require(False, str(exc))
    require(not plugin_answers(), f"{dk.PLUGIN_SOCKET} is already served by another agent")
    base = tmp_path_factory.mktemp("docker")
    prefix = f"nd{os.urandom(3).hex()}"
    dockerd = dk.TestDockerd(prefix, f"{prefix}-h1", base)
    the_lab = DockerLab(prefix, base / "lab", dockerd, base / "lab" / "h1" / "agent.toml")
    try:
        # h1's agent serves the plugin for the dockerd started below
        the_lab.cli("up", "--mode", "l2", "--hosts", "2", "--prefix", prefix, "--dir",
                    str(the_lab.dir), "--no-install-cni", "--cni-conf-dir", str(base / "cni"),
                    "--docker-host", dockerd.host)
        wait_for("the agent's docker plugin", plugin_answers, 30)
        try:
            took = dockerd.start()
        except dk.DockerUnavailable as exc:
            require(False, f"cannot start dockerd: {exc}")
        print(f"\nlab {prefix} up, dockerd answering after {took:.1f}s")
        # as on a Docker host with docker0: forwarding on, FORWARD policy DROP (in h1 only)
        subprocess.run(["ip", "netns", "exec", the_lab.ns("h1"), "iptables", "-P", "FORWARD",
                        "DROP"], check=True, timeout=30)
        dockerd.import_busybox()
        yield the_lab
    finally:
        with contextlib.suppress(Exception):
            the_lab.rm_all()  # while the agent can still release
        with contextlib.suppress(Exception):
            for n in dockerd.client().networks.list(names=[NET, "side", "tiny", "nolan"]):
                n.remove()
        dockerd.cleanup()
        with contextlib.suppress(OSError):  # the lab removes its logs; keep the agent's
            shutil.copy(the_lab.dir / "h1" / "agent.log", base / "agent-h1.log")
        the_lab.cli("down", "--prefix", prefix, "--dir", str(the_lab.dir), check=False)
        if not plugin_answers():
            dk.PLUGIN_SOCKET.unlink(missing_ok=True)
        dk.cleanup_prefix(prefix)


@pytest.fixture(scope="module")
def net(lab: DockerLab) -> str:
    """The Docker network on the lab pool, for the tests that follow the first."""
    client = lab.dockerd.client()
    if not client.networks.list(names=[NET]):
        lab.dockerd.cli("network", "create", "-d", "netd", "--ipam-driver", "netd",
                        "--ipam-opt", f"pool={POOL}", "--subnet", SUBNET, NET, check=True)
    return NET


# --- networks -----------------------------------------------------------------------


def test_network_create_inspect_rm(lab: DockerLab) -> None:
    d = lab.dockerd
    before = lab.ipam_view()
    proc = d.cli("network", "create", "-d", "netd", "--ipam-driver", "netd", "--ipam-opt",
                 f"pool={POOL}", "--subnet", SUBNET, NET)
    assert proc.returncode == 0, proc.stderr
    info = d.client().networks.get(NET).attrs
    assert info["Driver"] == "netd" and info["Scope"] == "local"
    assert info["IPAM"]["Driver"] == "netd"
    assert info["IPAM"]["Options"] == {"pool": POOL}
    assert [c["Subnet"] for c in info["IPAM"]["Config"]] == [SUBNET]
    nid = info["Id"]
    assert [r[0] for r in lab.state_rows("docker_networks")] == [nid]
    # the gateway came from the pool; nothing was allocated for it
    assert lab.ipam_view() == before

    # the lab pool is h1's own subnet: without --subnet libnetwork's route check would
    # make dockerd ask forever; the driver says what to do instead (and quickly)
    start = time.monotonic()
    proc = d.cli("network", "create", "-d", "netd", "--ipam-driver", "netd",
                 "--ipam-opt", f"pool={POOL}", "nolan", timeout=60)
    assert proc.returncode != 0 and time.monotonic() - start < 20
    assert f"add --subnet {SUBNET}" in proc.stderr, proc.stderr

    # a pool on no host route needs no --subnet; its routes reach the container
    lab.netctl("pool", "create", "side", "--cidr", "198.18.8.0/24", "--route",
               "10.200.0.0/16")
    proc = d.cli("network", "create", "-d", "netd", "--ipam-driver", "netd",
                 "--ipam-opt", "pool=side", "side")
    assert proc.returncode == 0, proc.stderr
    side = d.client().networks.get("side").attrs
    assert [c["Subnet"] for c in side["IPAM"]["Config"]] == ["198.18.8.0/24"]
    ep = lab.run_ok("routes1", network="side")
    assert ep["Gateway"] == "198.18.8.1" and ep["IPAddress"].startswith("198.18.8.")
    routes = lab.in_container("routes1", "ip", "route")
    assert "default via 198.18.8.1" in routes and "10.200.0.0/16 via 198.18.8.1" in routes
    lab.rm("routes1")
    assert d.cli("network", "rm", "side").returncode == 0
    assert lab.allocations("side") == {}
    lab.netctl("pool", "delete", "side")

    assert d.cli("network", "rm", NET).returncode == 0
    assert not d.client().networks.list(names=[NET])
    assert lab.state_rows("docker_networks") == []
    assert lab.ipam_view() == before


# --- containers ---------------------------------------------------------------------


class ArpWatch:
    """Gratuitous ARPs (sender IP = target IP) seen on the gateway's link, by IP."""

    def __init__(self, lab: DockerLab) -> None:
        self.seen: dict[str, set[str]] = {}
        self.stop = threading.Event()
        ready = threading.Event()

        def listen() -> None:
            def loop() -> None:
                with ArpSocket("lan0", None) as sock:
                    ready.set()
                    while not self.stop.is_set():
                        pkt = sock.receive(time.monotonic() + 0.2)
                        if pkt is not None and pkt.sender_ip == pkt.target_ip:
                            self.seen.setdefault(pkt.sender_ip, set()).add(pkt.sender_mac)

            labmod.in_netns(lab.ns("gw"), loop)

        self.thread = threading.Thread(target=listen, daemon=True)
        self.thread.start()
        ready.wait(5)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)


def test_ten_parallel_containers_get_pool_addresses(lab: DockerLab, net: str) -> None:
    names = [f"{lab.prefix}-p{i}" for i in range(10)]
    ports_before = lab.bridge_ports()
    watch = ArpWatch(lab)

    def start(name: str) -> float:
        client = lab.dockerd.new_client()
        try:
            t0 = time.monotonic()
            client.containers.run(dk.IMAGE, ["sleep", "3600"], name=name, network=net,
                                  cap_add=["NET_RAW"], stop_signal="SIGKILL", detach=True)
            return time.monotonic() - t0
        finally:
            client.close()

    try:
        with ThreadPoolExecutor(max_workers=10) as pool:
            took = list(pool.map(start, names))
        print(f"\n10 parallel docker run: slowest {max(took):.2f}s")
        eps = {n: lab.endpoint(n, net) for n in names}
        ips = {e["IPAddress"] for e in eps.values()}
        assert len(ips) == 10
        assert all(ipaddress.ip_address(ip) in ipaddress.ip_network(SUBNET) for ip in ips)

        # the IPAM agrees: owner = endpoint, MAC, host, and the container's name
        lab.wait_labelled({n: e["IPAddress"] for n, e in eps.items()})
        allocs = lab.allocations()
        for e in eps.values():
            a = allocs[e["IPAddress"]]
            assert a["container_id"] == e["EndpointID"] and a["ifname"] == "eth0"
            assert a["mac"] == e["MacAddress"] and a["host"] == "h1"
            assert a["labels"]["netd.plugin"] == "docker"
            assert e["Gateway"] == GATEWAY and e["IPPrefixLen"] == 24
        assert len([a for a in allocs.values() if a["host"] == "h1"]) == 10

        # one veth per container, its host end on br0
        assert len(lab.bridge_ports() - ports_before) == 10
        assert len(lab.docker_links()) == 10

        # each announced itself with a gratuitous ARP once its interface was up
        def announced() -> bool:
            return all(e["MacAddress"] in watch.seen.get(e["IPAddress"], set())
                       for e in eps.values())

        wait_for("gratuitous ARP of every container", announced, 10, 0.1)

        # they reach each other, the gateway and the other host over the switch, although
        # h1's FORWARD policy is DROP (and bridged frames pass iptables)
        rules = subprocess.run(["ip", "netns", "exec", lab.ns("h1"), "iptables", "-S",
                                "FORWARD"], capture_output=True, text=True, check=True).stdout
        assert "-P FORWARD DROP" in rules, rules
        def reach(i: int) -> list[str]:
            me, other = names[i], names[(i + 1) % 10]
            targets = [GATEWAY, eps[other]["IPAddress"], H2]
            return [t for t in targets if not lab.ping(me, t)]

        with ThreadPoolExecutor(max_workers=5) as pool:
            failures = dict(zip(names, pool.map(reach, range(10)), strict=True))
        assert not any(failures.values()), failures
    finally:
        watch.close()
        lab.rm(*names)
    allocs = lab.allocations()
    assert not [a for a in allocs.values() if a["host"] == "h1"], allocs
    assert lab.docker_links() == set()
    assert lab.bridge_ports() == ports_before


def test_ip_and_mac_address_are_honoured(lab: DockerLab, net: str) -> None:
    p = lab.prefix
    ep = lab.run_ok(f"{p}-fixed", "--ip", "198.18.0.77", "--mac-address", "02:aa:bb:00:00:77")
    assert ep["IPAddress"] == "198.18.0.77" and ep["MacAddress"] == "02:aa:bb:00:00:77"
    shown = lab.in_container(f"{p}-fixed", "ip", "addr", "show", "eth0")
    assert "02:aa:bb:00:00:77" in shown and "198.18.0.77/24" in shown
    a = lab.allocations()["198.18.0.77"]
    assert a["mac"] == "02:aa:bb:00:00:77" and a["container_id"] == ep["EndpointID"]

    # an address reserved for a handle goes to the container of that name, to no other
    name = f"{p}-db"
    lab.netctl("ip", "assign", POOL, "198.18.0.88", "--handle", name)
    before = lab.ipam_view()
    proc = lab.run(f"{p}-thief", "--ip", "198.18.0.88")
    assert proc.returncode != 0
    assert "198.18.0.88 is assigned to handle" in proc.stderr, proc.stderr
    lab.rm(f"{p}-thief")
    assert lab.ipam_view() == before
    ep = lab.run_ok(name, "--ip", "198.18.0.88")
    assert ep["IPAddress"] == "198.18.0.88"
    a = lab.allocations()["198.18.0.88"]
    assert a["handle"] == name and a["fixed"] and a["labels"]["container_name"] == name
    # the same MAC twice is refused (the IPAM keeps MACs unique)
    proc = lab.run(f"{p}-twin", "--mac-address", "02:aa:bb:00:00:77")
    assert proc.returncode != 0 and "02:aa:bb:00:00:77" in proc.stderr, proc.stderr
    lab.rm(f"{p}-twin", f"{p}-fixed", name)
    allocs = lab.allocations()
    assert "198.18.0.77" not in allocs and "198.18.0.88" not in allocs
    state = json.loads(lab.netctl("--json", "ip", "show", "198.18.0.88").stdout)
    assert state["state"] == "reserved" and state["handle"] == name
    lab.netctl("ip", "unreserve", POOL, "198.18.0.88")


def test_overlap_and_exhausted_pool_are_clear_errors(lab: DockerLab, net: str) -> None:
    d = lab.dockerd
    networks = sorted(n.name for n in d.client().networks.list())
    before = lab.ipam_view()
    proc = d.cli("network", "create", "-d", "netd", "--ipam-driver", "netd", "--subnet",
                 "198.18.0.0/16", "overlap")
    assert proc.returncode != 0
    assert "subnet 198.18.0.0/16 overlaps pool 'lab' (198.18.0.0/24)" in proc.stderr
    proc = d.cli("network", "create", "-d", "netd", "--ipam-driver", "netd", "--ipam-opt",
                 "pool=nosuchpool", "--subnet", "198.18.7.0/24", "nopool")
    assert proc.returncode != 0 and "pool 'nosuchpool' does not exist" in proc.stderr
    assert sorted(n.name for n in d.client().networks.list()) == networks
    assert lab.ipam_view() == before

    # a pool with room for one container (gateway .1; .2 is the only address left)
    lab.netctl("pool", "create", "tiny", "--cidr", "198.18.9.0/30")
    d.cli("network", "create", "-d", "netd", "--ipam-driver", "netd", "--ipam-opt",
          "pool=tiny", "--subnet", "198.18.9.0/30", "tiny", check=True)
    try:
        assert lab.run_ok("tiny1", network="tiny")["IPAddress"] == "198.18.9.2"
        links, view = lab.docker_links(), lab.ipam_view("tiny")
        proc = lab.run("tiny2", network="tiny")
        assert proc.returncode != 0
        assert "pool 'tiny' (198.18.9.0/30) has no free address" in proc.stderr, proc.stderr
        assert lab.ipam_view("tiny") == view and lab.docker_links() == links
        assert lab.ipam_view() == before
    finally:
        lab.rm("tiny1", "tiny2")
        d.cli("network", "rm", "tiny")
    assert lab.allocations("tiny") == {}
    lab.netctl("pool", "delete", "tiny")


def test_an_address_in_use_on_the_wire_is_never_given_to_a_container(lab: DockerLab,
                                                                     net: str) -> None:
    """The Docker path probes the wire like the CNI one: with h1's own address not reserved
    in the pool, 0.1.0 gave it to a container. Now it is refused, reserved with a note
    naming the MAC that answered, and the next container gets a free address."""
    mac = json.loads(subprocess.run(["ip", "-j", "-n", lab.ns("h1"), "link", "show", "br0"],
                                    capture_output=True, text=True, check=True).stdout)[0][
        "address"]
    host_ip = "198.18.0.11"
    lab.netctl("ip", "unreserve", POOL, host_ip)
    name = f"{lab.prefix}-dup"
    try:
        assert json.loads(lab.netctl("--json", "ip", "show", host_ip).stdout)["state"] == "free"
        links = lab.docker_links()
        proc = lab.run(name)  # the lowest free address is h1's own now
        assert proc.returncode != 0
        assert f"{host_ip} is already used on the wire by {mac}" in proc.stderr, proc.stderr
        shown = json.loads(lab.netctl("--json", "ip", "show", host_ip).stdout)
        assert shown["state"] == "reserved" and mac in shown["note"] and "h1" in shown["note"]
        assert host_ip not in lab.allocations() and lab.docker_links() == links
        lab.rm(name)
        ep = lab.run_ok(name)
        assert ep["IPAddress"] != host_ip and lab.ping(name, GATEWAY)
    finally:
        lab.rm(name)
        shown = json.loads(lab.netctl("--json", "ip", "show", host_ip).stdout)
        if shown["state"] != "reserved":
            lab.netctl("ip", "reserve", POOL, host_ip, "--note", "h1")


def test_disconnect_and_connect(lab: DockerLab, net: str) -> None:
    name = f"{lab.prefix}-dc"
    ip = lab.run_ok(name)["IPAddress"]
    assert ip in lab.allocations()
    assert len(lab.docker_links()) == 1  # our end; Docker moved the other into the container
    assert lab.dockerd.cli("network", "disconnect", net, name).returncode == 0
    assert ip not in lab.allocations()
    assert lab.docker_links() == set()
    assert lab.dockerd.cli("network", "connect", net, name).returncode == 0
    lab.wait_labelled({name: lab.endpoint(name)["IPAddress"]})
    assert lab.ping(name, GATEWAY)
    lab.rm(name)
    assert not [a for a in lab.allocations().values() if a["host"] == "h1"]


def test_agent_restart_keeps_containers_and_repairs(lab: DockerLab, net: str) -> None:
    p = lab.prefix
    a, b = f"{p}-ra", f"{p}-rb"
    ea, eb = lab.run_ok(a), lab.run_ok(b)
    # what a crash can leave: an address requested but never given to an endpoint,
    # and a veth of an endpoint the agent no longer knows
    leak_ip = "198.18.0.250"

    def leak(client: Any) -> Any:
        return client.allocate(POOL, "docker-pending-02aabbccddee", "eth0", host="h1",
                               labels={"netd.plugin": "docker"}, ip=leak_ip,
                               mac="02:aa:bb:cc:dd:ee")

    from netd.ipam.client import Client

    token = (lab.dir / "token").read_text().strip()
    labmod.in_netns(lab.ns("gw"), lambda: leak(Client(IPAM_URL, token=token)))
    # a veth of ours (marked, on br0) that no record and no allocation explain, and an
    # operator's veth with a netd-looking name, unmarked: only the first is the agent's
    h1 = ["ip", "-n", lab.ns("h1"), "link"]
    subprocess.run([*h1, "add", "ndvffffffffffff", "type", "veth", "peer", "name",
                    "ndpffffffffffff"], check=True)
    subprocess.run([*h1, "set", "ndvffffffffffff", "master", "br0", "alias",
                    "netd:br0:" + "f" * 64 + ":eth0"], check=True)
    subprocess.run([*h1, "add", "ndvoperator0000", "type", "veth", "peer", "name",
                    "ndvoperator0001"], check=True)

    lab.kill_agent(9)
    # containers keep their network while the agent is down
    assert lab.ping(a, eb["IPAddress"])
    lab.start_agent()
    assert lab.ping(a, eb["IPAddress"]) and lab.ping(b, GATEWAY)
    assert leak_ip not in lab.allocations()
    assert "ndvffffffffffff" not in lab.h1_links()
    assert "ndvoperator0000" in lab.h1_links()  # not provably ours: left alone
    subprocess.run([*h1, "del", "ndvoperator0000"], check=True)
    # later calls succeed: a new container, and removing one from before the restart
    ec = lab.run_ok(f"{p}-rc")
    assert lab.ping(f"{p}-rc", ea["IPAddress"])
    lab.rm(a)
    allocs = lab.allocations()
    assert ea["IPAddress"] not in allocs
    assert {eb["IPAddress"], ec["IPAddress"]} <= set(allocs)
    lab.rm(b, f"{p}-rc")
    assert not [x for x in lab.allocations().values() if x["host"] == "h1"]
    assert lab.docker_links() == set()


def test_dockerd_restart_keeps_addresses(lab: DockerLab, net: str) -> None:
    p = lab.prefix
    names = [f"{p}-d{i}" for i in range(3)]
    eps = {n: lab.run_ok(n) for n in names}
    view = lab.allocations()
    # live restore: the containers keep running, dockerd takes them back as they are
    lab.dockerd.restart(live_restore=True)
    for n in names:
        assert lab.endpoint(n)["IPAddress"] == eps[n]["IPAddress"]
        assert lab.endpoint(n)["EndpointID"] == eps[n]["EndpointID"]
    assert lab.ping(names[0], eps[names[1]]["IPAddress"])
    assert lab.allocations() == view
    lab.rm(*names)
    assert not [x for x in lab.allocations().values() if x["host"] == "h1"]

    # without live restore dockerd stops its containers (releasing their endpoints) and
    # starts them again with new endpoints: --ip brings the same address back, and
    # nothing leaks either way
    fixed, loose = f"{p}-fix", f"{p}-loose"
    lab.run_ok(fixed, "--restart", "always", "--ip", "198.18.0.99")
    lab.run_ok(loose, "--restart", "always")
    lab.dockerd.restart(live_restore=False)
    try:
        def back() -> bool:
            running = {c.name for c in lab.dockerd.client().containers.list()}
            return {fixed, loose} <= running
        wait_for("containers restarted", back, 60, 0.2)
        assert lab.endpoint(fixed)["IPAddress"] == "198.18.0.99"
        got = {lab.endpoint(n)["IPAddress"]: lab.endpoint(n)["EndpointID"]
               for n in (fixed, loose)}
        allocs = {ip: a for ip, a in lab.allocations().items() if a["host"] == "h1"}
        assert {ip: a["container_id"] for ip, a in allocs.items()} == got
        assert lab.ping(fixed, GATEWAY) and lab.ping(loose, "198.18.0.99")
    finally:
        lab.rm(fixed, loose)
        lab.dockerd.restart(live_restore=True)
    assert not [x for x in lab.allocations().values() if x["host"] == "h1"]


def test_everything_removed_leaves_nothing(lab: DockerLab, net: str) -> None:
    ports = lab.bridge_ports()
    ep = lab.run_ok(f"{lab.prefix}-last")
    assert lab.bridge_ports() != ports
    lab.rm_all()
    assert lab.dockerd.cli("network", "rm", net).returncode == 0
    assert not [a for a in lab.allocations().values() if a["host"] == "h1"]
    assert ep["IPAddress"] not in lab.allocations()
    assert lab.docker_links() == set()
    assert lab.bridge_ports() == {"bond0"}
    for table in ("docker_networks", "docker_addresses"):
        assert lab.state_rows(table) == [], table
    assert lab.state_rows("attachments", "WHERE plugin = 'docker'") == []
    pool = json.loads(lab.netctl("--json", "pool", "show", POOL).stdout)["pool"]
    assert pool["allocated"] == 0
