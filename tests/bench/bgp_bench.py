"""BGP-mode benchmark: route propagation, re-announcement after a restart, CNI, TCP.

    .venv/bin/python -m tests.bench.bgp_bench [--out .bench/bgp.json] [--n 60] [--quick]

A benchmark, not a test: figures with the targets as PASS/MISS markers; nothing
asserts on time. Exit status 1 only when the measurement is not trustworthy (a
plugin answered an error, a route never came or went, a restart withdrew
something, iperf3 failed, something was left behind).

In ONE run, on this machine (root; per-run names, everything removed at the end):

1. ``netd lab up --mode bgp --racks 2 --hosts-per-rack 1``: h1 under tor-r1, h2
   under tor-r2, the core above (FRR 8.4, the configs of ``netd fabric
   config``), exabgp 5 in each agent. A reference host namespace with
   ``bridge`` + ``host-local`` (what cni_bench compares the L2 mode with).
2. CNI: N sequential ADDs then DELs of netd-cni on h1 (pool ``bgp``: veth, /32,
   proxy ARP, host route) and of the reference, interleaved; p50/p99.
   Target: ADD p50 <= 1.0x the reference.
3. Propagation: ``--samples`` times, an ADD on h2 of an address of h1's block
   (a borrowed address: the only ADD that changes the fabric's routes — an
   address of the host's own block is covered by the block already announced),
   timed from the ADD's exec to its /32 in the core's kernel FIB (h2's agent ->
   exabgp -> tor-r2 -> core bgpd -> zebra), polled every millisecond; then its
   DEL to the /32 gone from the core's FIB. p50/p99. Target: ADD -> FIB p50 <=
   150 ms.
4. Re-announcement: ``--routes`` blocks (pool ``dense``, /31 blocks) given to h1
   through the IPAM, announced; h1's agent killed (-9) and started again: the
   time from its start to tor-r1 holding the End-of-RIB of the new session
   (every route re-announced: the agent sends End-of-RIB after its
   announcements), and from the session's establishment to it; the core's FIB
   sampled throughout (graceful restart: it must never lose one of them).
   Target: start -> End-of-RIB <= 2 s for 1,000 routes.
5. Throughput (iperf3, TCP, one stream, ``--seconds`` each, rounds in turn): a
   container on h1 -> a container on h2 (other rack: h1, tor-r1, core, tor-r2,
   h2) against host h1 -> host h2 over the very same links. Target: containers
   >= 90% of the hosts. For information: two containers of the reference bridge.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import ipaddress
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from netd.dataplane.netlink import Netlink
from netd.dataplane.netns import create_netns
from netd.lab import lab_up, plan_lab
from netd.lab.bgp import FRR_BASE, FRR_LIB, POOL, SUBNET
from tests.bench.cni_bench import (
    REF_DIR,
    Plugin,
    Slot,
    new_cid,
    sequential,
    summarize,
)
from tests.bench.common import (
    BenchError,
    LabSetup,
    address_in,
    left_behind,
    log,
    mark,
    netd_plugin,
    quiet_sigterm,
    ratio,
    reference_plugin,
    run_and_report,
    throughput,
)
from tests.support.cnilab import Lab

TARGET_ADD_RATIO = 1.0
TARGET_PROPAGATION_MS = 150.0
TARGET_REANNOUNCE_S = 2.0
TARGET_REANNOUNCE_ROUTES = 1000
TARGET_THROUGHPUT = 0.9
DENSE = "dense"
DENSE_CIDR = "10.96.0.0/16"


Setup = LabSetup



# --- watching the fabric --------------------------------------------------------------------


def frr(prefix: str, node: str, command: str) -> Any:
    out = subprocess.run(["vtysh", "--vty_socket", str(FRR_BASE / prefix / node), "-c",
                          command], capture_output=True, text=True, timeout=30,
                         check=True).stdout
    return json.loads(out or "{}")


def fib(nl: Netlink, within: ipaddress.IPv4Network | None = None) -> set[str]:
    """The destinations of a namespace's main table (optionally those within a net)."""
    got = set()
    for r in nl.routes():
        if r.dst == "default":
            continue
        net = ipaddress.ip_network(r.dst, strict=False)
        if within is None or (net.version == 4 and net.subnet_of(within)):
            got.add(str(net))
    return got


