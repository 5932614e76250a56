"""Datastore interface for the IPAM, and its embedded SQLite implementation.

The IPAM logic (:mod:`netd.ipam.service`) runs inside one :class:`Txn` per
change and only uses the primitives below, so a distributed store (etcd) can
implement the same interface. Free addresses are never stored one by one:
never-used space is kept as disjoint ranges ("free ranges", per allocation
space), and only addresses that were once handed out and came back are listed
("released", with their release time, for least-recently-used re-use).

A *space* is the unit a pool allocates from: ``""`` for a whole pool, or the
key of a host block's first address in BGP pools.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import os
import sqlite3
import stat
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar
from urllib.parse import quote, unquote, urlsplit

from netd.errors import InvalidInput, MacInUse, Unavailable
from netd.ipam.model import Allocation, Block, Event, Pool, Reservation, key, unkey

if TYPE_CHECKING:
    from netd.ipam.etcd_store import EtcdUrl


class Txn(Protocol):
    """Primitives of one atomic change (or one consistent read)."""

    # pools and their counters
    def get_pool(self, name: str) -> Pool | None: ...
    def list_pools(self) -> list[Pool]: ...
    def insert_pool(self, pool: Pool) -> None: ...
    def delete_pool(self, name: str) -> None: ...
    def counters(self, name: str) -> tuple[int, int]: ...
    def add_counters(self, name: str, reserved: int, allocated: int) -> None: ...
    def block_cursor(self, name: str) -> int: ...
    def set_block_cursor(self, name: str, value: int) -> None: ...

    # never-used space, as disjoint ranges per space
    def first_free(self, pool: str, space: str | None) -> tuple[str, int, int] | None: ...
    def free_overlapping(self, pool: str, lo: int, hi: int) -> list[tuple[str, int, int]]: ...
    def put_free(self, pool: str, space: str, lo: int, hi: int) -> None: ...
    def del_free(self, pool: str, lo: int) -> None: ...
    def shrink_free(self, pool: str, lo: int, new_lo: int) -> None: ...

    # addresses that were handed out and came back
    def oldest_released(
        self, pool: str, space: str | None, before: float | None
    ) -> tuple[str, int, float] | None: ...
    def released_space(self, pool: str, ip: int) -> str | None: ...
    def released_in(self, pool: str, lo: int, hi: int) -> list[int]: ...
    def put_released(self, pool: str, space: str, ip: int, ts: float) -> None: ...
    def del_released(self, pool: str, ip: int) -> None: ...

    # allocations
    def allocation(self, pool: str, ip: int) -> Allocation | None: ...
    def allocation_of(self, pool: str, container_id: str, ifname: str) -> Allocation | None: ...
    def allocations_of(
        self, container_id: str, ifname: str | None, pool: str | None
    ) -> list[Allocation]: ...
    def allocations_in(self, pool: str, lo: int, hi: int, limit: int) -> list[Allocation]: ...
    def allocation_by_mac(self, mac: str) -> Allocation | None: ...
    def allocations_by_handle(self, handle: str, limit: int) -> list[Allocation]: ...
    def list_allocations(
        self, pool: str | None, host: str | None, after: tuple[str, int] | None, limit: int
    ) -> list[Allocation]: ...
    def put_allocation(self, a: Allocation) -> None:
        """Insert; raises :class:`MacInUse` when a live allocation has that MAC."""
    def del_allocation(self, pool: str, ip: int) -> None: ...
    def hosts(self) -> list[dict[str, Any]]: ...

    # reservations (disjoint ranges; a handle-assigned one covers one address)
    def reservations_overlapping(self, pool: str, lo: int, hi: int) -> list[Reservation]: ...
    def reservation_by_handle(self, pool: str, handle: str) -> Reservation | None: ...
    def list_reservations(self, pool: str) -> list[Reservation]: ...
    def put_reservation(self, r: Reservation) -> None: ...
    def del_reservation(self, pool: str, lo: int) -> None: ...

    # BGP host blocks
    def blocks(self, pool: str | None, host: str | None) -> list[Block]: ...
    def block(self, pool: str, lo: int) -> Block | None: ...
    def put_block(self, b: Block) -> None: ...

    # history
    def add_event(self, e: Event) -> None: ...
    def events(self, ip: str | None, pool: str | None, limit: int,
               after: int | None = None) -> list[Event]: ...


T = TypeVar("T")


class Store(Protocol):
    def transact(self, change: Callable[[Txn], T]) -> T:
        """``change(tx)`` as one atomic change, its result returned; an exception rolls it
        back. A store with optimistic concurrency (etcd) runs ``change`` again when what
        it read was changed meanwhile, so ``change`` must depend only on ``tx``."""

    def write(self) -> AbstractContextManager[Txn]:
        """One atomic change: commits when the block ends, rolls back on error (stores
        that may have to retry offer :meth:`transact` only for changes; this is for
        tools and tests)."""

    def read(self) -> AbstractContextManager[Txn]:
        """A consistent read."""

    def close(self) -> None: ...


MEMORY_URL = "sqlite://:memory:"


@dataclass(frozen=True)
class StoreUrl:
    """A checked store URL: ``sqlite:///ABSOLUTE/PATH``, ``sqlite://:memory:`` or
    ``etcd://HOST:PORT,...`` (:func:`netd.ipam.etcd_store.parse_etcd_url`)."""

    path: str  # absolute, or ":memory:"; "" for etcd
    etcd: EtcdUrl | None = None

    @property
    def memory(self) -> bool:
        return self.path == ":memory:"


