"""Synchronous Python client for the IPAM HTTP API (see docs/API.md).

Small on purpose: the host agent and ``netctl`` both use it. Methods return
the decoded JSON answer; error answers raise the matching
:mod:`netd.errors` class (by ``code``), and a server that cannot be reached
raises :class:`netd.errors.Unavailable`.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any, Protocol
from urllib.parse import quote

import httpx

from netd import errors
from netd.errors import NetdError, Unavailable

DEFAULT_URL = "http://127.0.0.1:9650"

# stable code -> exception class, built from the hierarchy itself
_BY_CODE: dict[str, type[NetdError]] = {}


def _index(cls: type[NetdError]) -> None:
    _BY_CODE.setdefault(cls.code, cls)
    for sub in cls.__subclasses__():
        _index(sub)


_index(NetdError)

_BY_STATUS: dict[int, type[NetdError]] = {
    401: errors.Unauthorized,
    403: errors.Unauthorized,
    404: errors.NotFound,
    409: errors.Conflict,
    422: errors.InvalidInput,
    400: errors.InvalidInput,
    503: errors.Unavailable,
}


def error_from_response(response: httpx.Response) -> NetdError:
    """Turn a non-2xx answer into the matching :class:`NetdError`."""
    code: str | None = None
    message: str | None = None
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict):
            if isinstance(err.get("code"), str):
                code = err["code"]
            if isinstance(err.get("message"), str):
                message = err["message"]
        elif isinstance(body.get("detail"), str):  # a bare FastAPI/Starlette error
            message = body["detail"]
    if message is None:
        text = response.text.strip().replace("\n", " ")[:200]
        message = f"HTTP {response.status_code} from {response.request.url}" + (
            f": {text}" if text else "")
    cls = _BY_CODE.get(code) if code else None
    if cls is not None:
        return cls(message)
    fallback = _BY_STATUS.get(response.status_code, NetdError)
    # keep an unknown code visible to callers that match on it
    return fallback(message, code=code) if code else fallback(message)


def _check_url(base_url: str) -> str:
    """The server's base URL without a trailing slash; InvalidInput when unusable."""
    try:
        url = httpx.URL(base_url)
    except httpx.InvalidURL as exc:
        raise errors.InvalidInput(f"invalid server URL {base_url!r}: {exc}") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise errors.InvalidInput(
            f"invalid server URL {base_url!r}: expected http://HOST[:PORT] or https://...")
    return base_url.rstrip("/")


def _seg(value: str) -> str:
    """One URL path segment, escaped (pool names and addresses)."""
    return quote(value, safe=":")


PAGE = 1000  # the server's largest page


class IpamApi(Protocol):
    """What the host agent and the Docker driver call on the IPAM (fakes implement this)."""

    def health(self) -> dict[str, Any]: ...
    def list_pools(self) -> dict[str, Any]: ...
    def get_pool(self, name: str) -> dict[str, Any]: ...
    def allocate(self, pool: str, container_id: str, ifname: str = "eth0", host: str = "",
                 netns: str = "", labels: dict[str, str] | None = None, ip: str | None = None,
                 mac: str | None = None, handle: str | None = None) -> dict[str, Any]: ...
    def release(self, pool: str | None = None, container_id: str | None = None,
                ifname: str | None = None, ip: str | None = None,
                force: bool = False) -> dict[str, Any]: ...
    def reserve(self, pool: str, range: str, note: str = "") -> dict[str, Any]: ...
    def update(self, ip: str, container_id: str, ifname: str | None = None,
               new_container_id: str | None = None,
               labels: dict[str, str] | None = None) -> dict[str, Any]: ...
    def show(self, ip: str) -> dict[str, Any]: ...
    def addresses(self, pool: str | None = None, host: str | None = None, limit: int = 1000,
                  after: str | None = None) -> dict[str, Any]: ...
    def blocks(self, pool: str | None = None, host: str | None = None) -> dict[str, Any]: ...


def all_addresses(api: IpamApi, pool: str | None = None,
                  host: str | None = None) -> list[dict[str, Any]]:
    """Every allocation through any :class:`IpamApi`, following each page's ``next``."""
    out: list[dict[str, Any]] = []
    after: str | None = None
    while True:
        page = api.addresses(pool=pool, host=host, limit=PAGE, after=after)
        out += page.get("addresses") or []
        after = page.get("next")
        if not after:
            return out


