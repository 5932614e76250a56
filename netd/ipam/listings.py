"""Listing pages (addresses, history): built where they cannot delay an allocation.

A page of 1,000 allocations costs the server some 30 ms of CPU; eight clients
paging through a big pool keep it busy all the time. Built in the server's own
threads, those pages hold the interpreter lock that the allocations on the
event loop need after every SQLite call, and an allocation waited up to 25
times longer. So, with a file store, pages are built in a reader process of
their own (:class:`ReaderProcess`), at a lower CPU priority, on its own SQLite
connection (WAL lets it read beside the writer): the kernel, not the
interpreter lock, shares the CPU, and it favours the allocations. An in-memory
store cannot be shared with another process; there, pages are built in the
thread pool, a few at a time (:class:`InThreads`).

:func:`build` is the one place a page is made; both run it.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import logging
import multiprocessing
import os
import signal
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Protocol

from starlette.concurrency import run_in_threadpool

from netd.errors import Unavailable
from netd.ipam import model
from netd.ipam.service import IPAM, cursor

log = logging.getLogger(__name__)

#: pages built at once in the thread pool (an in-memory store)
MAX_IN_THREADS = 2
#: how much nicer than the server the reader process runs (0-19)
READER_NICE = 10


def alloc_out(a: model.Allocation, pool: model.Pool) -> dict[str, Any]:
    """An allocation as the API shows it (``Allocation`` in the OpenAPI document)."""
    version = 6 if ":" in pool.cidr else 4
    plen = int(pool.cidr.rsplit("/", 1)[1])
    ip = model.ip_str(version, a.ip)
    return {
        "pool": a.pool, "ip": ip, "prefix_len": plen, "address": f"{ip}/{plen}",
        "gateway": pool.gateway, "mac": a.mac, "container_id": a.container_id,
        "ifname": a.ifname, "host": a.host, "netns": a.netns, "handle": a.handle,
        "fixed": a.fixed, "labels": a.labels, "vlan": pool.vlan,
        "routes": [r.to_dict() for r in pool.routes], "created": a.created,
        # every key, as the Dns model gives them (allocate's answer goes through it)
        "dns": {"nameservers": [], "domain": "", "search": [], "options": [], **pool.dns},
        "allowed": list(a.allowed),
    }


def res_out(r: model.Reservation, pool: model.Pool) -> dict[str, Any]:
    version = 6 if ":" in pool.cidr else 4
    first, last = model.ip_str(version, r.lo), model.ip_str(version, r.hi)
    return {
        "pool": r.pool, "range": first if r.lo == r.hi else f"{first}-{last}",
        "first": first, "last": last, "count": r.count, "note": r.note,
        "handle": r.handle, "created": r.created,
    }


def build(ipam: IPAM, kind: str, params: dict[str, Any]) -> bytes:
    """One listing page as the API's JSON (C encoder; the shapes are the documented ones,
    which the schemathesis run holds them to)."""
    limit = params.get("limit", 1000)
    doc: dict[str, Any]
    if kind == "addresses":
        rows = ipam.addresses(params.get("pool"), params.get("host"), limit,
                              params.get("after"))
        doc = {"addresses": [alloc_out(a, p) for a, p in rows],
               "next": cursor(*rows[-1]) if len(rows) == limit else None}
    elif kind == "pool_addresses":
        name, state = params["name"], params.get("state", "all")
        pool, reservations = ipam.reservations(name)
        rows = (ipam.addresses(name, params.get("host"), limit, params.get("after"))
                if state in ("all", "allocated") else [])
        doc = {"allocated": [alloc_out(a, p) for a, p in rows],
               "reserved": ([res_out(r, pool) for r in reservations]
                            if state in ("all", "reserved") else []),
               "next": cursor(*rows[-1]) if len(rows) == limit else None}
    elif kind == "history":
        doc = {"events": [e.to_dict() for e in ipam.history(
            ip=params.get("ip"), pool=params.get("pool"), limit=limit,
            after=params.get("after"))]}
    else:
        raise ValueError(f"no listing {kind!r}")
    return json.dumps(doc, separators=(",", ":")).encode()


class Listings(Protocol):
    async def page(self, kind: str, **params: Any) -> bytes: ...

    def close(self) -> None: ...


class InThreads:
    """Pages built in the server's thread pool, at most ``MAX_IN_THREADS`` at once."""

    def __init__(self, ipam: IPAM, at_once: int = MAX_IN_THREADS) -> None:
        self.ipam = ipam
        self._gate = asyncio.Semaphore(at_once)

    async def page(self, kind: str, **params: Any) -> bytes:
        async with self._gate:
            return await run_in_threadpool(build, self.ipam, kind, params)

    def close(self) -> None:
        pass


# --- the reader process ----------------------------------------------------------

_reader_ipam: IPAM | None = None


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _die_with(parent: int) -> None:
    """Be killed when the server goes, however it goes (kill -9 included)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # it went before the line above
        os._exit(1)


def _reader_start(store_url: str, nice: int, parent: int) -> None:
    """In the reader process: follow the server, lower the priority, open the store once."""
    global _reader_ipam
    from netd.ipam.store import open_store

    _die_with(parent)
    os.nice(nice)
    _reader_ipam = IPAM(open_store(store_url))


def _reader_build(kind: str, params: dict[str, Any]) -> bytes:
    assert _reader_ipam is not None
    return build(_reader_ipam, kind, params)


class ReaderProcess:
    """Pages built in a reader process (spawned, not forked: the server runs threads).

    A reader that died (killed, out of memory) is replaced on the next page; that
    page is retried once, then answered 503.
    """

    def __init__(self, store_url: str, workers: int = 1, nice: int = READER_NICE) -> None:
        self.store_url = store_url
        self.workers = workers
        self.nice = nice
        self._pool: ProcessPoolExecutor | None = None

    def _executor(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(
                max_workers=self.workers, mp_context=multiprocessing.get_context("spawn"),
                initializer=_reader_start, initargs=(self.store_url, self.nice, os.getpid()))
        return self._pool

    def start(self) -> None:
        """Spawn the reader now (it takes a second), not on the first listing."""
        self._executor().submit(os.getpid).result(timeout=60)

    async def page(self, kind: str, **params: Any) -> bytes:
        for attempt in (1, 2):
            try:
                future = self._executor().submit(_reader_build, kind, params)
                return await asyncio.wrap_future(future)
            except BrokenProcessPool:
                log.warning("the listing reader process died; starting another")
                self._replace()
                if attempt == 2:
                    raise Unavailable("the listing reader process died; try again") from None
        raise AssertionError("unreachable")

    def _replace(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


def for_store(ipam: IPAM, store_url: str | None) -> Listings:
    """A reader process for a file store; the thread pool for memory, etcd (or unknown)."""
    from netd.ipam.store import check_store_url

    if store_url is None:
        return InThreads(ipam)
    checked = check_store_url(store_url)
    if checked.memory or checked.etcd is not None:  # etcd: reads do not hold the writers up
        return InThreads(ipam)
    return ReaderProcess(store_url)


__all__ = ["InThreads", "Listings", "ReaderProcess", "alloc_out", "build", "for_store",
           "res_out"]