def check_store_url(url: str) -> StoreUrl:
    """Parse a store URL, refusing what would silently mean something else (pure).

    No user info (a SQLite file has no users; a password would only end up in
    logs), no query options or fragments (none is supported: ``?mode=ro``
    would be ignored), and an absolute path: ``sqlite://dir/ipam.db`` would be
    relative to wherever the server happens to start.
    """
    if url == MEMORY_URL:
        return StoreUrl(":memory:")
    parsed = urlsplit(url)
    if parsed.scheme in ("etcd", "etcds"):
        from netd.ipam.etcd_store import parse_etcd_url

        return StoreUrl("", parse_etcd_url(url))
    if parsed.scheme != "sqlite":
        raise InvalidInput(f"unknown store URL {url[:80]!r}: expected sqlite:///PATH or "
                           "etcd://HOST:PORT[,HOST:PORT...]")
    if "@" in parsed.netloc:
        raise InvalidInput("the store URL carries user info: a SQLite database has no users "
                           "(give sqlite:///PATH)")
    if parsed.query or parsed.fragment:
        raise InvalidInput(f"the store URL has options ({(parsed.query or parsed.fragment)[:40]!r}"
                           "); sqlite:///PATH takes none")
    if parsed.netloc:
        raise InvalidInput(f"store URL {url[:80]!r} names a relative path "
                           f"({parsed.netloc}{parsed.path}): write sqlite:///ABSOLUTE/PATH, "
                           "with three slashes")
    path = unquote(parsed.path)
    if not path.startswith("/"):
        raise InvalidInput(f"store URL {url[:80]!r} names a relative path: write "
                           "sqlite:///ABSOLUTE/PATH")
    if path.endswith("/") or "\0" in path:
        raise InvalidInput(f"store URL {url[:80]!r} names no database file")
    return StoreUrl("/" + os.path.normpath(path).lstrip("/"))  # sqlite:////x is /x too


def open_store(url: str) -> Store:
    """Open a store from a URL (:func:`check_store_url`); nothing is created or changed
    when the URL or the file it names is refused."""
    checked = check_store_url(url)
    if checked.etcd is not None:
        from netd.ipam.etcd_store import EtcdStore

        return EtcdStore(checked.etcd)
    return SqliteStore(checked.path)


