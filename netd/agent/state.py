"""The agent's own record of what it plumbed, and releases still owed to the IPAM.

An attachment is written as ``adding`` *before* the agent allocates or
creates anything, and as ``ready`` once everything is in place, so a crash
at any moment leaves a record that reconciliation can finish or undo.
Releases the IPAM could not take (it was unreachable) wait in a queue here.

The Docker driver (:mod:`netd.agent.docker_driver`) keeps its own three tables
here: the networks it serves, the addresses it holds in the IPAM (and under
which owner) and its endpoints.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS attachments (
    network TEXT NOT NULL, container_id TEXT NOT NULL, ifname TEXT NOT NULL,
    plugin TEXT NOT NULL, state TEXT NOT NULL, netns TEXT NOT NULL,
    host_ifname TEXT, pool TEXT NOT NULL, ip TEXT, mac TEXT, result TEXT,
    created REAL NOT NULL, updated REAL NOT NULL,
    PRIMARY KEY (network, container_id, ifname)
);
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
CREATE TABLE IF NOT EXISTS docker_endpoints (
    endpoint_id TEXT PRIMARY KEY, network_id TEXT NOT NULL, pool TEXT NOT NULL,
    ip TEXT NOT NULL, address TEXT NOT NULL, mac TEXT NOT NULL, state TEXT NOT NULL,
    host_ifname TEXT NOT NULL, peer_ifname TEXT NOT NULL, sandbox TEXT NOT NULL DEFAULT '',
    docker_pid INTEGER NOT NULL DEFAULT 0, container_name TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL, updated REAL NOT NULL
);
"""


@dataclass
class Attachment:
    network: str
    container_id: str
    ifname: str
    plugin: str
    state: str
    netns: str
    pool: str
    host_ifname: str | None = None
    ip: str | None = None
    mac: str | None = None
    result: dict[str, Any] = field(default_factory=dict)
    created: float = 0.0
    updated: float = 0.0

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.network, self.container_id, self.ifname)


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
class DockerEndpoint:
    endpoint_id: str
    network_id: str
    pool: str
    ip: str
    address: str  # ip/prefix
    mac: str
    state: str  # creating | created | joined | deleting
    host_ifname: str  # our end, on the bridge
    peer_ifname: str  # the end Docker moves into the container (there: ethN)
    sandbox: str = ""  # Docker's SandboxKey (the container's netns file)
    docker_pid: int = 0  # dockerd's pid at Join: its mount namespace holds the sandbox
    container_name: str = ""
    created: float = 0.0
    updated: float = 0.0


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