def poll(what: str, done: Callable[[], bool], timeout: float, every: float = 0.001) -> float:
    """perf_counter() at the first ``done()``; BenchError after ``timeout``."""
    deadline = time.perf_counter() + timeout
    while True:
        if done():
            return time.perf_counter()
        if time.perf_counter() > deadline:
            raise BenchError(f"{what}: not within {timeout:g} s")
        time.sleep(every)


def in_thread(fn: Callable[[], Any]) -> Callable[[], Any]:
    """Run ``fn`` in a thread now; the returned call joins it (and re-raises)."""
    box: dict[str, Any] = {}

    def body() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # handed to the joiner
            box["error"] = exc

    t = threading.Thread(target=body, daemon=True)
    t.start()

    def join() -> Any:
        t.join(180)
        if "error" in box:
            raise box["error"]
        return box.get("value")

    return join


# --- the parts ------------------------------------------------------------------------------


def propagation(setup: Setup, lab: Lab, plugin: Plugin, samples: int,
                res: dict[str, Any]) -> None:
    """ADD of a borrowed address on h2 -> its /32 in the core's FIB; DEL -> gone."""
    blocks = lab.ipam(lambda c: c.blocks(pool=POOL, host="h1"))["blocks"]
    if not blocks:
        raise BenchError("h1 has no block of pool bgp after its ADDs")
    block = ipaddress.ip_network(blocks[0]["cidr"])
    held = {a["ip"] for a in lab.allocations(pool=POOL)}
    free = [str(ip) for ip in block.hosts() if str(ip) not in held][-samples:]
    if len(free) < samples:
        raise BenchError(f"h1's block {block} has fewer than {samples} free addresses")
    add_ms, del_ms, returned_ms = [], [], []
    with Netlink(setup.ns("core")) as core:
        for ip in free:
            dst, slot = f"{ip}/32", Slot(setup.ns(f"p{ip.replace('.', '-')}"), new_cid())
            create_netns(slot.netns)
            one = dataclasses.replace(plugin, config={**plugin.config,
                                                      "runtimeConfig": {"ips": [dst]}})
            t0 = time.perf_counter()
            join = in_thread(lambda o=one, s=slot: o.run("ADD", s.netns, s.cid))
            seen = poll(f"{dst} in the core's FIB", lambda d=dst: d in fib(core), 30)
            took, doc = join()
            if doc["ips"][0]["address"] != dst:
                raise BenchError(f"ADD asked for {dst}, got {doc['ips'][0]['address']}")
            add_ms.append(seen - t0)
            returned_ms.append(took)
            t0 = time.perf_counter()
            join = in_thread(lambda o=one, s=slot: o.run("DEL", s.netns, s.cid))
            gone = poll(f"{dst} gone from the core's FIB", lambda d=dst: d not in fib(core),
                        30)
            join()
            del_ms.append(gone - t0)
    res["propagation"] = {"add_to_core_fib": summarize(add_ms),
                          "del_to_gone": summarize(del_ms),
                          "add_returned": summarize(returned_ms), "block": str(block)}


