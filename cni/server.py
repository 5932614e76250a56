"""The agent's CNI socket: one JSON request per connection, one JSON answer.

The plugin shims (:mod:`.shim`, the native front) connect here; the answer
comes from :class:`.handler.CniHandler`. A request with ``"reply": "cni"``
(the native plugin) gets, instead of the JSON answer, the plugin's exit
status on one line and then exactly what the plugin prints
(:func:`.protocol.render_reply`).

The socket is created 0600 (root only) and every peer's credentials are
checked (:mod:`.unixsock`), so only root (or the agent's own user) can plumb
containers.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import socketserver
from typing import Any, Protocol

from .protocol import (
    DECODING_FAILURE,
    INVALID_CONFIG,
    IO_FAILURE,
    TRY_AGAIN_LATER,
    render_reply,
    request_version,
)
from .shim import MAX_CONFIG
from .unixsock import BoundedThreads, peer_allowed, root_only_socket

log = logging.getLogger("netd.cni.server")
#: a request line: the plugins' config limit and room for the env
MAX_REQUEST = MAX_CONFIG + (64 << 10)
#: seconds a client has to send its request line; a silent one holds no worker longer
READ_TIMEOUT = 5.0
#: seconds an answer may take to be taken (a plugin that stopped reading)
WRITE_TIMEOUT = 10.0
#: connections served at once; more are answered "try again later" at once
MAX_CONNECTIONS = 128


class Handler(Protocol):
    def handle(self, request: dict[str, Any]) -> dict[str, Any]: ...


class _Conn(socketserver.StreamRequestHandler):
    server: AgentServer

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(READ_TIMEOUT)

    def handle(self) -> None:
        # the request is read first, also from a caller refused below: closing with it
        # unread would reset the connection before the caller reads why
        try:
            line = self.rfile.readline(MAX_REQUEST + 1)
        except TimeoutError:
            log.info("a client sent no request within %g s; closed", READ_TIMEOUT)
            return
        except OSError:
            return
        if not self.server.peer_allowed(self.connection):
            self._answer({"error": {"code": IO_FAILURE, "msg": "permission denied by the netd "
                                    "agent's socket: root only"}})
            return
        if len(line) > MAX_REQUEST:
            self._answer({"error": {"code": INVALID_CONFIG, "msg": "invalid network config: "
                                    f"the request is larger than {MAX_REQUEST} bytes"}})
            return
        try:
            request = json.loads(line)
            if not isinstance(request, dict):
                raise ValueError("request is not a JSON object")
        except ValueError as exc:
            self._answer({"error": {"code": DECODING_FAILURE,
                                    "msg": f"cannot decode request: {exc}"}})
            return
        self.connection.settimeout(WRITE_TIMEOUT)  # the work itself is not bounded here
        answer = self.server.target.handle(request)
        if request.get("reply") == "cni":
            # the native plugin prints what it gets: the exit status, then stdout as is
            status, out = render_reply(answer, request_version(request.get("config")))
            self._write(f"{status}\n{out}".encode())
        else:
            self._answer(answer)

    def _answer(self, answer: dict[str, Any]) -> None:
        self._write(json.dumps(answer).encode() + b"\n")

    def _write(self, data: bytes) -> None:
        # the plugin may have gone away (runtime timeout); the record says what happened
        with contextlib.suppress(OSError):
            self.wfile.write(data)


class AgentServer(BoundedThreads, socketserver.UnixStreamServer):
    """At most :data:`MAX_CONNECTIONS` connections at once, each for at most
    :data:`READ_TIMEOUT` before its request is in: a flood of silent connections pins
    no more threads than that; those beyond are told to try again later (CNI 11)."""

    request_queue_size = 256

    def __init__(self, path: str, target: Handler,
                 max_connections: int = MAX_CONNECTIONS) -> None:
        self.path = path
        self.target = target
        self.max_connections = max_connections
        with root_only_socket(path):
            super().__init__(path, _Conn)

    def busy(self, request: socket.socket) -> bytes:
        return json.dumps({"error": {
            "code": TRY_AGAIN_LATER, "msg": "try again later: the netd agent is serving "
            f"{self.max_connections} connections"}}).encode() + b"\n"

    def peer_allowed(self, conn: socket.socket) -> bool:
        return peer_allowed(conn)

    def server_close(self) -> None:
        super().server_close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def call(path: str, request: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
    """Send one request to an agent socket (used by ``netd agent status`` and tests)."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(json.dumps(request).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    answer: dict[str, Any] = json.loads(data)
    return answer
