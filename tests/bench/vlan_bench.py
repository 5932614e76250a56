"""VLAN-mode benchmark: netd-cni on ovs0 against the reference plugins, and TCP throughput.

    .venv/bin/python -m tests.bench.vlan_bench [--out .bench/vlan.json] [--n 60] [--quick]

A benchmark, not a test: figures with the targets as PASS/MISS markers; nothing
asserts on time. Exit status 1 only when the measurement is not trustworthy (a
plugin answered an error, iperf3 failed, something was left behind).

In ONE run, on this machine (root; per-run names, everything removed at the end):

1. ``netd lab up --mode vlan --hosts 2``: each host's bond0 a trunk of its own
   ovs0 (real Open vSwitch 3.1, userspace datapath: this kernel has no
   openvswitch module), the agent in vlan mode, the router between VLAN 100 and
   200. A reference host namespace with ``bridge`` + ``host-local`` (what
   cni_bench compares the L2 mode with).
2. CNI: N sequential ADDs then DELs of netd-cni (pool ``vlan100``: access port
   tagged 100, port-security flows, the duplicate-address probe) and of the
   reference, interleaved; p50/p99. Targets: ADD p50 <= 1.5x, DEL p50 <= 1.0x.
3. Throughput (iperf3, TCP, one stream, ``--seconds`` each, rounds taken in
   turn): container on h1 -> container on h2 (same VLAN, through both hosts'
   ovs0 and the trunk) against host h1 -> host h2 (their own addresses on ovs0,
   through the very same bridges and trunk, untagged). Target: containers >= 80%
   of the hosts. For information: two containers of the reference bridge
   (kernel bridge, same host), the path a kernel datapath would be compared to.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from netd.dataplane.netns import create_netns
from netd.lab import lab_up, plan_lab
from netd.lab.ovs import available as ovs_available
from netd.lab.vlan import VLANS
from tests.bench.cni_bench import (
    REF_DIR,
    Plugin,
    Slot,
    sequential,
    summarize,
)
from tests.bench.common import (
    BenchError,
    LabSetup,
    left_behind,
    log,
    mark,
    quiet_sigterm,
    ratio,
    reference_plugin,
    run_and_report,
    throughput,
)
from tests.bench.common import netd_plugin as netd_plugin_of

TARGET_ADD_RATIO = 1.5
TARGET_DEL_RATIO = 1.0
TARGET_THROUGHPUT = 0.8  # containers across hosts / hosts across hosts
POOL = VLANS[0][0]


Setup = LabSetup



# --- the run --------------------------------------------------------------------------------


def run(args: argparse.Namespace, setup: Setup, res: dict[str, Any]) -> None:
    n = args.n
    log(f"lab {setup.prefix}: vlan mode, 2 hosts (OVS userspace datapath), IPAM, router")
    t = time.monotonic()
    plan = plan_lab(setup.prefix, 2, setup.tmp / "lab", "vlan",
                    cni_conf_dir=setup.tmp / "net.d")
    setup.plan = plan
    setup.tmp.joinpath("net.d").mkdir(parents=True, exist_ok=True)
    lab_up(plan, cni_bin_dir=setup.tmp / "bin", cooldown=0, echo=log)
    res["setup_s"] = round(time.monotonic() - t, 1)
    ref_host = setup.ns("ref")
    create_netns(ref_host)
    slots = {"netd-cni": [Slot(setup.ns(f"n{i}")) for i in range(n)],
             "bridge+host-local": [Slot(setup.ns(f"r{i}")) for i in range(n)]}
    for kind in slots.values():
        for slot in kind:
            create_netns(slot.netns)
    h1, h2 = plan.hosts

    def netd_plugin(host: Any) -> Plugin:
        return netd_plugin_of(setup, host, POOL)

    netd = netd_plugin(h1)
    ref = reference_plugin(setup, ref_host)
    res["netd_cni_native"] = Path(netd.binary).read_bytes()[:4] == b"\x7fELF"

    log(f"warm-up ({args.warmup} ADD+DEL each) ...")
    sequential([netd, ref], slots, args.warmup)
    log(f"sequential: {n} ADD then {n} DEL of each, interleaved ...")
    seq = sequential([netd, ref], slots, n)
    res["sequential"] = {p: {c: summarize(v) for c, v in d.items()} for p, d in seq.items()}

    # throughput: a container on each host (VLAN 100), two reference containers
    log(f"throughput: iperf3 TCP, {args.rounds} rounds of {args.seconds:g} s per path ...")
    made = throughput(setup, netd_plugin, ref, args, res,
                      "containers across hosts (VLAN 100, ovs0 -> trunk -> ovs0)",
                      "hosts across hosts (their ovs0 addresses, same bridges)")

    left = left_behind([*(slot.netns for kind in slots.values() for slot in kind), *made],
                       (h1, h2))
    if left:
        raise BenchError("left behind after the DELs: " + ", ".join(left[:10]))


def targets(res: dict[str, Any]) -> dict[str, Any]:
    seq = res["sequential"]
    add = ratio(seq["netd-cni"]["ADD"]["p50_ms"], seq["bridge+host-local"]["ADD"]["p50_ms"])
    dele = ratio(seq["netd-cni"]["DEL"]["p50_ms"], seq["bridge+host-local"]["DEL"]["p50_ms"])
    tput = res["throughput_ratio"]
    return {"add_p50_ratio": add, "del_p50_ratio": dele, "throughput_ratio": tput,
            "pass": {"add": add is not None and add <= TARGET_ADD_RATIO,
                     "del": dele is not None and dele <= TARGET_DEL_RATIO,
                     "throughput": tput is not None and tput >= TARGET_THROUGHPUT}}


def report(res: dict[str, Any]) -> str:
    seq, tg = res["sequential"], res["targets"]
    lines = [f"VLAN benchmark  {res['env']['date']}  {res['env']['cpus']} CPUs  "
             f"load {res['env']['loadavg_start']} -> {res['env'].get('loadavg_end', '?')}",
             f"netd-cni ({'native fast path' if res.get('netd_cni_native') else 'Python'}) "
             "on ovs0 (OVS 3.1, userspace datapath), pool vlan100; reference bridge+host-local",
             "", f"sequential, n={res['params']['n']} each   p50 ms    p99 ms"]
    for name in ("netd-cni", "bridge+host-local"):
        for command in ("ADD", "DEL"):
            s = seq[name][command]
            lines.append(f"  {name:18} {command}  {s['p50_ms']:8.1f}  {s['p99_ms']:8.1f}")
    lines += ["", f"TCP, one stream, {res['params']['seconds']:g} s x {res['params']['rounds']}"
                  " rounds                         Gbit/s (median; rounds)"]
    for name, t in res["throughput_gbps"].items():
        each = ", ".join(f"{x:.2f}" for x in t["rounds"])
        lines.append(f"  {name:62} {t['median']:5.2f}  ({each})")
    lines += [
        "",
        f"ADD p50 ratio       {tg['add_p50_ratio']:.2f}x  target <= {TARGET_ADD_RATIO}x  "
        f"{mark(tg['add_p50_ratio'], TARGET_ADD_RATIO)}",
        f"DEL p50 ratio       {tg['del_p50_ratio']:.2f}x  target <= {TARGET_DEL_RATIO}x  "
        f"{mark(tg['del_p50_ratio'], TARGET_DEL_RATIO)}",
        f"throughput ratio    {tg['throughput_ratio']:.2f}   target >= {TARGET_THROUGHPUT}  "
        + ("[PASS]" if tg["pass"]["throughput"] else "[MISS]"),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.bench.vlan_bench",
                                 description="netd-cni in vlan mode vs bridge+host-local; "
                                             "TCP containers vs hosts across ovs0")
    ap.add_argument("--out", default=".bench/vlan.json", help="JSON report path")
    ap.add_argument("--n", type=int, default=60, help="sequential ADDs (and DELs) per plugin")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3, help="iperf3 rounds per path")
    ap.add_argument("--seconds", type=float, default=5.0, help="seconds per iperf3 run")
    ap.add_argument("--prefix", default=None, help="name prefix (default: nvb + 6 hex digits)")
    ap.add_argument("--quick", action="store_true", help="small counts: a quick look")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny counts, no targets: proves the benchmark runs (the test suite "
                         "does this)")
    args = ap.parse_args(argv)
    if args.quick:
        args.n, args.warmup, args.rounds, args.seconds = 20, 2, 1, 3.0
    if args.smoke:
        args.n, args.warmup, args.rounds, args.seconds = 3, 1, 1, 1.0
    if os.geteuid() != 0:
        log("vlan_bench needs root (network namespaces)")
        return 1
    missing = [b for b in ("bridge", "host-local") if not os.access(REF_DIR / b, os.X_OK)]
    if missing or not ovs_available() or shutil.which("iperf3") is None:
        log("vlan_bench needs containernetworking-plugins, openvswitch-switch and iperf3 "
            "(make deps)")
        return 1
    quiet_sigterm()
    prefix = args.prefix or f"nvb{secrets.token_hex(3)}"
    setup = Setup(prefix, Path(tempfile.mkdtemp(prefix="netd-vlan-bench-")))
    return run_and_report(args, setup, prefix, run, targets, report)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
    sys.exit(130)
