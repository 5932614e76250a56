"""What the lab benchmarks share: a fork-safe SIGTERM, and run -> tear down -> report.

A benchmark module supplies a ``Setup`` (with ``teardown() -> list[str]`` of
problems), ``run(args, setup, res)`` that fills ``res``, ``targets(res)`` and
``report(res)``; :func:`run_and_report` does the rest the same way for each.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from netd.lab import LabPlan
    from tests.bench.cni_bench import Plugin


class BenchError(Exception):
    """The measurement cannot be trusted (errors, counts that do not add up)."""


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def ratio(a: float | None, b: float | None) -> float | None:
    """``a / b`` to two places; None when either is missing."""
    return None if a is None or not b else round(a / b, 2)


def mark(value: float | None, limit: float) -> str:
    """The PASS/MISS marker of a ratio that must stay at or under ``limit``."""
    return "[ n/a]" if value is None else ("[PASS]" if value <= limit else "[MISS]")


class Setup(Protocol):
    def teardown(self) -> list[str]: ...


def quiet_sigterm() -> None:
    """SIGTERM unwinds into teardown; forked helpers (pyroute2) that inherit it just exit."""
    main_pid = os.getpid()

    def on_term(signum: int, frame: object) -> None:
        if os.getpid() != main_pid:
            os._exit(128 + signum)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)


def run_and_report(args: argparse.Namespace, setup: Any, prefix: str,
                   run: Callable[[argparse.Namespace, Any, dict[str, Any]], None],
                   targets: Callable[[dict[str, Any]], dict[str, Any]],
                   report: Callable[[dict[str, Any]], str]) -> int:
    """Run, always tear down, write the JSON (``args.out``), print the report.

    Exit code 1 only when the measurement is not trustworthy or teardown left
    something behind; missed targets are markers in the report, not failures.
    """
    res: dict[str, Any] = {
        "env": {"date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "cpus": os.cpu_count(),
                "python": platform.python_version(), "platform": platform.platform(),
                "loadavg_start": " ".join(f"{x:.2f}" for x in os.getloadavg())},
        "params": {k: v for k, v in vars(args).items() if k != "out"},
        "prefix": prefix,
    }
    started = time.monotonic()
    code = 0
    try:
        run(args, setup, res)
        # a smoke run (the test suite's) proves the benchmark runs; its figures judge nothing
        res["targets"] = {} if getattr(args, "smoke", False) else targets(res)
    except BenchError as exc:
        res["error"] = str(exc)
        log(f"MEASUREMENT NOT TRUSTWORTHY: {exc}")
        code = 1
    finally:
        log("tearing down ...")
        problems = setup.teardown()
        if problems:
            res["teardown_problems"] = problems
            log("teardown problems: " + "; ".join(problems))
            code = 1
    res["env"]["loadavg_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    res["elapsed_s"] = round(time.monotonic() - started, 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2, sort_keys=True) + "\n")
    if "targets" in res and getattr(args, "smoke", False):
        print(f"smoke run done (figures in the JSON judge nothing): {', '.join(sorted(res))}")
    elif "targets" in res:
        print(report(res))
    print(f"(JSON: {out}; {res['elapsed_s']} s)")
    return code


def teardown_lab(plan: LabPlan | None, prefix: str, tmp: Path) -> list[str]:
    """``lab down`` of a bench's lab, every namespace of its prefix, its temp dir; the
    problems met (a teardown that leaves something makes the run untrustworthy)."""
    from netd.dataplane.netns import list_netns, remove_netns
    from netd.lab import lab_down

    problems = []
    if plan is not None:
        try:
            lab_down(plan.dir, prefix, cni_conf_dir=plan.cni_conf_dir, echo=lambda _: None)
        except Exception as exc:
            problems.append(f"lab down: {exc}")
    for name in list_netns(f"{prefix}-"):
        try:
            remove_netns(name)
        except Exception as exc:
            problems.append(f"netns {name}: {exc}")
    shutil.rmtree(tmp, ignore_errors=True)
    return problems


# --- throughput (iperf3 between namespaces) -------------------------------------------------

IPERF_PORT = 5201


def iperf_server(netns: str) -> subprocess.Popen[bytes]:
    """An iperf3 server in ``netns``; the caller kills it."""
    return subprocess.Popen(["ip", "netns", "exec", netns, "iperf3", "-s", "-p",
                             str(IPERF_PORT)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def iperf(netns: str, server: str, seconds: float) -> float:
    """One TCP stream from ``netns`` to ``server`` for ``seconds``; Gbit/s received.

    Tried again for up to 10 s while it fails (a server a moment after it was
    started, a route a moment after it was announced).
    """
    deadline = time.monotonic() + 10
    while True:
        proc = subprocess.run(["ip", "netns", "exec", netns, "iperf3", "-J", "-c", server,
                               "-p", str(IPERF_PORT), "-t", f"{seconds:g}", "-O", "0"],
                              capture_output=True, text=True, timeout=seconds + 60,
                              check=False)
        try:
            doc = json.loads(proc.stdout)
        except ValueError:
            doc = {"error": (proc.stdout or proc.stderr)[-800:]}
        error = doc.get("error") or ("" if "sum_received" in doc.get("end", {})
                                     else "no result")
        if proc.returncode == 0 and not error:
            break
        if time.monotonic() > deadline:
            raise BenchError(f"iperf3 {netns} -> {server} exited {proc.returncode}: {error}")
        time.sleep(0.2)
    bits = float(doc["end"]["sum_received"]["bits_per_second"])
    if bits <= 0:
        raise BenchError(f"iperf3 {netns} -> {server}: nothing received")
    return round(bits / 1e9, 3)


def address_in(netns: str, ifname: str = "eth0") -> str:
    """The first IPv4 address of ``ifname`` in ``netns``."""
    from socket import AF_INET

    from netd.dataplane.netlink import Netlink

    with Netlink(netns) as nl:
        return str(nl.addresses(ifname, AF_INET)[0].interface.ip)


# --- a lab bench's setup, plugins and leftovers (the VLAN and BGP benchmarks) -------------


@dataclass
class LabSetup:
    """A benchmark's lab: its prefix, temp dir, plan, and the iperf3 servers it started."""

    prefix: str
    tmp: Path
    plan: LabPlan | None = None
    servers: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def ns(self, name: str) -> str:
        return f"{self.prefix}-{name}"

    def teardown(self) -> list[str]:
        for proc in self.servers:
            with contextlib.suppress(Exception):
                proc.kill()
                proc.wait(timeout=10)
        return teardown_lab(self.plan, self.prefix, self.tmp)


