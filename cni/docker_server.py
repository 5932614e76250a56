"""Docker's remote plugin protocol, served over HTTP on a unix socket.

dockerd finds plugins by their socket in ``/run/docker/plugins``: the agent
serves ``/run/docker/plugins/netd.sock`` (``docker_socket`` in agent.toml
moves it; dockerd then needs a spec file naming it) when ``docker_plugin =
true``, and Docker knows the driver and the IPAM driver as ``netd``::

    docker network create -d netd --ipam-driver netd --ipam-opt pool=POOL NAME

Every call is ``POST /<Interface>.<Method>`` with a JSON body (sometimes
empty); the answer is JSON with status 200, or ``{"Err": "..."}`` with a
non-200 status, which Docker shows to the user. Unknown calls get 404 (what
dockerd expects for optional calls such as a capability query), malformed
JSON 400. Requests are served concurrently, one thread per connection, at
most :data:`MAX_CONNECTIONS` at once (more are answered 503 at once); a
connection that sends nothing for :data:`IDLE_TIMEOUT` seconds is closed
(dockerd opens a new one when it needs to). The socket is 0600 and only
root's (or the agent's own user's) connections are served (:mod:`.unixsock`).
The meaning of the calls is in :mod:`.docker_driver`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any, Protocol

from .docker_driver import PluginError
from .unixsock import BoundedThreads, peer_credentials, root_only_socket

log = logging.getLogger("netd.cni.docker")

DEFAULT_SOCKET = "/run/docker/plugins/netd.sock"
CONTENT_TYPE = "application/vnd.docker.plugins.v1+json"
MAX_BODY = 1 << 20
#: seconds a connection may stay silent (between requests, or within one) before it is closed
IDLE_TIMEOUT = 30.0
MAX_CONNECTIONS = 128


class Driver(Protocol):
    def call(self, method: str, request: dict[str, Any], peer_pid: int = 0) -> dict[str, Any]: ...


class _Handler(BaseHTTPRequestHandler):
    server: PluginServer
    protocol_version = "HTTP/1.1"  # keep-alive: dockerd reuses its connections
    timeout = IDLE_TIMEOUT  # the socket's timeout (StreamRequestHandler.setup)

    def address_string(self) -> str:  # AF_UNIX peers have no address
        return "dockerd"

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("docker plugin: " + format, *args)

    def _answer(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        with contextlib.suppress(OSError):  # dockerd may have given up waiting
            self.send_response(status)
            self.send_header("Content-Type", CONTENT_TYPE)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    def do_POST(self) -> None:
        pid, uid, _ = peer_credentials(self.connection)
        if uid not in (0, os.getuid()):
            self._answer(403, {"Err": "netd: permission denied: root only"})
            return
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_BODY:
            self.close_connection = True
            self._answer(400, {"Err": "netd: bad or missing Content-Length"})
            return
        raw = self.rfile.read(length) if length else b""
        method = self.path.lstrip("/")
        try:
            request = json.loads(raw) if raw.strip() else {}
            if not isinstance(request, dict):
                raise ValueError("the request is not a JSON object")
        except ValueError as exc:
            self._answer(400, {"Err": f"netd: cannot decode {method} request: {exc}"})
            return
        log.debug("docker plugin: %s %s", method, raw[:2000])
        try:
            answer = self.server.driver.call(method, request, pid)
        except PluginError as exc:
            if exc.status != 404:
                log.warning("docker plugin: %s refused: %s", method, exc.message)
            self._answer(exc.status, {"Err": exc.message})
            return
        self._answer(200, answer)

    def _not_allowed(self) -> None:
        self._answer(405, {"Err": "netd: the plugin protocol uses POST"})

    do_GET = do_PUT = do_DELETE = do_PATCH = do_HEAD = _not_allowed


class PluginServer(BoundedThreads, HTTPServer):
    address_family = socket.AF_UNIX
    request_queue_size = 256

    def __init__(self, path: str, driver: Driver,
                 max_connections: int = MAX_CONNECTIONS) -> None:
        self.path = path
        self.driver = driver
        self.max_connections = max_connections
        with root_only_socket(path):
            super().__init__(path, _Handler)  # type: ignore[arg-type]

    def busy(self, request: socket.socket) -> bytes:
        body = json.dumps({"Err": f"netd: busy serving {self.max_connections} connections; "
                                  "try again"}).encode()
        return (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: " + CONTENT_TYPE.encode()
                + b"\r\nContent-Length: " + str(len(body)).encode()
                + b"\r\nConnection: close\r\n\r\n" + body)

    def server_bind(self) -> None:
        # HTTPServer.server_bind looks up a host name, which a unix socket has not
        self.socket.bind(self.server_address)
        self.server_name, self.server_port = "localhost", 0

    def handle_error(self, request: Any, client_address: Any) -> None:
        # dockerd dropping a kept-alive connection (it restarts) is no error of ours
        exc = sys.exc_info()[1]
        if isinstance(exc, ConnectionError):
            log.debug("docker plugin: connection closed by dockerd: %s", exc)
            return
        log.exception("docker plugin: error serving a connection")

    def server_close(self) -> None:
        super().server_close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
