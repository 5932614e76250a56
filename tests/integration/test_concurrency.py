"""Concurrent allocation against real server processes: no address is ever handed out twice."""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import signal as sig
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Server, every_address, every_event, ipam_check, start_server

pytestmark = [pytest.mark.real, pytest.mark.slow]

WORKER = Path(__file__).with_name("_alloc_worker.py")


def run_workers(jobs: list[tuple[Server, str, int, str, int]]) -> list[dict[str, Any]]:
    """Run (server, prefix, count, pools, release_every) jobs as parallel OS processes."""
    start_at = time.time() + 2.0  # all processes start allocating at the same moment
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), srv.url, srv.token, prefix, str(count),
             str(start_at), pools, str(release_every)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for srv, prefix, count, pools, release_every in jobs
    ]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err.decode()
        result = json.loads(out)
        assert result["errors"] == [], result["errors"][:5]
        results.append(result)
    return results


def check_history(events: list[dict[str, Any]]) -> None:
    """Replay the history: an address is only allocated while free, released by its holder."""
    holder: dict[tuple[str, str], str] = {}
    for e in sorted(events, key=lambda e: e["id"]):
        k = (e["pool"], e["ip"])
        if e["action"] == "allocate":
            assert k not in holder, f"{k} allocated to {e['container_id']} while {holder[k]} " \
                                    "held it"
            holder[k] = e["container_id"]
        elif e["action"] == "release":
            assert holder.pop(k, None) == e["container_id"], e


def check_consistent(c: httpx.Client, held: list[dict[str, Any]],
                     released: list[dict[str, Any]]) -> None:
    keys = [(a["pool"], a["ip"]) for a in held]
    assert len(set(keys)) == len(keys), "an address is held twice"
    macs = [a["mac"] for a in held]
    assert len(set(macs)) == len(macs), "a MAC is held twice"

    pools = c.get("/v1/pools").json()["pools"]
    assert sum(p["allocated"] for p in pools) == len(held)
    for p in pools:
        assert p["free"] == p["size"] - p["reserved"] - p["allocated"]
        assert p["reserved"] == 1  # the gateway
    listed = every_address(c.get)
    assert {(a["pool"], a["ip"], a["mac"], a["container_id"]) for a in listed} == \
        {(a["pool"], a["ip"], a["mac"], a["container_id"]) for a in held}
    assert len(listed) == len(held)

    events = every_event(c.get)
    by_action: dict[str, int] = defaultdict(int)
    for e in events:
        by_action[e["action"]] += 1
    assert by_action["allocate"] == len(held) + len(released)
    assert by_action["release"] == len(released)
    check_history(events)
    for p in pools:
        for a in c.get(f"/v1/pools/{p['name']}/addresses",
                       params={"state": "reserved"}).json()["reserved"]:
            assert a["range"] == p["gateway"]
            assert (p["name"], p["gateway"]) not in set(keys)


def counter(metrics_text: str, name: str) -> float:
    return sum(float(v) for v in re.findall(rf"^{name}{{[^}}]*}} (\S+)$", metrics_text, re.M))


def test_eight_processes_one_server(server: Server) -> None:
    with httpx.Client(base_url=server.url, timeout=30,
                      headers={"Authorization": f"Bearer {server.token}"}) as c:
        for body in ({"name": "v4", "cidr": "10.100.0.0/21"},
                     {"name": "v6", "cidr": "fd00:100::/64"}):
            assert c.post("/v1/pools", json=body).status_code == 201
        results = run_workers([(server, f"w{i}", 500, "v4,v6", 0) for i in range(8)])
        held = [a for r in results for a in r["held"]]
        assert len(held) == 4000
        assert sum(1 for a in held if a["pool"] == "v4") == 2000
        check_consistent(c, held, [])
        assert counter(c.get("/metrics").text, "netd_ipam_allocations_total") == 4000
    ipam_check(server.store_url)


def test_two_servers_one_store(tmp_path: Path) -> None:
    token = os.urandom(16).hex()
    a = start_server(tmp_path, token=token)
    try:
        b = start_server(tmp_path, token=token, db=a.db)
        try:
            with httpx.Client(base_url=a.url, timeout=30,
                              headers={"Authorization": f"Bearer {token}"}) as ca, \
                    httpx.Client(base_url=b.url, timeout=30,
                                 headers={"Authorization": f"Bearer {token}"}) as cb:
                assert ca.post("/v1/pools", json={"name": "shared",
                                                  "cidr": "10.101.0.0/21"}).status_code == 201
                # 8 x 300 = 2400 allocations, every 4th released at once: the
                # 2045 never-used addresses run out and released ones are reused
                jobs = [(srv, f"{name}{i}", 300, "shared", 4)
                        for i in range(4) for srv, name in ((a, "a"), (b, "b"))]
                results = run_workers(jobs)
                held = [x for r in results for x in r["held"]]
                released = [x for r in results for x in r["released"]]
                assert len(held) == 1800 and len(released) == 600
                check_consistent(ca, held, released)
                check_consistent(cb, held, released)
                ipam_check(a.store_url)
                assert ca.get("/v1/pools").content == cb.get("/v1/pools").content
                ips = {x["ip"] for x in held} | {x["ip"] for x in released}
                assert len(ips) < 2400, "released addresses were never reused"
                total = sum(counter(cl.get("/metrics").text, "netd_ipam_allocations_total")
                            for cl in (ca, cb))
                assert total == 2400
        finally:
            b.stop()
    finally:
        a.stop()


@pytest.mark.real
def test_two_worker_processes_share_socket_and_store(tmp_path: Path) -> None:
    """`netd ipam serve --workers 2`: both serve, no duplicates, SIGTERM stops both."""
    srv = start_server(tmp_path, extra=["--workers", "2"])
    try:
        children = [int(p) for p in Path(f"/proc/{srv.proc.pid}/task/{srv.proc.pid}/children")
                    .read_text().split()]
        assert len(children) == 2
        headers = {"Authorization": f"Bearer {srv.token}"}
        httpx.post(f"{srv.url}/v1/pools", json={"name": "w", "cidr": "10.77.0.0/20"},
                   headers=headers).raise_for_status()

        def alloc(i: int) -> str:
            with httpx.Client(base_url=srv.url, headers=headers) as c:
                r = c.post("/v1/allocate", json={"pool": "w", "container_id": f"c{i}"})
                r.raise_for_status()
                return str(r.json()["ip"])

        with concurrent.futures.ThreadPoolExecutor(16) as ex:
            ips = list(ex.map(alloc, range(400)))
        assert len(set(ips)) == 400
        assert httpx.get(f"{srv.url}/v1/pools/w", headers=headers).json()["allocated"] == 400
        # the counters are the server's, not one worker's: every scrape (a new connection
        # each, so the kernel hands them to different workers) sums them all
        seen = set()
        for _ in range(12):
            text = httpx.get(f"{srv.url}/metrics").text
            line = next(x for x in text.splitlines()
                        if x.startswith('netd_ipam_allocations_total{pool="w"}'))
            seen.add(float(line.split()[-1]))
            assert 'netd_ipam_pool_allocated{pool="w"} 400.0' in text
        assert seen == {400.0}
        srv.proc.send_signal(sig.SIGTERM)
        assert srv.proc.wait(20) == 0
        for child in children:
            assert not os.path.exists(f"/proc/{child}") or \
                Path(f"/proc/{child}/stat").read_text().split()[2] == "Z"
    finally:
        srv.stop()
