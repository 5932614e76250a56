"""The agent's socket (cni/server.py) under clients that misbehave: silent, slow, too big,
not root. The server is the real one; what it serves is a stand-in that echoes."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from netd.cni import server as agent_server
from netd.cni import shim
from netd.cni.server import AgentServer
from tests.conftest import require
from tests.unit.test_cni_shim import ATTACH, PYTHON, SHIM, native_plugin, netconf

NOBODY = 65534


class Echo:
    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []

    def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        self.requests.append(request)
        return {"result": {"cniVersion": "1.0.0", "command": request.get("command")}}


class Served:
    def __init__(self, path: Path, server: AgentServer, target: Echo) -> None:
        self.path, self.server, self.target = path, server, target

    def ask(self, line: bytes, timeout: float = 10.0) -> dict[str, Any]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(self.path))
            s.sendall(line)
            return dict(json.loads(s.makefile("rb").readline()))


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> Iterator[Served]:
    monkeypatch.setattr(agent_server, "READ_TIMEOUT", 0.5)
    where = Path(tempfile.mkdtemp(prefix="netd-sock-", dir="/tmp"))
    target = Echo()
    server = AgentServer(str(where / "agent.sock"), target, max_connections=16)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield Served(where / "agent.sock", server, target)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
        shutil.rmtree(where, ignore_errors=True)


def request_line(**extra: Any) -> bytes:
    return json.dumps({"plugin": "netd-cni", "command": "ADD", "env": {}, "config": {},
                       **extra}).encode() + b"\n"


def serving_threads() -> int:
    return sum(1 for t in threading.enumerate() if "process_request_thread" in t.name)


def test_the_socket_is_root_only(served: Served) -> None:
    st = os.stat(served.path)
    assert st.st_mode & 0o777 == 0o600 and st.st_uid == 0


def test_silent_clients_hold_no_worker_for_long_and_are_bounded(served: Served) -> None:
    """200 connections that never send a line: at most 16 are served (the rest are told 11
    at once), each is closed after the read timeout, then a real request is served."""
    silent = []
    try:
        for _ in range(200):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(10)
            s.connect(str(served.path))
            silent.append(s)
        time.sleep(0.2)
        assert serving_threads() <= 16
        told = [s for s in silent[16:] if b'"code": 11' in s.recv(4096)]
        assert len(told) == len(silent) - 16
        # the first 16 are closed by the agent after READ_TIMEOUT (0.5 s here)
        for s in silent[:16]:
            assert s.recv(4096) == b""
    finally:
        for s in silent:
            s.close()
    deadline = time.monotonic() + 5
    while serving_threads() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert serving_threads() == 0
    assert served.ask(request_line())["result"]["command"] == "ADD"
    assert served.target.requests and len(served.target.requests) == 1


def test_a_slow_client_is_cut_off(served: Served) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(served.path))
        s.sendall(b'{"plugin": "netd-cni", ')  # and never the rest
        started = time.monotonic()
        assert s.recv(4096) == b""
        assert time.monotonic() - started < 5
    assert served.target.requests == []


def test_oversize_and_undecodable_requests(served: Served) -> None:
    huge = request_line(config={"pad": "x" * (agent_server.MAX_REQUEST + 1)})
    answer = served.ask(huge)
    assert answer["error"]["code"] == 7 and "larger than" in answer["error"]["msg"]
    assert served.ask(b"not json\n")["error"]["code"] == 6
    assert served.ask(b"[1]\n")["error"]["code"] == 6
    assert served.target.requests == []
    assert agent_server.MAX_REQUEST > shim.MAX_CONFIG  # what the plugins send always fits


@pytest.mark.parametrize("front", ["shim.py", "native"])
def test_a_caller_who_is_not_root_is_refused_with_5(served: Served, front: str) -> None:
    """Through the plugin, as a user who is not root: the socket file refuses it (EACCES);
    opened up by hand, the agent's own peer check does (SO_PEERCRED). Both are 5, from
    both fronts."""
    require(os.geteuid() == 0, "needs root to run the plugin as another user")
    os.chmod(served.path.parent, 0o755)
    argv = [PYTHON, "-I", "-S", str(SHIM)]
    if front == "native":  # a copy nobody may run (the build's directory is root's)
        shutil.copy(native_plugin() / "netd-cni", served.path.parent / "netd-cni")
        argv = [str(served.path.parent / "netd-cni")]
    env = {"PATH": "/usr/bin:/bin", "CNI_COMMAND": "ADD", **ATTACH}

    def as_nobody() -> dict[str, Any]:
        proc = subprocess.run(argv, input=netconf(served.path).encode(), env=env, user=NOBODY,
                              group=NOBODY, capture_output=True, timeout=60)
        assert proc.returncode == 1, proc.stderr
        return dict(json.loads(proc.stdout))

    by_the_file = as_nobody()
    assert by_the_file["code"] == 5 and "permission denied" in by_the_file["msg"]
    os.chmod(served.path, 0o666)
    by_the_agent = as_nobody()
    assert by_the_agent["code"] == 5 and "root only" in by_the_agent["msg"]
    assert served.target.requests == []
