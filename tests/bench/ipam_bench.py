"""IPAM benchmark: HTTP throughput and latency, pool-size independence, host-local reference.

    .venv/bin/python -m tests.bench.ipam_bench [--out .bench/ipam.json] [--quick]

A benchmark, not a test: it prints figures, with the targets next to them as
PASS/MISS markers; nothing asserts on time. The exit status is 1 only when the
measurement itself is not trustworthy: error answers, counts that do not add
up, a filled store that is not consistent, a phase that crashed.

1. HTTP: a real ``netd ipam serve`` process on loopback (SQLite file store in a
   temp dir, bearer token), ``POST /v1/allocate`` with 1 and 16 concurrent
   keep-alive clients, one distinct container id per allocation. The load
   generator shares the 2-core box with the server, so the bench first measures
   the client CPU per request of each generator (asyncio over raw HTTP/1.1
   connections, the same on uvloop, threads with ``http.client``) and drives the
   real runs with the cheapest. Afterwards the server's own count (pool counter
   and the listed addresses) must equal the 200 answers received.
2. Pool size: in-process ``IPAM`` + ``SqliteStore`` on a temp file (the code the
   server runs), a /24 versus a /8 pool at 0% and 90% fill. The /24 is filled
   by real ``allocate()`` calls; the /8 (15.1M addresses) by bulk inserts of the
   rows ``allocate()`` writes (allocations, events, free range, counter; see
   :func:`bulk_fill`), then checked through the store. Each measured
   ``allocate()`` is followed by an untimed ``release()``, so the fill level
   stays put (a /24 has too few free addresses for 2,000 allocations otherwise).
3. Reference: the CNI ``host-local`` IPAM plugin, executed serially the way a
   runtime executes it (one process per ADD, net config on stdin).
4. Listings under load: a real server on a pool of 58,000 allocations
   (bulk-filled), one client allocating (paced, each allocation released
   untimed) alone and while 8 client processes page through every address
   (``GET /v1/addresses?limit=1000`` with ``after``) without pause, in rounds
   taken in turn: the p99 ratio. The readers count the rows of each full pass
   (it must be the pool's).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import http.client
import itertools
import json
import math
import os
import platform
import secrets
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from netd.errors import AddressInUse
from netd.ipam.model import ip_str, key, mac_for_ipv4, unkey
from netd.ipam.service import IPAM, AllocRequest, PoolSpec
from netd.ipam.store import SCHEMA, SqliteStore, SqliteTxn
from tests.bench.common import quiet_sigterm
from tests.conftest import Server, start_server

HOST_LOCAL = "/usr/lib/cni/host-local"
BENCH_HOST = "bench-node"
ACTOR = "bench"

# targets printed next to the figures (markers, not assertions)
TARGET_HTTP_PER_S = 2000.0
TARGET_HTTP_P99_MS = 25.0
TARGET_SIZE_RATIO = 1.2
TARGET_VS_HOST_LOCAL = 10.0
TARGET_LISTING_RATIO = 3.0  # allocation p99 with 8 clients paging / idle


class BenchError(Exception):
    """The measurement is not trustworthy (errors, counts that do not add up)."""


# --- figures -------------------------------------------------------------------


def summarize(lat_ns: list[int]) -> dict[str, Any]:
    """Nearest-rank percentiles of latencies given in ns, reported in ms."""
    s = sorted(lat_ns)
    n = len(s)
    if not n:
        return {"n": 0, "p50_ms": None, "p90_ms": None, "p99_ms": None, "max_ms": None,
                "mean_ms": None}

    def pct(p: float) -> float:
        return round(s[max(0, math.ceil(p * n / 100) - 1)] / 1e6, 3)

    return {"n": n, "p50_ms": pct(50), "p90_ms": pct(90), "p99_ms": pct(99),
            "max_ms": round(s[-1] / 1e6, 3), "mean_ms": round(sum(s) / n / 1e6, 3)}


def fmt_ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else round(a / b, 2)


def mark(ok: bool | None) -> str:
    return "[ n/a]" if ok is None else ("[PASS]" if ok else "[MISS]")


def proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (from /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def new_cid() -> str:
    """A container id as runtimes make them: 64 random hex digits."""
    return secrets.token_hex(32)


# --- 1. HTTP API -----------------------------------------------------------------


@dataclass
class Endpoint:
    host: str
    port: int
    token: str
    pool: str


@dataclass
class HttpRun:
    name: str
    loadgen: str
    clients: int
    planned: int
    cids: list[str]
    lat_ns: list[int] = field(default_factory=list)
    statuses: Counter[str] = field(default_factory=Counter)
    ok: list[tuple[int, bytes]] = field(default_factory=list)  # (request index, body)
    elapsed_s: float = 0.0
    client_cpu_s: float = 0.0
    server_cpu_s: float = 0.0
    timed_out: bool = False

    @property
    def errors(self) -> int:
        return sum(n for s, n in self.statuses.items() if s != "200")

    def to_dict(self) -> dict[str, Any]:
        n_ok = len(self.ok)
        return {
            "loadgen": self.loadgen, "clients": self.clients, "planned": self.planned,
            "answered": len(self.lat_ns), "ok": n_ok, "errors": self.errors,
            "statuses": dict(self.statuses), "timed_out": self.timed_out,
            "elapsed_s": round(self.elapsed_s, 3),
            "allocs_per_s": round(n_ok / self.elapsed_s, 1) if self.elapsed_s else None,
            "latency": summarize(self.lat_ns),
            "client_cpu_us_per_req": round(self.client_cpu_s / max(1, len(self.lat_ns)) * 1e6, 1),
            "server_cpu_us_per_req": round(self.server_cpu_s / max(1, len(self.lat_ns)) * 1e6, 1),
        }


def alloc_body(pool: str, cid: str) -> bytes:
    return json.dumps({"pool": pool, "container_id": cid, "ifname": "eth0", "host": BENCH_HOST,
                       "netns": f"/var/run/netns/cni-{cid[:12]}"},
                      separators=(",", ":")).encode()


def raw_request(ep: Endpoint, body: bytes) -> bytes:
    head = (f"POST /v1/allocate HTTP/1.1\r\nHost: {ep.host}:{ep.port}\r\n"
            f"Authorization: Bearer {ep.token}\r\nContent-Type: application/json\r\n"
            f"X-Netd-Actor: {ACTOR}\r\nContent-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes, bool]:
    """Status, body and whether the server will close, of one HTTP/1.1 answer."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head[:-4].split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    length = -1
    chunked = False
    close = lines[0].startswith(b"HTTP/1.0")
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding":
            chunked = b"chunked" in value.lower()
        elif name == b"connection":
            close = b"close" in value.lower()
    if chunked:
        parts = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                break
            parts.append(await reader.readexactly(size))
            await reader.readexactly(2)
        body = b"".join(parts)
    elif length >= 0:
        body = await reader.readexactly(length)
    else:
        body = await reader.read()
        close = True
    return status, body, close


async def _async_load(ep: Endpoint, run: HttpRun, server_pid: int, deadline: float) -> None:
    reqs = [raw_request(ep, alloc_body(ep.pool, c)) for c in run.cids]
    todo = itertools.count()
    conns = [await asyncio.open_connection(ep.host, ep.port) for _ in range(run.clients)]

    async def client(conn: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> None:
        reader, writer = conn
        try:
            while True:
                i = next(todo)
                if i >= len(reqs):
                    return
                if time.monotonic() > deadline:
                    run.timed_out = True
                    return
                t0 = time.perf_counter_ns()
                try:
                    writer.write(reqs[i])
                    status, body, close = await read_response(reader)
                except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                        ValueError, IndexError):
                    run.statuses["transport-error"] += 1
                    close = True
                else:
                    run.lat_ns.append(time.perf_counter_ns() - t0)
                    run.statuses[str(status)] += 1
                    if status == 200:
                        run.ok.append((i, body))
                if close:
                    writer.close()
                    reader, writer = await asyncio.open_connection(ep.host, ep.port)
        finally:
            writer.close()

    cpu0, srv0, t0 = time.process_time(), proc_cpu_s(server_pid), time.perf_counter()
    await asyncio.gather(*(client(c) for c in conns))
    run.elapsed_s = time.perf_counter() - t0
    run.client_cpu_s = time.process_time() - cpu0
    run.server_cpu_s = proc_cpu_s(server_pid) - srv0


