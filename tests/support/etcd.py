"""A real etcd (Debian's etcd-server 3.4) for the tests: 1 or 3 members on loopback.

Each member gets free ports, its own data directory under the test's tmp
directory, and ``--max-txn-ops`` large enough for the IPAM's transactions
(docs/ETCD.md); everything is killed and removed by :meth:`EtcdCluster.stop`.
Tests use a key prefix of their own, so clusters could be shared.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

ETCD = "/usr/bin/etcd"
PACKAGE = "etcd-server"


def available() -> bool:
    return os.access(ETCD, os.X_OK)


def ensure_etcd() -> bool:
    """Install Debian's etcd-server when it is missing (tests install what they need)."""
    if available():
        return True
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return False
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "install", "-y", "-q", PACKAGE], env=env, capture_output=True,
                   timeout=600, check=False)
    return available()


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(int(s.getsockname()[1]))
    for s in socks:
        s.close()
    return ports


@dataclass
class Member:
    name: str
    client_port: int
    peer_port: int
    data: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@dataclass
class EtcdCluster:
    base: Path
    size: int = 3
    tag: str = "netd"
    # TLS: (CA, server certificate, key) for the members; (certificate, key) of a client
    tls: tuple[Path, Path, Path] | None = None
    client_tls: tuple[Path, Path] | None = None
    members: list[Member] = field(default_factory=list)

    def __post_init__(self) -> None:
        ports = _free_ports(2 * self.size)
        for i in range(self.size):
            name = f"{self.tag}-m{i}"
            self.members.append(Member(name, ports[2 * i], ports[2 * i + 1],
                                       self.base / name, self.base / f"{name}.log"))

    @property
    def endpoints(self) -> list[str]:
        return [m.endpoint for m in self.members]

    def url(self, prefix: str = "/netd/ipam/") -> str:
        return f"etcd://{','.join(self.endpoints)}{prefix}"

    def _argv(self, m: Member) -> list[str]:
        initial = ",".join(f"{x.name}=http://127.0.0.1:{x.peer_port}" for x in self.members)
        scheme = "https" if self.tls else "http"
        tls = [] if self.tls is None else [
            "--trusted-ca-file", str(self.tls[0]), "--cert-file", str(self.tls[1]),
            "--key-file", str(self.tls[2]), "--client-cert-auth"]
        return [ETCD, "--name", m.name, "--data-dir", str(m.data), *tls,
                "--listen-client-urls", f"{scheme}://{m.endpoint}",
                "--advertise-client-urls", f"{scheme}://{m.endpoint}",
                "--listen-peer-urls", f"http://127.0.0.1:{m.peer_port}",
                "--initial-advertise-peer-urls", f"http://127.0.0.1:{m.peer_port}",
                "--initial-cluster", initial, "--initial-cluster-state", "new",
                "--initial-cluster-token", self.tag, "--max-txn-ops", "10000",
                "--heartbeat-interval", "100", "--election-timeout", "1000",
                "--logger", "zap", "--log-outputs", "stderr"]

    def start_member(self, m: Member) -> None:
        m.data.mkdir(parents=True, exist_ok=True, mode=0o700)
        with m.log.open("ab") as log:
            m.proc = subprocess.Popen(self._argv(m), stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True)

    def start(self, timeout: float = 30.0) -> float:
        t0 = time.monotonic()
        for m in self.members:
            self.start_member(m)
        self.wait_healthy(timeout)
        return time.monotonic() - t0

    def wait_healthy(self, timeout: float = 30.0) -> None:
        from netd.ipam.etcd_kv import EtcdClient, Tls

        tls = None
        if self.tls is not None and self.client_tls is not None:
            tls = Tls(self.tls[0].read_bytes(), self.client_tls[0].read_bytes(),
                      self.client_tls[1].read_bytes())
        client = EtcdClient([m.endpoint for m in self.members if m.alive], timeout=1.0,
                            budget=timeout, tls=tls)
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    client.put(b"/netd-test/health", b"ok")
                    return
                except Exception:
                    if time.monotonic() > deadline:
                        raise RuntimeError("etcd did not become healthy: "
                                           + self.tail()) from None
                    time.sleep(0.1)
        finally:
            client.close()

    def leader(self) -> Member:
        """The member that leads now (by asking each one)."""
        from netd.ipam.etcd_kv import EtcdClient

        for m in self.members:
            if not m.alive:
                continue
            client = EtcdClient([m.endpoint], timeout=1.0, budget=2.0)
            try:
                st = client.status(m.endpoint)
                if st.leader == st.header.member_id:
                    return m
            except Exception:
                continue
            finally:
                client.close()
        raise RuntimeError("no etcd leader")

    def term(self) -> int:
        """The highest raft term a live member reports (an election raises it)."""
        from netd.ipam.etcd_kv import EtcdClient

        best = 0
        for m in self.members:
            if not m.alive:
                continue
            client = EtcdClient([m.endpoint], timeout=1.0, budget=2.0)
            try:
                best = max(best, int(client.status(m.endpoint).raftTerm))
            except Exception:
                continue
            finally:
                client.close()
        return best

    def kill(self, m: Member) -> None:
        if m.proc is not None and m.proc.poll() is None:
            os.killpg(m.proc.pid, signal.SIGKILL)
            m.proc.wait(10)

    def restart(self, m: Member) -> None:
        self.kill(m)
        argv = self._argv(m)
        argv[argv.index("new")] = "existing"
        m.data.mkdir(parents=True, exist_ok=True)
        with m.log.open("ab") as log:
            m.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True)

    def tail(self, lines: int = 20) -> str:
        out = []
        for m in self.members:
            with contextlib.suppress(OSError):
                out.append(f"--- {m.name}\n" + "\n".join(
                    m.log.read_text(errors="replace").splitlines()[-lines:]))
        return "\n".join(out)

    def stop(self) -> None:
        for m in self.members:
            with contextlib.suppress(Exception):
                self.kill(m)
        for m in self.members:
            shutil.rmtree(m.data, ignore_errors=True)


# --- one member for the whole test run (the store tests: a key prefix each) ----------------

_shared: EtcdCluster | None = None


def shared_cluster() -> EtcdCluster | None:
    """A one-member etcd started on first use, stopped by :func:`stop_shared` (the test
    session's end); None when etcd cannot be had."""
    global _shared
    if _shared is None:
        if not ensure_etcd():
            return None
        import tempfile

        base = Path(tempfile.mkdtemp(prefix="netd-etcd-"))
        cluster = EtcdCluster(base, size=1, tag=f"netd-{os.getpid()}")
        cluster.start()
        _shared = cluster
    return _shared


def stop_shared() -> None:
    global _shared
    if _shared is not None:
        _shared.stop()
        shutil.rmtree(_shared.base, ignore_errors=True)
        _shared = None


def fresh_store(cluster: EtcdCluster, **kwargs: object) -> object:
    """An EtcdStore on a key prefix of its own (removed again by :func:`drop_store`)."""
    import secrets

    from netd.ipam.etcd_store import EtcdStore

    return EtcdStore(cluster.url(f"/netd-test/{secrets.token_hex(6)}/"), **kwargs)  # type: ignore[arg-type]


def drop_store(store: object) -> None:
    """Remove everything under the store's prefix, and close it."""
    from netd.ipam.etcd_kv import prefix_end
    from netd.ipam.etcd_store import EtcdStore

    assert isinstance(store, EtcdStore)
    p = store.prefix.encode()
    with contextlib.suppress(Exception):
        store.client.delete_range(p, prefix_end(p))
    store.close()