class Client:
    """IPAM API client: one keep-alive ``httpx.Client`` per instance."""

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        token: str | None = None,
        actor: str = "api",
        timeout: float = 10.0,
        *,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.base_url = _check_url(base_url)
        # the API takes <= 64 printable ASCII characters; never fail a call over it
        actor = "".join(c for c in actor if " " <= c <= "~")[:64] or "api"
        headers = {"X-Netd-Actor": actor, "Accept": "application/json"}
        if token:
            token = token.strip()
            if not all("!" <= c <= "~" for c in token):
                raise errors.InvalidInput("the API token has characters a header cannot carry")
            headers["Authorization"] = f"Bearer {token}"
        self._http = httpx.Client(
            base_url=self.base_url, headers=headers, timeout=timeout, transport=transport
        )

    # --- plumbing -------------------------------------------------------------

    def close(self) -> None:
        """Close the underlying connection pool."""
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _request(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, Any] | None = None,
        body: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        query = {k: v for k, v in (params or {}).items() if v is not None}
        try:
            response = self._http.request(method, path, params=query or None, json=body)
        except httpx.TimeoutException as exc:
            raise Unavailable(
                f"IPAM server at {self.base_url} did not answer in time ({type(exc).__name__})"
            ) from exc
        except httpx.TransportError as exc:
            raise Unavailable(f"cannot reach IPAM server at {self.base_url}: {exc}") from exc
        if response.is_error:
            raise error_from_response(response)
        try:
            data = response.json()
        except ValueError as exc:
            raise NetdError(
                f"IPAM server at {self.base_url} sent a non-JSON answer to {method} {path}"
            ) from exc
        if not isinstance(data, dict):
            raise NetdError(
                f"IPAM server at {self.base_url} sent an unexpected answer to {method} {path}")
        return data

    # --- health and pools -----------------------------------------------------

    def health(self) -> dict[str, Any]:
        """``GET /healthz``."""
        return self._request("GET", "/healthz")

    def list_pools(self) -> dict[str, Any]:
        """All pools with their counters: ``{"pools": [Pool]}``."""
        return self._request("GET", "/v1/pools")

    def create_pool(self, **fields: Any) -> dict[str, Any]:
        """Create a pool from PoolCreate fields (``name``, ``cidr`` ...)."""
        return self._request("POST", "/v1/pools", body=fields)

    def get_pool(self, name: str) -> dict[str, Any]:
        """One pool with its counters."""
        return self._request("GET", f"/v1/pools/{_seg(name)}")

    def delete_pool(self, name: str, force: bool = False) -> dict[str, Any]:
        """Delete a pool; the server refuses while it has allocations unless forced."""
        params = {"force": "true"} if force else None
        return self._request("DELETE", f"/v1/pools/{_seg(name)}", params=params)

    # --- addresses ------------------------------------------------------------

    def addresses(
        self,
        pool: str | None = None,
        host: str | None = None,
        limit: int = 1000,
        after: str | None = None,
    ) -> dict[str, Any]:
        """One page of allocations, optionally by pool and host:
        ``{"addresses": [Allocation], "next": cursor or None}``."""
        params = {"pool": pool, "host": host, "limit": limit, "after": after}
        return self._request("GET", "/v1/addresses", params=params)

    def all_addresses(self, pool: str | None = None,
                      host: str | None = None) -> list[dict[str, Any]]:
        """Every allocation (optionally by pool and host), page after page."""
        return all_addresses(self, pool, host)

    def pool_addresses(
        self, name: str, state: str = "all", host: str | None = None, limit: int = 1000
    ) -> dict[str, Any]:
        """A pool's allocations and reservations: ``{"allocated": [...], "reserved": [...]}``."""
        params = {"state": state, "host": host, "limit": limit}
        return self._request("GET", f"/v1/pools/{_seg(name)}/addresses", params=params)

    def allocate(
        self,
        pool: str,
        container_id: str,
        ifname: str = "eth0",
        host: str = "",
        netns: str = "",
        labels: dict[str, str] | None = None,
        ip: str | None = None,
        mac: str | None = None,
        handle: str | None = None,
    ) -> dict[str, Any]:
        """Allocate (idempotently) an address for ``container_id``/``ifname``."""
        body: dict[str, Any] = {
            "pool": pool, "container_id": container_id, "ifname": ifname, "host": host,
            "netns": netns, "labels": labels or {},
        }
        for k, v in (("ip", ip), ("mac", mac), ("handle", handle)):
            if v is not None:
                body[k] = v
        return self._request("POST", "/v1/allocate", body=body)

    def release(
        self,
        pool: str | None = None,
        container_id: str | None = None,
        ifname: str | None = None,
        ip: str | None = None,
        force: bool = False,
    ) -> dict[str, Any]:
        """Release by owner or by address: ``{"released": [...], "message": ...}``."""
        body: dict[str, Any] = {"force": force}
        for k, v in (("pool", pool), ("container_id", container_id), ("ifname", ifname),
                     ("ip", ip)):
            if v is not None:
                body[k] = v
        return self._request("POST", "/v1/release", body=body)

    def update(
        self,
        ip: str,
        container_id: str,
        ifname: str | None = None,
        new_container_id: str | None = None,
        labels: dict[str, str] | None = None,
    ) -> dict[str, Any]:
        """Hand ``ip`` from its holder ``container_id`` to ``new_container_id`` and/or merge
        ``labels``; the Allocation afterwards."""
        body: dict[str, Any] = {"container_id": container_id, "labels": labels or {}}
        for k, v in (("ifname", ifname), ("new_container_id", new_container_id)):
            if v is not None:
                body[k] = v
        return self._request("POST", f"/v1/addresses/{_seg(ip)}/update", body=body)

    def set_allowed(self, ip: str, container_id: str, allowed: list[str],
                    ifname: str | None = None) -> dict[str, Any]:
        """Set the extra addresses the holder of ``ip`` may send from; the Allocation."""
        body: dict[str, Any] = {"container_id": container_id, "allowed": list(allowed)}
        if ifname is not None:
            body["ifname"] = ifname
        return self._request("POST", f"/v1/addresses/{_seg(ip)}/allowed", body=body)

    def reserve(self, pool: str, range: str, note: str = "") -> dict[str, Any]:
        """Reserve an address, ``A-B`` range or CIDR inside a pool."""
        return self._request("POST", f"/v1/pools/{_seg(pool)}/reserve",
                             body={"range": range, "note": note})

    def unreserve(self, pool: str, range: str) -> dict[str, Any]:
        """Free reserved addresses: ``{"freed": n}``."""
        return self._request("POST", f"/v1/pools/{_seg(pool)}/unreserve", body={"range": range})

    def assign(self, pool: str, ip: str, handle: str, note: str = "") -> dict[str, Any]:
        """Bind ``ip`` to a stable ``handle`` (a fixed address)."""
        return self._request("POST", f"/v1/pools/{_seg(pool)}/assign",
                             body={"ip": ip, "handle": handle, "note": note})

    def show(self, ip: str) -> dict[str, Any]:
        """State of one address (free, reserved, allocated, unusable)."""
        return self._request("GET", f"/v1/addresses/{_seg(ip)}")

    def history(self, ip: str, limit: int = 100) -> dict[str, Any]:
        """Events of one address, oldest first: ``{"events": [Event]}``."""
        return self._request("GET", f"/v1/addresses/{_seg(ip)}/history",
                             params={"limit": limit})

    def pool_history(self, pool: str | None = None, limit: int = 100) -> dict[str, Any]:
        """Recent events, of one pool or all: ``{"events": [Event]}``."""
        return self._request("GET", "/v1/history", params={"pool": pool, "limit": limit})

    def blocks(self, pool: str | None = None, host: str | None = None) -> dict[str, Any]:
        """BGP address blocks, of one pool or all: ``{"blocks": [Block]}``."""
        path = f"/v1/pools/{_seg(pool)}/blocks" if pool is not None else "/v1/blocks"
        return self._request("GET", path, params={"host": host})

    def hosts(self) -> dict[str, Any]:
        """Per-host allocation and block counts: ``{"hosts": [...]}``."""
        return self._request("GET", "/v1/hosts")
