"""The agent's IPAM client: :class:`netd.ipam.client.Client` over ``http.client``.

Every ADD allocates and every DEL releases through the IPAM API, so the
client's own cost is on the critical path of each container start. httpx
spends ~1 ms of CPU per request in its layers (request model, URL parsing,
auth and event hooks); ``http.client`` on a kept-alive connection ~0.2 ms.
Same methods, same answers, same errors (:func:`~netd.ipam.client.error_from_response`
builds them), same timeouts; connections are pooled per client and a
connection the server closed while idle is replaced, and the request retried
once, before anything was read from it.
"""

from __future__ import annotations

import http.client
import json
import select
import threading
from typing import Any
from urllib.parse import urlencode, urlsplit

import httpx

from netd.errors import NetdError, Unavailable
from netd.ipam.client import Client, error_from_response

MAX_IDLE = 16


class AgentIpamClient(Client):
    """:class:`Client` whose requests go over pooled ``http.client`` connections."""

    def __init__(self, base_url: str, token: str | None = None, actor: str = "api",
                 timeout: float = 10.0) -> None:
        super().__init__(base_url, token=token, actor=actor, timeout=timeout)
        url = urlsplit(self.base_url)
        self._https = url.scheme == "https"
        self._host = url.hostname or "127.0.0.1"
        self._port = url.port or (443 if self._https else 80)
        self._prefix = url.path.rstrip("/")
        self._timeout = timeout
        self._headers = {name: self._http.headers[name]
                         for name in ("Authorization", "X-Netd-Actor", "Accept")
                         if name in self._http.headers}
        self._idle: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
        super().close()

    def _connection(self) -> tuple[http.client.HTTPConnection, bool]:
        """A kept-alive connection the server has not closed, or a new one; (conn, reused)."""
        while True:
            with self._lock:
                conn = self._idle.pop() if self._idle else None
            if conn is None:
                cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
                return cls(self._host, self._port, timeout=self._timeout), False
            sock = conn.sock
            if sock is not None:
                readable, _, _ = select.select([sock], [], [], 0)
                if not readable:  # idle and open: reuse (readable means closed or garbage)
                    return conn, True
            conn.close()

    def _release_connection(self, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            if len(self._idle) < MAX_IDLE:
                self._idle.append(conn)
                return
        conn.close()

    def _exchange(self, method: str, target: str,
                  payload: bytes | None) -> tuple[int, dict[str, str], bytes]:
        headers = dict(self._headers)
        if payload is not None:
            headers["Content-Type"] = "application/json"
        for attempt in (0, 1):
            conn, reused = self._connection()
            try:
                conn.request(method, target, body=payload, headers=headers)
                response = conn.getresponse()
                data = response.read()
            except (http.client.RemoteDisconnected, BrokenPipeError,
                    ConnectionResetError) as exc:
                conn.close()
                if reused and attempt == 0:
                    continue  # the server closed the idle connection: once more, new one
                raise Unavailable(f"cannot reach IPAM server at {self.base_url}: {exc}") from exc
            except TimeoutError as exc:
                conn.close()
                raise Unavailable(f"IPAM server at {self.base_url} did not answer in time "
                                  f"({type(exc).__name__})") from exc
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                raise Unavailable(f"cannot reach IPAM server at {self.base_url}: {exc}") from exc
            if response.will_close:
                conn.close()
            else:
                self._release_connection(conn)
            return response.status, dict(response.getheaders()), data
        raise AssertionError("unreachable")

    #: netd.agent.metrics.AgentMetrics: every call timed, failures counted (when on)
    metrics: Any = None

    def _request(self, method: str, path: str, *, params: dict[str, Any] | None = None,
                 body: dict[str, Any] | None = None) -> dict[str, Any]:
        if self.metrics is not None:  # the call: /v1/allocate -> allocate, /v1/pools/x -> pools
            parts = path.strip("/").split("/")
            call = parts[1] if parts[0] == "v1" and len(parts) > 1 else parts[0] or path
            return self.metrics.ipam_call(  # type: ignore[no-any-return]
                call, lambda: self._send(method, path, params, body))
        return self._send(method, path, params, body)

    def _send(self, method: str, path: str, params: dict[str, Any] | None,
              body: dict[str, Any] | None) -> dict[str, Any]:
        query = {k: v for k, v in (params or {}).items() if v is not None}
        target = self._prefix + path + (f"?{urlencode(query)}" if query else "")
        payload = None if body is None else json.dumps(body).encode()
        status, headers, data = self._exchange(method, target, payload)
        if status >= 400:
            request = httpx.Request(method, self.base_url + target)
            raise error_from_response(httpx.Response(status, headers=headers, content=data,
                                                     request=request))
        try:
            doc = json.loads(data)
        except ValueError as exc:
            raise NetdError(
                f"IPAM server at {self.base_url} sent a non-JSON answer to {method} {path}"
            ) from exc
        if not isinstance(doc, dict):
            raise NetdError(
                f"IPAM server at {self.base_url} sent an unexpected answer to {method} {path}")
        return doc


__all__ = ["AgentIpamClient"]
