"""The IPAM's datastore on etcd v3: the same :class:`~netd.ipam.store.Txn` as SQLite.

``netd ipam serve --store etcd://h1:2379,h2:2379,h3:2379[/PREFIX][?options]``
(:func:`parse_etcd_url`). Several API servers share one etcd: every change is
one optimistic transaction (:mod:`netd.ipam.etcd_kv`), and a change that lost
a race runs again on fresh reads. Keys under the prefix (default
``/netd/ipam/``), each a value type as JSON; the indexes make every question
the IPAM asks a point read or a short range, so an allocation never reads a
whole pool:

====================================  ============================================
``pool/NAME``                         the pool
``cnt/NAME/SHARD``, ``cursor/NAME``   counts (a shard per server process); next block
``free/POOL/LO``                      a never-used range LO-HI (its space, HI)
``freesp/POOL/SPACE/LO``              ... by space (a host's block)
``rel/POOL/IP``                       a released address (space, time)
``rellru/POOL/SPACE/TS/IP``           ... oldest first, per space and
``relall/POOL/TS/IP``                 ... for the whole pool
``alloc/POOL/IP``                     an allocation
``owner/CID/IFNAME/POOL``             its owner's key: created only when absent
``mac/MAC``                           its MAC's key: one owner per MAC
``host/HOST/POOL/IP``                 the allocation's name, by host (empty; a
                                      store written before 2026-12-03 has a copy)
``ahandle/HANDLE/POOL/IP``            an allocation's handle (a pod's ns/name)
``res/POOL/LO``, ``reshandle/P/H``    reservations, and by handle
``block/POOL/LO``, ``blockhost/...``  BGP host blocks, and by host
``evip/IP/TXN/N``                     the history, once, by address (a pool's is
                                      its CIDR's range), each event under a lease
                                      of its day: dropped after ``history_days``
``evspan/LO/HI/TXN/N``                ... a range's or a pool's own events
====================================  ============================================

Addresses are 32 hex digits (:func:`~netd.ipam.model.key`), so key order is
address order; names are percent-quoted. An event's id is its transaction's
etcd revision x 1,000 + its place in the transaction.

Group commit: the changes queued while one commit is on the wire go together
in the next transaction (each behind a savepoint: one that fails is undone
alone), so many clients on one pool do not each pay a commit and a conflict.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import json
import logging
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Generic, TypeVar
from urllib.parse import parse_qs, quote, unquote, urlsplit

from netd.errors import Conflict, InvalidInput, MacInUse, NetdError, Unavailable
from netd.ipam.etcd_kv import Conflict as CommitConflict
from netd.ipam.etcd_kv import EtcdClient, Retry, Stm, Tls, Watch, prefix_end, read_file
from netd.ipam.model import Allocation, Block, Event, Pool, Reservation, key, unkey
from netd.ipam.store import event_span as _span

log = logging.getLogger("netd.ipam.etcd")

T = TypeVar("T")

DEFAULT_PREFIX = "/netd/ipam/"
EVENTS_PER_TXN = 1000  # event id = revision * 1000 + place in the transaction
EVENT_MARGIN = 128  # events read beyond a page's limit: a transaction's events share a revision
DAY = 86400
WARN_AT = 0.8  # of the quota: warn, writes stop at 100 %


# --- the URL --------------------------------------------------------------------------------


@dataclass(frozen=True)
class EtcdUrl:
    endpoints: tuple[str, ...]
    prefix: str = DEFAULT_PREFIX
    cacert: str | None = None
    cert: str | None = None
    key: str | None = None
    user: str | None = None
    password_file: str | None = None
    timeout: float = 1.0
    history_days: int = 30
    quota_gb: float = 2.0  # etcd's --quota-backend-bytes (its default: 2 GiB)


OPTIONS = {"cacert", "cert", "key", "user", "password_file", "timeout", "history_days",
           "quota_gb"}


def parse_etcd_url(url: str) -> EtcdUrl:
    """``etcd://HOST:PORT[,HOST:PORT...][/PREFIX][?cacert=&cert=&key=&user=&password_file=
    &timeout=&history_days=&quota_gb=]`` (pure). A password only from a file: URLs end up in
    logs and process lists."""
    parsed = urlsplit(url)
    if parsed.scheme not in ("etcd", "etcds"):
        raise InvalidInput(f"not an etcd URL: {url[:80]!r}")
    if "@" in parsed.netloc:
        raise InvalidInput("the etcd URL carries user info: give ?user=NAME&password_file="
                           "PATH (a password in a URL ends up in logs)")
    hosts = [h.strip() for h in parsed.netloc.split(",") if h.strip()]
    if not hosts:
        raise InvalidInput("the etcd URL names no endpoint: etcd://HOST:PORT[,HOST:PORT...]")
    for h in hosts:
        host, _, port = h.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise InvalidInput(f"etcd endpoint {h!r} is not HOST:PORT")
    opts = parse_qs(parsed.query, keep_blank_values=True, strict_parsing=False)
    unknown = sorted(set(opts) - OPTIONS)
    if unknown:
        raise InvalidInput(f"unknown etcd URL option(s) {', '.join(unknown)} (known: "
                           f"{', '.join(sorted(OPTIONS))})")
    one = {k: v[-1] for k, v in opts.items()}
    prefix = unquote(parsed.path) or DEFAULT_PREFIX
    if not prefix.endswith("/"):
        prefix += "/"
    tls = parsed.scheme == "etcds" or any(one.get(k) for k in ("cacert", "cert", "key"))
    if bool(one.get("cert")) != bool(one.get("key")):
        raise InvalidInput("a client certificate needs both cert= and key=")
    if one.get("user") and not one.get("password_file"):
        raise InvalidInput("user= needs password_file=PATH (etcd authentication)")
    try:
        timeout = float(one.get("timeout") or 1.0)
        days = int(one.get("history_days") or 30)
        quota = float(one.get("quota_gb") or 2.0)
    except ValueError:
        raise InvalidInput("timeout= is seconds, history_days= a whole number, quota_gb= "
                           "GiB") from None
    if not 0.05 <= timeout <= 60 or not 1 <= days <= 3650 or not 0.01 <= quota <= 64:
        raise InvalidInput("timeout= must be 0.05-60 s, history_days= 1-3650, quota_gb= "
                           "0.01-64")
    return EtcdUrl(tuple(hosts), prefix, one.get("cacert") if tls else None,
                   one.get("cert"), one.get("key"), one.get("user") or None,
                   one.get("password_file"), timeout, days, quota)


def client_for(url: EtcdUrl) -> EtcdClient:
    tls = None
    if url.cacert or url.cert:
        tls = Tls(read_file(url.cacert, "CA certificate"), read_file(url.cert, "certificate"),
                  read_file(url.key, "key"))
    password = None
    if url.password_file:
        raw = read_file(url.password_file, "password file")
        password = (raw or b"").decode().strip()
    return EtcdClient(url.endpoints, tls=tls, user=url.user, password=password,
                      timeout=url.timeout)


# --- values ---------------------------------------------------------------------------------


def _j(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def _alloc(raw: bytes) -> Allocation:
    d = json.loads(raw)
    d["allowed"] = tuple(d.get("allowed") or ())
    return Allocation(**d)


def _res(raw: bytes) -> Reservation:
    return Reservation(**json.loads(raw))


def _block(raw: bytes) -> Block:
    return Block(**json.loads(raw))


_PLAIN = re.compile(r"[A-Za-z0-9_.~-]*")  # what quote(safe="") leaves as it is


def _q(part: str) -> str:
    """A key component, percent-quoted (most are hex or plain names: kept, fast)."""
    return part if _PLAIN.fullmatch(part) else quote(part, safe="")


def _alloc_doc(a: Allocation) -> bytes:
    """Fields at their defaults left out: every byte is written to each member's WAL
    and database (twice: by address and by host), and etcd here is bound by its disk."""
    doc: dict[str, Any] = {}
    for f, default in _ALLOC_FIELDS:
        value = getattr(a, f)
        if value != default or default is _REQUIRED:
            doc[f] = list(value) if f == "allowed" else value
    return _j(doc)


_REQUIRED = object()
_ALLOC_FIELDS = tuple(
    (f.name, f.default if f.default is not dataclasses.MISSING
     else f.default_factory() if f.default_factory is not dataclasses.MISSING
     else _REQUIRED) for f in dataclasses.fields(Allocation))


def _event_doc(e: Event) -> bytes:
    """The event without its id (its revision gives it) and without empty fields."""
    return _j({k: v for k, v in e.to_dict().items() if k != "id" and v != ""})


def _ts(ts: float) -> str:
    return f"{ts:017.6f}"


class EtcdTxn:
    """:class:`~netd.ipam.store.Txn` on one :class:`Stm` try."""

    def __init__(self, store: EtcdStore, stm: Stm) -> None:
        self.store, self.stm = store, stm
        self.txn_id = secrets.token_hex(6)
        self.n_events = 0

    def k(self, *parts: str) -> bytes:
        return (self.store.prefix + "/".join(_q(p) for p in parts)).encode()

    def _range(self, *parts: str, start: str | None = None, end: str | None = None,
               limit: int = 0, descending: bool = False) -> list[tuple[bytes, bytes]]:
        """Keys under ``parts/`` (from ``start``, before ``end``: raw last components)."""
        base = self.k(*parts) + b"/"
        lo = base + start.encode() if start is not None else base
        hi = base + end.encode() if end is not None else prefix_end(base)
        return self.stm.range(lo, hi, limit=limit, descending=descending)

    def _last(self, kv_key: bytes) -> str:
        return unquote(kv_key.decode().rsplit("/", 1)[1])

    # pools
    def get_pool(self, name: str) -> Pool | None:
        raw = self.stm.get(self.k("pool", name))
        return self.store.parse_pool(raw) if raw else None

    def list_pools(self) -> list[Pool]:
        return [Pool.from_dict(json.loads(v)) for _, v in self._range("pool")]

    def insert_pool(self, pool: Pool) -> None:
        if self.stm.get(self.k("pool", pool.name)) is not None:
            raise Conflict(f"pool {pool.name!r} already exists")
        self.stm.put(self.k("pool", pool.name), _j(pool.to_dict()))

    def delete_pool(self, name: str) -> None:
        for a in self.list_allocations(name, None, None, 1 << 30):
            self.del_allocation(name, a.ip)
        for b in self.blocks(name, None):
            self.stm.delete(self.k("blockhost", b.host, name, key(b.lo)))
            self.stm.delete(self.k("block", name, key(b.lo)))
        for r in self.list_reservations(name):
            self.del_reservation(name, r.lo)
        for family in ("free", "freesp", "rel", "rellru", "relall", "cnt"):
            for k, _ in self._range(family, name):
                self.stm.delete(k)
        for family in ("pool", "cursor"):
            self.stm.delete(self.k(family, name))

    def counters(self, name: str) -> tuple[int, int]:
        reserved = allocated = 0
        for _, raw in self._range("cnt", name):  # one shard per server process
            d = json.loads(raw)
            reserved += int(d["reserved"])
            allocated += int(d["allocated"])
        return reserved, allocated

    def add_counters(self, name: str, reserved: int, allocated: int) -> None:
        """Into this server's own shard: changes on two servers never collide on it."""
        k = self.k("cnt", name, self.store.shard)
        raw = self.stm.get(k)
        d: dict[str, Any] = json.loads(raw) if raw else {"reserved": "0", "allocated": 0}
        self.stm.put(k, _j({"reserved": str(int(d["reserved"]) + reserved),
                            "allocated": int(d["allocated"]) + allocated}))

    def block_cursor(self, name: str) -> int:
        raw = self.stm.get(self.k("cursor", name))
        return unkey(raw.decode()) if raw else -1

    def set_block_cursor(self, name: str, value: int) -> None:
        self.stm.put(self.k("cursor", name), key(value).encode())

    # free ranges
    def _free(self, pool: str, lo_key: str) -> tuple[str, int, int] | None:
        raw = self.stm.get(self.k("free", pool, lo_key))
        if raw is None:
            return None
        d = json.loads(raw)
        return str(d["space"]), unkey(lo_key), unkey(d["hi"])

    def first_free(self, pool: str, space: str | None) -> tuple[str, int, int] | None:
        if space is None:
            got = self._range("free", pool, limit=1)
            if not got:
                return None
            d = json.loads(got[0][1])
            return str(d["space"]), unkey(self._last(got[0][0])), unkey(d["hi"])
        idx = self._range("freesp", pool, space, limit=1)
        return self._free(pool, self._last(idx[0][0])) if idx else None

    def free_overlapping(self, pool: str, lo: int, hi: int) -> list[tuple[str, int, int]]:
        out = []
        before = self._range("free", pool, end=key(lo), limit=1, descending=True)
        if before:
            d = json.loads(before[0][1])
            if unkey(d["hi"]) >= lo:
                out.append((str(d["space"]), unkey(self._last(before[0][0])), unkey(d["hi"])))
        for k, v in self._range("free", pool, start=key(lo), end=key(hi) + "\0"):
            d = json.loads(v)
            out.append((str(d["space"]), unkey(self._last(k)), unkey(d["hi"])))
        return out

    def put_free(self, pool: str, space: str, lo: int, hi: int) -> None:
        old = self._free(pool, key(lo))
        if old is not None and old[0] != space:
            self.stm.delete(self.k("freesp", pool, old[0], key(lo)))
        self.stm.put(self.k("free", pool, key(lo)), _j({"hi": key(hi), "space": space}))
        self.stm.put(self.k("freesp", pool, space, key(lo)), b"")

    def del_free(self, pool: str, lo: int) -> None:
        old = self._free(pool, key(lo))
        if old is None:
            return
        self.stm.delete(self.k("free", pool, key(lo)))
        self.stm.delete(self.k("freesp", pool, old[0], key(lo)))

    def shrink_free(self, pool: str, lo: int, new_lo: int) -> None:
        old = self._free(pool, key(lo))
        if old is None:
            return
        self.del_free(pool, lo)
        # the range's new start lies inside the old one: nobody else has a key there
        # without having changed the old one too (which the commit compares); so when
        # the next allocation of the same batch shrinks it again, nothing is sent for it
        self.stm.put(self.k("free", pool, key(new_lo)), _j({"hi": key(old[2]), "space": old[0]}),
                     absent=True)
        self.stm.put(self.k("freesp", pool, old[0], key(new_lo)), b"", absent=True)

    # released
    def oldest_released(
        self, pool: str, space: str | None, before: float | None
    ) -> tuple[str, int, float] | None:
        got = (self._range("relall", pool, limit=1) if space is None
               else self._range("rellru", pool, space, limit=1))
        if not got:
            return None
        parts = got[0][0].decode().rsplit("/", 2)
        ts, ip = float(parts[1]), unkey(parts[2])
        if before is not None and ts > before:
            return None
        rel = self.stm.get(self.k("rel", pool, key(ip)))
        if rel is None:
            return None
        return str(json.loads(rel)["space"]), ip, ts

    def released_space(self, pool: str, ip: int) -> str | None:
        raw = self.stm.get(self.k("rel", pool, key(ip)))
        return str(json.loads(raw)["space"]) if raw else None

    def released_in(self, pool: str, lo: int, hi: int) -> list[int]:
        return [unkey(self._last(k))
                for k, _ in self._range("rel", pool, start=key(lo), end=key(hi) + "\0")]

    def put_released(self, pool: str, space: str, ip: int, ts: float) -> None:
        self.del_released(pool, ip)
        self.stm.put(self.k("rel", pool, key(ip)), _j({"space": space, "ts": ts}))
        self.stm.put(self.k("rellru", pool, space, _ts(ts), key(ip)), b"")
        self.stm.put(self.k("relall", pool, _ts(ts), key(ip)), b"")

    def del_released(self, pool: str, ip: int) -> None:
        raw = self.stm.get(self.k("rel", pool, key(ip)))
        if raw is None:
            return
        d = json.loads(raw)
        self.stm.delete(self.k("rel", pool, key(ip)))
        self.stm.delete(self.k("rellru", pool, str(d["space"]), _ts(float(d["ts"])), key(ip)))
        self.stm.delete(self.k("relall", pool, _ts(float(d["ts"])), key(ip)))

    # allocations
    def allocation(self, pool: str, ip: int) -> Allocation | None:
        raw = self.stm.get(self.k("alloc", pool, key(ip)))
        return _alloc(raw) if raw else None

    def allocation_of(self, pool: str, container_id: str, ifname: str) -> Allocation | None:
        ref = self.stm.get_or_assume_absent(self.k("owner", container_id, ifname, pool))
        return self.allocation(pool, unkey(ref.decode())) if ref else None

    def allocations_of(
        self, container_id: str, ifname: str | None, pool: str | None
    ) -> list[Allocation]:
        parts = ("owner", container_id) if ifname is None else ("owner", container_id, ifname)
        out = []
        for k, v in self._range(*parts):
            tail = k.decode()[len(self.store.prefix):].split("/")
            p = unquote(tail[3])
            if pool is not None and p != pool:
                continue
            a = self.allocation(p, unkey(v.decode()))
            if a is not None:
                out.append(a)
        return sorted(out, key=lambda a: (a.pool, a.ip))

    def allocation_by_mac(self, mac: str) -> Allocation | None:
        ref = self.stm.get(self.k("mac", mac))
        if ref is None:
            return None
        pool, _, ip = ref.decode().rpartition("/")
        return self.allocation(pool, unkey(ip))

    def allocations_by_handle(self, handle: str, limit: int) -> list[Allocation]:
        out = []
        for k, _ in self._range("ahandle", handle, limit=limit):
            pool, ip = k.decode().rsplit("/", 2)[1:]
            a = self.allocation(unquote(pool), unkey(ip))
            if a is not None:
                out.append(a)
        return out

    def allocations_in(self, pool: str, lo: int, hi: int, limit: int) -> list[Allocation]:
        got = self._range("alloc", pool, start=key(lo), end=key(hi) + "\0", limit=limit)
        return [_alloc(v) for _, v in got]

    def list_allocations(
        self, pool: str | None, host: str | None, after: tuple[str, int] | None, limit: int
    ) -> list[Allocation]:
        parts: tuple[str, ...] = ("alloc",) if host is None else ("host", host)
        base = self.k(*parts) + b"/"
        lo = base + (quote(pool, safe="").encode() + b"/" if pool is not None else b"")
        hi = prefix_end(lo)
        if after is not None:
            start = base + quote(after[0], safe="").encode() + b"/" + key(after[1]).encode()
            lo = max(lo, start + b"\0")
        if lo >= hi:
            return []
        got = self.stm.range(lo, hi, limit=limit)
        if host is None:
            return [_alloc(v) for _, v in got]
        # the host index names the allocation (a store written before kept a copy)
        n = len(self.store.prefix)
        names = [self.k("alloc", *(unquote(x) for x in k.decode()[n:].split("/")[2:]))
                 for k, v in got if not v]
        docs = iter(self.stm.get_many(names))
        out = []
        for _, v in got:
            raw = v or next(docs)
            if raw:
                out.append(_alloc(raw))
        return out

    def put_allocation(self, a: Allocation) -> None:
        ip = key(a.ip)
        if self.stm.get_or_assume_absent(self.k("mac", a.mac)) is not None:
            raise MacInUse(f"MAC {a.mac} is already in use by another allocation")
        # the address and the owner must still be free when this commits: compared, not
        # read (the IPAM took the address from free space and asked for the owner already)
        self.stm.expect_absent(self.k("alloc", a.pool, ip))
        if self.stm.get_or_assume_absent(self.k("owner", a.container_id, a.ifname,
                                                a.pool)) is not None:
            raise Conflict(f"{a.container_id}/{a.ifname} already holds an address of pool "
                           f"{a.pool!r}")
        raw = _alloc_doc(a)
        self.stm.put(self.k("alloc", a.pool, ip), raw)
        self.stm.put(self.k("owner", a.container_id, a.ifname, a.pool), ip.encode())
        self.stm.put(self.k("mac", a.mac), f"{a.pool}/{ip}".encode())
        self.stm.put(self.k("host", a.host, a.pool, ip), b"")  # a name, not a copy
        if a.handle:
            self.stm.put(self.k("ahandle", a.handle, a.pool, ip), b"")

    def del_allocation(self, pool: str, ip: int) -> None:
        a = self.allocation(pool, ip)
        if a is None:
            return
        self.stm.delete(self.k("alloc", pool, key(ip)))
        self.stm.delete(self.k("owner", a.container_id, a.ifname, pool))
        self.stm.delete(self.k("mac", a.mac))
        self.stm.delete(self.k("host", a.host, pool, key(ip)))
        if a.handle:
            self.stm.delete(self.k("ahandle", a.handle, pool, key(ip)))

    def hosts(self) -> list[dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}

        def entry(h: str) -> dict[str, Any]:
            return out.setdefault(h, {"host": h, "allocations": 0, "pools": {}, "blocks": 0})

        n = len(self.store.prefix)
        for k in self.store.keys(self.k("host") + b"/"):
            _, h, p, _ = k.decode()[n:].split("/")
            e = entry(unquote(h))
            e["allocations"] += 1
            e["pools"][unquote(p)] = e["pools"].get(unquote(p), 0) + 1
        for k in self.store.keys(self.k("blockhost") + b"/"):
            entry(unquote(k.decode()[n:].split("/")[1]))["blocks"] += 1
        return [out[h] for h in sorted(out)]

    # reservations
    def reservations_overlapping(self, pool: str, lo: int, hi: int) -> list[Reservation]:
        out = []
        before = self._range("res", pool, end=key(lo), limit=1, descending=True)
        if before:
            r = _res(before[0][1])
            if r.hi >= lo:
                out.append(r)
        out += [_res(v) for _, v in self._range("res", pool, start=key(lo),
                                                end=key(hi) + "\0")]
        return out

    def reservation_by_handle(self, pool: str, handle: str) -> Reservation | None:
        ref = self.stm.get(self.k("reshandle", pool, handle))
        if ref is None:
            return None
        raw = self.stm.get(self.k("res", pool, ref.decode()))
        return _res(raw) if raw else None

    def list_reservations(self, pool: str) -> list[Reservation]:
        return [_res(v) for _, v in self._range("res", pool)]

    def put_reservation(self, r: Reservation) -> None:
        self.del_reservation(r.pool, r.lo)
        if r.handle:
            self.stm.put(self.k("reshandle", r.pool, r.handle), key(r.lo).encode())
        self.stm.put(self.k("res", r.pool, key(r.lo)), _j(dataclasses.asdict(r)))

    def del_reservation(self, pool: str, lo: int) -> None:
        raw = self.stm.get(self.k("res", pool, key(lo)))
        if raw is None:
            return
        old = _res(raw)
        if old.handle:
            self.stm.delete(self.k("reshandle", pool, old.handle))
        self.stm.delete(self.k("res", pool, key(lo)))

    # blocks
    def blocks(self, pool: str | None, host: str | None) -> list[Block]:
        if host is not None:
            got = (self._range("blockhost", host, pool) if pool is not None
                   else self._range("blockhost", host))
            out = [self.block(unquote(k.decode().rsplit("/", 2)[1]), unkey(self._last(k)))
                   for k, _ in got]
            return sorted((b for b in out if b is not None), key=lambda b: (b.pool, b.lo))
        got = self._range("block", pool) if pool is not None else self._range("block")
        return [_block(v) for _, v in got]

    def block(self, pool: str, lo: int) -> Block | None:
        raw = self.stm.get(self.k("block", pool, key(lo)))
        return _block(raw) if raw else None

    def put_block(self, b: Block) -> None:
        old = self.block(b.pool, b.lo)
        if old is not None and old.host != b.host:
            self.stm.delete(self.k("blockhost", old.host, b.pool, key(b.lo)))
        self.stm.put(self.k("block", b.pool, key(b.lo)), _j(dataclasses.asdict(b)))
        self.stm.put(self.k("blockhost", b.host, b.pool, key(b.lo)), b"")

    # events
    def add_event(self, e: Event) -> None:
        n = self.n_events
        self.n_events += 1
        if n >= EVENTS_PER_TXN:
            raise InvalidInput(f"one change may record at most {EVENTS_PER_TXN} events")
        lease = self.store.history_lease()
        doc = _event_doc(e)
        name = f"{n:03d}"
        # once, by address: a pool's history is the range of its addresses (pools do
        # not overlap); a range's or a pool's own event by its span
        span = _span(e.ip)
        if span is None:
            try:
                ipk = key(int(ipaddress.ip_address(e.ip)))
            except ValueError:
                span = (0, 0)  # no address at all (none of the IPAM's own): with the spans
        if span is None:
            self.stm.put(self.k("evip", ipk, self.txn_id, name), doc, lease)
        else:
            self.stm.put(self.k("evspan", key(span[0]), key(span[1]), self.txn_id, name), doc,
                         lease)

    def events(self, ip: str | None, pool: str | None, limit: int,
               after: int | None = None) -> list[Event]:
        return self.store.events(ip, pool, limit, after)