def _thread_load(ep: Endpoint, run: HttpRun, server_pid: int, deadline: float) -> None:
    bodies = [alloc_body(ep.pool, c) for c in run.cids]
    headers = {"Authorization": f"Bearer {ep.token}", "Content-Type": "application/json",
               "X-Netd-Actor": ACTOR}
    todo = itertools.count()
    start = threading.Barrier(run.clients + 1)
    lock = threading.Lock()

    def worker() -> None:
        conn = http.client.HTTPConnection(ep.host, ep.port, timeout=30)
        conn.connect()
        start.wait(timeout=60)
        try:
            while True:
                i = next(todo)
                if i >= len(bodies):
                    return
                if time.monotonic() > deadline:
                    run.timed_out = True
                    return
                t0 = time.perf_counter_ns()
                try:
                    conn.request("POST", "/v1/allocate", body=bodies[i], headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                except (OSError, http.client.HTTPException):
                    with lock:
                        run.statuses["transport-error"] += 1
                    conn.close()
                    conn = http.client.HTTPConnection(ep.host, ep.port, timeout=30)
                    continue
                dt = time.perf_counter_ns() - t0
                with lock:
                    run.lat_ns.append(dt)
                    run.statuses[str(resp.status)] += 1
                    if resp.status == 200:
                        run.ok.append((i, data))
                if resp.will_close:
                    conn.close()
                    conn = http.client.HTTPConnection(ep.host, ep.port, timeout=30)
        finally:
            conn.close()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(run.clients)]
    for t in threads:
        t.start()
    start.wait(timeout=60)
    cpu0, srv0, t0 = time.process_time(), proc_cpu_s(server_pid), time.perf_counter()
    for t in threads:
        t.join()
    run.elapsed_s = time.perf_counter() - t0
    run.client_cpu_s = time.process_time() - cpu0
    run.server_cpu_s = proc_cpu_s(server_pid) - srv0


def have_uvloop() -> bool:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


def http_load(ep: Endpoint, server: Server, name: str, loadgen: str, clients: int, n: int,
              max_s: float) -> HttpRun:
    run = HttpRun(name, loadgen, clients, n, [new_cid() for _ in range(n)])
    deadline = time.monotonic() + max_s
    gc.collect()
    if loadgen == "threads":
        _thread_load(ep, run, server.proc.pid, deadline)
    elif loadgen == "asyncio":
        asyncio.run(_async_load(ep, run, server.proc.pid, deadline))
    elif loadgen == "uvloop":
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(_async_load(ep, run, server.proc.pid, deadline))
    else:
        raise ValueError(loadgen)
    return run


LOADGEN_LABEL = {
    "asyncio": "asyncio, raw keep-alive HTTP/1.1",
    "uvloop": "asyncio on uvloop, raw keep-alive HTTP/1.1",
    "threads": "threads + http.client (keep-alive)",
}