def reannounce(setup: Setup, lab: Lab, routes: int, res: dict[str, Any]) -> None:
    """``routes`` blocks on h1; its agent killed and started: start -> End-of-RIB."""
    plan = setup.plan
    assert plan is not None
    h1 = plan.hosts[0]
    dense = ipaddress.ip_network(DENSE_CIDR)
    lab.ipam(lambda c: c.create_pool(name=DENSE, cidr=DENSE_CIDR, mode="bgp",
                                     block_prefix=31, labels={"bench": setup.prefix}))
    t = time.monotonic()

    def fill(c: Any) -> int:
        n = 0
        while len(c.blocks(pool=DENSE, host="h1")["blocks"]) < routes:
            for _ in range(2 * routes - n):  # two addresses per /31 block
                c.allocate(DENSE, f"bench-{n}", host="h1", labels={"bench": "dense"})
                n += 1
                if n % 200 == 0 and len(c.blocks(pool=DENSE, host="h1")["blocks"]) >= routes:
                    break
        return n

    allocated = lab.ipam(fill)
    want = {b["cidr"] for b in lab.ipam(lambda c: c.blocks(pool=DENSE, host="h1"))["blocks"]}
    log(f"  {allocated} allocations gave h1 {len(want)} blocks in "
        f"{time.monotonic() - t:.1f} s; waiting for the core to hold them ...")
    with Netlink(setup.ns("core")) as core:
        t0 = time.perf_counter()
        poll("h1's dense blocks at the core", lambda: want <= fib(core, dense), 120, 0.05)
        res_first = time.perf_counter() - t0
        tor = f"tor-{h1.rack}"
        peer = h1.address

        def neighbor() -> dict[str, Any]:
            return dict(frr(setup.prefix, tor, f"show bgp neighbors {peer} json").get(peer)
                        or {})

        lab.kill_agent("h1")
        poll("tor's session with h1 down", lambda: neighbor().get("bgpState") !=
             "Established", 30, 0.01)
        lowest = [len(want)]
        stop = threading.Event()

        def watch() -> None:  # graceful restart: the core must never lose one
            while not stop.is_set():  # (a dump of 1,000 routes costs CPU: 4 a second)
                lowest[0] = min(lowest[0], len(want & fib(core, dense)))
                time.sleep(0.25)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            t0 = time.perf_counter()
            join = in_thread(lambda: lab.start_agent("h1", timeout=60))
            # every 50 ms a vtysh: polling faster would take a CPU from the fabric
            established = poll("h1's session established", lambda: neighbor().get(
                "bgpState") == "Established", 60, 0.05)
            eor = poll("h1's End-of-RIB at the ToR", lambda: bool(
                neighbor().get("gracefulRestartInfo", {}).get("endOfRibRecv", {})
                .get("ipv4Unicast")), 60, 0.05)
            answered = join()
            time.sleep(1.0)  # what a late withdrawal would take
        finally:
            stop.set()
            watcher.join(10)
        at_tor = set(frr(setup.prefix, tor, "show bgp ipv4 unicast json").get("routes") or {})
    if not want <= at_tor:
        raise BenchError(f"after the restart tor-{h1.rack} lacks "
                         f"{len(want - at_tor)} of h1's {len(want)} blocks")
    if lowest[0] < len(want):
        raise BenchError(f"the core lost {len(want) - lowest[0]} of h1's blocks during the "
                         "restart (graceful restart failed)")
    res["reannounce"] = {"routes": len(want), "first_announce_s": round(res_first, 3),
                         "start_to_eor_s": round(eor - t0, 3),
                         "established_to_eor_s": round(eor - established, 3),
                         "start_to_established_s": round(established - t0, 3),
                         "agent_answering_s": round(float(answered), 3),
                         "core_lowest": lowest[0]}


def announced(setup: LabSetup, netns: str) -> None:
    """Until the block of ``netns``'s container (new on its host) is in the core's FIB."""
    with Netlink(setup.ns("core")) as core:
        poll("the container's block at the core", lambda: any(
            ipaddress.ip_address(address_in(netns)) in ipaddress.ip_network(d)
            for d in fib(core, SUBNET)), 30, 0.01)


# --- the run --------------------------------------------------------------------------------