# --- SQLite ----------------------------------------------------------------

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS pools (
    name TEXT PRIMARY KEY,
    doc TEXT NOT NULL,
    n_reserved TEXT NOT NULL DEFAULT '0',
    n_allocated INTEGER NOT NULL DEFAULT 0,
    block_cursor TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS free_ranges (
    pool TEXT NOT NULL, lo TEXT NOT NULL, hi TEXT NOT NULL, space TEXT NOT NULL,
    PRIMARY KEY (pool, lo)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS free_by_space ON free_ranges (pool, space, lo);
CREATE TABLE IF NOT EXISTS released (
    pool TEXT NOT NULL, ip TEXT NOT NULL, space TEXT NOT NULL, ts REAL NOT NULL,
    PRIMARY KEY (pool, ip)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS released_lru ON released (pool, space, ts);
CREATE INDEX IF NOT EXISTS released_lru_pool ON released (pool, ts);
CREATE TABLE IF NOT EXISTS allocations (
    pool TEXT NOT NULL, ip TEXT NOT NULL, container_id TEXT NOT NULL, ifname TEXT NOT NULL,
    mac TEXT NOT NULL, host TEXT NOT NULL, netns TEXT NOT NULL, handle TEXT,
    fixed INTEGER NOT NULL, labels TEXT NOT NULL, block TEXT, created REAL NOT NULL,
    allowed TEXT NOT NULL DEFAULT '[]',
    PRIMARY KEY (pool, ip)
) WITHOUT ROWID;
CREATE UNIQUE INDEX IF NOT EXISTS alloc_owner ON allocations (container_id, ifname, pool);
CREATE UNIQUE INDEX IF NOT EXISTS alloc_mac ON allocations (mac);
CREATE INDEX IF NOT EXISTS alloc_host ON allocations (host, pool, ip);
CREATE INDEX IF NOT EXISTS alloc_handle ON allocations (handle) WHERE handle IS NOT NULL;
CREATE TABLE IF NOT EXISTS reservations (
    pool TEXT NOT NULL, lo TEXT NOT NULL, hi TEXT NOT NULL, note TEXT NOT NULL,
    handle TEXT, created REAL NOT NULL,
    PRIMARY KEY (pool, lo)
) WITHOUT ROWID;
CREATE UNIQUE INDEX IF NOT EXISTS res_handle ON reservations (pool, handle)
    WHERE handle IS NOT NULL;
CREATE TABLE IF NOT EXISTS blocks (
    pool TEXT NOT NULL, lo TEXT NOT NULL, hi TEXT NOT NULL, host TEXT NOT NULL,
    prefix INTEGER NOT NULL,
    PRIMARY KEY (pool, lo)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS blocks_host ON blocks (host, pool, lo);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY, ts REAL NOT NULL, pool TEXT NOT NULL,
    ip TEXT NOT NULL, action TEXT NOT NULL, container_id TEXT NOT NULL, ifname TEXT NOT NULL,
    host TEXT NOT NULL, mac TEXT NOT NULL, actor TEXT NOT NULL, note TEXT NOT NULL,
    lo TEXT, hi TEXT
);
CREATE INDEX IF NOT EXISTS events_ip ON events (ip, id);
CREATE INDEX IF NOT EXISTS events_span ON events (lo) WHERE lo IS NOT NULL;
CREATE INDEX IF NOT EXISTS events_pool ON events (pool, id);
"""


@functools.lru_cache(maxsize=4096)
def _pool(doc: str) -> Pool:
    """Decode a stored pool; cached by its exact text (pools are immutable values)."""
    return Pool.from_dict(json.loads(doc))


def event_span(text: str) -> tuple[int, int] | None:
    """Address span of a range or pool event ("A-B" or a CIDR); None for one address."""
    try:
        if "/" in text:
            net = ipaddress.ip_network(text)
            return int(net.network_address), int(net.broadcast_address)
        if "-" in text:
            a, b = text.split("-", 1)
            return int(ipaddress.ip_address(a)), int(ipaddress.ip_address(b))
    except ValueError:
        return None
    return None


def _alloc(row: sqlite3.Row) -> Allocation:
    return Allocation(
        pool=row["pool"], ip=unkey(row["ip"]), container_id=row["container_id"],
        ifname=row["ifname"], mac=row["mac"], host=row["host"], netns=row["netns"],
        handle=row["handle"], fixed=bool(row["fixed"]), labels=json.loads(row["labels"]),
        block=unkey(row["block"]) if row["block"] else None, created=row["created"],
        allowed=tuple(json.loads(row["allowed"])),
    )


def _res(row: sqlite3.Row) -> Reservation:
    return Reservation(
        pool=row["pool"], lo=unkey(row["lo"]), hi=unkey(row["hi"]), note=row["note"],
        handle=row["handle"], created=row["created"],
    )


def _block(row: sqlite3.Row) -> Block:
    return Block(pool=row["pool"], lo=unkey(row["lo"]), hi=unkey(row["hi"]), host=row["host"],
                 prefix=row["prefix"])


class SqliteTxn:
    """:class:`Txn` over one SQLite connection inside an open transaction."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def _one(self, sql: str, *args: Any) -> sqlite3.Row | None:
        row: sqlite3.Row | None = self.db.execute(sql, args).fetchone()
        return row

    def _all(self, sql: str, *args: Any) -> list[sqlite3.Row]:
        return self.db.execute(sql, args).fetchall()

    # pools
    def get_pool(self, name: str) -> Pool | None:
        row = self._one("SELECT doc FROM pools WHERE name=?", name)
        return _pool(row["doc"]) if row else None

    def list_pools(self) -> list[Pool]:
        return [_pool(r["doc"]) for r in self._all("SELECT doc FROM pools ORDER BY name")]

    def insert_pool(self, pool: Pool) -> None:
        self.db.execute("INSERT INTO pools (name, doc) VALUES (?, ?)",
                        (pool.name, json.dumps(pool.to_dict(), sort_keys=True)))

    def delete_pool(self, name: str) -> None:
        for table in ("pools", "free_ranges", "released", "allocations", "reservations",
                      "blocks"):
            col = "name" if table == "pools" else "pool"
            self.db.execute(f"DELETE FROM {table} WHERE {col}=?", (name,))  # noqa: S608

    def counters(self, name: str) -> tuple[int, int]:
        row = self._one("SELECT n_reserved, n_allocated FROM pools WHERE name=?", name)
        return (int(row["n_reserved"]), int(row["n_allocated"])) if row else (0, 0)

    def add_counters(self, name: str, reserved: int, allocated: int) -> None:
        if reserved == 0:  # the common case: one statement
            self.db.execute("UPDATE pools SET n_allocated=n_allocated+? WHERE name=?",
                            (allocated, name))
            return
        # n_reserved is text: an IPv6 reservation can exceed SQLite's 64-bit integers
        res, alloc = self.counters(name)
        self.db.execute("UPDATE pools SET n_reserved=?, n_allocated=? WHERE name=?",
                        (str(res + reserved), alloc + allocated, name))

    def block_cursor(self, name: str) -> int:
        row = self._one("SELECT block_cursor FROM pools WHERE name=?", name)
        return unkey(row["block_cursor"]) if row and row["block_cursor"] else -1

    def set_block_cursor(self, name: str, value: int) -> None:
        self.db.execute("UPDATE pools SET block_cursor=? WHERE name=?", (key(value), name))

    # free ranges
    def first_free(self, pool: str, space: str | None) -> tuple[str, int, int] | None:
        if space is None:
            row = self._one("SELECT space, lo, hi FROM free_ranges WHERE pool=? ORDER BY lo "
                            "LIMIT 1", pool)
        else:
            row = self._one("SELECT space, lo, hi FROM free_ranges WHERE pool=? AND space=? "
                            "ORDER BY lo LIMIT 1", pool, space)
        return (row["space"], unkey(row["lo"]), unkey(row["hi"])) if row else None

    def free_overlapping(self, pool: str, lo: int, hi: int) -> list[tuple[str, int, int]]:
        rows = []
        before = self._one("SELECT space, lo, hi FROM free_ranges WHERE pool=? AND lo<? "
                           "ORDER BY lo DESC LIMIT 1", pool, key(lo))
        if before and unkey(before["hi"]) >= lo:
            rows.append(before)
        rows += self._all("SELECT space, lo, hi FROM free_ranges WHERE pool=? AND lo>=? "
                          "AND lo<=? ORDER BY lo", pool, key(lo), key(hi))
        return [(r["space"], unkey(r["lo"]), unkey(r["hi"])) for r in rows]

    def put_free(self, pool: str, space: str, lo: int, hi: int) -> None:
        self.db.execute("INSERT OR REPLACE INTO free_ranges (pool, lo, hi, space) "
                        "VALUES (?, ?, ?, ?)", (pool, key(lo), key(hi), space))

    def del_free(self, pool: str, lo: int) -> None:
        self.db.execute("DELETE FROM free_ranges WHERE pool=? AND lo=?", (pool, key(lo)))

    def shrink_free(self, pool: str, lo: int, new_lo: int) -> None:
        self.db.execute("UPDATE free_ranges SET lo=? WHERE pool=? AND lo=?",
                        (key(new_lo), pool, key(lo)))

    # released
    def oldest_released(
        self, pool: str, space: str | None, before: float | None
    ) -> tuple[str, int, float] | None:
        sql = "SELECT space, ip, ts FROM released WHERE pool=?"
        args: list[Any] = [pool]
        if space is not None:
            sql += " AND space=?"
            args.append(space)
        if before is not None:
            sql += " AND ts<=?"
            args.append(before)
        row = self._one(sql + " ORDER BY ts LIMIT 1", *args)
        return (row["space"], unkey(row["ip"]), row["ts"]) if row else None

    def released_space(self, pool: str, ip: int) -> str | None:
        row = self._one("SELECT space FROM released WHERE pool=? AND ip=?", pool, key(ip))
        return row["space"] if row else None

    def released_in(self, pool: str, lo: int, hi: int) -> list[int]:
        return [unkey(r["ip"]) for r in self._all(
            "SELECT ip FROM released WHERE pool=? AND ip>=? AND ip<=?", pool, key(lo), key(hi))]

    def put_released(self, pool: str, space: str, ip: int, ts: float) -> None:
        self.db.execute("INSERT OR REPLACE INTO released (pool, ip, space, ts) VALUES "
                        "(?, ?, ?, ?)", (pool, key(ip), space, ts))

    def del_released(self, pool: str, ip: int) -> None:
        self.db.execute("DELETE FROM released WHERE pool=? AND ip=?", (pool, key(ip)))

    # allocations
    def allocation(self, pool: str, ip: int) -> Allocation | None:
        row = self._one("SELECT * FROM allocations WHERE pool=? AND ip=?", pool, key(ip))
        return _alloc(row) if row else None

    def allocation_of(self, pool: str, container_id: str, ifname: str) -> Allocation | None:
        row = self._one("SELECT * FROM allocations WHERE container_id=? AND ifname=? AND pool=?",
                        container_id, ifname, pool)
        return _alloc(row) if row else None

    def allocations_of(
        self, container_id: str, ifname: str | None, pool: str | None
    ) -> list[Allocation]:
        # without statistics SQLite may pick the (pool, ip) key and scan the whole pool
        sql = "SELECT * FROM allocations INDEXED BY alloc_owner WHERE container_id=?"
        args: list[Any] = [container_id]
        if ifname is not None:
            sql += " AND ifname=?"
            args.append(ifname)
        if pool is not None:
            sql += " AND pool=?"
            args.append(pool)
        return [_alloc(r) for r in self._all(sql, *args)]

    def allocation_by_mac(self, mac: str) -> Allocation | None:
        row = self._one("SELECT * FROM allocations INDEXED BY alloc_mac WHERE mac=?", mac)
        return _alloc(row) if row else None

    def allocations_by_handle(self, handle: str, limit: int) -> list[Allocation]:
        return [_alloc(r) for r in self._all(
            "SELECT * FROM allocations INDEXED BY alloc_handle WHERE handle=? "
            "ORDER BY pool, ip LIMIT ?", handle, limit)]

    def allocations_in(self, pool: str, lo: int, hi: int, limit: int) -> list[Allocation]:
        return [_alloc(r) for r in self._all(
            "SELECT * FROM allocations WHERE pool=? AND ip>=? AND ip<=? ORDER BY ip LIMIT ?",
            pool, key(lo), key(hi), limit)]

    def list_allocations(
        self, pool: str | None, host: str | None, after: tuple[str, int] | None, limit: int
    ) -> list[Allocation]:
        """Allocations in (pool, address) order, from after ``after`` (a page's last row)."""
        sql = "SELECT * FROM allocations WHERE 1=1"
        args: list[Any] = []
        if host is not None:
            sql += " AND host=?"
            args.append(host)
        if pool is not None:
            sql += " AND pool=?"
            args.append(pool)
        if after is not None:
            sql += " AND (pool, ip) > (?, ?)"
            args += [after[0], key(after[1])]
        sql += " ORDER BY pool, ip LIMIT ?"
        args.append(limit)
        return [_alloc(r) for r in self._all(sql, *args)]

    def put_allocation(self, a: Allocation) -> None:
        try:
            self._insert_allocation(a)
        except sqlite3.IntegrityError as exc:
            if "mac" in str(exc):
                raise MacInUse(f"MAC {a.mac} is already in use by another allocation") from None
            raise

    def _insert_allocation(self, a: Allocation) -> None:
        self.db.execute(
            "INSERT INTO allocations (pool, ip, container_id, ifname, mac, host, netns, handle, "
            "fixed, labels, block, created, allowed) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (a.pool, key(a.ip), a.container_id, a.ifname, a.mac, a.host, a.netns, a.handle,
             int(a.fixed), json.dumps(a.labels, sort_keys=True),
             key(a.block) if a.block is not None else None, a.created,
             json.dumps(list(a.allowed))))

    def del_allocation(self, pool: str, ip: int) -> None:
        self.db.execute("DELETE FROM allocations WHERE pool=? AND ip=?", (pool, key(ip)))

    def hosts(self) -> list[dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for r in self._all("SELECT host, pool, COUNT(*) AS n FROM allocations GROUP BY host, pool"):
            h = out.setdefault(r["host"], {"host": r["host"], "allocations": 0, "pools": {},
                                           "blocks": 0})
            h["allocations"] += r["n"]
            h["pools"][r["pool"]] = r["n"]
        for r in self._all("SELECT host, COUNT(*) AS n FROM blocks GROUP BY host"):
            h = out.setdefault(r["host"], {"host": r["host"], "allocations": 0, "pools": {},
                                           "blocks": 0})
            h["blocks"] = r["n"]
        return [out[k] for k in sorted(out)]

    # reservations
    def reservations_overlapping(self, pool: str, lo: int, hi: int) -> list[Reservation]:
        rows = []
        before = self._one("SELECT * FROM reservations WHERE pool=? AND lo<? ORDER BY lo DESC "
                           "LIMIT 1", pool, key(lo))
        if before and unkey(before["hi"]) >= lo:
            rows.append(before)
        rows += self._all("SELECT * FROM reservations WHERE pool=? AND lo>=? AND lo<=? "
                          "ORDER BY lo", pool, key(lo), key(hi))
        return [_res(r) for r in rows]

    def reservation_by_handle(self, pool: str, handle: str) -> Reservation | None:
        row = self._one("SELECT * FROM reservations WHERE pool=? AND handle=?", pool, handle)
        return _res(row) if row else None

    def list_reservations(self, pool: str) -> list[Reservation]:
        return [_res(r) for r in self._all("SELECT * FROM reservations WHERE pool=? ORDER BY lo",
                                           pool)]

    def put_reservation(self, r: Reservation) -> None:
        self.db.execute("INSERT OR REPLACE INTO reservations (pool, lo, hi, note, handle, "
                        "created) VALUES (?, ?, ?, ?, ?, ?)",
                        (r.pool, key(r.lo), key(r.hi), r.note, r.handle, r.created))

    def del_reservation(self, pool: str, lo: int) -> None:
        self.db.execute("DELETE FROM reservations WHERE pool=? AND lo=?", (pool, key(lo)))

    # blocks
    def blocks(self, pool: str | None, host: str | None) -> list[Block]:
        sql = "SELECT * FROM blocks WHERE 1=1"
        args: list[Any] = []
        if host is not None:
            sql += " AND host=?"
            args.append(host)
        if pool is not None:
            sql += " AND pool=?"
            args.append(pool)
        return [_block(r) for r in self._all(sql + " ORDER BY pool, lo", *args)]

    def block(self, pool: str, lo: int) -> Block | None:
        row = self._one("SELECT * FROM blocks WHERE pool=? AND lo=?", pool, key(lo))
        return _block(row) if row else None

    def put_block(self, b: Block) -> None:
        self.db.execute("INSERT OR REPLACE INTO blocks (pool, lo, hi, host, prefix) VALUES "
                        "(?, ?, ?, ?, ?)", (b.pool, key(b.lo), key(b.hi), b.host, b.prefix))

    # events
    def add_event(self, e: Event) -> None:
        span = event_span(e.ip)
        lo, hi = (key(span[0]), key(span[1])) if span else (None, None)
        self.db.execute(
            "INSERT INTO events (ts, pool, ip, action, container_id, ifname, host, mac, actor, "
            "note, lo, hi) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (e.ts, e.pool, e.ip, e.action, e.container_id, e.ifname, e.host, e.mac, e.actor,
             e.note, lo, hi))

    def events(self, ip: str | None, pool: str | None, limit: int,
               after: int | None = None) -> list[Event]:
        """The last ``limit`` events, oldest first; with ``after``: the ``limit`` events that
        follow event id ``after`` (paging through the whole log)."""
        cols = "id, ts, pool, ip, action, container_id, ifname, host, mac, actor, note"
        sql = f"SELECT {cols} FROM events WHERE 1=1"  # noqa: S608
        args: list[Any] = []
        if ip is not None:
            # events about this address, and about ranges and pools that cover it
            k = key(int(ipaddress.ip_address(ip)))
            sql = (f"SELECT {cols} FROM events WHERE ip=? UNION "  # noqa: S608
                   f"SELECT {cols} FROM events WHERE lo IS NOT NULL AND lo<=? AND hi>=?")
            args += [ip, k, k]
            if pool is not None:
                sql = f"SELECT * FROM ({sql}) WHERE pool=?"  # noqa: S608
                args.append(pool)
        elif pool is not None:
            sql += " AND pool=?"
            args.append(pool)
        if after is not None:
            sql = f"SELECT * FROM ({sql}) WHERE id>?"  # noqa: S608
            rows = self._all(sql + " ORDER BY id LIMIT ?", *args, after, limit)
            return [Event(**dict(zip(r.keys(), r, strict=True))) for r in rows]
        rows = self._all(sql + " ORDER BY id DESC LIMIT ?", *args, limit)
        return [Event(**dict(zip(r.keys(), r, strict=True))) for r in reversed(rows)]


SCHEMA_VERSION = 2
SQLITE_MAGIC = b"SQLite format 3\x00"


def _check_database_file(path: str) -> None:
    """Refuse a path that is not a database netd may own: before anything is created.

    A symbolic link (the database is chmod'ed 0600 and written: that would
    change whatever the link points to), something other than a regular file,
    and a file that is not SQLite's. A missing file is fine: it is created.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise InvalidInput(f"cannot use {path}: {exc.strerror}") from None
    if stat.S_ISLNK(st.st_mode):
        raise InvalidInput(f"{path} is a symbolic link: give the path of the database "
                           f"itself ({os.path.realpath(path)})")
    if not stat.S_ISREG(st.st_mode):
        raise InvalidInput(f"{path} is not a regular file")
    if st.st_size == 0:
        return  # SQLite makes an empty file a new database
    try:
        with open(path, "rb") as f:
            magic = f.read(len(SQLITE_MAGIC))
    except OSError as exc:
        raise InvalidInput(f"cannot read {path}: {exc.strerror}") from None
    if magic != SQLITE_MAGIC:
        raise InvalidInput(f"{path} is not a SQLite database")
    # read-only: a database of something else must not even be switched to WAL
    try:
        db = sqlite3.connect(f"file:{quote(path)}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise InvalidInput(f"{path} cannot be used as a database: {exc}") from None
    try:
        _check_ours(db, path)
    except sqlite3.DatabaseError as exc:
        raise InvalidInput(f"{path} cannot be used as a database: {exc}") from None
    finally:
        db.close()


def _check_ours(db: sqlite3.Connection, path: str) -> None:
    """Refuse a SQLite database that holds something else (netd would add its tables)."""
    tables = {r[0] for r in db.execute(
        "SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%'")}
    if not tables:
        return
    ours = "meta" in tables and db.execute(
        "SELECT 1 FROM meta WHERE k='schema'").fetchone() is not None
    if not ours:
        shown = ", ".join(sorted(tables)[:5])
        raise InvalidInput(f"{path} is a SQLite database of something else (tables: {shown}); "
                           "netd's IPAM needs a file of its own")


def _migrate(db: sqlite3.Connection) -> None:
    """Bring an older database to :data:`SCHEMA_VERSION` (inside the caller's transaction).

    1 -> 2: allocations gain ``allowed`` (extra addresses their holder may send from).
    """
    columns = {r[1] for r in db.execute("PRAGMA table_info(allocations)")}
    if "allowed" not in columns:
        db.execute("ALTER TABLE allocations ADD COLUMN allowed TEXT NOT NULL DEFAULT '[]'")
    db.execute("UPDATE meta SET v=? WHERE k='schema' AND CAST(v AS INTEGER) < ?",
               (str(SCHEMA_VERSION), SCHEMA_VERSION))


class SqliteStore:
    """SQLite in WAL mode; every change is one ``BEGIN IMMEDIATE`` transaction.

    Several processes may share one database file: SQLite's write lock
    serialises them. Inside a process, writers also take a lock first, so
    threads queue in order instead of spinning in SQLite's busy handler.
    """

    def __init__(self, path: str, busy_timeout_ms: int = 30000) -> None:
        self.path = path
        self.busy_timeout_ms = busy_timeout_ms
        self._local = threading.local()
        self._write_lock = threading.Lock()
        self._shared: sqlite3.Connection | None = None
        if path != ":memory:":
            _check_database_file(path)
            parent = os.path.dirname(os.path.abspath(path))
            os.makedirs(parent, mode=0o700, exist_ok=True)
        db = self._conn()
        with self._write_lock:
            self._begin(db, immediate=True)
            try:
                for statement in SCHEMA.split(";"):
                    if statement.strip():
                        db.execute(statement)
                _migrate(db)
                db.execute("INSERT OR IGNORE INTO meta (k, v) VALUES ('schema', ?)",
                           (str(SCHEMA_VERSION),))
                db.execute("COMMIT")
            except sqlite3.DatabaseError as exc:
                self._rollback(db)
                raise InvalidInput(f"{path} cannot be used as a database: {exc}") from None
            except BaseException:
                self._rollback(db)
                raise
        if path != ":memory:":
            os.chmod(path, 0o600)

    def _conn(self) -> sqlite3.Connection:
        if self.path == ":memory:":
            if self._shared is None:
                self._shared = self._open()
            return self._shared
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is None:
            db = self._open()
            self._local.db = db
        return db

    def _open(self) -> sqlite3.Connection:
        try:
            db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                                 timeout=self.busy_timeout_ms / 1000)
        except sqlite3.Error as exc:
            raise Unavailable(f"cannot open database {self.path}: {exc}") from None
        db.row_factory = sqlite3.Row
        try:
            db.execute(f"PRAGMA busy_timeout={int(self.busy_timeout_ms)}")
            if self.path != ":memory:":
                db.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode: a committed change survives any process crash;
            # only an OS crash or power cut can lose the last commits.
            db.execute("PRAGMA synchronous=NORMAL")
        except sqlite3.DatabaseError as exc:
            db.close()
            raise InvalidInput(f"{self.path} cannot be used as a database: {exc}") from None
        return db

    def _begin(self, db: sqlite3.Connection, immediate: bool) -> None:
        deadline = time.monotonic() + self.busy_timeout_ms / 1000
        while True:
            try:
                db.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise Unavailable(f"datastore busy: {exc}") from None
                time.sleep(0.001)

    def transact(self, change: Callable[[Txn], T]) -> T:
        with self.write() as tx:
            return change(tx)

    @contextmanager
    def write(self) -> Iterator[SqliteTxn]:
        db = self._conn()
        with self._write_lock:
            self._begin(db, immediate=True)
            try:
                yield SqliteTxn(db)
                db.execute("COMMIT")
            except sqlite3.OperationalError as exc:
                self._rollback(db)
                raise Unavailable(f"datastore error: {exc}") from None
            except BaseException:
                self._rollback(db)
                raise

    @staticmethod
    def _rollback(db: sqlite3.Connection) -> None:
        """Roll back if a transaction is still open (a failed COMMIT may have ended it)."""
        if db.in_transaction:
            db.execute("ROLLBACK")

    @contextmanager
    def read(self) -> Iterator[SqliteTxn]:
        db = self._conn()
        if self.path == ":memory:":
            with self._write_lock:
                yield SqliteTxn(db)
            return
        self._begin(db, immediate=False)
        try:
            yield SqliteTxn(db)
        finally:
            db.execute("COMMIT")

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None
        if self._shared is not None:
            self._shared.close()
            self._shared = None
