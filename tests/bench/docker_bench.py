"""Docker benchmark: ``docker run -d`` on a netd network against Docker's built-in bridge.

    .venv/bin/python -m tests.bench.docker_bench [--out .bench/docker.json] [--n 20] [--quick]

A benchmark, not a test: it prints figures, with the target of issue 4 next to
them as a PASS/MISS marker; nothing asserts on time. The exit status is 1 only
when the measurement itself is not trustworthy: a ``docker`` command failed, a
container got no address or one outside its network, something was left
behind after the containers were removed, or the teardown left something.

In ONE run, on this machine (root; everything named with a per-run prefix and
removed at the end, also after a failure or Ctrl-C):

1. ``netd lab up --docker`` with one host (switch, gateway, IPAM server, host
   namespace with ``br0`` over ``bond0``): dockerd (Debian docker.io 20.10) runs
   in h1's network namespace with per-run roots (:mod:`netd.lab.docker`),
   ``--bridge=none``, and h1's agent serves the plugin ``netd`` for it. The test
   image is busybox-static, imported with ``docker import``.
2. Two networks on that dockerd: ``docker network create -d netd --ipam-driver
   netd --ipam-opt pool=lab --subnet 198.18.0.0/24`` and Docker's built-in
   ``docker network create -d bridge --subnet 198.19.X.0/24`` (per-run X; its
   Linux bridge, veths and iptables rules live in h1's namespace too).
3. One warm-up container on each. Then ``--rounds`` rounds of ``--n``
   containers per network, started one after the other with ``docker -H ...
   run -d --network NET IMAGE sleep`` (the CLI a user runs; its own start-up is
   in both figures), interleaved (netd, bridge, bridge, netd, ...; the next
   round starts with the other) so drifting background load hits both alike.
   After each run, untimed: the container's address is checked against its
   network; for netd the bench waits until the agent has learnt the
   container's name from dockerd (``netd agent status``), so that none of the
   plugin's after-``Join`` work (that lookup, the gratuitous ARPs) spills into
   the next measurement; then both rest ``--settle`` seconds.
4. After each round every container is removed with ``docker rm -f`` (timed,
   interleaved, for information) and nothing may be left: no Docker endpoint
   in the agent, no ``ndv``/``ndp`` link and no Docker ``veth`` in h1, no
   address of h1 in the IPAM.

Target (issue 4): median ``docker run -d`` on a netd network <= 1.3x the
built-in bridge driver's.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import math
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from netd.lab import POOL, SUBNET, LabPlan, in_netns, lab_down, lab_up, list_netns, plan_lab
from netd.lab import docker as lab_docker
from tests.bench.common import BenchError, log, mark, quiet_sigterm, ratio, run_and_report
from tests.support import docker as dk

DOCKER_CLI = "/usr/bin/docker"
IMAGE = "netd-busybox:bench"
TARGET_RATIO = 1.3
NETD, BRIDGE = "netd", "bridge"




# --- figures ---------------------------------------------------------------------


def summarize(lat_s: Sequence[float]) -> dict[str, Any]:
    """Median and nearest-rank percentiles of latencies given in seconds, reported in ms."""
    s = sorted(lat_s)
    n = len(s)
    if not n:
        return {"n": 0, "p50_ms": None, "p90_ms": None, "min_ms": None, "max_ms": None}

    def pct(p: float) -> float:
        return round(s[max(0, math.ceil(p * n / 100) - 1)] * 1000, 1)

    return {"n": n, "p50_ms": round(statistics.median(s) * 1000, 1), "p90_ms": pct(90),
            "min_ms": round(s[0] * 1000, 1), "max_ms": round(s[-1] * 1000, 1),
            "mean_ms": round(sum(s) / n * 1000, 1)}


# --- the setup ---------------------------------------------------------------------------


@dataclass
class Setup:
    prefix: str
    tmp: Path
    bridge_subnet: str
    plan: LabPlan | None = None
    manifest: dict[str, Any] | None = None
    lab_built: bool = False
    host: str = ""  # dockerd's unix:// URL
    networks: dict[str, str] = field(default_factory=dict)  # driver -> network name
    subnets: dict[str, str] = field(default_factory=dict)

    def docker(self, *args: str, timeout: float = 120,
               stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
        """``docker -H HOST ARGS``; raises BenchError when it fails."""
        proc = subprocess.run([DOCKER_CLI, "-H", self.host, *args], input=stdin,
                              capture_output=True, timeout=timeout, check=False)
        if proc.returncode != 0:
            raise BenchError(f"docker {' '.join(args[:4])} ... exited {proc.returncode}: "
                             f"{proc.stderr.decode(errors='replace').strip()}")
        return proc

    def agent_status(self) -> dict[str, Any]:
        from netd.cni.server import call

        assert self.plan is not None
        answer = call(str(self.plan.hosts[0].socket), {"command": "AGENT_STATUS"}, timeout=10)
        if "result" not in answer:
            raise BenchError(f"agent status: {answer}")
        return dict(answer["result"])

    def teardown(self) -> list[str]:
        problems = []
        if self.plan is not None and self.lab_built:
            try:
                lab_down(self.plan.dir, self.prefix, cni_conf_dir=self.plan.cni_conf_dir,
                         echo=lambda _: None)
            except Exception as exc:
                problems.append(f"lab down: {exc}")
        problems += [f"left: {x}" for x in lab_docker.leftovers(self.prefix)]
        problems += [f"left: netns {n}" for n in list_netns() if n.startswith(f"{self.prefix}-")]
        shutil.rmtree(self.tmp, ignore_errors=True)
        return problems


def build(setup: Setup) -> None:
    plan = plan_lab(setup.prefix, 1, setup.tmp / "lab", cni_conf_dir=setup.tmp / "net.d",
                    docker=True)
    setup.plan = plan
    setup.tmp.joinpath("net.d").mkdir(parents=True, exist_ok=True)
    setup.lab_built = True  # from here on, lab down (it removes a half-built lab too)
    setup.manifest = lab_up(plan, install_cni=False, cooldown=0, echo=log)
    assert plan.docker_host is not None
    setup.host = plan.docker_host
    setup.docker("import", "--change", 'CMD ["sh"]', "-", IMAGE, stdin=dk.busybox_tar())
    setup.networks = {NETD: f"{setup.prefix}-netd", BRIDGE: f"{setup.prefix}-bridge"}
    setup.subnets = {NETD: str(SUBNET), BRIDGE: setup.bridge_subnet}
    setup.docker("network", "create", "-d", "netd", "--ipam-driver", "netd", "--ipam-opt",
                 f"pool={POOL}", "--subnet", str(SUBNET), setup.networks[NETD])
    setup.docker("network", "create", "-d", "bridge", "--subnet", setup.bridge_subnet,
                 setup.networks[BRIDGE])


# --- measuring ----------------------------------------------------------------------------


def run_one(setup: Setup, driver: str, name: str) -> float:
    """``docker run -d`` of one container on ``driver``'s network: seconds (the CLI's)."""
    argv = [DOCKER_CLI, "-H", setup.host, "run", "-d", "--name", name, "--network",
            setup.networks[driver], "--stop-signal", "KILL", IMAGE, "sleep", "3600"]
    started = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, timeout=120, check=False)
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        raise BenchError(f"docker run on {driver} ({name}) exited {proc.returncode}: "
                         f"{proc.stderr.decode(errors='replace').strip()}")
    return elapsed


def settle(setup: Setup, driver: str, name: str, timeout: float = 30.0) -> float | None:
    """Untimed, after a run: the address is right; for netd, seconds until the agent knows
    the container's name (the last of the plugin's after-Join work), else None."""
    doc = json.loads(setup.docker("inspect", "-f", "{{json .NetworkSettings.Networks}}",
                                  name).stdout)
    ep = doc.get(setup.networks[driver]) or {}
    ip = ep.get("IPAddress") or ""
    if not ip or ipaddress.ip_address(ip) not in ipaddress.ip_network(setup.subnets[driver]):
        raise BenchError(f"{name} on {driver} got address {ip!r}, not in "
                         f"{setup.subnets[driver]}")
    if driver != NETD:
        return None
    started = time.monotonic()
    while True:
        eps = {e["container_id"]: e for e in setup.agent_status()["attachments"]
               if e["plugin"] == "docker"}
        rec = eps.get(ep.get("EndpointID"))
        if rec is not None and rec["ip"] != ip:
            raise BenchError(f"the agent records {rec['ip']} for {name}, docker says {ip}")
        if rec is not None and rec["name"] == name:
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise BenchError(f"the agent did not learn the name of {name} within {timeout}s")
        time.sleep(0.01)


def leftovers(setup: Setup) -> list[str]:
    """After every container is gone: endpoints, links, veths, IPAM addresses of h1."""
    from netd.dataplane.netlink import Netlink
    from netd.ipam.client import Client

    assert setup.plan is not None
    plan = setup.plan
    found = []
    status = setup.agent_status()
    found += [f"agent attachment {e['container_id'][:12]} ({e['plugin']}, {e['ip']})"
              for e in status["attachments"]]

    def links() -> list[str]:
        with Netlink() as nl:
            return [link.name for link in nl.links()]

    found += [f"h1 link {n}" for n in in_netns(plan.hosts[0].netns, links)
              if n.startswith(("ndv", "ndp", "veth"))]
    token = plan.token_file.read_text().strip()

    def held() -> list[dict[str, Any]]:
        return Client(plan.ipam_url, token=token).all_addresses(host=plan.hosts[0].name)

    found += [f"IPAM {a['ip']} of {a['container_id'][:16]}"
              for a in in_netns(plan.gateway_ns, held)]
    running = setup.docker("ps", "-aq").stdout.split()
    found += [f"container {c.decode()}" for c in running]
    return found


def round_(setup: Setup, r: int, n: int, settle_s: float, res: dict[str, Any],
           tag: str = "") -> None:
    """n containers per driver, interleaved; then all removed (timed) and checked."""
    names: dict[str, list[str]] = {NETD: [], BRIDGE: []}
    for i in range(n):
        order = [NETD, BRIDGE] if (i + r) % 2 == 0 else [BRIDGE, NETD]
        for driver in order:
            name = f"{setup.prefix}-{tag}{driver[0]}{r}-{i}"
            res["run_s"][driver].append(run_one(setup, driver, name))
            res["rounds"][r][driver].append(res["run_s"][driver][-1])
            names[driver].append(name)
            took = settle(setup, driver, name)
            if took is not None:
                res["name_learnt_s"].append(took)
            time.sleep(settle_s)
    running = set(setup.docker("ps", "--format", "{{.Names}}").stdout.decode().split())
    missing = [x for d in names.values() for x in d if x not in running]
    if missing:
        raise BenchError(f"not running after the round: {', '.join(missing[:5])}")
    for i in range(n):
        order = [NETD, BRIDGE] if (i + r) % 2 == 0 else [BRIDGE, NETD]
        for driver in order:
            started = time.perf_counter()
            setup.docker("rm", "-f", names[driver][i])
            res["rm_s"][driver].append(time.perf_counter() - started)
    left = leftovers(setup)
    if left:
        raise BenchError(f"left behind after round {r + 1}: " + "; ".join(left[:10]))


def run(args: argparse.Namespace, setup: Setup, res: dict[str, Any]) -> None:
    log(f"lab {setup.prefix}: 1 host, IPAM, agent, dockerd in h1 (netd lab up --docker) ...")
    t = time.monotonic()
    build(setup)
    res["setup_s"] = round(time.monotonic() - t, 1)
    res["dockerd_version"] = setup.docker("version", "--format",
                                          "{{.Server.Version}}").stdout.decode().strip()
    res["networks"] = {d: {"name": setup.networks[d], "subnet": setup.subnets[d]}
                       for d in (NETD, BRIDGE)}
    raw: dict[str, Any] = {"run_s": {NETD: [], BRIDGE: []}, "rm_s": {NETD: [], BRIDGE: []},
                           "name_learnt_s": [],
                           "rounds": [{NETD: [], BRIDGE: []} for _ in range(args.rounds)]}
    log("warm-up (one container on each) ...")
    warm = {"run_s": {NETD: [], BRIDGE: []}, "rm_s": {NETD: [], BRIDGE: []},
            "name_learnt_s": [], "rounds": [{NETD: [], BRIDGE: []}]}
    for _ in range(args.warmup):
        round_(setup, 0, 1, args.settle, warm, tag="w")
    res["warmup_ms"] = {d: [round(x * 1000, 1) for x in v] for d, v in warm["run_s"].items()}
    for r in range(args.rounds):
        log(f"round {r + 1}/{args.rounds}: {args.n} containers per network, interleaved ...")
        round_(setup, r, args.n, args.settle, raw)
    res["run"] = {d: summarize(v) for d, v in raw["run_s"].items()}
    res["rm"] = {d: summarize(v) for d, v in raw["rm_s"].items()}
    res["per_round_p50_ms"] = {d: [round(statistics.median(rd[d]) * 1000, 1)
                                   for rd in raw["rounds"]] for d in (NETD, BRIDGE)}
    # the netd and the bridge container of the same slot ran back to back: their
    # difference cancels slower drift still better than the two medians do
    diffs = [a - b for rd in raw["rounds"] for a, b in zip(rd[NETD], rd[BRIDGE], strict=True)]
    res["paired_diff_ms"] = {"median": round(statistics.median(diffs) * 1000, 1),
                             "n": len(diffs)}
    res["netd_name_learnt"] = summarize(raw["name_learnt_s"])
    res["raw_run_ms"] = {d: [round(x * 1000, 1) for x in v] for d, v in raw["run_s"].items()}
    res["notes"] = [
        "each figure is the 'docker -H ... run -d' CLI as a user runs it, start-up of the CLI "
        "included (the same for both); the bench waits, untimed, for netd's after-Join work "
        "(the agent learning the container's name) and --settle seconds after every run",
        "the netd network's addresses come from the central IPAM (an HTTP call from h1 to "
        "the gateway namespace per RequestAddress and per CreateEndpoint); the bridge "
        "driver's from dockerd's built-in IPAM in memory",
    ]


def targets(res: dict[str, Any]) -> dict[str, Any]:
    r = ratio(res["run"][NETD]["p50_ms"], res["run"][BRIDGE]["p50_ms"])
    return {"run_p50_ratio": r, "target": TARGET_RATIO,
            "pass": r is not None and r <= TARGET_RATIO,
            "rm_p50_ratio": ratio(res["rm"][NETD]["p50_ms"], res["rm"][BRIDGE]["p50_ms"])}


def report(res: dict[str, Any]) -> str:
    p, tg = res["params"], res["targets"]
    nets = res["networks"]
    lines = [
        f"Docker benchmark  {res['env']['date']}  {res['env']['cpus']} CPUs  "
        f"load {res['env']['loadavg_start']} -> {res['env'].get('loadavg_end', '?')}",
        f"dockerd {res['dockerd_version']} in the namespace of a 1-host L2 lab "
        "(netd lab up --docker); busybox-static image",
        f"netd: -d netd --ipam-driver netd, pool {POOL} {nets[NETD]['subnet']}; "
        f"bridge: built-in -d bridge {nets[BRIDGE]['subnet']}",
        f"'docker run -d' sequential, {p['rounds']} rounds x {p['n']} containers per network, "
        f"interleaved; {p['settle']:g} s rest after each (untimed)",
        "",
        f"docker run -d, n={res['run'][NETD]['n']} each   median ms   p90 ms   min ms   max ms",
    ]
    for d, label in ((NETD, "netd"), (BRIDGE, "bridge (built-in)")):
        s = res["run"][d]
        lines.append(f"  {label:26} {s['p50_ms']:9.1f} {s['p90_ms']:8.1f} {s['min_ms']:8.1f}"
                     f" {s['max_ms']:8.1f}")
    lines.append("  per-round medians: " + "; ".join(
        f"{d} " + ", ".join(f"{x:.0f}" for x in res["per_round_p50_ms"][d])
        for d in (NETD, BRIDGE)))
    lines += [
        "",
        f"median ratio netd/bridge   {tg['run_p50_ratio']:.2f}x  target <= {TARGET_RATIO}x  "
        f"{mark(tg['run_p50_ratio'], TARGET_RATIO)}",
        f"  (median of the paired differences, netd minus bridge run back to back: "
        f"{res['paired_diff_ms']['median']:+.1f} ms)",
        "",
        f"information: docker rm -f median: netd {res['rm'][NETD]['p50_ms']:.0f} ms, bridge "
        f"{res['rm'][BRIDGE]['p50_ms']:.0f} ms ({tg['rm_p50_ratio']:.2f}x); the agent knew "
        f"the container's name {res['netd_name_learnt']['p50_ms']:.0f} ms (median) after "
        "'docker run' returned; warm-up runs (ms): "
        + ", ".join(f"{d} {v}" for d, v in res["warmup_ms"].items()),
    ]
    lines += [f"note: {n}" for n in res.get("notes", [])]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.bench.docker_bench",
                                 description="docker run -d: netd network vs the built-in "
                                             "bridge driver (prints figures, writes JSON)")
    ap.add_argument("--out", default=".bench/docker.json", help="JSON report path")
    ap.add_argument("--n", type=int, default=20, help="containers per network and round")
    ap.add_argument("--rounds", type=int, default=3,
                    help="rounds (each starts with the other driver)")
    ap.add_argument("--warmup", type=int, default=1, help="warm-up containers per network")
    ap.add_argument("--settle", type=float, default=0.3,
                    help="seconds of rest after each run (untimed)")
    ap.add_argument("--prefix", default=None, help="name prefix (default: ndb + 6 hex digits)")
    ap.add_argument("--quick", action="store_true", help="small counts: a quick look")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny counts, no targets: proves the benchmark runs (the test suite "
                         "does this)")
    args = ap.parse_args(argv)
    if args.quick:
        args.n, args.rounds, args.settle = 5, 1, 0.1
    if args.smoke:
        args.n, args.rounds, args.settle, args.warmup = 2, 1, 0.0, 1
    if os.geteuid() != 0:
        log("docker_bench needs root (network namespaces, dockerd)")
        return 1
    try:
        dk.ensure_docker()  # like every make target: installs docker.io when missing
    except dk.DockerUnavailable as exc:
        log(f"docker_bench: {exc}")
        return 1
    if lab_docker.plugin_served():
        log(f"{lab_docker.PLUGIN_SOCKET} is already served (a lab or test with the Docker "
            "plugin runs): one at a time")
        return 1

    quiet_sigterm()
    prefix = args.prefix or f"ndb{secrets.token_hex(3)}"
    setup = Setup(prefix, Path(tempfile.mkdtemp(prefix="netd-docker-bench-")),
                  f"198.19.{secrets.randbelow(256)}.0/24")
    return run_and_report(args, setup, prefix, run, targets, report)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
    sys.exit(130)