def netd_plugin(setup: LabSetup, host: Any, pool: str) -> Plugin:
    """netd-cni of the bench's bin dir, run in ``host``'s namespace on ``pool``."""
    from tests.bench.cni_bench import CNI_VERSION, Plugin

    return Plugin("netd-cni", str(setup.tmp / "bin" / "netd-cni"), host.netns,
                  {"cniVersion": CNI_VERSION, "name": f"{host.network}", "type": "netd-cni",
                   "pool": pool, "agentSocket": str(host.socket)}, str(setup.tmp / "bin"))


def reference_plugin(setup: LabSetup, host_netns: str) -> Plugin:
    """The reference bridge + host-local, as cni_bench compares the L2 mode with."""
    from tests.bench.cni_bench import CNI_VERSION, REF_DIR, REF_GATEWAY, REF_SUBNET, Plugin

    return Plugin("bridge+host-local", str(REF_DIR / "bridge"), host_netns,
                  {"cniVersion": CNI_VERSION, "name": "refnet", "type": "bridge",
                   "bridge": f"{setup.prefix}br",
                   "ipam": {"type": "host-local", "subnet": REF_SUBNET, "gateway": REF_GATEWAY,
                            "dataDir": str(setup.tmp / "host-local"),
                            "routes": [{"dst": "0.0.0.0/0"}]}}, str(REF_DIR))


def left_behind(netns_names: list[str], hosts: Any) -> list[str]:
    """Container namespaces with an interface left, host ends (``ndv*``) left on hosts."""
    from netd.dataplane.netlink import Netlink

    left = []
    for name in netns_names:
        with Netlink(name) as nl:
            if [link.name for link in nl.links() if link.name != "lo"]:
                left.append(name)
    for host in hosts:
        with Netlink(host.netns) as nl:
            left += [f"{host.name}: {link.name}" for link in nl.links()
                     if link.name.startswith("ndv")]
    return left


def throughput(setup: LabSetup, netd_of: Callable[[Any], Plugin], ref: Plugin,
               args: argparse.Namespace, res: dict[str, Any], containers: str, hosts: str,
               ready: Callable[[str], None] | None = None) -> list[str]:
    """TCP (iperf3, ``args.rounds`` x ``args.seconds``, paths in turn): a container on h1 to
    one on h2 (path name ``containers``) against host h1 to host h2 (``hosts``), and for
    information two containers of the reference bridge; fills ``throughput_gbps`` and
    ``throughput_ratio``; returns the container namespaces it made. ``ready(c2's netns)``
    waits for the fabric to reach the second container (BGP: its block announced)."""
    import statistics

    from netd.dataplane.netns import create_netns
    from tests.bench.cni_bench import Slot, new_cid

    assert setup.plan is not None
    h1, h2 = setup.plan.hosts
    c1, c2 = Slot(setup.ns("tc1"), new_cid()), Slot(setup.ns("tc2"), new_cid())
    r1, r2 = Slot(setup.ns("tr1"), new_cid()), Slot(setup.ns("tr2"), new_cid())
    for slot in (c1, c2, r1, r2):
        create_netns(slot.netns)
    netd_of(h1).run("ADD", c1.netns, c1.cid)
    netd_of(h2).run("ADD", c2.netns, c2.cid)
    ref.run("ADD", r1.netns, r1.cid)
    ref.run("ADD", r2.netns, r2.cid)
    setup.servers += [iperf_server(ns) for ns in (c2.netns, h2.netns, r2.netns)]
    if ready is not None:
        ready(c2.netns)
    paths = {containers: (c1.netns, address_in(c2.netns)), hosts: (h1.netns, h2.address),
             "for information: reference bridge, same host (kernel bridge)":
             (r1.netns, address_in(r2.netns))}
    got: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(args.rounds):
        for name, (src, dst) in paths.items():
            got[name].append(iperf(src, dst, args.seconds))
    res["throughput_gbps"] = {name: {"rounds": v, "median": statistics.median(v)}
                              for name, v in got.items()}
    netd_of(h1).run("DEL", c1.netns, c1.cid)
    netd_of(h2).run("DEL", c2.netns, c2.cid)
    ref.run("DEL", r1.netns, r1.cid)
    ref.run("DEL", r2.netns, r2.cid)
    res["throughput_ratio"] = ratio(res["throughput_gbps"][containers]["median"],
                                    res["throughput_gbps"][hosts]["median"])
    return [c1.netns, c2.netns, r1.netns, r2.netns]
