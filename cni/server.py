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

from .protocol import render_reply, request_version
from .unixsock import peer_allowed, root_only_socket

log = logging.getLogger("netd.cni.server")
MAX_REQUEST = 4 << 20


class Handler(Protocol):
    def handle(self, request: dict[str, Any]) -> dict[str, Any]: ...


class _Conn(socketserver.StreamRequestHandler):
    server: AgentServer

    def handle(self) -> None:
        if not self.server.peer_allowed(self.connection):
            self._answer({"error": {"code": 4, "msg": "permission denied: root only"}})
            return
        line = self.rfile.readline(MAX_REQUEST)
        try:
            request = json.loads(line)
            if not isinstance(request, dict):
                raise ValueError("request is not a JSON object")
        except ValueError as exc:
            self._answer({"error": {"code": 6, "msg": f"cannot decode request: {exc}"}})
            return
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


class AgentServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    request_queue_size = 256

    def __init__(self, path: str, target: Handler) -> None:
        self.path = path
        self.target = target
        with root_only_socket(path):
            super().__init__(path, _Conn)

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