def run(args: argparse.Namespace, setup: Setup, res: dict[str, Any]) -> None:
    n = args.n
    log(f"lab {setup.prefix}: bgp mode, 2 racks of 1 host, ToRs and core (FRR), IPAM")
    t = time.monotonic()
    plan = plan_lab(setup.prefix, 2, setup.tmp / "lab", "bgp", racks=2, hosts_per_rack=1,
                    cni_conf_dir=setup.tmp / "net.d")
    setup.plan = plan
    setup.tmp.joinpath("net.d").mkdir(parents=True, exist_ok=True)
    lab_up(plan, cni_bin_dir=setup.tmp / "bin", cooldown=0, echo=log)
    res["setup_s"] = round(time.monotonic() - t, 1)
    lab = Lab(prefix=setup.prefix, dir=plan.dir, rootfs=setup.tmp / "no-rootfs")
    ref_host = setup.ns("ref")
    create_netns(ref_host)
    slots = {"netd-cni": [Slot(setup.ns(f"n{i}")) for i in range(n)],
             "bridge+host-local": [Slot(setup.ns(f"r{i}")) for i in range(n)]}
    for kind in slots.values():
        for slot in kind:
            create_netns(slot.netns)
    def netd_of(host: Any) -> Plugin:
        return netd_plugin(setup, host, POOL)

    h1, h2 = plan.hosts
    netd = netd_of(h1)
    ref = reference_plugin(setup, ref_host)
    res["netd_cni_native"] = Path(netd.binary).read_bytes()[:4] == b"\x7fELF"

    log(f"warm-up ({args.warmup} ADD+DEL each) ...")
    sequential([netd, ref], slots, args.warmup)
    log(f"sequential: {n} ADD then {n} DEL of each, interleaved ...")
    seq = sequential([netd, ref], slots, n)
    res["sequential"] = {p: {c: summarize(v) for c, v in d.items()} for p, d in seq.items()}

    log(f"propagation: {args.samples} borrowed addresses on h2, to the core's FIB and back ...")
    propagation(setup, lab, netd_of(h2), args.samples, res)

    log(f"re-announcement: {args.routes} blocks on h1, its agent killed and started ...")
    reannounce(setup, lab, args.routes, res)

    log(f"throughput: iperf3 TCP, {args.rounds} rounds of {args.seconds:g} s per path ...")
    throughput(setup, netd_of, ref, args, res,
               "containers across racks (h1, tor-r1, core, tor-r2, h2)",
               "hosts across racks (their bond0 addresses, same links)",
               ready=lambda netns: announced(setup, netns))

    left = left_behind([slot.netns for kind in slots.values() for slot in kind], (h1, h2))
    if left:
        raise BenchError("left behind after the DELs: " + ", ".join(left[:10]))


def targets(res: dict[str, Any]) -> dict[str, Any]:
    seq = res["sequential"]
    add = ratio(seq["netd-cni"]["ADD"]["p50_ms"], seq["bridge+host-local"]["ADD"]["p50_ms"])
    dele = ratio(seq["netd-cni"]["DEL"]["p50_ms"], seq["bridge+host-local"]["DEL"]["p50_ms"])
    prop = res["propagation"]["add_to_core_fib"]["p50_ms"]
    re_s = res["reannounce"]["start_to_eor_s"]
    tput = res["throughput_ratio"]
    return {"add_p50_ratio": add, "del_p50_ratio": dele, "propagation_p50_ms": prop,
            "reannounce_s": re_s, "throughput_ratio": tput,
            "pass": {"add": add is not None and add <= TARGET_ADD_RATIO,
                     "propagation": prop is not None and prop <= TARGET_PROPAGATION_MS,
                     "reannounce": (res["reannounce"]["routes"] >= TARGET_REANNOUNCE_ROUTES
                                    and re_s <= TARGET_REANNOUNCE_S),
                     "throughput": tput is not None and tput >= TARGET_THROUGHPUT}}


