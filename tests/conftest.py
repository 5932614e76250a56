"""Shared test fixtures.

Real-component tests skip on a developer's laptop when the component is
missing, but under CI (``CI=true``) a skip is turned into a failure: CI must
prove the real thing, not quietly skip it.
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


def require(condition: bool, why: str) -> None:
    """Skip (laptop) or fail (CI) when a real component is missing."""
    if not condition:
        if IN_CI:
            pytest.fail(f"required component missing under CI: {why}")
        pytest.skip(why)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if IN_CI and report.skipped and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.longrepr = f"skipped under CI=true, which counts as a failure: {reason}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def bin_path(name: str) -> str:
    """A console script of this checkout's venv (the installed entry point)."""
    path = VENV_BIN / name
    require(path.exists(), f"{name} is not installed in {VENV_BIN}; run 'make venv'")
    return str(path)


@dataclass
class Server:
    url: str
    token: str
    db: Path
    proc: subprocess.Popen[bytes]
    log: Path
    store_url: str = ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_server(tmp: Path, *, token: str | None = None, db: Path | None = None,
                 read_token: str | None = None, extra: list[str] | None = None,
                 store: str | None = None) -> Server:
    """Start ``netd ipam serve`` as a real process on loopback and wait for /healthz.

    ``extra`` containing ``--no-token`` leaves ``--token-file`` out; ``store`` is a
    store URL instead of the SQLite file ``db``."""
    port = free_port()
    token = token if token is not None else secrets.token_hex(16)
    db = db or tmp / "ipam.db"
    log = tmp / f"server-{port}.log"
    extra = list(extra or [])
    cmd = [bin_path("netd"), "ipam", "serve", "--listen", f"127.0.0.1:{port}",
           "--store", store or f"sqlite:///{db}"]
    for flag, value in (("--token-file", token), ("--read-token-file", read_token)):
        if value is None or (flag == "--token-file" and "--no-token" in extra):
            continue
        path = tmp / f"{flag[2:]}-{port}"
        path.write_text(value + "\n")
        path.chmod(0o600)
        cmd += [flag, str(path)]
    cmd += [e for e in extra if e != "--no-token"]
    proc = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {log.read_text()}")
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                return Server(url, token, db, proc, log, store or f"sqlite:///{db}")
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"server did not become healthy: {log.read_text()}")


def ipam_check(store_url: str) -> str:
    """``netd ipam check --store URL`` must find the store consistent; its report."""
    proc = subprocess.run([bin_path("netd"), "ipam", "check", "--store", store_url],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, f"ipam check: {proc.stdout[-3000:]}{proc.stderr[-2000:]}"
    return proc.stdout


def every_event(get: Any, **params: Any) -> list[dict[str, Any]]:
    """The whole event log through ``GET /v1/history``, page after page (``get``: an
    httpx get, e.g. ``client.get``)."""
    out: list[dict[str, Any]] = []
    after = 0
    while True:
        page = get("/v1/history", params={**params, "limit": 1000, "after": after}).json()
        out += page["events"]
        if len(page["events"]) < 1000:
            return out
        after = page["events"][-1]["id"]


def every_address(get: Any, **params: Any) -> list[dict[str, Any]]:
    """Every allocation through ``GET /v1/addresses``, following ``next``."""
    out: list[dict[str, Any]] = []
    after = None
    while True:
        page = get("/v1/addresses", params={**params, "limit": 1000,
                                             **({"after": after} if after else {})}).json()
        out += page["addresses"]
        after = page.get("next")
        if not after:
            return out


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    """A real IPAM server process on loopback with a fresh SQLite store and a token."""
    srv = start_server(tmp_path)
    try:
        yield srv
    finally:
        srv.stop()


# --- the IPAM's stores: SQLite, and a real etcd (one member for the whole session) -----------


@pytest.fixture(scope="session", autouse=True)
def _stop_shared_etcd() -> Iterator[None]:
    """The session's etcd member (started by whichever test first needed it) goes with it."""
    yield
    from tests.support import etcd

    etcd.stop_shared()


@pytest.fixture(scope="session")
def etcd_cluster() -> Any:
    from tests.support import etcd

    cluster = etcd.shared_cluster()
    require(cluster is not None, "etcd is missing (apt-get install etcd-server)")
    return cluster


@pytest.fixture(params=["sqlite", pytest.param("etcd", marks=pytest.mark.real)])
def store(request: pytest.FixtureRequest) -> Iterator[Any]:
    """Each IPAM store in turn: SQLite in memory, etcd on a key prefix of its own."""
    from netd.ipam.store import SqliteStore

    if request.param == "sqlite":
        s = SqliteStore(":memory:")
        yield s
        s.close()
        return
    from tests.support import etcd

    cluster = request.getfixturevalue("etcd_cluster")
    es = etcd.fresh_store(cluster)
    yield es
    etcd.drop_store(es)