def api_call(ep: Endpoint, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    conn = http.client.HTTPConnection(ep.host, ep.port, timeout=60)
    try:
        headers = {"Authorization": f"Bearer {ep.token}", "X-Netd-Actor": ACTOR}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
        return resp.status, json.loads(raw) if raw else None
    finally:
        conn.close()


def server_addresses(ep: Endpoint) -> list[dict[str, Any]]:
    """Every allocation of the bench pool, as the server lists them (paged)."""
    out: list[dict[str, Any]] = []
    after = ""
    while True:
        q = f"/v1/addresses?pool={ep.pool}&limit=1000" + (f"&after={after}" if after else "")
        status, page = api_call(ep, "GET", q)
        if status != 200:
            raise BenchError(f"GET {q} answered {status}: {page}")
        rows = page["addresses"]
        out += rows
        if len(rows) < 1000:
            return out
        after = rows[-1]["ip"]


def bench_http(tmp: Path, args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    (tmp / "http").mkdir()
    server = start_server(tmp / "http", extra=["--workers", str(args.workers)])
    try:
        u = urlparse(server.url)
        assert u.hostname is not None and u.port is not None
        ep = Endpoint(u.hostname, u.port, server.token, "bench")
        status, pool = api_call(ep, "POST", "/v1/pools",
                                {"name": ep.pool, "cidr": "10.64.0.0/16"})
        if status != 201:
            raise BenchError(f"creating the bench pool answered {status}: {pool}")

        runs: list[HttpRun] = []
        gens = ["asyncio", *(["uvloop"] if have_uvloop() else []), "threads"]
        calib: dict[str, Any] = {}
        for g in gens:
            r = http_load(ep, server, f"calibrate-{g}", g, 16, args.calib, args.max_run_s)
            runs.append(r)
            calib[g] = r.to_dict()
            log(f"  calibration {g:8s}: client CPU {calib[g]['client_cpu_us_per_req']:6.1f} "
                f"us/alloc, {calib[g]['allocs_per_s']}/s")
        chosen = min(gens, key=lambda g: calib[g]["client_cpu_us_per_req"])
        log(f"  load generator: {chosen}")
        warm = http_load(ep, server, "warmup", chosen, 16, args.warmup, args.max_run_s)
        runs.append(warm)
        r1 = http_load(ep, server, "clients-1", chosen, 1, args.n1, args.max_run_s)
        runs.append(r1)
        log(f"  1 client:   {r1.to_dict()['allocs_per_s']}/s")
        r16 = http_load(ep, server, "clients-16", chosen, 16, args.n16, args.max_run_s)
        runs.append(r16)
        log(f"  16 clients: {r16.to_dict()['allocs_per_s']}/s")

        # --- verification, through the server ---
        problems: list[str] = []
        sent_ok = sum(len(r.ok) for r in runs)
        errors = sum(r.errors for r in runs)
        ips: set[str] = set()
        for r in runs:
            for i, body in r.ok:
                a = json.loads(body)
                if a.get("container_id") != r.cids[i] or a.get("pool") != ep.pool:
                    problems.append(f"answer for {r.cids[i]} names {a.get('container_id')}")
                ips.add(a["ip"])
        if len(ips) != sent_ok:
            problems.append(f"{sent_ok} 200 answers carried only {len(ips)} distinct addresses")
        status, pool = api_call(ep, "GET", f"/v1/pools/{ep.pool}")
        counter = pool.get("allocated") if status == 200 else None
        listed = server_addresses(ep)
        listed_ips = {a["ip"] for a in listed}
        if counter != sent_ok:
            problems.append(f"server pool counter says {counter}, 200 answers {sent_ok}")
        if len(listed) != sent_ok or listed_ips != ips:
            problems.append(f"server lists {len(listed)} allocations ({len(listed_ips)} "
                            f"distinct), 200 answers {sent_ok}")
        if errors:
            problems.append(f"{errors} non-200 answers or transport errors")
        stop_rc = None
        server.stop()
        stop_rc = server.proc.returncode
        return {
            "server": "netd ipam serve, SQLite file store in a temp dir, token auth, loopback",
            "pool": {"name": ep.pool, "cidr": "10.64.0.0/16"},
            "calibration": calib, "loadgen": chosen,
            "warmup": warm.to_dict(), "clients_1": r1.to_dict(), "clients_16": r16.to_dict(),
            "verify": {"sent_ok": sent_ok, "errors": errors, "server_counter": counter,
                       "server_listed": len(listed), "distinct_ips": len(ips),
                       "ok": not problems, "problems": problems},
            "server_exit_code": stop_rc,
        }
    finally:
        server.stop()


# --- 2. pool size: in-process IPAM + SqliteStore ---------------------------------

FILL_BATCH = 1_000_000
# Container ids of bulk-filled rows: 8 hex digits spread evenly over the key space
# (so the owner index is as wide as with random ids, and measured random ids land
# all over it) then 56 deterministic pseudo-random digits (the event row repeats
# the id). All multipliers < 2**31 and j < 2**32, so no 64-bit overflow.
_J = "(i - :base)"
_CID_SQL = (
    f"printf('%08x', {_J} * :step) || printf('%08x%08x%08x%08x%08x%08x%08x', "
    f"({_J} * 1597334677) & 4294967295, ({_J} * 1103515245) & 4294967295, "
    f"({_J} * 1664525) & 4294967295, ({_J} * 22695477) & 4294967295, "
    f"({_J} * 214013) & 4294967295, ({_J} * 134775813) & 4294967295, "
    f"({_J} * 1140671485) & 4294967295)"
)
_MAC_SQL = "printf('0a:58:%02x:%02x:%02x:%02x', (i>>24)&255, (i>>16)&255, (i>>8)&255, i&255)"
_SERIES = "WITH RECURSIVE s(i) AS (SELECT :lo UNION ALL SELECT i + 1 FROM s WHERE i < :hi) "
_FILL_ALLOCS = (
    _SERIES + "INSERT INTO allocations (pool, ip, container_id, ifname, mac, host, netns, "
    "handle, fixed, labels, block, created) "
    f"SELECT :pool, printf('%032x', i), {_CID_SQL}, 'eth0', {_MAC_SQL}, :host, :netns, "
    "NULL, 0, '{}', NULL, :ts FROM s"
)
_FILL_EVENTS = (
    _SERIES + "INSERT INTO events (ts, pool, ip, action, container_id, ifname, host, mac, "
    "actor, note) "
    "SELECT :ts, :pool, printf('%d.%d.%d.%d', (i>>24)&255, (i>>16)&255, (i>>8)&255, i&255), "
    f"'allocate', {_CID_SQL}, 'eth0', :host, {_MAC_SQL}, :actor, '' FROM s"
)


# the columns bulk_fill knows how to fill as allocate() does (events.lo/hi stay
# NULL: allocate() writes them only for range and pool events)
FILL_COLUMNS = {
    "allocations": {"pool", "ip", "container_id", "ifname", "mac", "host", "netns", "handle",
                    "fixed", "labels", "block", "created", "allowed"},
    "events": {"id", "ts", "pool", "ip", "action", "container_id", "ifname", "host", "mac",
               "actor", "note", "lo", "hi"},
}


def schema_statement(index: str) -> str | None:
    for stmt in SCHEMA.split(";"):
        if f"INDEX IF NOT EXISTS {index} " in stmt:
            return stmt.strip()
    return None


def bulk_fill(path: Path, pool: str, n: int, log: Callable[[str], None]) -> dict[str, Any]:
    """Put ``pool`` (IPv4, fresh, store closed) in the state ``n`` allocate() calls leave.

    allocate() on a fresh l2 pool takes the lowest never-used address, writes
    one ``allocations`` row (key(ip), mac 0a:58+ip, labels '{}'), bumps
    ``pools.n_allocated`` and appends one ``events`` row. Here: the same rows
    for the n lowest free addresses, generated inside SQLite in batches of
    FILL_BATCH within one transaction; then the free range is cut to start
    after them and the counter raised by n. ``events_ip`` (dotted-quad text, so
    not in insert order) is dropped and recreated from the store's SCHEMA
    statement, which builds the same index by sorting instead of by random
    inserts. The one-off transaction runs with a rollback journal instead of
    the WAL (pages are written once, not twice) and the file is fsync'ed after,
    so that no writeback of the fill lands in the measurements.
    """
    t0 = time.monotonic()
    ts = time.time()
    db = sqlite3.connect(str(path), isolation_level=None)
    db.row_factory = sqlite3.Row
    try:
        db.execute("PRAGMA journal_mode=DELETE")
        db.execute("PRAGMA synchronous=OFF")
        db.execute("PRAGMA cache_size=-1048576")
        db.execute("PRAGMA temp_store=MEMORY")
        db.execute("BEGIN IMMEDIATE")
        try:
            tx = SqliteTxn(db)
            for table, cols in FILL_COLUMNS.items():
                have = {r["name"] for r in db.execute(f"PRAGMA table_info({table})")}
                if have != cols:
                    raise BenchError(f"the store's {table} columns changed ({sorted(have)}); "
                                     "bulk_fill must write what allocate() writes: update it")
            free = db.execute("SELECT lo, hi, space FROM free_ranges WHERE pool=? ORDER BY lo",
                              (pool,)).fetchall()
            used = db.execute("SELECT (SELECT COUNT(*) FROM allocations WHERE pool=?) + "
                              "(SELECT COUNT(*) FROM released WHERE pool=?)",
                              (pool, pool)).fetchone()[0]
            if len(free) != 1 or used:
                raise BenchError(f"bulk fill needs a fresh pool with one free range, got "
                                 f"{len(free)} ranges and {used} allocated/released")
            lo, hi, space = unkey(free[0]["lo"]), unkey(free[0]["hi"]), free[0]["space"]
            if hi - lo + 1 <= n or hi >= 1 << 32:
                raise BenchError(f"cannot fill {n} of {hi - lo + 1} free addresses")
            events_before = db.execute("SELECT COALESCE(MAX(id), 0) FROM events").fetchone()[0]
            ev_ip = schema_statement("events_ip")
            if ev_ip:
                db.execute("DROP INDEX events_ip")
            params = {"base": lo, "step": (1 << 32) // n, "pool": pool, "host": BENCH_HOST,
                      "netns": "/var/run/netns/cni-fill", "actor": ACTOR, "ts": ts}
            for start in range(0, n, FILL_BATCH):
                params["lo"] = lo + start
                params["hi"] = lo + min(n, start + FILL_BATCH) - 1
                db.execute(_FILL_ALLOCS, params)
                db.execute(_FILL_EVENTS, params)
                done = min(n, start + FILL_BATCH)
                if done % (5 * FILL_BATCH) == 0 or done == n:
                    log(f"    bulk fill: {done:,}/{n:,} rows, {time.monotonic() - t0:.0f} s")
            if ev_ip:
                db.execute(ev_ip)
            tx.del_free(pool, lo)
            tx.put_free(pool, space, lo + n, hi)
            tx.add_counters(pool, 0, n)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        t_commit = time.monotonic()
        db.execute("PRAGMA journal_mode=WAL")
    finally:
        db.close()
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    secs = time.monotonic() - t0
    return {"rows": n, "first": lo, "next_free": lo + n, "events_before": events_before,
            "seconds": round(secs, 1), "seconds_until_commit": round(t_commit - t0, 1),
            "rows_per_s": round(n / secs), "db_bytes": path.stat().st_size,
            "method": "bulk INSERT ... SELECT in SQLite (allocations + events rows), "
                      "free range cut, n_allocated raised; one transaction"}


def _row(tx: SqliteTxn, sql: str, *args: Any) -> dict[str, Any] | None:
    r = tx.db.execute(sql, args).fetchone()
    return dict(zip(r.keys(), r, strict=True)) if r is not None else None


# columns whose value depends on the address, the owner or the time
_VARYING = {"ip", "container_id", "mac", "netns", "created", "ts", "id"}


def _same_shape(filled: dict[str, Any] | None, real: dict[str, Any] | None) -> list[str]:
    """Differences between a bulk-filled row and one allocate() wrote itself."""
    if filled is None or real is None:
        return [f"missing row: filled {filled}, real {real}"]
    if filled.keys() != real.keys():
        return [f"columns differ: {sorted(filled)} vs {sorted(real)}"]
    out = []
    for col, v in real.items():
        f = filled[col]
        if type(f) is not type(v) or (col not in _VARYING and f != v):
            out.append(f"{col}: filled {f!r}, allocate() wrote {v!r}")
    return out


def _mac_recorded(tx: SqliteTxn, mac: str) -> bool:
    """The allocations' unique MAC index knows ``mac`` (what keeps MACs unique)."""
    return tx.db.execute("SELECT 1 FROM allocations WHERE mac=?", (mac,)).fetchone() is not None


def check_bulk(ipam: IPAM, store: SqliteStore, pool: str, fill: dict[str, Any],
               reserved0: int, seen: set[int]) -> dict[str, Any]:
    """The filled store, read through the store and IPAM, is what allocate() leaves."""
    n, lo, nxt = fill["rows"], fill["first"], fill["next_free"]
    problems: list[str] = []
    _, stats = ipam.get_pool(pool)
    if stats.allocated != n or stats.reserved != reserved0:
        problems.append(f"pool counters {stats.allocated}/{stats.reserved}, want {n}/{reserved0}")
    with store.read() as tx:
        rows = tx.db.execute("SELECT COUNT(*) FROM allocations WHERE pool=?", (pool,)).fetchone()[0]
        events = tx.db.execute("SELECT MAX(id) FROM events").fetchone()[0]
        if rows != n:
            problems.append(f"{rows} allocation rows, want {n}")
        if events != fill["events_before"] + n:
            problems.append(f"last event id {events}, want {fill['events_before'] + n}")
        first_free = tx.first_free(pool, None)
        if first_free is None or first_free[1] != nxt:
            problems.append(f"first free range {first_free}, want one starting at {nxt}")
        step = max(1, n // 50)
        for ip in sorted({lo, lo + n - 1, *range(lo, lo + n, step)}):
            a = tx.allocation(pool, ip)
            if a is None:
                problems.append(f"no allocation at {ip_str(4, ip)}")
                continue
            owner = tx.allocation_of(pool, a.container_id, "eth0")
            ev = [e for e in tx.events(ip_str(4, ip), None, 10) if e.ip == ip_str(4, ip)]
            if (a.mac != mac_for_ipv4(ip) or len(a.container_id) != 64 or a.fixed
                    or a.labels or a.host != BENCH_HOST or owner is None or owner.ip != ip
                    or not _mac_recorded(tx, a.mac) or len(ev) != 1
                    or ev[0].container_id != a.container_id or ev[0].mac != a.mac
                    or ev[0].pool != pool or ev[0].action != "allocate"):
                problems.append(f"row at {ip_str(4, ip)} is not what allocate() writes: "
                                f"{a}, events {ev}")
        if tx.allocation(pool, lo + n) is not None or tx.allocation(pool, lo - 1) is not None:
            problems.append("allocation rows outside the filled part")
    try:
        ipam.allocate(AllocRequest(pool=pool, container_id=new_cid(), ip=ip_str(4, lo + n // 2)))
        problems.append("allocate() of a filled address succeeded")
    except AddressInUse:
        pass
    got = []
    for k in range(5):
        cid = new_cid()
        a, _ = ipam.allocate(AllocRequest(pool=pool, container_id=cid, host=BENCH_HOST,
                                          netns="/var/run/netns/cni-fill"), actor=ACTOR)
        got.append(a.ip)
        if k == 0:  # a row allocate() wrote itself, next to a filled one
            sql_a = "SELECT * FROM allocations WHERE pool=? AND ip=?"
            sql_e = "SELECT * FROM events WHERE ip=? AND action='allocate' ORDER BY id DESC"
            with store.read() as tx:
                problems += _same_shape(_row(tx, sql_a, pool, key(lo + n - 1)),
                                        _row(tx, sql_a, pool, key(a.ip)))
                problems += _same_shape(_row(tx, sql_e, ip_str(4, lo + n - 1)),
                                        _row(tx, sql_e, ip_str(4, a.ip)))
        ipam.release(pool=pool, container_id=cid, actor=ACTOR)
        seen.add(a.ip)
    if got != list(range(nxt, nxt + 5)):
        problems.append(f"allocate() after fill returned {[ip_str(4, i) for i in got]}, "
                        f"want {ip_str(4, nxt)}... (first address after the filled part)")
    _, stats = ipam.get_pool(pool)
    if stats.allocated != n:
        problems.append(f"after 5 allocate+release the counter is {stats.allocated}, want {n}")
    return {"ok": not problems, "problems": problems[:5] + (
                [f"... and {len(problems) - 5} more"] if len(problems) > 5 else []),
            "allocate_after_fill": [ip_str(4, i) for i in got],
            "filled_range": f"{ip_str(4, lo)}-{ip_str(4, lo + n - 1)}"}


def churn(ipam: IPAM, pool: str, n: int, warmup: int, seen: set[int]) -> dict[str, Any]:
    """Timed allocate(), each followed by an untimed release() of the same owner."""
    lat: list[int] = []
    new: list[int] = []
    reused: list[int] = []
    ids = [new_cid() for _ in range(warmup + n)]
    gc.collect()
    for k, cid in enumerate(ids):
        req = AllocRequest(pool=pool, container_id=cid, host=BENCH_HOST,
                           netns=f"/var/run/netns/cni-{cid[:12]}")
        t0 = time.perf_counter_ns()
        a, _ = ipam.allocate(req, actor=ACTOR)
        dt = time.perf_counter_ns() - t0
        # by owner and interface, as a CNI DEL does (see release_without_ifname)
        if not ipam.release(pool=pool, container_id=cid, ifname="eth0", actor=ACTOR).released:
            raise BenchError(f"release of {cid} in {pool} released nothing")
        if k >= warmup:
            lat.append(dt)
            (reused if a.ip in seen else new).append(dt)
        seen.add(a.ip)
    out = summarize(lat)
    out["never_used_path"] = {"n": len(new), "p50_ms": summarize(new)["p50_ms"]}
    out["reused_path"] = {"n": len(reused), "p50_ms": summarize(reused)["p50_ms"]}
    return out


def release_without_ifname(ipam: IPAM, pool: str, n: int = 3) -> dict[str, Any]:
    """Observation: release(pool, container_id) without an ifname (API, netctl).

    Not part of the targets; recorded because its query plan differs from the
    release with an ifname that the churn uses.
    """
    lat = []
    for _ in range(n):
        cid = new_cid()
        ipam.allocate(AllocRequest(pool=pool, container_id=cid, host=BENCH_HOST), actor=ACTOR)
        t0 = time.perf_counter_ns()
        ipam.release(pool=pool, container_id=cid, actor=ACTOR)
        lat.append(time.perf_counter_ns() - t0)
    return {"n": n, "p50_ms": summarize(lat)["p50_ms"], "max_ms": summarize(lat)["max_ms"]}


def scenario(tmp: Path, label: str, cidr: str, fill: float, args: argparse.Namespace,
             log: Callable[[str], None]) -> dict[str, Any]:
    path = tmp / f"{label}.db"
    store = SqliteStore(str(path))
    try:
        ipam = IPAM(store)
        pool = label
        ipam.create_pool(PoolSpec(name=pool, cidr=cidr), actor=ACTOR)
        _, stats = ipam.get_pool(pool)
        want = max(0, round(fill * stats.size) - stats.reserved)
        info: dict[str, Any] = {"cidr": cidr, "size": stats.size, "reserved": stats.reserved,
                                "target_fill": fill}
        seen: set[int] = set()
        big = stats.size > 1 << 16
        if want and big:
            n = min(want, args.big_fill_rows) if args.big_fill_rows is not None else want
            need = n * 700
            free_disk = shutil.disk_usage(tmp).free
            if need > free_disk * 0.8:
                n = int(free_disk * 0.8 / 700)
                log(f"    only {free_disk / 1e9:.1f} GB free: filling {n:,} rows instead")
            store.close()
            info["fill"] = bulk_fill(path, pool, n, log)
            store = SqliteStore(str(path))
            ipam = IPAM(store)
            t_check = time.monotonic()
            info["consistency"] = check_bulk(ipam, store, pool, info["fill"], stats.reserved,
                                             seen)
            info["consistency"]["seconds"] = round(time.monotonic() - t_check, 1)
            log(f"    consistency check: {info['consistency']['seconds']} s")
            if not info["consistency"]["ok"]:
                raise BenchError(f"bulk-filled store is inconsistent: "
                                 f"{info['consistency']['problems']}")
        elif want:
            t0 = time.monotonic()
            for _ in range(want):
                ipam.allocate(AllocRequest(pool=pool, container_id=new_cid(), host=BENCH_HOST),
                              actor=ACTOR)
            info["fill"] = {"rows": want, "seconds": round(time.monotonic() - t0, 2),
                            "method": "allocate() calls"}
        _, stats = ipam.get_pool(pool)
        info["allocated"] = stats.allocated
        info["fill_pct"] = round(100 * stats.utilisation, 2)
        t_churn = time.monotonic()
        info["latency"] = churn(ipam, pool, args.inproc, args.inproc_warmup, seen)
        info["latency"]["seconds"] = round(time.monotonic() - t_churn, 1)
        info["release_without_ifname"] = release_without_ifname(ipam, pool)
        _, after = ipam.get_pool(pool)
        if after.allocated != stats.allocated:
            raise BenchError(f"{label}: {after.allocated} allocated after churn, "
                             f"{stats.allocated} before")
        return info
    finally:
        store.close()
        for suffix in ("", "-wal", "-shm", "-journal"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{path}{suffix}")


def bench_inproc(tmp: Path, args: argparse.Namespace,
                 log: Callable[[str], None]) -> dict[str, Any]:
    d = tmp / "inproc"
    d.mkdir()
    out: dict[str, Any] = {}
    for label, cidr, fill in (("s24-0", "192.168.10.0/24", 0.0), ("s8-0", "10.0.0.0/8", 0.0),
                              ("s24-90", "192.168.10.0/24", 0.9), ("s8-90", "10.0.0.0/8", 0.9)):
        log(f"  {cidr} at {fill:.0%} fill ...")
        out[label] = scenario(d, label, cidr, fill, args, log)
        lat = out[label]["latency"]
        log(f"    p50 {fmt_ms(lat['p50_ms'])} ms, p99 {fmt_ms(lat['p99_ms'])} ms "
            f"({lat['seconds']} s for {args.inproc_warmup + args.inproc} allocate+release)")
    out["ratio_0"] = {"p50": ratio(out["s8-0"]["latency"]["p50_ms"],
                                   out["s24-0"]["latency"]["p50_ms"]),
                      "p99": ratio(out["s8-0"]["latency"]["p99_ms"],
                                   out["s24-0"]["latency"]["p99_ms"])}
    out["ratio_90"] = {"p50": ratio(out["s8-90"]["latency"]["p50_ms"],
                                    out["s24-90"]["latency"]["p50_ms"]),
                       "p99": ratio(out["s8-90"]["latency"]["p99_ms"],
                                    out["s24-90"]["latency"]["p99_ms"])}
    a = out["s8-0"]["latency"]["never_used_path"]["p50_ms"]
    b = out["s8-90"]["latency"]["never_used_path"]["p50_ms"]
    out["same_path"] = {"s8_0_p50_ms": a, "s8_90_p50_ms": b, "ratio": ratio(b, a)}
    return out


# --- 4. listings under load: allocation latency while clients page -----------------

LIST_POOL = "listing"
LIST_CIDR = "10.128.0.0/16"


def _page_reader(url: str, token: str, stop: Any, paused: Any, pages: Any,
                 passes: Any) -> None:
    """A dashboard that pages through every address, again and again (own process);
    it waits between pages while ``paused`` is set (the idle rounds)."""
    u = urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    headers = {"Authorization": f"Bearer {token}"}
    after, rows = "", 0
    while not stop.value:
        if paused.value:
            time.sleep(0.01)
            continue
        q = f"/v1/addresses?pool={LIST_POOL}&limit=1000" + (f"&after={after}" if after else "")
        try:
            conn.request("GET", q, headers=headers)
            resp = conn.getresponse()
            body = resp.read()
        except (OSError, http.client.HTTPException) as exc:
            if not stop.value:  # cut while it should page: a finding, not a traceback
                passes.put(("error", type(exc).__name__, str(exc)[:200]))
            return
        if resp.status != 200:
            passes.put(("error", resp.status, body[:200]))
            return
        with pages.get_lock():
            pages.value += 1
        rows += body.count(b'"container_id"')
        tail = body[body.rfind(b'"next":') + 7:-1]  # the last key: no JSON parse
        if tail == b"null":
            passes.put(("pass", rows))
            after, rows = "", 0
        else:
            after = tail.strip(b'"').decode()


def _probe(ep: Endpoint, n: int, pace_s: float) -> tuple[list[int], Counter[str]]:
    """``n`` allocations one after the other (each released untimed), their latencies."""
    headers = {"Authorization": f"Bearer {ep.token}", "Content-Type": "application/json",
               "X-Netd-Actor": ACTOR}
    conn = http.client.HTTPConnection(ep.host, ep.port, timeout=60)
    lat: list[int] = []
    statuses: Counter[str] = Counter()
    try:
        for _ in range(n):
            cid = new_cid()
            t0 = time.perf_counter_ns()
            conn.request("POST", "/v1/allocate", body=alloc_body(ep.pool, cid), headers=headers)
            resp = conn.getresponse()
            resp.read()
            dt = time.perf_counter_ns() - t0
            statuses[str(resp.status)] += 1
            if resp.status == 200:
                lat.append(dt)
            conn.request("POST", "/v1/release", headers=headers, body=json.dumps(
                {"pool": ep.pool, "container_id": cid, "ifname": "eth0"}).encode())
            r = conn.getresponse()
            r.read()
            statuses[f"release-{r.status}"] += 1
            time.sleep(pace_s)
    finally:
        conn.close()
    return lat, statuses


def bench_listings(tmp: Path, args: argparse.Namespace,
                   log: Callable[[str], None]) -> dict[str, Any]:
    """Allocation latency while ``args.list_readers`` clients page through all addresses
    of a pool of ``args.list_fill`` allocations, against the same probe idle."""
    import multiprocessing

    d = tmp / "listings"
    d.mkdir()
    db = d / "ipam.db"
    store = SqliteStore(str(db))
    IPAM(store).create_pool(PoolSpec(name=LIST_POOL, cidr=LIST_CIDR), actor=ACTOR)
    store.close()
    fill = bulk_fill(db, LIST_POOL, args.list_fill, log)
    server = start_server(d, db=db)
    try:
        u = urlparse(server.url)
        assert u.hostname is not None and u.port is not None
        ep = Endpoint(u.hostname, u.port, server.token, LIST_POOL)
        status, _ = api_call(ep, "GET", f"/v1/addresses?pool={LIST_POOL}&limit=100000")
        t0 = time.perf_counter()
        status_page, _ = api_call(ep, "GET", f"/v1/addresses?pool={LIST_POOL}&limit=1000")
        one_page_ms = round((time.perf_counter() - t0) * 1e3, 1)
        _probe(ep, max(10, args.list_probe // 10), args.list_pace)  # warm-up
        ctx = multiprocessing.get_context("spawn")
        stop, paused, pages = ctx.Value("i", 0), ctx.Value("i", 1), ctx.Value("i", 0)
        passes = ctx.Queue()
        readers = [ctx.Process(target=_page_reader, args=(server.url, server.token, stop,
                                                           paused, pages, passes), daemon=True)
                   for _ in range(args.list_readers)]
        for r in readers:
            r.start()
        # idle and loaded rounds in turn, so that drift (WAL checkpoints, the machine's
        # other work) lands in both alike
        idle: list[int] = []
        loaded: list[int] = []
        st_idle: Counter[str] = Counter()
        st_loaded: Counter[str] = Counter()
        busy_s, busy_pages = 0.0, 0
        each = max(1, args.list_probe // args.list_rounds)
        for _ in range(args.list_rounds):
            paused.value = 1
            time.sleep(0.2)  # the pages in flight are done
            lat, st = _probe(ep, each, args.list_pace)
            idle += lat
            st_idle += st
            paused.value = 0
            p0 = pages.value
            deadline = time.monotonic() + 30
            while pages.value < p0 + args.list_readers and time.monotonic() < deadline:
                time.sleep(0.01)  # every reader is paging
            p0, t0 = pages.value, time.perf_counter()
            lat, st = _probe(ep, each, args.list_pace)
            busy_s += time.perf_counter() - t0
            busy_pages += pages.value - p0
            loaded += lat
            st_loaded += st
        log(f"  idle p99 {summarize(idle)['p99_ms']} ms, loaded p99 "
            f"{summarize(loaded)['p99_ms']} ms")
        pages_per_s = round(busy_pages / busy_s, 1) if busy_s else 0.0
        results: list[tuple[Any, ...]] = []
        deadline = time.monotonic() + args.list_verify_s
        while time.monotonic() < deadline:  # the readers finish a full pass each
            while not passes.empty():
                results.append(passes.get())
            if sum(1 for x in results if x[0] == "pass") >= args.list_readers:
                break
            time.sleep(0.1)
        stop.value = 1
        for r in readers:
            r.join(30)
        while not passes.empty():
            results.append(passes.get())
        full = [x[1] for x in results if x[0] == "pass"]
        errors = [x for x in results if x[0] == "error"]
        li, ll = summarize(idle), summarize(loaded)
        problems = []
        bad = {k: v for k, v in (st_idle + st_loaded).items() if k not in ("200", "release-200")}
        if bad:
            problems.append(f"probe answers other than 200: {dict(bad)}")
        if errors:
            problems.append(f"reader errors: {errors[:3]}")
        if full and (min(full) < args.list_fill or max(full) > args.list_fill + 1):
            problems.append(f"a full pass listed {min(full)}-{max(full)} rows, want "
                            f"{args.list_fill} (+1 probe)")
        if not full:
            problems.append(f"no reader finished a full pass in {args.list_verify_s} s")
        if status != 422 or status_page != 200:
            problems.append(f"limit=100000 answered {status} (want 422), limit=1000 "
                            f"{status_page}")
        return {
            "server": "netd ipam serve (listing pages in its reader process), SQLite file "
                      "store, token, loopback",
            "pool": {"name": LIST_POOL, "cidr": LIST_CIDR, "allocations": args.list_fill},
            "fill": fill, "readers": args.list_readers, "pace_ms": args.list_pace * 1e3,
            "rounds": args.list_rounds,
            "one_page_ms": one_page_ms, "limit_100000_status": status,
            "idle": li, "loaded": ll, "p99_ratio": ratio(ll["p99_ms"], li["p99_ms"]),
            "p50_ratio": ratio(ll["p50_ms"], li["p50_ms"]),
            "pages_per_s": pages_per_s, "rows_per_s": round(pages_per_s * 1000),
            "full_passes": len(full),
            "verify": {"ok": not problems, "problems": problems},
        }
    finally:
        server.stop()


# --- 3. reference: CNI host-local --------------------------------------------------


def host_local_version() -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        p = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", "containernetworking-plugins"],
                           capture_output=True, text=True, timeout=10)
        if p.returncode == 0:
            return f"containernetworking-plugins {p.stdout.strip()}"
    return "unknown"


def bench_host_local(tmp: Path, args: argparse.Namespace) -> dict[str, Any]:
    data_dir = tmp / "host-local"
    # What a runtime hands a main plugin (here: bridge), which passes the same
    # config on to its IPAM plugin; host-local reads the "ipam" section.
    conf = json.dumps({"cniVersion": "1.0.0", "name": "bench", "type": "bridge",
                       "ipam": {"type": "host-local",
                                "ranges": [[{"subnet": "10.20.0.0/16"}]],
                                "dataDir": str(data_dir)}}).encode()
    base_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "CNI_COMMAND": "ADD",
                "CNI_IFNAME": "eth0", "CNI_PATH": str(Path(HOST_LOCAL).parent)}
    lat: list[int] = []
    errors: list[str] = []
    ips: set[str] = set()
    total = args.host_local_warmup + args.host_local
    t_start = 0.0
    for k in range(total):
        if k == args.host_local_warmup:
            t_start = time.perf_counter()
        cid = new_cid()
        env = dict(base_env, CNI_CONTAINERID=cid, CNI_NETNS=f"/var/run/netns/cni-{cid[:12]}")
        t0 = time.perf_counter_ns()
        p = subprocess.run([HOST_LOCAL], input=conf, env=env, capture_output=True)
        dt = time.perf_counter_ns() - t0
        if p.returncode != 0:
            errors.append(p.stdout.decode(errors="replace") + p.stderr.decode(errors="replace"))
            continue
        ips.add(json.loads(p.stdout)["ips"][0]["address"])
        if k >= args.host_local_warmup:
            lat.append(dt)
    elapsed = time.perf_counter() - t_start
    files = [f for f in (data_dir / "bench").iterdir() if f.name[0].isdigit()]
    problems = []
    if errors:
        problems.append(f"{len(errors)} failed ADDs, first: {errors[0][:300]}")
    if len(ips) != total - len(errors) or len(files) != len(ips):
        problems.append(f"{total - len(errors)} ADDs, {len(ips)} distinct addresses, "
                        f"{len(files)} lease files")
    return {"plugin": HOST_LOCAL, "version": host_local_version(), "serial": True,
            "config": json.loads(conf), "warmup": args.host_local_warmup,
            "allocs": len(lat), "errors": len(errors), "elapsed_s": round(elapsed, 3),
            "allocs_per_s": round(len(lat) / elapsed, 1) if elapsed else None,
            "latency": summarize(lat),
            "verify": {"lease_files": len(files), "distinct_ips": len(ips), "ok": not problems,
                       "problems": problems}}


# --- report ------------------------------------------------------------------------


def targets(res: dict[str, Any]) -> list[dict[str, Any]]:
    h = res.get("http") or {}
    c16 = h.get("clients_16") or {}
    c1 = h.get("clients_1") or {}
    ip = res.get("inproc") or {}
    hl = res.get("host_local") or {}
    t16 = c16.get("allocs_per_s")
    t1 = c1.get("allocs_per_s")
    p99 = (c16.get("latency") or {}).get("p99_ms")
    hl_s = hl.get("allocs_per_s")
    out = []

    def add(name: str, value: float | None, ok: bool | None, unit: str, note: str = "") -> None:
        out.append({"target": name, "value": value, "unit": unit,
                    "status": None if ok is None else ("PASS" if ok else "MISS"), "note": note})

    add(f">= {TARGET_HTTP_PER_S:,.0f} allocations/s at 16 clients", t16,
        None if t16 is None else t16 >= TARGET_HTTP_PER_S, "/s")
    add(f"p99 < {TARGET_HTTP_P99_MS:g} ms (HTTP, 16 clients)", p99,
        None if p99 is None else p99 < TARGET_HTTP_P99_MS, "ms",
        f"1 client: {fmt_ms((c1.get('latency') or {}).get('p99_ms'))} ms")
    for lvl in ("0", "90"):
        r = (ip.get(f"ratio_{lvl}") or {}).get("p50")
        fills = ", ".join(f"/{p} {ip[f's{p}-{lvl}']['fill_pct']:.1f}%" for p in ("24", "8")
                          if f"s{p}-{lvl}" in ip)
        add(f"/8-to-/24 p50 latency ratio <= {TARGET_SIZE_RATIO:g} at {lvl}% fill", r,
            None if r is None else r <= TARGET_SIZE_RATIO, "x",
            f"p99 ratio {(ip.get(f'ratio_{lvl}') or {}).get('p99')}; actual fill {fills}")
    v16 = ratio(t16, hl_s)
    add(f"16-client throughput >= {TARGET_VS_HOST_LOCAL:g}x serial host-local", v16,
        None if v16 is None else v16 >= TARGET_VS_HOST_LOCAL, "x",
        f"1 client: {ratio(t1, hl_s)}x")
    ls = res.get("listings") or {}
    lr = ls.get("p99_ratio")
    add(f"allocation p99 with {ls.get('readers', 8)} clients paging all addresses <= "
        f"{TARGET_LISTING_RATIO:g}x idle", lr, None if lr is None else lr <= TARGET_LISTING_RATIO,
        "x", f"p50 {ls.get('p50_ratio')}x; {ls.get('pages_per_s')} pages/s")
    return out


def render(res: dict[str, Any]) -> str:
    L: list[str] = []
    env = res["env"]
    L.append("netd IPAM benchmark")
    L.append(f"  {env['date']}  {env['cpus']} CPUs  Python {env['python']}  SQLite "
             f"{env['sqlite']}  load avg at start {env['loadavg_start']}")
    L.append("")
    h = res.get("http")
    L.append("1. HTTP API: POST /v1/allocate on a real `netd ipam serve` (SQLite file store, "
             "token, loopback)")
    if h:
        L.append("   load generator, client CPU per allocation (16 clients, "
                 f"{res['params']['calib']} allocations each):")
        for g, c in h["calibration"].items():
            star = "  <- used" if g == h["loadgen"] else ""
            L.append(f"     {LOADGEN_LABEL[g]:44s} {c['client_cpu_us_per_req']:7.1f} us"
                     f"   ({c['allocs_per_s']:,.0f}/s){star}")
        L.append("   clients  allocs  errors  allocs/s    p50 ms   p99 ms   max ms   "
                 "server CPU/alloc  client CPU/alloc")
        for k in ("clients_1", "clients_16"):
            r = h[k]
            lat = r["latency"]
            L.append(f"   {r['clients']:>7}  {r['ok']:>6}  {r['errors']:>6}  "
                     f"{r['allocs_per_s']:>8,.0f}  {fmt_ms(lat['p50_ms']):>8} "
                     f"{fmt_ms(lat['p99_ms']):>8} {fmt_ms(lat['max_ms']):>8}   "
                     f"{r['server_cpu_us_per_req']:>10.0f} us   {r['client_cpu_us_per_req']:>10.0f}"
                     f" us" + ("  (stopped at the time bound)" if r["timed_out"] else ""))
        v = h["verify"]
        L.append(f"   verify: {v['sent_ok']} allocations answered 200 (incl. calibration and "
                 f"warm-up); server pool counter {v['server_counter']}, server lists "
                 f"{v['server_listed']}, distinct addresses {v['distinct_ips']}; errors "
                 f"{v['errors']} -> {'OK' if v['ok'] else 'FAILED: ' + '; '.join(v['problems'])}")
    else:
        L.append(f"   not run: {res.get('errors', {}).get('http', 'skipped')}")
    L.append("")
    ip = res.get("inproc")
    L.append("2. Pool size: in-process IPAM.allocate() + SqliteStore (temp file, one store per "
             "case); each timed allocate() is followed by an untimed release()")
    if ip:
        L.append("   pool               fill                      allocs   p50 ms   p99 ms   "
                 "max ms   p50 never-used / re-used path")
        for label in ("s24-0", "s8-0", "s24-90", "s8-90"):
            s = ip[label]
            lat = s["latency"]
            fill = f"{s['fill_pct']:.2f}% ({s['allocated']:,} alloc)"
            nu, ru = lat["never_used_path"], lat["reused_path"]
            L.append(f"   {s['cidr']:18s} {fill:25s} {lat['n']:>6} {fmt_ms(lat['p50_ms']):>8} "
                     f"{fmt_ms(lat['p99_ms']):>8} {fmt_ms(lat['max_ms']):>8}   "
                     f"{fmt_ms(nu['p50_ms'])} (n={nu['n']}) / {fmt_ms(ru['p50_ms'])} "
                     f"(n={ru['n']})")
        for lvl in ("0", "90"):
            r = ip[f"ratio_{lvl}"]
            L.append(f"   /8-to-/24 ratio at {lvl:>2}% fill: p50 {r['p50']}x, p99 {r['p99']}x")
        same = ip["same_path"]
        L.append(f"   same path (never-used address), /8 at 0% -> /8 at "
                 f"{ip['s8-90']['fill_pct']:.0f}%: p50 {fmt_ms(same['s8_0_p50_ms'])} -> "
                 f"{fmt_ms(same['s8_90_p50_ms'])} ms ({same['ratio']}x); the churning /24 "
                 "mostly takes the re-used path")
        f = ip["s8-90"].get("fill") or {}
        c = ip["s8-90"].get("consistency") or {}
        if f:
            L.append(f"   /8 fill: {f['rows']:,} allocations + {f['rows']:,} events bulk-inserted "
                     f"in {f['seconds']} s ({f['rows_per_s']:,}/s), DB {f['db_bytes'] / 1e9:.2f}"
                     f" GB; filled {c.get('filled_range')}")
            L.append(f"   consistency after fill: {'OK' if c.get('ok') else 'FAILED'}; "
                     f"allocate() then returns {', '.join(c.get('allocate_after_fill', []))}")
        rel = ", ".join(f"{ip[k]['cidr']} {ip[k]['fill_pct']:.0f}%: "
                        f"{fmt_ms(ip[k]['release_without_ifname']['p50_ms'])} ms"
                        for k in ("s24-0", "s8-0", "s24-90", "s8-90"))
        L.append(f"   observation, release(pool, container_id) without ifname (p50 of 3, "
                 f"untimed in the churn): {rel}")
        f24 = ip["s24-90"].get("fill") or {}
        L.append(f"   /24 fill: {f24.get('rows')} real allocate() calls")
    else:
        L.append(f"   not run: {res.get('errors', {}).get('inproc', 'skipped')}")
    L.append("")
    hl = res.get("host_local")
    L.append(f"3. Reference: CNI host-local ({HOST_LOCAL}), serial, one exec per ADD")
    if hl:
        lat = hl["latency"]
        L.append(f"   {hl['version']}; {hl['allocs']} allocations, {hl['errors']} errors: "
                 f"{hl['allocs_per_s']:,.0f}/s, p50 {fmt_ms(lat['p50_ms'])} ms, p99 "
                 f"{fmt_ms(lat['p99_ms'])} ms; lease files {hl['verify']['lease_files']} -> "
                 f"{'OK' if hl['verify']['ok'] else 'FAILED'}")
        if h:
            L.append(f"   netd/host-local throughput: 16 clients "
                     f"{ratio(h['clients_16']['allocs_per_s'], hl['allocs_per_s'])}x, "
                     f"1 client {ratio(h['clients_1']['allocs_per_s'], hl['allocs_per_s'])}x")
    else:
        L.append(f"   not run: {res.get('errors', {}).get('host_local', 'skipped')}")
    L.append("")
    ls = res.get("listings")
    L.append("4. Listings under load: POST /v1/allocate (one client, paced, each released "
             "untimed) while clients page through every address")
    if ls:
        L.append(f"   pool {ls['pool']['cidr']} with {ls['pool']['allocations']:,} allocations "
                 f"(bulk-filled); one page of 1,000: {ls['one_page_ms']} ms; limit=100000: "
                 f"{ls['limit_100000_status']}")
        for k in ("idle", "loaded"):
            lat = ls[k]
            who = "idle" if k == "idle" else f"{ls['readers']} readers"
            L.append(f"   {who:11s} {lat['n']:>5} allocs  p50 {fmt_ms(lat['p50_ms']):>6} ms  "
                     f"p99 {fmt_ms(lat['p99_ms']):>6} ms  max {fmt_ms(lat['max_ms']):>7} ms")
        L.append(f"   ratio loaded/idle: p99 {ls['p99_ratio']}x, p50 {ls['p50_ratio']}x; "
                 f"readers: {ls['pages_per_s']} pages/s ({ls['rows_per_s']:,} rows/s), "
                 f"{ls['full_passes']} full passes -> " + (
                     "OK" if ls["verify"]["ok"] else
                     "FAILED: " + "; ".join(ls["verify"]["problems"])))
    else:
        L.append(f"   not run: {res.get('errors', {}).get('listings', 'skipped')}")
    L.append("")
    L.append("Targets (markers, not assertions)")
    for t in res["targets"]:
        v = t["value"]
        vs = "-" if v is None else (f"{v:,.1f}" if t["unit"] == "/s" else f"{v}")
        note = f"   ({t['note']})" if t["note"] else ""
        L.append(f"   {mark(None if t['status'] is None else t['status'] == 'PASS')} "
                 f"{t['target']}: {vs}{'' if t['unit'] == 'x' else ' '}{t['unit']}{note}")
    if res.get("errors"):
        L.append("")
        L.append("Measurement problems:")
        for k, e in res["errors"].items():
            L.append(f"   {k}: {e}")
    L.append(f"\ntotal {res['elapsed_s']:.0f} s; JSON: {res['out']}")
    return "\n".join(L)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.bench.ipam_bench",
                                 description="netd IPAM benchmark (prints figures, writes JSON)")
    ap.add_argument("--out", default=".bench/ipam.json", help="JSON report path")
    ap.add_argument("--tmpdir", default=None, help="parent of the temp dir (default: $TMPDIR)")
    ap.add_argument("--quick", action="store_true",
                    help="small counts and a 1M-row /8 fill: a quick look, not the figures")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny counts, no targets: proves the benchmark runs (the test suite "
                         "does this)")
    ap.add_argument("--only", choices=["http", "inproc", "host-local", "listings"],
                    action="append",
                    help="run only these parts (repeatable)")
    ap.add_argument("--workers", type=int, default=1,
                    help="server processes (netd ipam serve --workers); on this 2-core box "
                         "the load generator needs the other core, so 1")
    ap.add_argument("--n16", type=int, default=5000)
    ap.add_argument("--n1", type=int, default=1000)
    ap.add_argument("--calib", type=int, default=800)
    ap.add_argument("--warmup", type=int, default=300)
    ap.add_argument("--max-run-s", type=float, default=60.0, help="time bound of each HTTP run")
    ap.add_argument("--inproc", type=int, default=2000)
    ap.add_argument("--inproc-warmup", type=int, default=200)
    ap.add_argument("--big-fill-rows", type=int, default=None,
                    help="cap on bulk-filled rows for the /8 at 90%% (default: the full 90%%)")
    ap.add_argument("--host-local", type=int, default=300)
    ap.add_argument("--host-local-warmup", type=int, default=20)
    ap.add_argument("--list-fill", type=int, default=58_000,
                    help="allocations of the listing bench's pool (the issue's 58,000)")
    ap.add_argument("--list-probe", type=int, default=2000)
    ap.add_argument("--list-readers", type=int, default=8)
    ap.add_argument("--list-pace", type=float, default=0.005,
                    help="seconds between probe allocations")
    ap.add_argument("--list-rounds", type=int, default=4,
                    help="idle and loaded probe rounds, in turn")
    ap.add_argument("--list-verify-s", type=float, default=120.0,
                    help="time the readers get afterwards to finish a full pass each")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir")
    args = ap.parse_args(argv)
    if args.quick:
        args.n16, args.n1, args.calib, args.warmup = 1000, 200, 300, 100
        args.inproc, args.inproc_warmup, args.host_local = 300, 50, 50
        args.big_fill_rows = args.big_fill_rows or 1_000_000
        args.list_probe = 500
    if args.smoke:
        args.n16, args.n1, args.calib, args.warmup, args.max_run_s = 64, 16, 32, 8, 20.0
        args.inproc, args.inproc_warmup, args.host_local, args.host_local_warmup = 20, 5, 5, 1
        args.big_fill_rows = 20_000
        args.list_fill, args.list_probe, args.list_readers, args.list_rounds = 3_000, 20, 2, 2
    parts = set(args.only or ["http", "inproc", "host-local", "listings"])

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    quiet_sigterm()  # SIGTERM tears down what the bench started
    t0 = time.monotonic()
    out = Path(args.out)
    res: dict[str, Any] = {
        "env": {"date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "cpus": os.cpu_count(),
                "python": platform.python_version(), "sqlite": sqlite3.sqlite_version,
                "platform": platform.platform(),
                "loadavg_start": " ".join(f"{x:.2f}" for x in os.getloadavg())},
        "params": {k: v for k, v in vars(args).items() if k not in ("out", "tmpdir")},
        "errors": {},
    }
    tmp = Path(tempfile.mkdtemp(prefix="netd-ipam-bench-", dir=args.tmpdir))
    try:
        phases: list[tuple[str, str, str, Callable[[], dict[str, Any]]]] = [
            ("host-local", "host-local reference", "host_local",
             lambda: bench_host_local(tmp, args)),
            ("http", "HTTP API", "http", lambda: bench_http(tmp, args, log)),
            ("inproc", "in-process pool-size bench", "inproc",
             lambda: bench_inproc(tmp, args, log)),
            ("listings", "listings under load", "listings",
             lambda: bench_listings(tmp, args, log)),
        ]
        for part, label, key_, phase in phases:
            if part in parts:
                log(f"{label} ...")
                try:
                    res[key_] = phase()
                except Exception as exc:
                    res["errors"][key_] = f"{type(exc).__name__}: {exc}"
    finally:
        if args.keep:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    res["targets"] = [] if args.smoke else targets(res)
    res["elapsed_s"] = round(time.monotonic() - t0, 1)
    res["out"] = str(out)
    for part, key_ in (("http", "http"), ("host_local", "host_local"),
                       ("listings", "listings")):
        v = (res.get(key_) or {}).get("verify")
        if v and not v["ok"]:
            res["errors"][f"{part}_verify"] = "; ".join(v["problems"])
    if not res["errors"]:
        del res["errors"]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2, sort_keys=False) + "\n")
    print(render(res))
    return 1 if res.get("errors") else 0


if __name__ == "__main__":
    sys.exit(main())