class StateStore:
    """SQLite file under ``state_dir`` (WAL, 0600); safe across threads."""

    def __init__(self, state_dir: str) -> None:
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        self.path = os.path.join(state_dir, "agent.db")
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                                   timeout=30)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        for statement in SCHEMA.split(";"):
            if statement.strip():
                self._db.execute(statement)
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

    @staticmethod
    def _att(row: sqlite3.Row) -> Attachment:
        return Attachment(
            network=row["network"], container_id=row["container_id"], ifname=row["ifname"],
            plugin=row["plugin"], state=row["state"], netns=row["netns"], pool=row["pool"],
            host_ifname=row["host_ifname"], ip=row["ip"], mac=row["mac"],
            result=json.loads(row["result"]) if row["result"] else {},
            created=row["created"], updated=row["updated"],
        )

    def get(self, network: str, container_id: str, ifname: str) -> Attachment | None:
        with self._lock:
            row = self._db.execute(
                "SELECT * FROM attachments WHERE network=? AND container_id=? AND ifname=?",
                (network, container_id, ifname)).fetchone()
        return self._att(row) if row else None

    def put(self, a: Attachment) -> None:
        now = time.time()
        a.updated = now
        if not a.created:
            a.created = now
        with self._tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO attachments (network, container_id, ifname, plugin, "
                "state, netns, host_ifname, pool, ip, mac, result, created, updated) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (a.network, a.container_id, a.ifname, a.plugin, a.state, a.netns,
                 a.host_ifname, a.pool, a.ip, a.mac, json.dumps(a.result) if a.result else None,
                 a.created, a.updated))

    def delete(self, network: str, container_id: str, ifname: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM attachments WHERE network=? AND container_id=? AND ifname=?",
                       (network, container_id, ifname))

    def all(self, network: str | None = None) -> list[Attachment]:
        with self._lock:
            if network is None:
                rows = self._db.execute("SELECT * FROM attachments ORDER BY created").fetchall()
            else:
                rows = self._db.execute("SELECT * FROM attachments WHERE network=? "
                                        "ORDER BY created", (network,)).fetchall()
        return [self._att(r) for r in rows]

    def queue_release(self, pool: str, container_id: str, ifname: str, ip: str | None,
                      error: str) -> None:
        with self._tx() as db:
            db.execute("INSERT INTO pending_releases (pool, container_id, ifname, ip, queued, "
                       "last_error) VALUES (?, ?, ?, ?, ?, ?)",
                       (pool, container_id, ifname, ip, time.time(), error))

    def pending(self) -> list[PendingRelease]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM pending_releases ORDER BY id").fetchall()
        return [PendingRelease(**dict(zip(r.keys(), r, strict=True))) for r in rows]

    def pending_release(self, pid: int) -> PendingRelease | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM pending_releases WHERE id=?", (pid,)).fetchone()
        return PendingRelease(**dict(zip(row.keys(), row, strict=True))) if row else None

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

    # --- the Docker driver's records ------------------------------------------------

    def docker_network(self, network_id: str) -> DockerNetwork | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM docker_networks WHERE network_id=?",
                                   (network_id,)).fetchone()
        return DockerNetwork(**dict(row)) if row else None

    def docker_networks(self) -> list[DockerNetwork]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM docker_networks ORDER BY created").fetchall()
        return [DockerNetwork(**dict(r)) for r in rows]

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
        with self._lock:
            row = self._db.execute("SELECT * FROM docker_addresses WHERE pool=? AND ip=?",
                                   (pool, ip)).fetchone()
        return DockerAddress(**dict(row)) if row else None

    def docker_addresses(self) -> list[DockerAddress]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM docker_addresses ORDER BY created").fetchall()
        return [DockerAddress(**dict(r)) for r in rows]

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

    def docker_endpoint(self, endpoint_id: str) -> DockerEndpoint | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM docker_endpoints WHERE endpoint_id=?",
                                   (endpoint_id,)).fetchone()
        return DockerEndpoint(**dict(row)) if row else None

    def docker_endpoints(self, network_id: str | None = None) -> list[DockerEndpoint]:
        with self._lock:
            if network_id is None:
                rows = self._db.execute(
                    "SELECT * FROM docker_endpoints ORDER BY created").fetchall()
            else:
                rows = self._db.execute(
                    "SELECT * FROM docker_endpoints WHERE network_id=? ORDER BY created",
                    (network_id,)).fetchall()
        return [DockerEndpoint(**dict(r)) for r in rows]

    def put_docker_endpoint(self, e: DockerEndpoint) -> None:
        now = time.time()
        e.updated = now
        e.created = e.created or now
        with self._tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO docker_endpoints (endpoint_id, network_id, pool, ip, "
                "address, mac, state, host_ifname, peer_ifname, sandbox, docker_pid, "
                "container_name, created, updated) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (e.endpoint_id, e.network_id, e.pool, e.ip, e.address, e.mac, e.state,
                 e.host_ifname, e.peer_ifname, e.sandbox, e.docker_pid, e.container_name,
                 e.created, e.updated))

    def delete_docker_endpoint(self, endpoint_id: str) -> None:
        with self._tx() as db:
            db.execute("DELETE FROM docker_endpoints WHERE endpoint_id=?", (endpoint_id,))

    def close(self) -> None:
        with self._lock:
            self._db.close()
