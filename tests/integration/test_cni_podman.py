"""Issue 3 with the real client: podman (CNI backend) and runtime-style plugin runs on a lab.

One lab (``netd lab up --hosts 2``) serves the whole module: a switch, a
gateway namespace with the IPAM server, and two host namespaces each running a
``netd agent`` that takes ``bond0`` into ``br0``. Podman runs in the machine's
root namespace and execs the CNI plugins there; ``netd-cni`` forwards to the
agent of a host namespace (``agentSocket``), which plumbs the container's veth
into that host's ``br0``. Tests that need finer control than podman gives act
as the runtime themselves: they exec ``/opt/cni/bin/netd-cni`` (and the
reference plugins) with CNI_* variables and the config on stdin, exactly as
libcni does, against network namespaces they create with ``ip netns add``.

Everything is named with a per-run prefix and removed in ``finally`` blocks:
containers, conflists, namespaces, root-namespace links, iptables rules.
Nothing here adds an address or route to the machine's own namespace.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import random
import secrets
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from netd import lab as labmod
from netd.dataplane.veth import host_ifname_for
from tests.conftest import require
from tests.support import podman as pm
from tests.support.cnilab import (
    CNI_PATH,
    GATEWAY,
    HANDED_OUT,
    NETD_CNI,
    NETD_IPAM,
    POOL,
    REFERENCE_PLUGINS,
    CniRun,
    Lab,
    add_netns,
    container_view,
    del_netns,
    in_ns,
    links,
    ndv_links,
    netd_conf,
    netd_marked_root_links,
    ping_all,
    reference_plugin_dir,
    run_plugin,
    running_lab,
    wait_for,
)

pytestmark = [pytest.mark.real]


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    require(os.geteuid() == 0, "CNI plugins, podman and the lab need root")
    for tool in ("ip", "iptables", "tc"):
        require(shutil.which(tool) is not None, f"{tool} is missing")
    try:
        pm.ensure_podman()
    except pm.PodmanUnavailable as exc:
        require(False, str(exc))
    missing = [p for p in REFERENCE_PLUGINS if reference_plugin_dir(p) is None]
    require(not missing, f"reference CNI plugins missing: {' '.join(missing)} "
                         f"(Debian containernetworking-plugins)")
    with running_lab(tmp_path_factory.mktemp("cni-podman"), "nc") as the_lab:
        yield the_lab


# --- 1. ten containers in parallel across two hosts ------------------------------------


def test_ten_parallel_podman_containers_across_two_hosts(lab: Lab) -> None:
    hosts = ("h1", "h2")
    before_ndv = {h: ndv_links(lab.ns(h)) for h in hosts}
    before_allocated = lab.pool()["allocated"]
    names = [f"{lab.prefix}-p{i}" for i in range(10)]
    host_of = {n: hosts[i % 2] for i, n in enumerate(names)}
    try:
        start = time.monotonic()

        def run(name: str) -> tuple[str, float]:
            t0 = time.monotonic()
            cid = pm.run_container(name, lab.rootfs, ["sleep", "600"],
                                   network=lab.network(host_of[name]), timeout=180)
            return cid, time.monotonic() - t0

        with ThreadPoolExecutor(max_workers=len(names)) as ex:
            started = dict(zip(names, ex.map(run, names), strict=True))
        run_wall = time.monotonic() - start
        ids = {n: started[n][0] for n in names}

        views = {n: container_view(n) for n in names}  # (ip, mac) seen inside
        ips = [ip for ip, _ in views.values()]
        assert len(set(ips)) == len(names), f"duplicate addresses: {sorted(ips)}"
        for n, (ip, mac) in views.items():
            assert HANDED_OUT[0] <= ipaddress.ip_address(ip) <= HANDED_OUT[1], (n, ip)
            podman_view = pm.container_network(n, lab.network(host_of[n]))
            assert podman_view["IPAddress"] == ip and podman_view["IPPrefixLen"] == 24
            assert podman_view["MacAddress"].lower() == mac

        records = lab.by_container()
        assert lab.pool()["allocated"] == before_allocated + len(names)
        for n, (ip, mac) in views.items():
            rec = records.get(ids[n])
            assert rec is not None, f"no IPAM record for {n} ({ids[n][:12]})"
            assert (rec["ip"], rec["mac"].lower(), rec["ifname"]) == (ip, mac, "eth0"), rec
            assert rec["host"] == host_of[n], rec
            assert rec["labels"].get("netd.network") == lab.network(host_of[n]), rec
        for h in hosts:
            mine = {host_ifname_for(ids[n]) for n in names if host_of[n] == h}
            assert ndv_links(lab.ns(h)) == before_ndv[h] | mine

        start = time.monotonic()
        with ThreadPoolExecutor(max_workers=5) as ex:
            results = dict(zip(names, ex.map(
                lambda n: ping_all(n, [GATEWAY, *(views[o][0] for o in names if o != n)]),
                names), strict=True))
        ping_wall = time.monotonic() - start
        failed = {(n, t): r for n, seen in results.items() for t, r in seen.items()
                  if r != "ok"}
        assert not failed, f"unreachable (source, target): {failed}"

        start = time.monotonic()
        pm.rm(*names)
        rm_wall = time.monotonic() - start
        print(f"\n10 parallel podman run: {run_wall:.1f}s wall "
              f"(each {min(t for _, t in started.values()):.1f}-"
              f"{max(t for _, t in started.values()):.1f}s); 10 x 10 pings: {ping_wall:.1f}s; "
              f"podman rm of 10: {rm_wall:.1f}s")
        assert pm.containers(name_prefix=f"{lab.prefix}-p") == []
        assert lab.pool()["allocated"] == before_allocated
        left = set(ids.values()) & set(lab.by_container())
        assert not left, f"addresses still held by removed containers: {left}"
        for h in hosts:
            assert ndv_links(lab.ns(h)) == before_ndv[h], f"veth left in {h}"
    finally:
        pm.rm(*names)


# --- 2. chaining: netd-cni + portmap + bandwidth ----------------------------------------
#
# Podman execs every plugin of a conflist in the machine's root namespace. netd's
# agent, though, lives in a lab host namespace and puts the host end of the veth
# there, so in this lab portmap's DNAT rules land in the root namespace's nat table
# (not on the host the container is plugged into) and bandwidth cannot find the veth
# peer in its namespace. Two halves, then:
#
# * through podman: the chain runs (portmap with a real -p mapping, bandwidth as the
#   pass-through it is without rates), the container gets its IPAM address, serves TCP
#   to a container on the other host, portmap's DNAT rule names that address, and
#   `podman rm` removes rule, address and veth. We do not connect to the mapped port in
#   the root namespace: the DNAT target (198.18.0.x) is only routed inside the lab, so
#   such a packet would leave through the machine's own default route. portmap runs with
#   "snat": false for the same reason: with SNAT it sets route_localnet on whatever
#   interface routes the container address in its namespace, here the machine's eth0.
#   (portmap's shared CNI-HOSTPORT-DNAT chain and its two jumps stay in the root nat
#   table after DEL, as they do wherever portmap runs; the per-container chain goes.)
# * as the runtime of the host itself: the test execs netd-cni -> portmap -> bandwidth
#   (with rates) inside the host namespace, with prevResult passed along as libcni does,
#   which is what a runtime sharing the agent's namespace on a real host does. There the
#   DNAT is exercised for real (host -> its own address:HOSTPORT -> container httpd),
#   bandwidth puts a tbf qdisc on the veth's host end and an ifb for egress, and DEL in
#   reverse order removes all of it.


def _dnat_rules(netns: str | None = None) -> list[str]:
    argv = ["iptables", "-w", "10", "-t", "nat", "-S"]
    if netns:
        argv = ["ip", "netns", "exec", netns, *argv]
    out = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=30).stdout
    return [line for line in out.splitlines() if "-j DNAT" in line]


def test_chain_portmap_bandwidth_through_podman(lab: Lab) -> None:
    net = f"{lab.prefix}-chain"
    server, client = f"{lab.prefix}-web", f"{lab.prefix}-wget"
    hostport = random.randint(20000, 29999)
    before_ndv = ndv_links(lab.ns("h1"))
    before_allocated = lab.pool()["allocated"]
    pm.write_conflist(net, [
        {"type": "netd-cni", "pool": POOL, "agentSocket": lab.socket("h1")},
        {"type": "portmap", "capabilities": {"portMappings": True}, "snat": False},
        {"type": "bandwidth", "capabilities": {"bandwidth": True}},
    ])
    try:
        cid = pm.run_container(server, lab.rootfs,
                               ["/bin/busybox", "httpd", "-f", "-p", "80", "-h", "/etc"],
                               network=net, extra=["-p", f"{hostport}:80"])
        ip, mac = container_view(server)
        assert pm.container_network(server, net)["IPAddress"] == ip
        rec = lab.by_container().get(cid)
        assert rec is not None and (rec["ip"], rec["mac"].lower()) == (ip, mac), rec
        assert rec["host"] == "h1" and rec["labels"]["netd.network"] == net
        assert ndv_links(lab.ns("h1")) == before_ndv | {host_ifname_for(cid)}
        rules = [r for r in _dnat_rules() if f"--to-destination {ip}:80" in r]
        assert len(rules) == 1 and f"--dport {hostport}" in rules[0], _dnat_rules()

        # the container serves TCP to a container plugged into the other host
        pm.run_container(client, lab.rootfs, ["sleep", "600"], network=lab.network("h2"))
        # (busybox 1.35's wget crashes with -T: bound it with timeout instead)
        got = pm.exec_in(client, ["timeout", "10", "wget", "-q", "-O", "-",
                                  f"http://{ip}/hostname"], timeout=30)
        assert got.returncode == 0, got.stderr
        assert got.stdout.strip() == cid[:12]  # podman's /etc/hostname of the server

        pm.rm(server, client)
        assert not [r for r in _dnat_rules() if f"{ip}:80" in r], "portmap DEL left its rule"
        assert cid not in lab.by_container()
        assert lab.pool()["allocated"] == before_allocated
        assert ndv_links(lab.ns("h1")) == before_ndv
    finally:
        pm.rm(server, client)
        pm.remove_network(net)


def test_chain_portmap_bandwidth_as_host_runtime(lab: Lab, tmp_path: Path) -> None:
    host_ns, cns = lab.ns("h1"), lab.ns("pm")
    host_ip = lab.host("h1")["address"]
    net, cid = f"{lab.prefix}-hchain", f"{lab.prefix}-pm-{secrets.token_hex(4)}"
    hostport = random.randint(20000, 29999)
    portmaps = [{"hostPort": hostport, "containerPort": 80, "protocol": "tcp"}]
    rate = {"ingressRate": 200_000_000, "ingressBurst": 4_000_000,
            "egressRate": 200_000_000, "egressBurst": 4_000_000}
    portmap = shutil.which("portmap", path=CNI_PATH)
    bandwidth = shutil.which("bandwidth", path=CNI_PATH)
    assert portmap and bandwidth
    conf = netd_conf(net, lab.socket("h1"))
    marker = secrets.token_hex(8)
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "marker").write_text(marker + "\n")
    before_ndv = ndv_links(host_ns)
    before_allocated = lab.pool()["allocated"]
    netns = add_netns(cns)
    httpd: subprocess.Popen[bytes] | None = None

    def chain(command: str, prev: dict[str, Any] | None) -> list[CniRun]:
        """The conflist's plugins in order (ADD) or reverse order (DEL), as libcni runs them."""
        steps: list[tuple[str, dict[str, Any]]] = [
            (str(NETD_CNI), conf),
            (portmap, {"cniVersion": "1.0.0", "name": net, "type": "portmap",
                       "runtimeConfig": {"portMappings": portmaps}}),
            (bandwidth, {"cniVersion": "1.0.0", "name": net, "type": "bandwidth", **rate}),
        ]
        if command == "DEL":
            steps.reverse()
        runs = []
        for plugin, cfg in steps:
            doc = dict(cfg, prevResult=prev) if prev is not None else dict(cfg)
            r = run_plugin(plugin, command, doc, container_id=cid, netns=netns,
                           in_netns=host_ns)
            runs.append(r)
            assert r.rc == 0, f"{command} {Path(plugin).name}: {r}"
            if command == "ADD":
                prev = r.doc
        return runs

    try:
        adds = chain("ADD", None)
        result = adds[-1].doc
        ip = result["ips"][0]["address"].split("/")[0]
        host_end = host_ifname_for(cid)
        assert host_end in {i["name"] for i in result["interfaces"] if not i.get("sandbox")}
        assert lab.by_container()[cid]["ip"] == ip
        assert ndv_links(host_ns) == before_ndv | {host_end}
        # CHECK of the main plugin with the chain's final result
        check = run_plugin(NETD_CNI, "CHECK", dict(conf, prevResult=result),
                           container_id=cid, netns=netns, in_netns=host_ns)
        assert check.rc == 0, str(check)

        # bandwidth: tbf on the host end shapes traffic to the container, an ifb device
        # with tbf shapes traffic from it
        qdiscs = subprocess.run(["tc", "-n", host_ns, "qdisc", "show", "dev", host_end],
                                capture_output=True, text=True, check=True).stdout
        assert "tbf" in qdiscs and "ingress" in qdiscs, qdiscs
        ifbs = [n for n in links(host_ns) if n.startswith("bwp")]
        assert len(ifbs) == 1, links(host_ns).keys()

        # portmap: host -> its own address:HOSTPORT -> DNAT -> the container's httpd
        assert any(f"--to-destination {ip}:80" in r for r in _dnat_rules(host_ns))
        httpd = subprocess.Popen(["ip", "netns", "exec", cns, "/bin/busybox", "httpd", "-f",
                                  "-p", "80", "-h", str(tmp_path / "www")],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        got = None
        for _ in range(30):
            got = in_ns(host_ns, "timeout", "5", "/bin/busybox", "wget", "-q", "-O", "-",
                        f"http://{host_ip}:{hostport}/marker")
            if got.returncode == 0:
                break
            time.sleep(0.1)
        assert got is not None and got.returncode == 0, got and got.stderr
        assert got.stdout.strip() == marker

        dels = chain("DEL", result)
        assert not [r for r in _dnat_rules(host_ns) if f"{ip}:80" in r]
        assert not [n for n in links(host_ns) if n.startswith("bwp")]
        assert ndv_links(host_ns) == before_ndv
        assert set(links(cns)) == {"lo"}
        assert cid not in lab.by_container()
        assert lab.pool()["allocated"] == before_allocated
        print(f"\nhost-namespace chain ADD: "
              f"{', '.join(f'{r.took * 1000:.0f}ms' for r in adds)}; "
              f"DEL: {', '.join(f'{r.took * 1000:.0f}ms' for r in dels)}")
    finally:
        if httpd is not None:
            httpd.kill()
            httpd.wait()
        for plugin in (bandwidth, portmap, str(NETD_CNI)):
            cfg = conf if plugin == str(NETD_CNI) else {
                "cniVersion": "1.0.0", "name": net, "type": Path(plugin).name,
                "runtimeConfig": {"portMappings": portmaps}}
            run_plugin(plugin, "DEL", cfg, container_id=cid, netns=netns, in_netns=host_ns)
        del_netns(cns)


# --- 3. reference bridge and macvlan with netd-ipam -------------------------------------


def _pair_on(lab: Lab, net: str, tag: str) -> None:
    """Two containers on ``net`` get pool addresses recorded for them, ping, and give back."""
    before_allocated = lab.pool()["allocated"]
    names = [f"{lab.prefix}-{tag}a", f"{lab.prefix}-{tag}b"]
    try:
        ids = {n: pm.run_container(n, lab.rootfs, ["sleep", "600"], network=net)
               for n in names}
        records = lab.by_container()
        seen = {}
        for n in names:
            ip, _mac = container_view(n)
            seen[n] = ip
            rec = records.get(ids[n])
            assert rec is not None, f"{net}: no IPAM record for {ids[n]}"
            # bridge and macvlan choose the MAC themselves; the address is the pool's
            assert rec["ip"] == ip and rec["host"] == "h1" and rec["ifname"] == "eth0", rec
            assert rec["labels"].get("netd.network") == net
            assert HANDED_OUT[0] <= ipaddress.ip_address(ip) <= HANDED_OUT[1]
            assert pm.container_network(n, net)["Gateway"] == GATEWAY
        assert lab.pool()["allocated"] == before_allocated + 2
        # they share a segment, so they reach each other (the pool's gateway is not
        # on this segment: pinging it would prove nothing)
        assert pm.ping(names[0], seen[names[1]], count=2)
        assert pm.ping(names[1], seen[names[0]], count=2)
        pm.rm(*names)
        assert not set(ids.values()) & set(lab.by_container()), f"{net}: DEL did not release"
        assert lab.pool()["allocated"] == before_allocated
    finally:
        pm.rm(*names)


def test_reference_bridge_with_netd_ipam(lab: Lab) -> None:
    net, bridge = f"{lab.prefix}-rb", f"{lab.prefix}b"
    ipam = {"type": "netd-ipam", "pool": POOL, "agentSocket": lab.socket("h1")}
    pm.write_conflist(net, [{"type": "bridge", "bridge": bridge, "isGateway": False,
                             "ipMasq": False, "ipam": ipam}])
    try:
        with pm.allow_bridge(bridge, lab.prefix):
            _pair_on(lab, net, "rb")
    finally:
        pm.remove_network(net)
        subprocess.run(["ip", "link", "del", bridge], capture_output=True, check=False)


def test_reference_macvlan_with_netd_ipam(lab: Lab) -> None:
    # macvlan's master must live where the plugin runs (the root namespace, for
    # podman): a per-run veth pair with no addresses, both ends up so it has carrier
    net, master, peer = f"{lab.prefix}-mv", f"{lab.prefix}m0", f"{lab.prefix}m1"
    ipam = {"type": "netd-ipam", "pool": POOL, "agentSocket": lab.socket("h1")}
    try:
        subprocess.run(["ip", "link", "add", master, "type", "veth", "peer", "name", peer],
                       check=True, capture_output=True)
        for dev in (master, peer):
            subprocess.run(["sysctl", "-qw", f"net.ipv6.conf.{dev}.disable_ipv6=1"],
                           check=False, capture_output=True)
            subprocess.run(["ip", "link", "set", dev, "up"], check=True, capture_output=True)
        pm.write_conflist(net, [{"type": "macvlan", "master": master, "mode": "bridge",
                                 "ipam": ipam}])
        _pair_on(lab, net, "mv")
    finally:
        pm.remove_network(net)
        subprocess.run(["ip", "link", "del", master], capture_output=True, check=False)


# --- 4. bad input ------------------------------------------------------------------------


def test_bad_input_gives_the_right_cni_error_and_leaves_nothing(lab: Lab) -> None:
    cns = lab.ns("bad")
    netns = add_netns(cns)
    sock = lab.socket("h1")
    ok = netd_conf(f"{lab.prefix}-bad", sock)
    cid = f"{lab.prefix}-bad-{secrets.token_hex(4)}"
    ipam_conf = {"cniVersion": "1.0.0", "name": f"{lab.prefix}-bad", "type": "bridge",
                 "ipam": {"type": "netd-ipam", "pool": "no-such-pool", "agentSocket": sock}}
    # (what, plugin, command, stdin, env overrides, expected code)
    cases: list[tuple[str, Path, str | None, bytes | dict[str, Any], dict[str, Any], int]] = [
        ("malformed stdin", NETD_CNI, "ADD", b'{"cniVersion": "1.0.0", "name": ', {}, 6),
        ("stdin not an object", NETD_CNI, "ADD", b"[1, 2]", {}, 6),
        ("missing CNI_COMMAND", NETD_CNI, None, ok, {}, 4),
        ("wrong CNI_COMMAND", NETD_CNI, "FROBNICATE", ok, {}, 4),
        ("missing CNI_CONTAINERID", NETD_CNI, "ADD", ok, {"container_id": None}, 4),
        ("unknown pool", NETD_CNI, "ADD", dict(ok, pool="no-such-pool"), {}, 101),
        ("unknown pool (netd-ipam)", NETD_IPAM, "ADD", ipam_conf, {}, 101),
        ("ifname over 15 characters", NETD_CNI, "ADD", ok, {"ifname": "e" * 16}, 4),
        ("netns does not exist", NETD_CNI, "ADD", ok,
         {"netns": str(labmod.NETNS_DIR / f"{lab.prefix}-nonexistent")}, 3),
        ("unsupported cniVersion", NETD_CNI, "ADD", dict(ok, cniVersion="0.2.0"), {}, 1),
        ("unknown cniVersion", NETD_CNI, "ADD", dict(ok, cniVersion="9.9.9"), {}, 1),
    ]
    hosts = ("h1", "h2")
    try:
        before_pool = lab.pool()
        before_event = lab.last_event()
        before_ndv = {h: ndv_links(lab.ns(h)) for h in hosts}
        before_root = netd_marked_root_links()
        wrong = []
        for what, plugin, command, stdin, env, code in cases:
            kw: dict[str, Any] = {"container_id": cid, "netns": netns, "ifname": "eth0"}
            kw.update(env)
            r = run_plugin(plugin, command, stdin, **kw)
            doc = r.doc
            if not (r.rc == 1 and doc.get("code") == code and isinstance(doc.get("msg"), str)
                    and doc["msg"] and "cniVersion" in doc):
                wrong.append(f"{what}: expected code {code}, got {r}")
            if set(links(cns)) != {"lo"}:
                wrong.append(f"{what}: left {sorted(links(cns))} in the container namespace")
        assert not wrong, "\n".join(wrong)
        after_pool = lab.pool()
        for k in ("allocated", "reserved", "free"):
            assert after_pool[k] == before_pool[k], (k, before_pool, after_pool)
        assert lab.last_event() == before_event, "a bad request changed the IPAM history"
        for h in hosts:
            assert ndv_links(lab.ns(h)) == before_ndv[h]
        # the machine is shared with other runs, so only links with netd's marks count
        assert netd_marked_root_links() == before_root
        atts = [a for h in hosts for a in lab.agent_status(h)["attachments"]
                if a["container_id"] == cid]
        assert atts == [], atts
    finally:
        del_netns(cns)


# --- 5. crash safety ---------------------------------------------------------------------


@dataclass
class Ctr:
    """One container namespace and what the test (the runtime) believes about it."""

    ns: str
    path: str
    lock: threading.Lock = field(default_factory=threading.Lock)
    cid: str | None = None
    attached: bool = False
    incarnation: int = 0


def test_crash_safety_kill9_agent_during_200_add_del(lab: Lab) -> None:
    host, host_ns = "h1", lab.ns("h1")
    net = f"{lab.prefix}-crash"
    conf = netd_conf(net, lab.socket(host))
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    n_ops, n_ctrs, workers = 200, 20, 4
    started = time.monotonic()
    deadline = started + 150  # the whole test stays under 3 minutes
    before_ndv = ndv_links(host_ns)
    before_allocated = lab.pool()["allocated"]
    ctrs = [Ctr(ns=lab.ns(f"c{i}"), path="") for i in range(1, n_ctrs + 1)]
    stats = {"add_ok": 0, "add_failed": 0, "add_cut": 0, "del": 0, "del_retries": 0,
             "kills": 0}
    agent_log = Path(lab.host(host)["agent"]["log"])
    log_start = agent_log.stat().st_size
    stats_lock = threading.Lock()
    unexpected: list[str] = []
    restart_times: list[float] = []

    def count(key: str) -> None:
        with stats_lock:
            stats[key] += 1

    def delete(c: Ctr) -> None:
        """DEL until it succeeds, as a runtime retries a failed DEL."""
        while True:
            r = run_plugin(NETD_CNI, "DEL", conf, container_id=c.cid, netns=c.path)
            if r.rc == 0:
                count("del")
                return
            if r.code != 11:
                unexpected.append(f"DEL {c.cid}: {r}")
            count("del_retries")
            assert time.monotonic() < deadline, f"DEL {c.cid} never succeeded: {r}"
            time.sleep(0.2)

    def op(step: tuple[int, float, float]) -> None:
        index, dice, pause = step
        time.sleep(pause)  # runtimes do not send in lockstep
        c = ctrs[index]
        with c.lock:
            add = dice < (0.4 if c.attached else 0.75)
            if c.cid is None or (add and not c.attached):
                c.incarnation += 1
                c.cid = f"{lab.prefix}-crash-{index + 1}-{c.incarnation}"
            if not add:
                delete(c)
                c.attached, c.cid = False, None
                return
            r = run_plugin(NETD_CNI, "ADD", conf, container_id=c.cid, netns=c.path)
            if r.rc == 0:
                count("add_ok")
                c.attached = True
                return
            count("add_failed")
            if "without an answer" in r.out or "connection failed" in r.out:
                count("add_cut")  # the agent died while serving this ADD
            if r.code != 11:
                unexpected.append(f"ADD {c.cid}: {r}")
            c.attached = False
            delete(c)  # a runtime cleans up after a failed ADD
            c.cid = None

    stop = threading.Event()
    killer_error: list[BaseException] = []

    def killer() -> None:
        try:
            # kill to kill ~1-2 s: up 0.2-1.0 s, down 0-0.5 s, ~0.6 s to start and answer
            while not stop.wait(rng.uniform(0.2, 1.0)):
                lab.kill_agent(host)
                count("kills")
                time.sleep(rng.uniform(0.0, 0.5))
                restart_times.append(lab.start_agent(host))
        except BaseException as exc:
            killer_error.append(exc)

    try:
        for c in ctrs:
            c.path = add_netns(c.ns)
        # ~0.15 s between a worker's ops: 200 ops over ~8-10 s, so that the agent
        # is killed several times while they run, however fast each op is
        plan = [(rng.randrange(n_ctrs), rng.random(), rng.uniform(0, 0.3))
                for _ in range(n_ops)]
        kill_thread = threading.Thread(target=killer, name="agent-killer", daemon=True)
        kill_thread.start()
        try:
            with ThreadPoolExecutor(max_workers=workers) as ex:
                list(ex.map(op, plan))
        finally:
            stop.set()
            kill_thread.join(30)
        ops_took = time.monotonic() - started
        assert not killer_error, killer_error
        assert stats["kills"] >= 3, f"only {stats} in {ops_took:.1f}s"
        lab.ensure_agent(host)
        # one more crash and restart: the agent reconciles against what really exists
        restart_times.append(lab.restart_agent(host))
        for c in ctrs:
            if not c.attached:
                c.cid = c.cid or f"{lab.prefix}-crash-{c.ns}-never"
                delete(c)
                c.cid = None
        assert not unexpected, "\n".join(unexpected)

        attached = {c.cid: c for c in ctrs if c.attached and c.cid}
        wait_for("queued releases sent",
                 lambda: lab.agent_status(host)["pending_releases"] == 0, 15)
        records = {a["container_id"]: a for a in lab.allocations()
                   if a["labels"].get("netd.network") == net}
        assert set(records) == set(attached), (
            f"IPAM holds {sorted(set(records) - set(attached))} that are not attached, "
            f"lacks {sorted(set(attached) - set(records))}")
        assert lab.pool()["allocated"] == before_allocated + len(attached)
        assert ndv_links(host_ns) == before_ndv | {host_ifname_for(cid) for cid in attached}
        known = {a["container_id"] for a in lab.agent_status(host)["attachments"]
                 if a["network"] == net}
        assert known == set(attached)
        for c in ctrs:
            names = set(links(c.ns))
            assert names == ({"lo", "eth0"} if c.attached else {"lo"}), (c.ns, names)
        for cid, c in attached.items():
            eth0 = links(c.ns)["eth0"]
            assert eth0["address"].lower() == records[cid]["mac"].lower()

        def reach(c: Ctr) -> tuple[str, bool]:
            r = in_ns(c.ns, "ping", "-c", "1", "-W", "2", GATEWAY)
            if r.returncode != 0:
                r = in_ns(c.ns, "ping", "-c", "2", "-W", "2", GATEWAY)
            return c.ns, r.returncode == 0

        with ThreadPoolExecutor(max_workers=8) as ex:
            unreachable = [ns for ns, ok in ex.map(reach, attached.values()) if not ok]
        assert not unreachable, f"cannot reach the gateway from {unreachable}"
        with agent_log.open("rb") as fh:
            fh.seek(log_start)
            repairs = [line.split("reconcile: ", 1)[1].split(" of ")[0]
                       for line in fh.read().decode(errors="replace").splitlines()
                       if "reconcile: " in line]
        print(f"\ncrash test (seed {seed}): {n_ops} ops in {ops_took:.1f}s, {stats}, "
              f"{len(attached)} attached at the end; agent restart to answering: "
              f"{min(restart_times):.2f}-{max(restart_times):.2f}s; reconcile repaired "
              f"{len(repairs)} thing(s): {sorted(set(repairs))}")
        assert time.monotonic() - started < 170
    finally:
        with contextlib.suppress(Exception):
            lab.ensure_agent(host)
        for c in ctrs:
            if c.cid:
                with contextlib.suppress(Exception):
                    run_plugin(NETD_CNI, "DEL", conf, container_id=c.cid, netns=c.path,
                               timeout=30)
            del_netns(c.ns)
    assert ndv_links(host_ns) == before_ndv
    assert not [a for a in lab.allocations() if a["labels"].get("netd.network") == net]


# --- 6. IPAM unreachable -----------------------------------------------------------------


def test_ipam_unreachable_del_queues_add_fails_fast(lab: Lab) -> None:
    host, host_ns = "h1", lab.ns("h1")
    net = f"{lab.prefix}-noipam"
    conf = netd_conf(net, lab.socket(host))
    before_ndv = ndv_links(host_ns)
    spaces = {k: lab.ns(k) for k in ("q1", "q2", "q3")}
    paths: dict[str, str] = {}
    ids = {k: f"{lab.prefix}-{k}-{secrets.token_hex(4)}" for k in spaces}

    def cni(command: str, k: str) -> CniRun:
        return run_plugin(NETD_CNI, command, conf, container_id=ids[k], netns=paths[k])

    try:
        for k, ns in spaces.items():
            paths[k] = add_netns(ns)
        for k in ("q1", "q3"):
            r = cni("ADD", k)
            assert r.rc == 0, str(r)
        held = lab.by_container()
        assert ids["q1"] in held and ids["q3"] in held

        # A. the IPAM process is gone (connections refused)
        lab.stop_ipam()
        assert not lab.ipam_healthy()
        d = cni("DEL", "q1")
        assert d.rc == 0 and d.took < 5, str(d)
        assert host_ifname_for(ids["q1"]) not in ndv_links(host_ns)
        assert set(links(spaces["q1"])) == {"lo"}
        assert lab.agent_status(host)["pending_releases"] >= 1
        a = cni("ADD", "q2")
        assert a.rc == 1 and a.code == 11 and a.took < 6, str(a)
        assert host_ifname_for(ids["q2"]) not in ndv_links(host_ns)
        assert set(links(spaces["q2"])) == {"lo"}
        # the agent crashes and restarts while the IPAM is still away: the queue survives
        took = lab.restart_agent(host)
        assert took < 10
        status = lab.agent_status(host)
        assert status["pending_releases"] >= 1 and not status["ipam_reachable"]
        # q3 survives the restart untouched
        assert host_ifname_for(ids["q3"]) in ndv_links(host_ns)
        lab.start_ipam()
        landed = wait_for("queued release of q1 sent",
                          lambda: ids["q1"] not in lab.by_container(), 10, 0.2)
        held = lab.by_container()
        assert ids["q2"] not in held and ids["q3"] in held
        wait_for("queue drained", lambda: lab.agent_status(host)["pending_releases"] == 0, 10)

        # B. the IPAM hangs (frozen: TCP accepts, nothing answers) - the hard case
        lab.ipam_signal(signal.SIGSTOP)
        try:
            d3 = cni("DEL", "q3")
            a2 = cni("ADD", "q2")
        finally:
            lab.ipam_signal(signal.SIGCONT)
        assert d3.rc == 0 and d3.took < 5, str(d3)
        assert host_ifname_for(ids["q3"]) not in ndv_links(host_ns)
        assert a2.rc == 1 and a2.code == 11 and a2.took < 6, str(a2)
        assert set(links(spaces["q2"])) == {"lo"}
        # the frozen server now works through what it was sent, the agent through its
        # queue: neither the late allocation of the failed ADD nor q3 may stay
        wait_for("no allocation left for q2 and q3",
                 lambda: not {ids["q2"], ids["q3"]} & set(lab.by_container()), 15, 0.2)
        print(f"\nIPAM refused: DEL {d.took:.2f}s, ADD -> 11 in {a.took:.2f}s, agent restart "
              f"{took:.2f}s, queued release landed {landed:.1f}s after the IPAM came back; "
              f"IPAM frozen: DEL {d3.took:.2f}s, ADD -> 11 in {a2.took:.2f}s")
    finally:
        lab.ensure_ipam()
        lab.ensure_agent(host)
        for k in spaces:
            if k in paths:
                with contextlib.suppress(Exception):
                    cni("DEL", k)
            del_netns(spaces[k])
    assert ndv_links(host_ns) == before_ndv


def test_add_retried_after_ipam_timeout_keeps_its_address(lab: Lab) -> None:
    """Error 11 invites the runtime to try again; the retry must keep its address."""
    host, cns = "h1", lab.ns("r1")
    conf = netd_conf(f"{lab.prefix}-retry", lab.socket(host))
    cid = f"{lab.prefix}-r1-{secrets.token_hex(4)}"
    netns = add_netns(cns)
    try:
        lab.ipam_signal(signal.SIGSTOP)
        try:
            first = run_plugin(NETD_CNI, "ADD", conf, container_id=cid, netns=netns)
        finally:
            lab.ipam_signal(signal.SIGCONT)
        assert first.code == 11, str(first)
        retry = run_plugin(NETD_CNI, "ADD", conf, container_id=cid, netns=netns)
        assert retry.rc == 0, str(retry)
        ip = retry.doc["ips"][0]["address"].split("/")[0]
        time.sleep(5)  # more than two rounds of the agent's release flusher
        assert host_ifname_for(cid) in ndv_links(lab.ns(host))
        rec = lab.by_container().get(cid)
        assert rec is not None and rec["ip"] == ip, f"{ip} in use by {cid} but IPAM has {rec}"
    finally:
        with contextlib.suppress(Exception):
            run_plugin(NETD_CNI, "DEL", conf, container_id=cid, netns=netns, timeout=30)
        del_netns(cns)