class EtcdStore:
    """:class:`~netd.ipam.store.Store` on an etcd cluster (see the module's docstring)."""

    #: every call waits on the network: the API runs changes in its thread pool
    network = True

    def __init__(self, url: EtcdUrl | str, *, client: EtcdClient | None = None,
                 group_commit: bool = True, max_batch: int = 64) -> None:
        self.url = parse_etcd_url(url) if isinstance(url, str) else url
        self.prefix = self.url.prefix
        self.client = client or client_for(self.url)
        self.group_commit = group_commit
        self.max_batch = max_batch
        self.shard = secrets.token_hex(4)  # this process's counter shard
        # keys that change rarely or only here: pools, this process's counter shards
        self._known: dict[bytes, tuple[bytes | None, int]] = {}
        self._pool_prefix = (self.prefix + "pool/").encode()
        self._shard_suffix = ("/" + self.shard).encode()
        self._parsed: dict[bytes, Pool] = {}
        self._leases: dict[int, int] = {}
        self._lease_lock = threading.Lock()
        self._queue: list[_Pending[Any]] = []
        self._queue_lock = threading.Condition()
        self._committer: threading.Thread | None = None
        self._closed = False

    def parse_pool(self, raw: bytes) -> Pool:
        """The pool a stored value holds; parsed once per value (every change reads its
        pool, and a Pool is immutable)."""
        pool = self._parsed.get(raw)
        if pool is None:
            pool = Pool.from_dict(json.loads(raw))
            if len(self._parsed) > 1024:
                self._parsed.clear()
            self._parsed[raw] = pool
        return pool

    def _cacheable(self, k: bytes) -> bool:
        return k.startswith(self._pool_prefix) or k.endswith(self._shard_suffix)

    # --- history leases -----------------------------------------------------------------

    def history_lease(self) -> int:
        """The lease of today's events (by this machine's clock, not the events' own
        times): etcd deletes them ``history_days`` after the day ends."""
        day = int(time.time() // DAY)
        with self._lease_lock:
            lease = self._leases.get(day)
            if lease is None:
                ttl = int((day + 1) * DAY - time.time()) + self.url.history_days * DAY
                lease = self.client.lease_grant(max(ttl, 60))
                self._leases = {d: v for d, v in self._leases.items() if d >= day - 1}
                self._leases[day] = lease
            return lease

    def forget_leases(self) -> None:
        with self._lease_lock:
            self._leases.clear()

    # --- transactions -------------------------------------------------------------------

    def _stm(self, optimistic: bool) -> Stm:
        return Stm(self.client, optimistic=optimistic, cache=self._known,
                   cacheable=self._cacheable)

    def _execute(self, changes: list[_Pending[Any]], stm: Stm,
                 into: _Try | None = None) -> _Try:
        """Every change on ``stm``, each behind a savepoint (one that fails is undone
        alone, its error its own); :class:`Retry` from a read ends the try. ``into``: a
        try on ``stm`` that these changes join."""
        tx = into.tx if into is not None else EtcdTxn(self, stm)
        outcomes: list[tuple[bool, Any]] = []
        for p in changes:
            point = stm.savepoint()
            events = tx.n_events
            try:
                outcomes.append((True, p.change(tx)))
            except Retry:
                raise
            except Exception as exc:
                stm.rollback_to(point)
                tx.n_events = events
                outcomes.append((False, exc))
        if into is not None:
            into.changes += changes
            into.outcomes += outcomes
            return into
        return _Try(list(changes), stm, outcomes, tx)

    def _run(self, changes: list[_Pending[Any]], *, optimistic: bool = True) -> None:
        """Tries until one commits (or the budget is spent), each on fresh reads."""
        deadline = time.monotonic() + self.client.budget
        tries = 0
        while True:
            tries += 1
            try:
                t = self._execute(changes, self._stm(optimistic and tries == 1))
                t.stm.commit()
                t.record()
                return
            except Retry as exc:
                if "lease" in str(exc):
                    self.forget_leases()
                if time.monotonic() > deadline:
                    err = Unavailable(f"etcd: gave up after {tries} tries ({exc})")
                    for p in changes:
                        p.error = err
                    return
                time.sleep(min(0.05, 0.002 * tries) * secrets.randbelow(1000) / 1000)
            except NetdError as exc:  # the store is down: every change fails with it
                for p in changes:
                    p.error = exc
                return

    def _enqueue(self, pending: _Pending[Any]) -> None:
        with self._queue_lock:
            if self._closed:
                raise Unavailable("etcd: the store is closed")
            self._queue.append(pending)
            if self._committer is None:
                self._committer = threading.Thread(target=self._commit_loop,
                                                   name="etcd-commit", daemon=True)
                self._committer.start()
            self._queue_lock.notify()

    def transact(self, change: Callable[[Any], T]) -> T:
        pending = _Pending(change, None)
        self._enqueue(pending)
        pending.wait()
        return pending.result()

    async def transact_async(self, change: Callable[[Any], T]) -> T:
        """:meth:`transact` for an event loop (the API's allocate and release): no
        thread waits per request, and a batch wakes its loop once."""
        pending = _Pending(change, asyncio.get_running_loop())
        self._enqueue(pending)
        assert pending.waiter is not None
        await pending.waiter
        return pending.result()

    def _commit_loop(self) -> None:
        """The committer. While one commit is on the wire, the changes that arrive are
        executed at once into the next one (``max_batch`` at most; 1 without group
        commit), on top of the one on the wire (:meth:`Stm.on_top_of`): that one is sent
        as soon as the answer comes, compared against the revision it names, or run
        again from scratch when the one before it failed."""
        most = self.max_batch if self.group_commit else 1
        flying: _Flight | None = None
        while True:
            batch: list[_Pending[Any]] = []
            with self._queue_lock:
                while flying is None and not self._queue and not self._closed:
                    self._queue_lock.wait()
                if flying is None and self._closed and not self._queue:
                    return
                if flying is None:
                    batch, self._queue = self._queue[:most], self._queue[most:]
            try:
                if flying is None:
                    flying = self._launch(batch)
                    continue
                child, batch = self._gather(flying, most)
                landed, revision = flying, self._land(flying)
                flying = None
                try:
                    if child is None or revision is None:
                        if child is not None:
                            batch = child.changes
                        if batch:  # not prepared, or on a parent that failed: again, first
                            with self._queue_lock:
                                self._queue[:0] = batch
                        continue
                    batch = child.changes
                    flying = self._send(child, revision)
                finally:
                    # answered once the next one is on the wire: the threads they wake
                    # do not hold it back
                    if revision is not None:
                        _resolve(landed.t.changes)
            except BaseException as exc:  # a bug: every change in hand hears of it
                log.exception("etcd: a group commit failed")
                for p in batch + (flying.t.changes if flying else []):
                    if not p.resolved:
                        p.error = p.error or exc
                        _resolve([p])
                flying = None

    def _gather(self, flying: _Flight, most: int
                ) -> tuple[_Try | None, list[_Pending[Any]]]:
        """Until ``flying``'s answer is in, what arrives is executed into the try that
        follows it (the first arrival waits one commit, not two). Returns that try, or
        (None, the changes taken) when it could not be prepared (a read failed): they
        then run again from scratch after ``flying``."""
        child: _Try | None = None
        taken: list[_Pending[Any]] = []
        broken = False
        while True:
            with self._queue_lock:
                while not flying.done and (
                        broken or not self._queue or len(taken) >= most):
                    self._queue_lock.wait()
                if flying.done:
                    break
                take = self._queue[:most - len(taken)]
                self._queue = self._queue[len(take):]
            taken += take
            try:
                stm = child.stm if child is not None else Stm.on_top_of(flying.t.stm)
                child = self._execute(take, stm, into=child)
            except (Retry, NetdError):
                child, broken = None, True
        return (None, taken) if broken else (child, taken)

    def _slowly(self, changes: list[_Pending[Any]], exc: Retry | NetdError) -> None:
        """A try of the pipeline failed: its changes run again the slow way (one try
        after another on fresh reads), or fail with the store's error; then answered."""
        if isinstance(exc, NetdError):
            for p in changes:
                p.error = exc
        else:
            self._run(changes, optimistic=False)
        _resolve(changes)

    def _launch(self, batch: list[_Pending[Any]]) -> _Flight | None:
        """Execute ``batch`` and send its commit (None: done already, or run the slow
        way)."""
        try:
            t = self._execute(batch, self._stm(True))
            request = t.stm.request()
            if request is None:  # read only: nothing to commit
                t.record()
                _resolve(batch)
                return None
            return self._fly(t, request)
        except (Retry, NetdError) as exc:
            self._slowly(batch, exc)
            return None

    def _fly(self, t: _Try, request: tuple[list[Any], list[Any]]) -> _Flight:
        """Send ``t``'s commit; its answer wakes the committer."""
        flight = _Flight(t)

        def done() -> None:
            with self._queue_lock:
                flight.done = True
                self._queue_lock.notify_all()

        flight.answer = self.client.txn_start(*request, on_done=done)
        return flight

    def _land(self, flight: _Flight) -> int | None:
        """The answer of a commit on the wire: its revision, its changes' results
        recorded (the caller tells their waiters); None when it failed (its changes are
        then run again the slow way, and answered)."""
        t = flight.t
        try:
            revision = t.stm.finish(flight.answer())
        except (Retry, NetdError) as exc:
            if isinstance(exc, Retry) and not isinstance(exc, CommitConflict):
                t.stm.lost()  # it may have committed: the slow way finds out
            if "lease" in str(exc):
                self.forget_leases()
            self._slowly(t.changes, exc)
            return None
        t.record()
        return revision

    def _send(self, child: _Try, parent_revision: int) -> _Flight | None:
        request = child.stm.request(parent_revision)
        assert request is not None  # a try on top of another always commits
        try:
            return self._fly(child, request)
        except (Retry, NetdError) as exc:
            self._slowly(child.changes, exc)
            return None

    @contextmanager
    def write(self) -> Iterator[EtcdTxn]:
        """One try, committed at the end (for tools and tests; the IPAM uses transact)."""
        stm = Stm(self.client)
        yield EtcdTxn(self, stm)
        stm.commit()

    @contextmanager
    def read(self) -> Iterator[EtcdTxn]:
        yield EtcdTxn(self, Stm(self.client))

    # --- reads outside a transaction ------------------------------------------------------

    def keys(self, prefix: bytes) -> list[bytes]:
        return [kv.key for kv in self.client.range(prefix, prefix_end(prefix),
                                                   keys_only=True).kvs]

    def events(self, ip: str | None, pool: str | None, limit: int,
               after: int | None) -> list[Event]:
        """One address's, one pool's or all history: the address keys in its range
        (for a pool: its CIDR, and that of any pool of the name before), and the
        span events that cover it; newest ``limit`` (or ``limit`` after ``after``)."""
        p = self.prefix.encode()
        spans = self._events_under(p + b"evspan/", prefix_end(p + b"evspan/"), None, 0)
        ranges: list[tuple[bytes, bytes]] = []
        if ip is not None:
            ipk = key(int(ipaddress.ip_address(ip)))
            spans = [kv for kv in spans if self._covers(kv[0], p, int(ipk, 16))]
            ranges.append(self._evip(ipk, ipk))
        elif pool is not None:
            cidrs = {e.ip for _, e in spans if e.pool == pool and "/" in e.ip}
            got = self.client.range(p + b"pool/" + _q(pool).encode()).kvs
            if got:
                cidrs.add(self.parse_pool(got[0].value).cidr)
            for cidr in sorted(cidrs):
                span = _span(cidr)
                if span is not None:
                    ranges.append(self._evip(key(span[0]), key(span[1])))
        else:
            ranges.append((p + b"evip/", prefix_end(p + b"evip/")))
        evs = spans
        for start, end in ranges:
            evs += self._events_under(start, end, after, limit)
        out = [e for _, e in evs if (pool is None or e.pool == pool)
               and (after is None or e.id > after)]
        out.sort(key=lambda e: e.id)
        return out[:limit] if after is not None else out[-limit:] if limit else out

    def _evip(self, lo: str, hi: str) -> tuple[bytes, bytes]:
        """The keys of the events of the addresses lo..hi (keys in address order)."""
        base = self.prefix.encode() + b"evip/"
        return base + lo.encode() + b"/", prefix_end(base + hi.encode() + b"/")

    @staticmethod
    def _covers(k: bytes, p: bytes, ip: int) -> bool:
        lo, hi = k[len(p):].decode().split("/")[1:3]
        return unkey(lo) <= ip <= unkey(hi)

    def _events_under(self, start: bytes, end: bytes, after: int | None,
                      limit: int) -> list[tuple[bytes, Event]]:
        if after is not None:
            got = self.client.range(start, end, by_create=True,
                                    min_create=after // EVENTS_PER_TXN,
                                    limit=limit + EVENT_MARGIN if limit else 0)
        else:
            got = self.client.range(start, end, by_create=True, descending=True,
                                    limit=limit + EVENT_MARGIN if limit else 0)
        out = []
        for kv in got.kvs:
            d = json.loads(kv.value)
            place = int(kv.key.decode().rsplit("/", 1)[1])
            d["id"] = kv.create * EVENTS_PER_TXN + place
            out.append((kv.key, Event(**d)))
        return out

    # --- space -------------------------------------------------------------------------

    def space(self) -> list[tuple[str, int | None]]:
        """Each endpoint's database size in bytes (None: it did not answer)."""
        out: list[tuple[str, int | None]] = []
        for ep in self.client.endpoints:
            try:
                out.append((ep, int(self.client.status(ep).dbSize)))
            except Exception:
                out.append((ep, None))
        return out

    def warn_on_space(self) -> list[str]:
        """Warnings for members past ``WARN_AT`` of the quota (``quota_gb`` in the URL)."""
        quota = self.url.quota_gb * (1 << 30)
        lines = []
        for ep, size in self.space():
            if size is not None and size >= WARN_AT * quota:
                lines.append(f"etcd {ep}: its database is {size / (1 << 20):.0f} MiB, "
                             f"{100 * size / quota:.0f}% of the {self.url.quota_gb} GiB quota: "
                             "compact and defragment it (docs/ETCD.md) before writes stop")
        for line in lines:
            log.warning("%s", line)
        return lines

    def watch_space(self, every: float = 60.0) -> threading.Event:
        """Check the space every ``every`` seconds in a thread; set the event to stop."""
        stop = threading.Event()

        def loop() -> None:
            while not stop.wait(every):
                try:
                    self.warn_on_space()
                except Exception:
                    log.exception("etcd: checking the space failed")

        threading.Thread(target=loop, name="etcd-space", daemon=True).start()
        return stop

    # --- the pool cache, kept fresh by a watch --------------------------------------------

    def watch_pools(self) -> PoolWatch:
        """Keep the cached pools fresh from a watch: a pool changed by another server is
        known here before a change trips over it (the cache is only an optimistic
        try's guess, compared at its commit: the watch saves conflicts, not errors)."""
        watch = PoolWatch(self)
        watch.start()
        return watch

    def close(self) -> None:
        with self._queue_lock:
            self._closed = True
            self._queue_lock.notify_all()
            committer = self._committer
        if committer is not None and committer is not threading.current_thread():
            committer.join(self.client.budget + 5)
        self.client.close()


class PoolWatch:
    """The thread behind :meth:`EtcdStore.watch_pools`: it reads every pool, then
    follows their changes from the next revision. After a compaction that removed
    the revision it wanted (it fell behind: its member died, the network went), it
    reads everything again and follows on from there."""

    def __init__(self, store: EtcdStore) -> None:
        self.store = store
        self.start_ = store._pool_prefix
        self.end = prefix_end(store._pool_prefix)
        self.revision = 0  # the last revision applied to the cache
        self.loads = 0  # full reads (the first, and one after each compaction)
        self.events = 0
        self._stop = threading.Event()
        self._current: Watch | None = None
        self._thread = threading.Thread(target=self._loop, name="etcd-pools", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        current = self._current
        if current is not None:
            current.cancel()
        self._thread.join(10)

    def _load(self) -> None:
        got = self.store.client.range(self.start_, self.end)
        known = self.store._known
        for k in [k for k in known if k.startswith(self.start_)]:
            known.pop(k, None)
        for kv in got.kvs:
            known[kv.key] = (kv.value, kv.mod)
        self.revision = got.revision
        self.loads += 1

    def _loop(self) -> None:
        delay = 0.1
        while not self._stop.is_set():
            try:
                if not self.revision:
                    self._load()
                self._current = self.store.client.watch(self.start_, self.end,
                                                        self.revision + 1)
                if self._stop.is_set():
                    self._current.cancel()
                for resp in self._current:
                    if resp.compact_revision:  # what it wanted is gone: read it all
                        log.info("etcd: the pool watch fell behind a compaction (revision "
                                 "%d); reading the pools again", resp.compact_revision)
                        self.revision = 0
                        self._current.cancel()
                        break
                    self._apply(resp.events)
                    delay = 0.1
            except (Retry, NetdError) as exc:
                if self._stop.is_set():
                    return
                log.debug("etcd: the pool watch failed (%s); again in %.1f s", exc, delay)
                self._stop.wait(delay)
                delay = min(delay * 2, 5.0)

    def _apply(self, events: Any) -> None:
        known = self.store._known
        for ev in events:
            kv = ev.kv
            if ev.type == ev.DELETE:
                known[kv.key] = (None, 0)
            else:
                known[kv.key] = (kv.value, kv.mod_revision)
            self.revision = max(self.revision, int(kv.mod_revision))
            self.events += 1


@dataclass
class _Try:
    """A batch executed on one :class:`Stm`: each change's outcome, not yet committed."""

    changes: list[_Pending[Any]]
    stm: Stm
    outcomes: list[tuple[bool, Any]]
    tx: EtcdTxn

    def record(self) -> None:
        """It committed: each change's outcome is its result."""
        for p, (ok, value) in zip(self.changes, self.outcomes, strict=True):
            if ok:
                p.ok, p.value = True, value
            else:
                p.error = value


@dataclass
class _Flight:
    """A try whose commit is on the wire; ``done`` once its answer is in."""

    t: _Try
    answer: Callable[[], tuple[bool, int, Any]] = lambda: (False, 0, None)
    done: bool = False


def _resolve(changes: list[_Pending[Any]]) -> None:
    """Tell each change's waiter that it is done: one wake-up per event loop."""
    by_loop: dict[asyncio.AbstractEventLoop, list[asyncio.Future[None]]] = {}
    for p in changes:
        p.resolved = True
        if p.waiter is not None and p.loop is not None:
            by_loop.setdefault(p.loop, []).append(p.waiter)
        elif p.lock is not None:
            p.lock.release()
    for loop, waiters in by_loop.items():
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits
            loop.call_soon_threadsafe(_wake, waiters)


def _wake(waiters: list[asyncio.Future[None]]) -> None:
    for w in waiters:
        if not w.done():  # a request cancelled meanwhile
            w.set_result(None)


class _Pending(Generic[T]):
    """One change waiting for (or done by) a group commit, and how its waiter hears of
    it: an event loop's future, or a held lock that the committer releases."""

    def __init__(self, change: Callable[[Any], T],
                 loop: asyncio.AbstractEventLoop | None) -> None:
        self.change = change
        self.ok = False
        self.value: T | None = None
        self.error: BaseException | None = None
        self.resolved = False
        self.loop = loop
        self.waiter: asyncio.Future[None] | None = None
        self.lock: threading.Lock | None = None
        if loop is not None:
            self.waiter = loop.create_future()
        else:
            self.lock = threading.Lock()
            self.lock.acquire()

    def wait(self) -> None:
        assert self.lock is not None
        self.lock.acquire()

    def result(self) -> T:
        if self.error is not None:
            raise self.error
        if not self.ok:
            raise Unavailable("etcd: the change was not committed")
        return self.value  # type: ignore[return-value]  # T itself may be None


__all__ = ["DEFAULT_PREFIX", "EtcdStore", "EtcdTxn", "EtcdUrl", "client_for",
           "parse_etcd_url"]
