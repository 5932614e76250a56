"""CNI benchmark: ``netd-cni`` against the reference ``bridge`` + ``host-local`` plugins.

    .venv/bin/python -m tests.bench.cni_bench [--out .bench/cni.json] [--n 100] [--quick]

A benchmark, not a test: it prints figures, with the targets of issue 3 next to
them as PASS/MISS markers; nothing asserts on time. The exit status is 1 only
when the measurement itself is not trustworthy: a plugin answered an error, a
result is malformed, something was left behind after the DELs.

In ONE run, on this machine (root; everything in namespaces named with a
per-run prefix, removed at the end, also after a failure or Ctrl-C):

1. ``netd lab up`` with one host (switch, gateway, IPAM server, host namespace
   with ``br0`` over ``bond0`` and ``netd agent``), ``netd-cni`` and
   ``netd-ipam`` installed by ``netd install-cni`` into a per-run bin
   directory (with its native fast path: the bench installs gcc when there is
   no C compiler, as make targets install what they need; the report says
   which plugin ran); the agent runs with its default settings (the report
   states the duplicate-address-detection timeout it ran with).
2. A "reference host" namespace for the reference plugins: ``bridge`` (bridge
   ``PREFIXbr``, created by its first ADD) with ``host-local`` IPAM (its own
   subnet, a per-run ``dataDir``), a default route via the subnet's gateway as
   netd configures one.
3. N pre-created container namespaces per plugin. Each plugin is executed the
   way a runtime executes it: one process per command, ``CNI_*`` environment,
   the network config on stdin, and through ``ip netns exec HOSTNS PLUGIN`` for
   both, so both pay the same exec path and run in their host's namespace.
4. Sequential: N ADDs then N DELs of each, interleaved (netd, reference,
   reference, netd, ...) so drifting background load hits both alike; p50/p99.
5. Concurrent: 32 ADDs at once from 32 threads, wall time (then the DELs, also
   concurrent, timed for information); ``--rounds`` rounds alternating which
   plugin goes first; the median wall time of each is compared.
6. The port guard's cost: sequential ADD/DEL with the agent restarted with
   ``[l2] guard = true`` and ``false`` in blocks taken in turn; the p50
   difference is what the guard costs an ADD (and a DEL).
7. For information: the same sequential ADD/DEL with the agent restarted with
   duplicate address detection off (``[l2] dad_timeout = 0``), the Python
   plugin alone (``install-cni --no-native``), and the exec time of
   ``VERSION`` (interpreter or binary start-up alone) of each plugin.

After each sequential command (untimed) the container's eth0 must be up (ADD)
or gone (DEL); after the runs nothing may be left: no interface in a container
namespace, no ``ndv*`` host end, no host-local lease, no attachment or queued
release in the agent.

Targets (issue 3): ADD p50 <= 1.5x the reference, DEL p50 <= 1.0x, 32
concurrent ADDs no slower than the reference's.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import math
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from netd.cni import install as cni_install
from netd.dataplane.l2driver import DEFAULT_DAD_TIMEOUT
from netd.dataplane.netlink import Netlink
from netd.dataplane.netns import create_netns
from netd.lab import SUBNET, LabPlan, lab_up, plan_lab
from netd.lab.base import agent_config_text
from netd.lab.procs import alive, start_process, stop_pids
from tests.bench.common import (
    BenchError,
    log,
    mark,
    quiet_sigterm,
    ratio,
    run_and_report,
    teardown_lab,
)

REPO = Path(__file__).resolve().parents[2]
REF_DIR = Path("/usr/lib/cni")
REF_SUBNET = "198.18.64.0/24"
GUARD_BLOCKS = 4  # on, off, on, off: drift hits both alike
REF_GATEWAY = "198.18.64.1"
IFNAME = "eth0"
CNI_VERSION = "1.0.0"

TARGET_ADD_RATIO = 1.5
TARGET_DEL_RATIO = 1.0
TARGET_CONCURRENT_RATIO = 1.0




# --- figures ---------------------------------------------------------------------


def summarize(lat_s: Sequence[float]) -> dict[str, Any]:
    """Nearest-rank percentiles of latencies given in seconds, reported in ms."""
    s = sorted(lat_s)
    n = len(s)
    if not n:
        return {"n": 0, "p50_ms": None, "p99_ms": None, "min_ms": None, "max_ms": None}

    def pct(p: float) -> float:
        return round(s[max(0, math.ceil(p * n / 100) - 1)] * 1000, 2)

    return {"n": n, "p50_ms": pct(50), "p90_ms": pct(90), "p99_ms": pct(99),
            "min_ms": round(s[0] * 1000, 2), "max_ms": round(s[-1] * 1000, 2),
            "mean_ms": round(sum(s) / n * 1000, 2)}


# --- plugins as a runtime runs them ------------------------------------------------------


@dataclass(frozen=True)
class Plugin:
    """One CNI plugin as the bench executes it: ``ip netns exec HOSTNS BINARY``."""

    name: str
    binary: str
    host_netns: str
    config: dict[str, Any]
    cni_path: str

    def run(self, command: str, netns: str, container_id: str) -> tuple[float, dict[str, Any]]:
        """Execute one command; (seconds, parsed stdout). Raises BenchError on an error."""
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "CNI_COMMAND": command,
               "CNI_CONTAINERID": container_id, "CNI_NETNS": f"/run/netns/{netns}",
               "CNI_IFNAME": IFNAME, "CNI_PATH": self.cni_path}
        stdin = json.dumps(self.config).encode()
        argv = ["ip", "netns", "exec", self.host_netns, self.binary]
        started = time.perf_counter()
        proc = subprocess.run(argv, input=stdin, env=env, capture_output=True, timeout=120,
                              check=False)
        elapsed = time.perf_counter() - started
        out = proc.stdout.decode(errors="replace").strip()
        if proc.returncode != 0:
            raise BenchError(f"{self.name} {command} {container_id[:12]} in {netns} exited "
                             f"{proc.returncode}: {out or proc.stderr.decode(errors='replace')}")
        try:
            doc = json.loads(out) if out else {}
        except ValueError as exc:
            raise BenchError(f"{self.name} {command}: stdout is not JSON: {out!r}") from exc
        if command == "ADD":
            ips = doc.get("ips") or []
            if not ips or "address" not in ips[0]:
                raise BenchError(f"{self.name} ADD: result without an address: {out}")
        return elapsed, doc

    def version_exec_s(self, runs: int) -> float:
        """Median time of ``VERSION`` executed directly (start-up cost of the binary)."""
        times = []
        for _ in range(runs):
            started = time.perf_counter()
            subprocess.run([self.binary], input=b'{"cniVersion": "1.0.0"}',
                           env={"CNI_COMMAND": "VERSION"}, capture_output=True, check=True,
                           timeout=30)
            times.append(time.perf_counter() - started)
        return statistics.median(times)


def new_cid() -> str:
    return secrets.token_hex(32)


@dataclass
class Slot:
    """One container namespace and the id of the container currently in it."""

    netns: str
    cid: str = ""


def check_plumbing(netns: str, present: bool) -> None:
    """After an ADD: eth0 is up in the container; after a DEL: it is gone (untimed)."""
    with Netlink(netns) as nl:
        link = nl.link(IFNAME)
    if present and (link is None or not link.up):
        raise BenchError(f"after ADD, {IFNAME} in {netns} is {'down' if link else 'missing'}")
    if not present and link is not None:
        raise BenchError(f"after DEL returned, {IFNAME} is still in {netns}")


def sequential(plugins: Sequence[Plugin], slots: dict[str, list[Slot]], n: int,
               ) -> dict[str, dict[str, list[float]]]:
    """N ADDs then N DELs of every plugin, interleaved; {plugin: {"ADD": [s], "DEL": [s]}}.

    After each command (untimed) the container's namespace is checked: eth0 up
    after an ADD, gone once a DEL has returned.
    """
    lat: dict[str, dict[str, list[float]]] = {p.name: {"ADD": [], "DEL": []} for p in plugins}
    for command in ("ADD", "DEL"):
        for i in range(n):
            order = plugins if i % 2 == 0 else list(reversed(plugins))
            for p in order:
                slot = slots[p.name][i]
                if command == "ADD":
                    slot.cid = new_cid()
                dt, _ = p.run(command, slot.netns, slot.cid)
                lat[p.name][command].append(dt)
                check_plumbing(slot.netns, command == "ADD")
    return lat


def concurrent(p: Plugin, slots: Sequence[Slot], width: int) -> dict[str, Any]:
    """``width`` ADDs at once (one thread each), then the DELs at once; wall times."""
    for slot in slots:
        slot.cid = new_cid()
    barrier = threading.Barrier(width)

    def one(command: str, slot: Slot) -> float:
        barrier.wait(timeout=60)
        return p.run(command, slot.netns, slot.cid)[0]

    out: dict[str, Any] = {}
    with ThreadPoolExecutor(max_workers=width) as pool:
        for command in ("ADD", "DEL"):
            barrier.reset()
            started = time.perf_counter()
            futures = [pool.submit(one, command, s) for s in slots[:width]]
            lat = [f.result() for f in futures]
            wall = time.perf_counter() - started
            out[command] = {"wall_ms": round(wall * 1000, 1), "latency": summarize(lat)}
    return out


# --- the setup ---------------------------------------------------------------------------


@dataclass
class Setup:
    prefix: str
    tmp: Path
    plan: LabPlan | None = None
    manifest: dict[str, Any] | None = None
    netd_bin: str = ""

    @property
    def ref_netns(self) -> str:
        return f"{self.prefix}-ref"

    @property
    def ref_bridge(self) -> str:
        return f"{self.prefix}br"

    def slot_netns(self, kind: str, i: int) -> str:
        return f"{self.prefix}-{kind}{i}"

    def teardown(self) -> list[str]:
        return teardown_lab(self.plan, self.prefix, self.tmp)


def build(setup: Setup, slots_per_plugin: int, cooldown: float) -> None:
    plan = plan_lab(setup.prefix, 1, setup.tmp / "lab", cni_conf_dir=setup.tmp / "net.d")
    setup.plan = plan
    setup.tmp.joinpath("net.d").mkdir(parents=True, exist_ok=True)
    setup.manifest = lab_up(plan, cni_bin_dir=setup.tmp / "bin", cooldown=cooldown,
                            echo=log)
    create_netns(setup.ref_netns)
    for kind in ("n", "r"):
        for i in range(slots_per_plugin):
            create_netns(setup.slot_netns(kind, i))


def restart_agent(setup: Setup, dad_timeout: float | None, guard: bool | None = None) -> None:
    """Restart the lab's agent with ``[l2] dad_timeout`` and ``guard`` set (None: the
    default)."""
    assert setup.plan is not None and setup.manifest is not None
    plan, manifest = setup.plan, setup.manifest
    host = plan.hosts[0]
    record = manifest["hosts"][0]
    stop_pids([record["agent"]["pid"]])
    text = agent_config_text(plan, host)
    if dad_timeout is not None:
        text += f"dad_timeout = {dad_timeout}\n"  # the [l2] table is the last one
    if guard is not None:
        text += f"guard = {'true' if guard else 'false'}\n"
    host.config.write_text(text)
    host.socket.unlink(missing_ok=True)
    argv = [setup.netd_bin, "agent", "--config", str(host.config)]
    record["agent"] = start_process(host.netns, argv, host.log)
    pid = record["agent"]["pid"]
    deadline = time.monotonic() + 30
    while not host.socket.exists():
        if not alive(pid) or time.monotonic() > deadline:
            raise BenchError(f"the agent did not come back:\n{host.log.read_text()[-2000:]}")
        time.sleep(0.02)


def guard_table(netns: str) -> bool:
    """Whether the agent's port guard table (nftables, bridge family) is in ``netns``."""
    proc = subprocess.run(["ip", "netns", "exec", netns, "nft", "list", "tables", "bridge"],
                          capture_output=True, text=True, timeout=30, check=False)
    return "netd_" in proc.stdout


