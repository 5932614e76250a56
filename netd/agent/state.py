"""The agent's own record of what it plumbed, and releases still owed to the IPAM.

An attachment is written as ``adding`` *before* the agent allocates or
creates anything, and as ``ready`` once everything is in place, so a crash
at any moment leaves a record that reconciliation can finish or undo. A
ready record holds everything a repair needs: the addressing the container
got, the mode and what its driver attached (MTU, VLAN, mode-specific data).
Releases the IPAM could not take (it was unreachable) wait in a queue here.

This database is a cache of what the kernel and the IPAM know: the agent
rebuilds lost records from both (:meth:`netd.agent.service.Agent.reconcile`).

Schema versions (``PRAGMA user_version``) and their migrations are below; a
database written by an older release is migrated when it is opened, in one
transaction. Docker's own records (the networks it created, addresses held
between ``RequestAddress`` and ``CreateEndpoint``) live in two more tables.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from netd.dataplane.driver import Attached, Endpoint

log = logging.getLogger("netd.agent.state")

#: The schema this release writes.
SCHEMA_VERSION = 2

SCHEMA = """
CREATE TABLE IF NOT EXISTS attachments (
    network TEXT NOT NULL, container_id TEXT NOT NULL, ifname TEXT NOT NULL,
    plugin TEXT NOT NULL, state TEXT NOT NULL,
    netns TEXT,                  -- NULL: handed over (Docker moves the container end)
    pool TEXT NOT NULL, host_ifname TEXT, peer_ifname TEXT,
    ip TEXT, mac TEXT, address TEXT, gateway TEXT,
    routes TEXT NOT NULL DEFAULT '[]', dns TEXT NOT NULL DEFAULT '{}',
    mode TEXT NOT NULL DEFAULT '', mtu INTEGER NOT NULL DEFAULT 0, vlan INTEGER,
    data TEXT NOT NULL DEFAULT '{}',   -- the driver's mode-specific data
    allowed TEXT NOT NULL DEFAULT '[]', -- extra addresses it may send from
    extra TEXT NOT NULL DEFAULT '{}',  -- the integration's (Docker: sandbox, name...)
    created REAL NOT NULL, updated REAL NOT NULL,
    PRIMARY KEY (network, container_id, ifname)
);
CREATE INDEX IF NOT EXISTS attachments_owner ON attachments (container_id, ifname);
CREATE TABLE IF NOT EXISTS pending_releases (
    id INTEGER PRIMARY KEY AUTOINCREMENT, pool TEXT NOT NULL, container_id TEXT NOT NULL,
    ifname TEXT NOT NULL, ip TEXT, queued REAL NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS docker_networks (
    network_id TEXT PRIMARY KEY, pool TEXT NOT NULL, cidr TEXT NOT NULL, gateway TEXT,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS docker_addresses (
    pool TEXT NOT NULL, ip TEXT NOT NULL, owner TEXT NOT NULL, mac TEXT NOT NULL,
    created REAL NOT NULL,
    PRIMARY KEY (pool, ip)
);
"""

@dataclass
class Attachment:
    """One endpoint the agent plumbed (or is plumbing): owner, addressing, what was attached."""

    network: str
    container_id: str
    ifname: str
    plugin: str  # netd-cni | netd-ipam | docker
    state: str  # adding | ready | deleting
    netns: str | None
    pool: str
    host_ifname: str | None = None
    peer_ifname: str | None = None
    ip: str | None = None
    mac: str | None = None
    address: str | None = None  # as configured in the container
    gateway: str | None = None
    routes: list[tuple[str, str | None]] = field(default_factory=list)  # default included
    dns: dict[str, Any] = field(default_factory=dict)
    mode: str = ""
    mtu: int = 0
    vlan: int | None = None
    data: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    allowed: list[str] = field(default_factory=list)
    created: float = 0.0
    updated: float = 0.0

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.network, self.container_id, self.ifname)

    @property
    def owner(self) -> tuple[str, str]:
        return (self.container_id, self.ifname)

    def endpoint(self) -> Endpoint | None:
        """The dataplane's name for it; None for an address-only attachment (netd-ipam)."""
        if not self.host_ifname:
            return None
        return Endpoint(self.container_id, self.ifname, self.netns, self.host_ifname,
                        self.peer_ifname)

    def attached(self) -> Attached | None:
        """What the driver attached, as recorded (None until it is known)."""
        if not self.host_ifname or not self.address or not self.mac:
            return None
        ifname = self.peer_ifname if self.netns is None and self.peer_ifname else self.ifname
        return Attached(self.host_ifname, ifname, self.mac, self.address, self.gateway,
                        tuple(self.routes), self.mtu, self.vlan, dict(self.data),
                        tuple(self.allowed))

    def record(self, attached: Attached) -> None:
        """Take over what a driver attached."""
        self.address, self.gateway = attached.address, attached.gateway
        self.routes, self.mtu = list(attached.routes), attached.mtu
        self.vlan, self.data, self.mac = attached.vlan, dict(attached.data), attached.mac
        self.allowed = list(attached.allowed)


@dataclass
class DockerNetwork:
    network_id: str
    pool: str
    cidr: str  # the pool's subnet, e.g. 198.18.0.0/24
    gateway: str | None
    created: float = 0.0


@dataclass
class DockerAddress:
    """An address the Docker IPAM driver holds, and its owner in the IPAM."""

    pool: str
    ip: str
    owner: str  # "docker-pending-<mac>" until CreateEndpoint, then the endpoint id
    mac: str
    created: float = 0.0


@dataclass
class PendingRelease:
    id: int
    pool: str
    container_id: str
    ifname: str
    ip: str | None
    queued: float
    attempts: int
    last_error: str


# --- migrations -------------------------------------------------------------------------


def _tables(db: sqlite3.Connection) -> set[str]:
    return {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}


def _create(db: sqlite3.Connection) -> None:
    """The current schema's tables (inside the caller's transaction, unlike executescript)."""
    for statement in SCHEMA.split(";"):
        if statement.strip():
            db.execute(statement)


def _v1_to_v2(db: sqlite3.Connection) -> None:
    """Release 0.1.0 -> 0.2: attachments gain the addressing and the driver's data; Docker
    endpoints become attachments (handed over) of plugin ``docker``.

    0.1.0 kept the CNI result as JSON and had no mode (it only had L2), so the
    addressing is read from that result. A Docker endpoint keeps the names its
    links were made with (``ndd``/``ndp``, marked ``netd-docker:``).
    """
    db.execute("ALTER TABLE attachments RENAME TO attachments_v1")
    _create(db)
    for row in db.execute("SELECT * FROM attachments_v1").fetchall():
        result = json.loads(row["result"]) if row["result"] else {}
        ips = result.get("ips") or [{}]
        routes = [(str(r["dst"]), r.get("gw")) for r in result.get("routes") or []
                  if isinstance(r, dict) and r.get("dst")]
        mtu = 0
        for iface in result.get("interfaces") or []:
            if isinstance(iface, dict) and iface.get("mtu"):
                mtu = int(iface["mtu"])
        _insert(db, Attachment(
            network=row["network"], container_id=row["container_id"], ifname=row["ifname"],
            plugin=row["plugin"], state=row["state"], netns=row["netns"], pool=row["pool"],
            host_ifname=row["host_ifname"], ip=row["ip"], mac=row["mac"],
            address=ips[0].get("address"), gateway=ips[0].get("gateway"), routes=routes,
            dns=result.get("dns") or {}, mode="l2" if row["host_ifname"] else "", mtu=mtu,
            created=row["created"], updated=row["updated"]))
    db.execute("DROP TABLE attachments_v1")
    if "docker_endpoints" in _tables(db):
        states = {"creating": "adding", "created": "ready", "joined": "ready",
                  "deleting": "deleting"}
        for e in db.execute("SELECT * FROM docker_endpoints").fetchall():
            _insert(db, Attachment(
                network=e["network_id"], container_id=e["endpoint_id"], ifname="eth0",
                plugin="docker", state=states.get(e["state"], "deleting"), netns=None,
                pool=e["pool"], host_ifname=e["host_ifname"], peer_ifname=e["peer_ifname"],
                ip=e["ip"] or None, mac=e["mac"] or None, address=e["address"] or None,
                mode="l2", extra={"sandbox": e["sandbox"], "docker_pid": e["docker_pid"],
                                  "container_name": e["container_name"],
                                  "joined": e["state"] == "joined"},
                created=e["created"], updated=e["updated"]))
        db.execute("DROP TABLE docker_endpoints")


#: version -> the migration that brings a database of that version to the next one
MIGRATIONS: dict[int, Callable[[sqlite3.Connection], None]] = {1: _v1_to_v2}


def migrate(db: sqlite3.Connection) -> int:
    """Bring the database to :data:`SCHEMA_VERSION` in one transaction; returns the old version.

    Version 0 with tables is what release 0.1.0 wrote (it set no version): 1.
    """
    db.execute("BEGIN IMMEDIATE")
    try:
        version = int(db.execute("PRAGMA user_version").fetchone()[0])
        if version == 0:
            version = 1 if "attachments" in _tables(db) else SCHEMA_VERSION
            if version == SCHEMA_VERSION:  # a new database
                _create(db)
        if version > SCHEMA_VERSION:
            raise RuntimeError(f"agent.db has schema version {version}, newer than this "
                               f"release's {SCHEMA_VERSION}: a newer netd wrote it")
        old = version
        while version < SCHEMA_VERSION:
            MIGRATIONS[version](db)
            version += 1
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
    return old


_INSERT = ("INSERT OR REPLACE INTO attachments (network, container_id, ifname, plugin, state, "
           "netns, pool, host_ifname, peer_ifname, ip, mac, address, gateway, routes, dns, "
           "mode, mtu, vlan, data, extra, allowed, created, updated) "
           "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")


def _insert(db: sqlite3.Connection, a: Attachment) -> None:
    db.execute(
        _INSERT,
        (a.network, a.container_id, a.ifname, a.plugin, a.state, a.netns, a.pool,
         a.host_ifname, a.peer_ifname, a.ip, a.mac, a.address, a.gateway,
         json.dumps([list(r) for r in a.routes]), json.dumps(a.dns, sort_keys=True), a.mode,
         a.mtu, a.vlan, json.dumps(a.data, sort_keys=True), json.dumps(a.extra, sort_keys=True),
         json.dumps(a.allowed), a.created, a.updated))


def _att(row: sqlite3.Row) -> Attachment:
    return Attachment(
        network=row["network"], container_id=row["container_id"], ifname=row["ifname"],
        plugin=row["plugin"], state=row["state"], netns=row["netns"], pool=row["pool"],
        host_ifname=row["host_ifname"], peer_ifname=row["peer_ifname"], ip=row["ip"],
        mac=row["mac"], address=row["address"], gateway=row["gateway"],
        routes=[(str(d), g) for d, g in json.loads(row["routes"])],
        dns=json.loads(row["dns"]), mode=row["mode"], mtu=int(row["mtu"]), vlan=row["vlan"],
        data=json.loads(row["data"]), extra=json.loads(row["extra"]),
        allowed=[str(a) for a in json.loads(row["allowed"])],
        created=row["created"], updated=row["updated"])


class StateStore:
    """SQLite file under ``state_dir`` (WAL, 0600); safe across threads."""

    def __init__(self, state_dir: str) -> None:
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        self.path = os.path.join(state_dir, "agent.db")
        self._lock = threading.Lock()
        fresh = not os.path.exists(self.path)
        old_umask = os.umask(0o077)
        try:
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                                       timeout=30)
        finally:
            os.umask(old_umask)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        old = migrate(self._db)
        if not fresh and old != SCHEMA_VERSION:
            log.info("agent.db migrated from schema version %d to %d", old, SCHEMA_VERSION)
        self.migrated_from = old
        os.chmod(self.path, 0o600)

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _rows(self, sql: str, *args: Any) -> list[sqlite3.Row]:
        with self._lock:
            return list(self._db.execute(sql, args).fetchall())

    # --- attachments -------------------------------------------------------------------

    def get(self, network: str, container_id: str, ifname: str) -> Attachment | None:
        rows = self._rows("SELECT * FROM attachments WHERE network=? AND container_id=? AND "
                          "ifname=?", network, container_id, ifname)
        return _att(rows[0]) if rows else None

    def by_host_ifname(self, host_ifname: str) -> Attachment | None:
        rows = self._rows("SELECT * FROM attachments WHERE host_ifname=?", host_ifname)
        return _att(rows[0]) if rows else None

    def of_owner(self, container_id: str, ifname: str) -> list[Attachment]:
        """Every attachment of an owner, whatever the network (normally at most one)."""
        return [_att(r) for r in self._rows(
            "SELECT * FROM attachments WHERE container_id=? AND ifname=? ORDER BY created",
            container_id, ifname)]

    def put(self, a: Attachment) -> None:
        now = time.time()
        a.updated = now
        if not a.created:
            a.created = now
        with self._tx() as db:
            _insert(db, a)

    def delete(self, network: str, container_id: str, ifname: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM attachments WHERE network=? AND container_id=? AND ifname=?",
                       (network, container_id, ifname))

    def all(self, network: str | None = None, plugin: str | None = None) -> list[Attachment]:
        sql, args = "SELECT * FROM attachments WHERE 1=1", []
        if network is not None:
            sql += " AND network=?"
            args.append(network)
        if plugin is not None:
            sql += " AND plugin=?"
            args.append(plugin)
        return [_att(r) for r in self._rows(sql + " ORDER BY created", *args)]

    # --- queued releases ---------------------------------------------------------------

    def queue_release(self, pool: str, container_id: str, ifname: str, ip: str | None,
                      error: str) -> None:
        with self._tx() as db:
            db.execute("INSERT INTO pending_releases (pool, container_id, ifname, ip, queued, "
                       "last_error) VALUES (?, ?, ?, ?, ?, ?)",
                       (pool, container_id, ifname, ip, time.time(), error))

    def pending(self) -> list[PendingRelease]:
        rows = self._rows("SELECT * FROM pending_releases ORDER BY id")
        return [PendingRelease(**dict(r)) for r in rows]

    def pending_release(self, pid: int) -> PendingRelease | None:
        rows = self._rows("SELECT * FROM pending_releases WHERE id=?", pid)
        return PendingRelease(**dict(rows[0])) if rows else None

    def drop_releases(self, container_id: str, ifname: str) -> int:
        """Forget queued releases of an owner that is being attached again."""
        with self._tx() as db:
            cur = db.execute("DELETE FROM pending_releases WHERE container_id=? AND ifname=?",
                             (container_id, ifname))
            return int(cur.rowcount)

    def release_done(self, pid: int) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM pending_releases WHERE id=?", (pid,))

    def release_failed(self, pid: int, error: str) -> None:
        with self._tx() as db:
            db.execute("UPDATE pending_releases SET attempts=attempts+1, last_error=? WHERE id=?",
                       (error, pid))

    # --- the Docker driver's records ------------------------------------------------------

    def docker_network(self, network_id: str) -> DockerNetwork | None:
        rows = self._rows("SELECT * FROM docker_networks WHERE network_id=?", network_id)
        return DockerNetwork(**dict(rows[0])) if rows else None

    def docker_networks(self) -> list[DockerNetwork]:
        return [DockerNetwork(**dict(r))
                for r in self._rows("SELECT * FROM docker_networks ORDER BY created")]

    def put_docker_network(self, n: DockerNetwork) -> None:
        n.created = n.created or time.time()
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO docker_networks (network_id, pool, cidr, gateway, "
                       "created) VALUES (?, ?, ?, ?, ?)",
                       (n.network_id, n.pool, n.cidr, n.gateway, n.created))

    def delete_docker_network(self, network_id: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM docker_networks WHERE network_id=?", (network_id,))

    def docker_address(self, pool: str, ip: str) -> DockerAddress | None:
        rows = self._rows("SELECT * FROM docker_addresses WHERE pool=? AND ip=?", pool, ip)
        return DockerAddress(**dict(rows[0])) if rows else None

    def docker_addresses(self) -> list[DockerAddress]:
        return [DockerAddress(**dict(r))
                for r in self._rows("SELECT * FROM docker_addresses ORDER BY created")]

    def put_docker_address(self, a: DockerAddress) -> None:
        a.created = a.created or time.time()
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO docker_addresses (pool, ip, owner, mac, created) "
                       "VALUES (?, ?, ?, ?, ?)", (a.pool, a.ip, a.owner, a.mac, a.created))

    def delete_docker_address(self, pool: str, ip: str, owner: str | None = None) -> None:
        """Forget an address (only while ``owner`` holds it, when given)."""
        with self._tx() as db:
            if owner is None:
                db.execute("DELETE FROM docker_addresses WHERE pool=? AND ip=?", (pool, ip))
            else:
                db.execute("DELETE FROM docker_addresses WHERE pool=? AND ip=? AND owner=?",
                           (pool, ip, owner))

    def close(self) -> None:
        with self._lock:
            self._db.close()


__all__ = ["SCHEMA_VERSION", "Attachment", "DockerAddress", "DockerNetwork", "PendingRelease",
           "StateStore", "migrate"]
