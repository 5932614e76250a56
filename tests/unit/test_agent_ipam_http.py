"""The agent's IPAM client (http.client, pooled) against a small local HTTP/1.1 server."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from netd.agent.ipam_http import AgentIpamClient
from netd.errors import NetdError, PoolNotFound, Unauthorized, Unavailable

Reply = tuple[int, bytes]


class Server:
    """Records requests; ``reply(method, path, body) -> (status, body)`` answers them."""

    def __init__(self, reply: Callable[[str, str, bytes], Reply]) -> None:
        self.reply = reply
        self.requests: list[dict[str, Any]] = []
        self.connections: set[tuple[str, int]] = set()
        self.sockets: list[socket.socket] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                outer.connections.add(self.client_address)
                outer.sockets.append(self.connection)
                outer.requests.append({"method": self.command, "path": self.path,
                                       "headers": dict(self.headers), "body": body})
                status, data = outer.reply(self.command, self.path, body)
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_DELETE = _serve

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def drop_connections(self) -> None:
        """Close every connection from the server's side, as a server's idle timeout does."""
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self.sockets.clear()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def serve() -> Iterator[Callable[[Callable[[str, str, bytes], Reply]], Server]]:
    made: list[Server] = []

    def start(reply: Callable[[str, str, bytes], Reply]) -> Server:
        made.append(Server(reply))
        return made[-1]

    yield start
    for s in made:
        s.close()


def ok(doc: dict[str, Any]) -> Reply:
    return 200, json.dumps(doc).encode()


def test_requests_headers_and_keep_alive(serve: Any) -> None:
    srv = serve(lambda m, p, b: ok({"ip": "198.18.0.50", "echo": json.loads(b or b"{}")}))
    with AgentIpamClient(srv.url, token="s3cret", actor="agent:h1", timeout=5) as c:
        got = c.allocate("lab", "c1", "eth0", host="h1", labels={"netd.network": "n"})
        assert got["ip"] == "198.18.0.50"
        assert got["echo"] == {"pool": "lab", "container_id": "c1", "ifname": "eth0",
                               "host": "h1", "netns": "", "labels": {"netd.network": "n"}}
        c.release(pool="lab", container_id="c1", ifname="eth0")
        c.addresses(pool="lab", host="h1")
    first = srv.requests[0]
    assert (first["method"], first["path"]) == ("POST", "/v1/allocate")
    assert first["headers"]["Authorization"] == "Bearer s3cret"
    assert first["headers"]["X-Netd-Actor"] == "agent:h1"
    assert first["headers"]["Content-Type"] == "application/json"
    assert srv.requests[2]["path"] == "/v1/addresses?pool=lab&host=h1&limit=1000"
    assert len(srv.connections) == 1  # one kept-alive connection for all three


def test_errors_are_the_clients_errors(serve: Any) -> None:
    answers = {
        "/v1/allocate": (404, json.dumps({"error": {"code": "pool_not_found",
                                                    "message": "pool 'x' does not exist"}})),
        "/v1/release": (401, json.dumps({"detail": "bad token"})),
        "/healthz": (503, json.dumps({"error": {"code": "unavailable",
                                                "message": "store is locked"}})),
        "/v1/hosts": (200, "not json"),
        "/v1/pools": (200, "[1, 2]"),
    }
    srv = serve(lambda m, p, b: (answers[p][0], answers[p][1].encode()))
    with AgentIpamClient(srv.url, timeout=5) as c:
        with pytest.raises(PoolNotFound, match="does not exist"):
            c.allocate("x", "c1")
        with pytest.raises(Unauthorized, match="bad token"):
            c.release(pool="x", container_id="c1", ifname="eth0")
        with pytest.raises(Unavailable, match="locked"):
            c.health()
        with pytest.raises(NetdError, match="non-JSON"):
            c.hosts()
        with pytest.raises(NetdError, match="unexpected"):
            c.list_pools()


def test_unreachable_and_slow_servers_are_unavailable() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with AgentIpamClient(f"http://127.0.0.1:{port}", timeout=1) as c, \
            pytest.raises(Unavailable, match="cannot reach"):
        c.health()
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)  # accepts (in the backlog), never answers
    try:
        with AgentIpamClient(f"http://127.0.0.1:{silent.getsockname()[1]}",
                             timeout=0.3) as c, pytest.raises(Unavailable, match="in time"):
            c.health()
    finally:
        silent.close()


@pytest.mark.parametrize("noticed", [True, False])
def test_a_connection_the_server_closed_is_replaced(serve: Any, noticed: bool,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The server drops idle keep-alive connections (uvicorn after 5 s) without a word.

    Noticed before reuse (the socket reads EOF), or not (a race): a new connection,
    and the request sent once more.
    """
    srv = serve(lambda m, p, b: ok({"status": "ok"}))
    with AgentIpamClient(srv.url, timeout=5) as c:
        assert c.health() == {"status": "ok"}
        srv.drop_connections()
        if not noticed:
            import netd.agent.ipam_http as mod

            monkeypatch.setattr(mod.select, "select", lambda r, w, x, t: ([], [], []))
        assert c.health() == {"status": "ok"}
    assert len(srv.connections) == 2