def report(res: dict[str, Any]) -> str:
    seq, tg, prop, rean = (res["sequential"], res["targets"], res["propagation"],
                           res["reannounce"])
    lines = [f"BGP benchmark  {res['env']['date']}  {res['env']['cpus']} CPUs  "
             f"load {res['env']['loadavg_start']} -> {res['env'].get('loadavg_end', '?')}",
             f"netd-cni ({'native fast path' if res.get('netd_cni_native') else 'Python'}) "
             "in bgp mode (FRR 8.4 ToRs + core, exabgp 5), pool bgp; reference "
             "bridge+host-local", "", f"sequential, n={res['params']['n']} each   "
                                      "p50 ms    p99 ms"]
    for name in ("netd-cni", "bridge+host-local"):
        for command in ("ADD", "DEL"):
            s = seq[name][command]
            lines.append(f"  {name:18} {command}  {s['p50_ms']:8.1f}  {s['p99_ms']:8.1f}")
    lines += ["", f"propagation, {res['params']['samples']} borrowed /32s from h2 "
                  "(ms)            p50       p99"]
    for key, what in (("add_to_core_fib", "ADD exec -> /32 in the core's FIB"),
                      ("del_to_gone", "DEL exec -> /32 gone from the core's FIB"),
                      ("add_returned", "for information: the ADD returned")):
        s = prop[key]
        lines.append(f"  {what:48} {s['p50_ms']:8.1f}  {s['p99_ms']:8.1f}")
    lines += ["", f"re-announcement of {rean['routes']} blocks after kill -9 + start of h1's "
                  "agent (s)",
              f"  start -> agent answering {rean['agent_answering_s']:.2f}, -> session "
              f"established {rean['start_to_established_s']:.2f}, -> End-of-RIB at the ToR "
              f"{rean['start_to_eor_s']:.2f} (established -> EoR "
              f"{rean['established_to_eor_s']:.2f}); the core kept {rean['core_lowest']}/"
              f"{rean['routes']} throughout; first announcement "
              f"{rean['first_announce_s']:.2f}"]
    lines += ["", f"TCP, one stream, {res['params']['seconds']:g} s x {res['params']['rounds']}"
                  " rounds                         Gbit/s (median; rounds)"]
    for name, t in res["throughput_gbps"].items():
        each = ", ".join(f"{x:.2f}" for x in t["rounds"])
        lines.append(f"  {name:62} {t['median']:5.2f}  ({each})")
    lines += [
        "",
        f"ADD p50 ratio       {tg['add_p50_ratio']:.2f}x  target <= {TARGET_ADD_RATIO}x  "
        f"{mark(tg['add_p50_ratio'], TARGET_ADD_RATIO)}",
        f"DEL p50 ratio       {tg['del_p50_ratio']:.2f}x  (for information)",
        f"ADD -> core FIB p50 {tg['propagation_p50_ms']:.0f} ms  target <= "
        f"{TARGET_PROPAGATION_MS:.0f} ms  {mark(tg['propagation_p50_ms'], TARGET_PROPAGATION_MS)}",
        f"re-announcement     {tg['reannounce_s']:.2f} s for {rean['routes']}  target <= "
        f"{TARGET_REANNOUNCE_S:g} s for {TARGET_REANNOUNCE_ROUTES}  "
        + ("[PASS]" if tg["pass"]["reannounce"] else "[MISS]"),
        f"throughput ratio    {tg['throughput_ratio']:.2f}   target >= {TARGET_THROUGHPUT}  "
        + ("[PASS]" if tg["pass"]["throughput"] else "[MISS]"),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.bench.bgp_bench",
                                 description="the BGP mode: propagation, re-announcement, "
                                             "CNI vs bridge+host-local, TCP across racks")
    ap.add_argument("--out", default=".bench/bgp.json", help="JSON report path")
    ap.add_argument("--n", type=int, default=60, help="sequential ADDs (and DELs) per plugin")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--samples", type=int, default=30, help="propagation samples")
    ap.add_argument("--routes", type=int, default=TARGET_REANNOUNCE_ROUTES,
                    help="blocks re-announced after the restart")
    ap.add_argument("--rounds", type=int, default=5, help="iperf3 rounds per path")
    ap.add_argument("--seconds", type=float, default=5.0, help="seconds per iperf3 run")
    ap.add_argument("--prefix", default=None, help="name prefix (default: nbb + 6 hex digits)")
    ap.add_argument("--quick", action="store_true", help="small counts: a quick look")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny counts, no targets: proves the benchmark runs (the test suite "
                         "does this)")
    args = ap.parse_args(argv)
    if args.quick:
        args.n, args.warmup, args.samples, args.rounds, args.seconds = 20, 2, 10, 1, 3.0
    if args.smoke:
        args.n, args.warmup, args.samples, args.routes, args.rounds, args.seconds = \
            3, 1, 2, 20, 1, 1.0
    if os.geteuid() != 0:
        log("bgp_bench needs root (network namespaces)")
        return 1
    missing = [b for b in ("bridge", "host-local") if not os.access(REF_DIR / b, os.X_OK)]
    if missing or not (FRR_LIB / "bgpd").exists() or shutil.which("iperf3") is None:
        log("bgp_bench needs containernetworking-plugins, frr and iperf3 (make deps)")
        return 1
    quiet_sigterm()
    prefix = args.prefix or f"nbb{secrets.token_hex(3)}"
    setup = Setup(prefix, Path(tempfile.mkdtemp(prefix="netd-bgp-bench-")))
    return run_and_report(args, setup, prefix, run, targets, report)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
    sys.exit(130)