def leftovers(setup: Setup, slots: dict[str, list[Slot]]) -> list[str]:
    """Interfaces left in container namespaces, netd host ends, host-local leases."""
    assert setup.plan is not None
    found = []
    for kind in slots.values():
        for slot in kind:
            with Netlink(slot.netns) as nl:
                names = [link.name for link in nl.links() if link.name != "lo"]
            if names:
                found.append(f"{slot.netns}: {', '.join(names)}")
    with Netlink(setup.plan.hosts[0].netns) as nl:
        found += [f"host end {link.name}" for link in nl.links()
                  if link.name.startswith("ndv")]
    leases = setup.tmp / "host-local" / "refnet"
    if leases.is_dir():
        found += [f"host-local lease {p.name}" for p in leases.iterdir()
                  if p.name[0].isdigit()]
    return found


def agent_status(setup: Setup) -> dict[str, Any]:
    from netd.cni.server import call

    assert setup.plan is not None
    answer = call(str(setup.plan.hosts[0].socket), {"command": "AGENT_STATUS"}, timeout=10)
    return dict(answer["result"])


# --- the run ------------------------------------------------------------------------------


def run(args: argparse.Namespace, setup: Setup, res: dict[str, Any]) -> None:
    n, width = args.n, args.concurrency
    slots_n = max(n, width)
    log(f"lab {setup.prefix}: 1 host, IPAM, agent; {slots_n} container namespaces per plugin")
    t = time.monotonic()
    build(setup, slots_n, cooldown=0)
    assert setup.plan is not None
    res["setup_s"] = round(time.monotonic() - t, 1)
    setup.netd_bin = str(Path(sys.executable).parent / "netd")
    host = setup.plan.hosts[0]
    default_dad = DEFAULT_DAD_TIMEOUT
    res["dad_timeout_s"] = default_dad
    netd = Plugin("netd-cni", str(setup.tmp / "bin" / "netd-cni"), host.netns,
                  {"cniVersion": CNI_VERSION, "name": host.network, "type": "netd-cni",
                   "pool": "lab", "agentSocket": str(host.socket)},
                  str(setup.tmp / "bin"))
    ref = Plugin("bridge+host-local", str(REF_DIR / "bridge"), setup.ref_netns,
                 {"cniVersion": CNI_VERSION, "name": "refnet", "type": "bridge",
                  "bridge": setup.ref_bridge,
                  "ipam": {"type": "host-local", "subnet": REF_SUBNET, "gateway": REF_GATEWAY,
                           "dataDir": str(setup.tmp / "host-local"),
                           "routes": [{"dst": "0.0.0.0/0"}]}},
                 str(REF_DIR))
    plugins = [netd, ref]
    res["netd_cni_native"] = Path(netd.binary).read_bytes()[:4] == b"\x7fELF"
    slots = {netd.name: [Slot(setup.slot_netns("n", i)) for i in range(slots_n)],
             ref.name: [Slot(setup.slot_netns("r", i)) for i in range(slots_n)]}

    log(f"warm-up ({args.warmup} ADD+DEL each) ...")
    sequential(plugins, slots, args.warmup)
    # the results are right: netd's address is from the lab's pool, on eth0 with its MAC
    cid = new_cid()
    _, doc = netd.run("ADD", slots[netd.name][0].netns, cid)
    address = doc["ips"][0]["address"]
    if ipaddress.ip_interface(address).ip not in SUBNET:
        raise BenchError(f"netd-cni ADD gave {address}, outside the lab pool {SUBNET}")
    netd.run("DEL", slots[netd.name][0].netns, cid)

    log(f"sequential: {n} ADD then {n} DEL of each, interleaved (DAD {default_dad:g} s) ...")
    seq = sequential(plugins, slots, n)
    res["sequential"] = {p: {c: summarize(v) for c, v in d.items()} for p, d in seq.items()}

    log(f"concurrent: {width} ADDs at once, {args.rounds} rounds ...")
    rounds: dict[str, list[dict[str, Any]]] = {p.name: [] for p in plugins}
    for r in range(args.rounds):
        for p in plugins if r % 2 == 0 else reversed(plugins):
            rounds[p.name].append(concurrent(p, slots[p.name], width))
    res["concurrent"] = {
        name: {"rounds": rs,
               "add_wall_ms": statistics.median(x["ADD"]["wall_ms"] for x in rs),
               "del_wall_ms": statistics.median(x["DEL"]["wall_ms"] for x in rs)}
        for name, rs in rounds.items()}

    status = agent_status(setup)
    left = leftovers(setup, slots)
    if status["attachments"] or status["pending_releases"]:
        left.append(f"agent still records {len(status['attachments'])} attachment(s), "
                    f"{status['pending_releases']} pending release(s)")
    if left:
        raise BenchError("left behind after the DELs: " + "; ".join(left[:10]))

    if args.dad_off:
        log(f"for information: DAD off ({args.dad_off} ADD+DEL each) ...")
        restart_agent(setup, 0)
        sequential([netd], slots, min(args.warmup, 5))
        off = sequential([netd], slots, args.dad_off)
        res["dad_off"] = {c: summarize(v) for c, v in off[netd.name].items()}
        restart_agent(setup, None)

    if args.guard:
        log(f"the port guard's cost: {args.guard} ADD+DEL with it and without, in "
            f"{GUARD_BLOCKS} blocks taken in turn ...")
        on: dict[str, list[float]] = {"ADD": [], "DEL": []}
        off: dict[str, list[float]] = {"ADD": [], "DEL": []}
        each = min(max(1, args.guard // (GUARD_BLOCKS // 2)), len(slots[netd.name]))
        for block in range(GUARD_BLOCKS):
            guarded = block % 2 == 0
            restart_agent(setup, None, guard=guarded)
            sequential([netd], slots, 1)  # the restarted agent's first ADD
            if guard_table(host.netns) != guarded:
                raise BenchError(f"the agent restarted with guard = {guarded} but its nftables "
                                 f"table is {'missing' if guarded else 'there'}")
            got = sequential([netd], slots, each)[netd.name]
            for command in ("ADD", "DEL"):
                (on if guarded else off)[command] += got[command]
        restart_agent(setup, None)
        res["guard"] = {"on": {c: summarize(v) for c, v in on.items()},
                        "off": {c: summarize(v) for c, v in off.items()}}
        g = res["guard"]
        res["guard"]["add_p50_cost_ms"] = round(g["on"]["ADD"]["p50_ms"]
                                                - g["off"]["ADD"]["p50_ms"], 2)
        res["guard"]["del_p50_cost_ms"] = round(g["on"]["DEL"]["p50_ms"]
                                                - g["off"]["DEL"]["p50_ms"], 2)
        res["guard"]["add_p50_ratio"] = ratio(g["on"]["ADD"]["p50_ms"], g["off"]["ADD"]["p50_ms"])

    if args.python_only:
        log(f"for information: the Python plugin alone ({args.python_only} ADD+DEL) ...")
        py_bin = setup.tmp / "bin-python"
        proc = subprocess.run([setup.netd_bin, "install-cni", "--no-native", "--bin-dir",
                               str(py_bin)], capture_output=True, text=True, timeout=120,
                              check=False)
        if proc.returncode != 0:
            raise BenchError(f"netd install-cni --no-native: {proc.stderr.strip()}")
        python_plugin = Plugin("netd-cni (python)", str(py_bin / "netd-cni"), host.netns,
                               netd.config, str(py_bin))
        res["python_plugin"] = {c: summarize(v) for c, v in sequential(
            [python_plugin], {python_plugin.name: slots[netd.name]},
            args.python_only)[python_plugin.name].items()}
        plugins.append(python_plugin)

    left = leftovers(setup, slots)
    if left:
        raise BenchError("left behind after the information runs: " + "; ".join(left[:10]))
    res["notes"] = [
        "netd-cni DEL returns once the kernel reports the veth unregistered (both ends gone, "
        "checked after each DEL); the kernel frees the devices an RCU grace period later, in "
        "the background. The reference returns after its RTM_DELLINK request, i.e. after it.",
        "netd-cni ADD includes the duplicate-address probe wait (dad_timeout); the reference "
        "probes nothing.",
    ]

    log("exec time of VERSION ...")
    res["version_exec_ms"] = {p.name: round(p.version_exec_s(args.version_runs) * 1000, 2)
                              for p in plugins}
    res["version_exec_ms"]["host-local"] = round(Plugin(
        "host-local", str(REF_DIR / "host-local"), "", {}, "").version_exec_s(
            args.version_runs) * 1000, 2)


def targets(res: dict[str, Any]) -> dict[str, Any]:
    seq = res["sequential"]
    n_add, r_add = seq["netd-cni"]["ADD"]["p50_ms"], seq["bridge+host-local"]["ADD"]["p50_ms"]
    n_del, r_del = seq["netd-cni"]["DEL"]["p50_ms"], seq["bridge+host-local"]["DEL"]["p50_ms"]
    conc = res["concurrent"]
    n_c, r_c = conc["netd-cni"]["add_wall_ms"], conc["bridge+host-local"]["add_wall_ms"]
    out = {
        "add_p50_ratio": ratio(n_add, r_add), "del_p50_ratio": ratio(n_del, r_del),
        "concurrent_add_wall_ratio": ratio(n_c, r_c),
    }
    out["pass"] = {
        "add": out["add_p50_ratio"] is not None and out["add_p50_ratio"] <= TARGET_ADD_RATIO,
        "del": out["del_p50_ratio"] is not None and out["del_p50_ratio"] <= TARGET_DEL_RATIO,
        "concurrent": (out["concurrent_add_wall_ratio"] is not None
                       and out["concurrent_add_wall_ratio"] <= TARGET_CONCURRENT_RATIO),
    }
    return out


def report(res: dict[str, Any]) -> str:
    seq, conc, tg = res["sequential"], res["concurrent"], res["targets"]
    names = ["netd-cni", "bridge+host-local"]
    lines = [
        f"CNI benchmark  {res['env']['date']}  {res['env']['cpus']} CPUs  "
        f"load {res['env']['loadavg_start']} -> {res['env'].get('loadavg_end', '?')}",
        f"netd-cni ({'native fast path' if res.get('netd_cni_native') else 'Python plugin'}): "
        f"L2 mode, 1 lab host, agent defaults: DAD (ARP probe) {res['dad_timeout_s'] * 1000:g}"
        " ms",
        "each plugin exec'd as 'ip netns exec HOSTNS PLUGIN' with CNI_* env + stdin; "
        "eth0 checked after each (untimed)",
        "",
        f"sequential, n={res['params']['n']} each   p50 ms    p99 ms",
    ]
    for name in names:
        for command in ("ADD", "DEL"):
            s = seq[name][command]
            lines.append(f"  {name:18} {command}  {s['p50_ms']:8.1f}  {s['p99_ms']:8.1f}")
    width = res["params"]["concurrency"]
    lines += ["", f"concurrent, {width} at once (median of {res['params']['rounds']} rounds)"
                  "   ADD wall ms   (DEL wall ms)"]
    for name in names:
        c = conc[name]
        walls = ", ".join(f"{x['ADD']['wall_ms']:.0f}" for x in c["rounds"])
        lines.append(f"  {name:18} {c['add_wall_ms']:10.0f}   ({c['del_wall_ms']:.0f})"
                     f"   rounds: {walls}")
    lines += [
        "",
        f"ADD p50 ratio            {tg['add_p50_ratio']:.2f}x  target <= {TARGET_ADD_RATIO}x  "
        f"{mark(tg['add_p50_ratio'], TARGET_ADD_RATIO)}",
        f"DEL p50 ratio            {tg['del_p50_ratio']:.2f}x  target <= {TARGET_DEL_RATIO}x  "
        f"{mark(tg['del_p50_ratio'], TARGET_DEL_RATIO)}",
        f"{width} concurrent ADD wall  {tg['concurrent_add_wall_ratio']:.2f}x  target <= "
        f"{TARGET_CONCURRENT_RATIO}x  "
        f"{mark(tg['concurrent_add_wall_ratio'], TARGET_CONCURRENT_RATIO)}",
    ]
    lines += [f"note: {n}" for n in res.get("notes", [])]
    if "dad_off" in res:
        off = res["dad_off"]
        lines += ["", f"information: netd-cni with DAD off (dad_timeout = 0), n={off['ADD']['n']}:"
                      f" ADD p50 {off['ADD']['p50_ms']:.1f} ms, DEL p50 "
                      f"{off['DEL']['p50_ms']:.1f} ms"]
    if "guard" in res:
        g = res["guard"]
        lines += ["", f"the port guard ([l2] guard, nftables bridge table; n={g['on']['ADD']['n']}"
                      f" each, in {GUARD_BLOCKS} blocks taken in turn):",
                  f"  guard on   ADD p50 {g['on']['ADD']['p50_ms']:.1f} ms  p99 "
                  f"{g['on']['ADD']['p99_ms']:.1f} ms   DEL p50 {g['on']['DEL']['p50_ms']:.1f} ms",
                  f"  guard off  ADD p50 {g['off']['ADD']['p50_ms']:.1f} ms  p99 "
                  f"{g['off']['ADD']['p99_ms']:.1f} ms   DEL p50 "
                  f"{g['off']['DEL']['p50_ms']:.1f} ms",
                  f"  cost per ADD (p50) {g['add_p50_cost_ms']:+.2f} ms ({g['add_p50_ratio']}x), "
                  f"per DEL {g['del_p50_cost_ms']:+.2f} ms"]
    if "python_plugin" in res:
        py = res["python_plugin"]
        lines.append(f"information: the Python plugin alone (install-cni --no-native), "
                     f"n={py['ADD']['n']}: ADD p50 {py['ADD']['p50_ms']:.1f} ms, DEL p50 "
                     f"{py['DEL']['p50_ms']:.1f} ms")
    if "version_exec_ms" in res:
        v = res["version_exec_ms"]
        lines.append("information: exec time of VERSION (start-up alone; the native netd-cni "
                     "hands VERSION to its Python plugin), median: "
                     + ", ".join(f"{k} {x:.1f} ms" for k, x in v.items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.bench.cni_bench",
                                 description="netd-cni vs bridge+host-local (prints figures, "
                                             "writes JSON)")
    ap.add_argument("--out", default=".bench/cni.json", help="JSON report path")
    ap.add_argument("--n", type=int, default=100, help="sequential ADDs (and DELs) per plugin")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3, help="concurrent rounds per plugin")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--dad-off", type=int, default=40,
                    help="sequential ADD+DELs with DAD off, for information (0: skip)")
    ap.add_argument("--python-only", type=int, default=30,
                    help="sequential ADD+DELs of the Python plugin alone (install-cni "
                         "--no-native), for information (0: skip)")
    ap.add_argument("--guard", type=int, default=60,
                    help="sequential ADD+DELs with the port guard and as many without, to "
                         "report its cost (0: skip)")
    ap.add_argument("--version-runs", type=int, default=20)
    ap.add_argument("--prefix", default=None, help="name prefix (default: ncb + 6 hex digits)")
    ap.add_argument("--quick", action="store_true", help="small counts: a quick look")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny counts, no targets: proves the benchmark runs (the test suite "
                         "does this)")
    args = ap.parse_args(argv)
    if args.quick:
        args.n, args.rounds, args.warmup, args.dad_off, args.version_runs = 20, 1, 2, 10, 5
        args.python_only, args.guard = 10, 20
    if args.smoke:
        args.n, args.rounds, args.warmup, args.dad_off, args.version_runs = 3, 1, 1, 2, 2
        args.python_only, args.concurrency, args.guard = 2, 4, 2
    if os.geteuid() != 0:
        log("cni_bench needs root (network namespaces)")
        return 1
    for binary in ("bridge", "host-local"):
        if not os.access(REF_DIR / binary, os.X_OK):
            log(f"reference plugin {REF_DIR / binary} missing: apt-get install "
                "containernetworking-plugins")
            return 1

    if cni_install.find_cc() is None:
        # like every make target: install what it needs (install-cni builds the
        # plugin's native fast path with it; without, the report says "Python plugin")
        log("no C compiler: installing gcc (scripts/install-deps gcc libc6-dev) ...")
        subprocess.run([str(REPO / "scripts" / "install-deps"), "gcc", "libc6-dev"],
                       check=False, timeout=900)

    quiet_sigterm()
    prefix = args.prefix or f"ncb{secrets.token_hex(3)}"
    setup = Setup(prefix, Path(tempfile.mkdtemp(prefix="netd-cni-bench-")))
    return run_and_report(args, setup, prefix, run, targets, report)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
    sys.exit(130)
