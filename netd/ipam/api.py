"""The IPAM HTTP API (``/v1``), as documented in ``docs/API.md``.

Mutations are ``async def`` and call the synchronous :class:`~netd.ipam.service.IPAM`
on the event loop for SQLite: each is one short store transaction and the store
serialises writers, so a thread pool would only add latency. On a network store
(etcd, ``store.network``) the loop never waits on the network: allocate and
release hand their change to the store's committer thread and await it (its
group commit gathers them, no thread per request); other mutations run in the
thread pool.
Small reads run in the thread pool (each thread has its own SQLite connection;
WAL lets readers run beside the writer). Listings are paged and capped
(:data:`~netd.ipam.service.MAX_PAGE`) and built where they cannot delay an
allocation: in a reader process of lower priority when the server has a file
store (:mod:`netd.ipam.listings`).

Cross-cutting concerns live in one pure-ASGI middleware (:class:`_Edge`):
authentication (with a token configured, every request to the API needs the
token, or the read-only token for reads; ``/healthz``, ``/metrics`` and the
OpenAPI document stay open), the request body limits (size, JSON nesting),
the latency histogram, the last-resort 500, and a fast path for the hot
mutations (allocate, release) that skips FastAPI's routing for well-formed
requests. Every error answer is built by :func:`error_response`; exceptions
are mapped to it in :func:`_install_error_handlers` (and by the edge for
401/403/413/422/500).
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Literal, TypeVar, cast

from fastapi import Depends, FastAPI, Header, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    TypeAdapter,
    field_validator,
)
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match, Router
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from netd import __version__
from netd.errors import InvalidInput, NetdError
from netd.ipam import model, ui
from netd.ipam.listings import InThreads, Listings, alloc_out, res_out
from netd.ipam.metrics import Metrics
from netd.ipam.service import IPAM, MAX_PAGE, AllocRequest, PoolSpec

T = TypeVar("T")

log = logging.getLogger(__name__)

MUTATING = frozenset({"POST", "DELETE", "PUT", "PATCH"})
METHODS = frozenset({"GET", "HEAD", "OPTIONS", *MUTATING})
MAX_BODY = 1 << 20
MAX_DEPTH = 32  # JSON nesting of a request body; the API's own documents need 4
#: paths anyone may read, token or not: liveness, metrics, the API's description
OPEN_PATHS = frozenset({"/healthz", "/metrics", "/openapi.json", "/docs", "/redoc",
                        "/docs/oauth2-redirect"})
ACTOR_PATTERN = r"^[\x20-\x7e]{1,64}$"
ACTOR_RE = re.compile(ACTOR_PATTERN)


# --- error mapping (the one place) -------------------------------------------

_HTTP_CODES = {
    400: "invalid_input", 401: "unauthorized", 403: "forbidden", 404: "not_found",
    405: "method_not_allowed", 413: "invalid_input", 422: "invalid_input",
    503: "unavailable",
}


def error_response(
    status: int, code: str, message: str, metrics: Metrics,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """Every non-2xx answer: ``{"error": {"code", "message"}}``, counted by code."""
    metrics.error(code)
    one_line = " ".join(message.split())
    return JSONResponse({"error": {"code": code, "message": one_line}}, status_code=status,
                        headers=headers)


def netd_error_response(exc: NetdError, metrics: Metrics) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    return error_response(exc.status, exc.code, exc.message, metrics, headers)


def _validation_message(exc: RequestValidationError) -> str:
    """One readable line for a request validation failure (at most three problems)."""
    errors = exc.errors()
    parts: list[str] = []
    for err in errors[:3]:
        loc = [str(p) for p in err.get("loc", ())]
        kind = err.get("type", "")
        msg = str(err.get("msg", "invalid")).removeprefix("Value error, ")
        if kind == "json_invalid":
            why = (err.get("ctx") or {}).get("error", "invalid JSON")
            pos = f" at position {loc[1]}" if len(loc) > 1 else ""
            return f"malformed JSON body: {why}{pos}"
        if loc == ["body"] and kind in ("model_attributes_type", "dict_type"):
            return ("the request body must be a JSON object, sent with "
                    "Content-Type: application/json")
        if loc[:1] == ["header"] and loc[1:2] == ["X-Netd-Actor"]:
            return "X-Netd-Actor must be 1-64 printable ASCII characters"
        if loc[:1] in (["query"], ["path"]) and len(loc) > 1:
            where = f"{loc[0]} parameter {'.'.join(loc[1:])}"
        elif loc[:1] == ["body"] and len(loc) > 1:
            where = ".".join(loc[1:])
        else:
            where = ".".join(loc) or "request"
        parts.append(f"{where}: {msg}")
    extra = len(errors) - len(parts)
    return "; ".join(parts) + (f" (and {extra} more)" if extra > 0 else "")


def _install_error_handlers(app: FastAPI, metrics: Metrics) -> None:
    async def netd_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, NetdError)
        return netd_error_response(exc, metrics)

    async def validation_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        return error_response(422, "invalid_input", _validation_message(exc), metrics)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        if exc.status_code == 400:  # FastAPI could not parse the body: docs/API.md says 422
            return error_response(422, "invalid_input", "malformed JSON body", metrics)
        code = _HTTP_CODES.get(exc.status_code, "error")
        if exc.status_code in (404, 405):
            what = "no such resource" if exc.status_code == 404 else "method not allowed"
            message = f"{what}: {request.method} {request.url.path[:200]}"
        else:
            message = str(exc.detail)
        return error_response(exc.status_code, code, message, metrics,
                              dict(exc.headers) if exc.headers else None)

    app.add_exception_handler(NetdError, netd_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)


# --- models ----------------------------------------------------------------


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorDetail(BaseModel):
    code: str = Field(description="stable machine code, see docs/API.md")
    message: str


class ErrorBody(BaseModel):
    error: ErrorDetail


class RouteModel(BaseModel):
    model_config = ConfigDict(extra="forbid")
    dst: str = Field(max_length=64, description="destination CIDR")
    gw: str | None = Field(None, max_length=64,
                           description="next hop; default: the pool gateway",
                           exclude_if=lambda v: v is None)


class Dns(BaseModel):
    model_config = ConfigDict(extra="forbid")
    nameservers: list[str] = Field(default_factory=list, max_length=model.MAX_NAMESERVERS)
    domain: str = Field("", max_length=model.MAX_DOMAIN)
    search: list[str] = Field(default_factory=list, max_length=model.MAX_DNS_ITEMS)
    options: list[str] = Field(default_factory=list, max_length=model.MAX_DNS_ITEMS)


Vlan = Annotated[int, Field(strict=True, ge=1, le=4094)]


def _query_bool(value: Any) -> Any:
    """Query booleans are ``true`` or ``false``: "yes", "on" or "1" are not taken as true."""
    if isinstance(value, str):
        if value in ("true", "false"):
            return value == "true"
        raise ValueError("must be true or false")
    return value


QueryBool = Annotated[bool, BeforeValidator(_query_bool)]


class PoolCreate(_In):
    name: str = Field(max_length=63, description="1-63 of a-z 0-9 . _ -")
    cidr: str | None = None
    gateway: str | None = Field(None, description="default: the first usable address")
    vlan: Vlan | Literal["auto"] | None = Field(
        None, description="1-4094, or 'auto' for the lowest free VLAN in vlan_range")
    mode: Literal["l2", "vlan", "bgp"] = "l2"
    labels: dict[str, str] = Field(default_factory=dict)
    reserved: list[str] = Field(default_factory=list, description="ranges: IP, A-B or CIDR")
    routes: list[RouteModel] = Field(default_factory=list, max_length=model.MAX_ROUTES)
    dns: Dns | None = None
    block_prefix: Annotated[int, Field(strict=True)] | None = Field(
        None, description="host block prefix length (bgp pools only): from the pool's "
                          "prefix to /31 (/127); default /26 (/122)")
    supernet: str | None = Field(None, description="generate the lowest free subnet in it")
    prefix_len: Annotated[int, Field(strict=True)] | None = None
    vlan_range: tuple[Vlan, Vlan] | None = None

    @field_validator("vlan", mode="before")
    @classmethod
    def _vlan(cls, value: Any) -> Any:
        """One clear message instead of one per branch of the union."""
        if value is None or value == "auto" or (type(value) is int and 1 <= value <= 4094):
            return value
        raise ValueError(f"invalid VLAN {repr(value)[:20]}: a number 1-4094 or 'auto'")


class Pool(BaseModel):
    name: str
    cidr: str
    gateway: str
    mode: str
    vlan: int | None
    labels: dict[str, str]
    routes: list[RouteModel]
    dns: Dns
    block_prefix: int | None
    created: float
    size: int
    free: int
    reserved: int
    allocated: int
    utilisation: float = Field(description="(reserved + allocated) / size, 0..1")


class PoolList(BaseModel):
    pools: list[Pool]


class PoolDeleted(BaseModel):
    deleted: str
    dropped_allocations: int


class Allocation(BaseModel):
    pool: str
    ip: str
    prefix_len: int
    address: str = Field(description="ip/prefix_len")
    gateway: str
    mac: str
    container_id: str
    ifname: str
    host: str
    netns: str
    handle: str | None
    fixed: bool
    labels: dict[str, str]
    vlan: int | None
    routes: list[RouteModel]
    dns: Dns
    created: float
    allowed: list[str] = Field(default_factory=list,
                               description="extra addresses the holder may send from")


class Reservation(BaseModel):
    pool: str
    range: str = Field(description="A or A-B")
    first: str
    last: str
    count: int
    note: str
    handle: str | None
    created: float


class PoolAddresses(BaseModel):
    allocated: list[Allocation]
    reserved: list[Reservation]
    next: str | None = Field(None, description="pass as 'after' for the next page of "
                                               "allocations; null: no more")


class ReserveIn(_In):
    range: str = Field(description="IP, A-B or CIDR inside the pool")
    note: str = Field("", max_length=model.MAX_NOTE)


class UnreserveIn(_In):
    range: str


class Freed(BaseModel):
    freed: int


class AssignIn(_In):
    ip: str
    handle: str = Field(max_length=253)
    note: str = Field("", max_length=model.MAX_NOTE)


class Block(BaseModel):
    pool: str
    cidr: str
    host: str


class BlockList(BaseModel):
    blocks: list[Block]


class AllocateIn(_In):
    pool: str = Field(max_length=63)
    container_id: str = Field(min_length=1, max_length=model.MAX_ID)
    ifname: str = Field("eth0", min_length=1, max_length=15)
    host: str = Field("", max_length=model.MAX_ID)
    netns: str = Field("", max_length=4096)
    labels: dict[str, str] = Field(default_factory=dict)
    ip: str | None = Field(None, description="ask for this address")
    mac: str | None = Field(None, description="use this MAC (default: derived or random)")
    handle: str | None = Field(None, max_length=253,
                               description="stable handle: gets its assigned address")


class ReleaseIn(_In):
    pool: str | None = None
    container_id: str | None = Field(None, max_length=model.MAX_ID)
    ifname: str | None = Field(None, max_length=15)
    ip: str | None = None
    force: StrictBool = Field(False, description="release by ip without naming the owner")


class UpdateIn(_In):
    container_id: str = Field(min_length=1, max_length=model.MAX_ID,
                              description="the current holder (refused when it is not)")
    ifname: str | None = Field(None, max_length=15, description="the holder's interface")
    new_container_id: str | None = Field(None, min_length=1, max_length=model.MAX_ID,
                                         description="hand the address to this owner")
    labels: dict[str, str] = Field(default_factory=dict,
                                   description="merged into the allocation's labels")


class AllowedIn(_In):
    container_id: str = Field(min_length=1, max_length=model.MAX_ID,
                              description="the current holder (refused when it is not)")
    ifname: str | None = Field(None, max_length=15, description="the holder's interface")
    allowed: list[str] = Field(max_length=model.MAX_ALLOWED,
                               description="the whole list (replaces the old one; [] clears)")


class Released(BaseModel):
    released: list[Allocation]
    message: str


class AddressList(BaseModel):
    addresses: list[Allocation]
    next: str | None = Field(None, description="pass as 'after' for the next page; null: "
                                               "no more")


class AddressState(BaseModel):
    ip: str
    pool: str
    cidr: str
    state: Literal["free", "reserved", "allocated", "unusable"]
    container_id: str | None = None
    ifname: str | None = None
    host: str | None = None
    netns: str | None = None
    mac: str | None = None
    handle: str | None = None
    labels: dict[str, str] | None = None
    allowed: list[str] | None = None
    note: str | None = None
    since: float | None = None


class Event(BaseModel):
    id: int
    ts: float
    pool: str
    ip: str
    action: str
    container_id: str
    ifname: str
    host: str
    mac: str
    actor: str
    note: str


class EventList(BaseModel):
    events: list[Event]


class HostSummary(BaseModel):
    host: str
    allocations: int
    pools: dict[str, int]
    blocks: int


class HostList(BaseModel):
    hosts: list[HostSummary]


class Health(BaseModel):
    status: str


# --- conversions -------------------------------------------------------------


def _prefix(pool: model.Pool) -> tuple[int, int]:
    """(version, prefix length) without building an ip_network."""
    return (6 if ":" in pool.cidr else 4), int(pool.cidr.rsplit("/", 1)[1])


def _pool_out(pool: model.Pool, stats: model.PoolStats) -> dict[str, Any]:
    d = pool.to_dict()
    d.update(size=stats.size, free=stats.free, reserved=stats.reserved,
             allocated=stats.allocated, utilisation=stats.utilisation)
    return d


def _block_out(b: model.Block, version: int) -> dict[str, Any]:
    return {"pool": b.pool, "cidr": f"{model.ip_str(version, b.lo)}/{b.prefix}", "host": b.host}


def _opt(value: str | None) -> str | None:
    """Empty query parameters mean 'no filter'."""
    return value or None


# --- the ASGI edge: auth, body limit, latency, hot paths, last-resort 500 -------

FastHandler = Callable[[Scope, bytes], Awaitable[Response | None]]


class _Disconnected(Exception):
    pass


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    """The whole request body, or None when it is larger than ``limit``."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _Disconnected
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that hands the already read body to the app once."""
    done = False

    async def replay() -> Message:
        nonlocal done
        if not done:
            done = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value)
    return None


def too_deep(body: bytes, limit: int = MAX_DEPTH) -> bool:
    """Whether a JSON text nests arrays and objects deeper than ``limit`` (strings skipped).

    Checked before any parser sees the body: a deeply nested one would exhaust
    the parser's recursion (a 500) instead of getting a clear 422.
    """
    if body.count(b"[") + body.count(b"{") <= limit:  # the common case, no scan
        return False
    depth = 0
    in_string = escaped = False
    for byte in body:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):  # [ {
            depth += 1
            if depth > limit:
                return True
        elif byte in (0x5D, 0x7D):  # ] }
            depth -= 1
    return False


class _Edge:
    """Pure ASGI middleware (no BaseHTTPMiddleware: it costs a task per request).

    With a token configured, requests to the API are authenticated here,
    before anything reads or parses the body, so a request without the token
    can change nothing and learns nothing: the token serves everything, the
    read-only token (if any) serves reads and gets 403 on a mutation. A path
    or method the API does not have is passed on unauthenticated, for the 404
    or 405 that says so (it touches no data). The body of a mutation is read
    once, bounded in size (``MAX_BODY``) and JSON nesting (``MAX_DEPTH``).

    The hot mutations (allocate, release) have a fast path that skips
    FastAPI's routing and dependency machinery. It only answers well-formed
    requests, through the same operations and error mapping as the routes;
    anything unusual (other content type, bad actor header, invalid body)
    falls through to the FastAPI route, which produces the documented error.
    """

    def __init__(self, app: ASGIApp, *, token: str | None, metrics: Metrics,
                 read_token: str | None = None, router: Router | None = None,
                 fast: dict[str, FastHandler] | None = None) -> None:
        self.app = app
        self.token = token.encode() if token else None
        self.read_token = read_token.encode() if read_token else None
        self.metrics = metrics
        self.router = router
        self.fast = fast or {}

    def _role(self, scope: Scope) -> Literal["write", "read"] | None:
        """What the request's bearer token may do: everything, read, or nothing."""
        assert self.token is not None
        value = _header(scope, b"authorization")
        if value is None:
            return None
        scheme, _, given = value.partition(b" ")
        if scheme.lower() != b"bearer":
            return None
        given = given.strip()
        # both compared, whichever matches: the time taken says nothing about either
        write = hmac.compare_digest(given, self.token)
        read = self.read_token is not None and hmac.compare_digest(given, self.read_token)
        return "write" if write else "read" if read else None

    def _routed(self, scope: Scope, method: str) -> bool:
        """Whether a route of the API serves this path and method."""
        if method == "POST" and scope["path"] in self.fast:
            return True
        if self.router is None:
            return True
        return any(route.matches(scope)[0] == Match.FULL for route in self.router.routes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        method: str = scope["method"] if scope["method"] in METHODS else "OTHER"
        ui = scope["path"] == "/ui" or scope["path"].startswith("/ui/")
        if (self.token is not None and scope["path"] not in OPEN_PATHS and not ui
                and self._routed(scope, method)):  # the web view checks for itself
            refused = await self._refuse(scope, receive, send, method)
            if refused is not None:
                self.metrics.observe(refused, method, time.perf_counter() - start)
                return
        if method in MUTATING:
            answered, body = await self._mutation(scope, receive, send, method)
            if answered is not None:
                self.metrics.observe(answered, method, time.perf_counter() - start)
                return
            receive = _replay(body, receive)
        started = False

        async def send_wrapper(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        except Exception:
            # No request data in the log line: headers may carry the token.
            log.exception("unexpected error serving %s %s", method, scope.get("path", "?"))
            if started:
                raise
            await self._internal_error(scope, receive, send)
        template = getattr(scope.get("route"), "path", None) or "<unmatched>"
        self.metrics.observe(template, method, time.perf_counter() - start)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send,
                      method: str) -> str | None:
        """Answer 401 or 403 when the token does not allow the request; the route label."""
        role = self._role(scope)
        if role is None:
            await error_response(401, "unauthorized", "missing or wrong bearer token",
                                 self.metrics, {"WWW-Authenticate": "Bearer"}
                                 )(scope, receive, send)
            return "<unauthorized>"
        if role == "read" and method in MUTATING:
            await error_response(403, "forbidden", "the read-only token cannot change "
                                 "anything", self.metrics)(scope, receive, send)
            return "<forbidden>"
        return None

    async def _mutation(self, scope: Scope, receive: Receive, send: Send,
                        method: str) -> tuple[str | None, bytes]:
        """Body and fast path of a mutation (already authenticated).

        Returns (route label, b"") when answered here, else (None, body).
        """
        length = _header(scope, b"content-length")
        declared = int(length) if length is not None and length.isdigit() else 0
        try:
            body = None if declared > MAX_BODY else await _read_body(receive, MAX_BODY)
        except _Disconnected:
            return "<disconnected>", b""
        if body is None:
            await error_response(413, "invalid_input",
                                 f"request body is larger than {MAX_BODY} bytes",
                                 self.metrics)(scope, receive, send)
            return "<too_large>", b""
        if too_deep(body):
            await error_response(422, "invalid_input", "malformed JSON body: nested deeper "
                                 f"than {MAX_DEPTH} levels", self.metrics)(scope, receive, send)
            return "<too_deep>", b""
        handler = self.fast.get(scope["path"]) if method == "POST" else None
        if handler is not None:
            try:
                response = await handler(scope, body)
            except Exception:
                log.exception("unexpected error serving %s %s", method, scope["path"])
                await self._internal_error(scope, receive, send)
                return str(scope["path"]), b""
            if response is not None:
                await response(scope, receive, send)
                return str(scope["path"]), b""
        return None, body

    async def _internal_error(self, scope: Scope, receive: Receive, send: Send) -> None:
        await error_response(500, "internal", "internal server error",
                             self.metrics)(scope, receive, send)


def _is_json(scope: Scope) -> bool:
    ctype = _header(scope, b"content-type")
    return ctype is not None and ctype.split(b";", 1)[0].strip().lower() == b"application/json"


def _fast_handler(
    model_in: type[_In], op: Callable[[Any, str], Awaitable[dict[str, Any]]],
    out: TypeAdapter[Any], metrics: Metrics,
) -> FastHandler:
    """A fast path for one POST route: only for requests the route would accept."""

    async def handler(scope: Scope, body: bytes) -> Response | None:
        if not _is_json(scope):
            return None
        raw_actor = _header(scope, b"x-netd-actor")
        actor = "api" if raw_actor is None else raw_actor.decode("latin-1")
        if raw_actor is not None and not ACTOR_RE.match(actor):
            return None
        try:
            request = model_in.model_validate(json.loads(body))
        except ValueError:  # JSONDecodeError, UnicodeDecodeError, ValidationError
            return None
        try:
            result = await op(request, actor)
        except NetdError as exc:
            return netd_error_response(exc, metrics)
        return Response(out.dump_json(out.validate_python(result)),
                        media_type="application/json")

    return handler


# --- the app -----------------------------------------------------------------

_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "unauthorized (missing or wrong token)"},
    404: {"model": ErrorBody, "description": "pool_not_found, not_found"},
    409: {"model": ErrorBody, "description": "conflict: pool_exists, pool_overlap, "
          "pool_exhausted, pool_in_use, address_in_use, mac_in_use"},
    422: {"model": ErrorBody, "description": "invalid_input"},
    503: {"model": ErrorBody, "description": "unavailable (datastore busy)"},
}
_MUTATION_ERRORS: dict[int | str, dict[str, Any]] = {
    **_ERRORS,
    403: {"model": ErrorBody, "description": "forbidden (the read-only token)"},
    413: {"model": ErrorBody, "description": "invalid_input (body larger than 1 MiB)"},
}

Actor = Annotated[str, Header(
    alias="X-Netd-Actor", pattern=ACTOR_PATTERN,
    description="who is acting, recorded in history (<= 64 printable characters)")]
PoolName = Annotated[str, Path(description="pool name")]
Limit = Annotated[int, Query(ge=1, le=MAX_PAGE, description=f"at most {MAX_PAGE}: page "
                                                           "with 'after'")]


def _query_names(doc: dict[str, Any]) -> dict[tuple[str, str], frozenset[str]]:
    """(METHOD, path template) -> the query parameters the OpenAPI document lists."""
    return {(method.upper(), path): frozenset(p["name"] for p in op.get("parameters", ())
                                              if p.get("in") == "query")
            for path, ops in doc.get("paths", {}).items() for method, op in ops.items()}


def create_app(ipam: IPAM, token: str | None, metrics: Metrics,
               read_token: str | None = None, listings: Listings | None = None) -> FastAPI:
    """Build the API app around an :class:`IPAM`; ``token=None`` disables auth.

    ``read_token``: an optional second token that may read but not change (dashboards).
    ``listings``: where listing pages are built (default: the thread pool; the server
    gives a reader process, :mod:`netd.ipam.listings`).
    """
    if read_token is not None and token is None:
        raise ValueError("a read-only token needs the token too (else anyone may change "
                         "what only token holders may read)")
    if read_token is not None and read_token == token:
        raise ValueError("the read-only token must differ from the token")
    metrics.track(ipam)
    # SQLite: a mutation is one short local transaction, best run right on the event
    # loop; a network store (etcd) waits on round trips, so mutations go to the thread
    # pool, where its group commit gathers them, and the loop keeps serving
    offload = bool(getattr(ipam.store, "network", False))
    transact_async: Callable[[Callable[[Any], Any]], Awaitable[Any]] | None = (
        getattr(ipam.store, "transact_async", None) if offload else None)

    async def mutate(fn: Callable[[], T]) -> T:
        return await run_in_threadpool(fn) if offload else fn()

    async def run(change: Callable[[Any], T]) -> T:
        """One change of the hot operations: awaited from the store's committer when it
        has one (etcd's group commit), else right here (SQLite)."""
        if transact_async is not None:
            return cast(T, await transact_async(change))
        return await mutate(lambda: ipam.store.transact(change))

    # the hot operations, shared by the routes and the edge's fast path
    async def do_allocate(body: AllocateIn, actor: str) -> dict[str, Any]:
        req = AllocRequest(
            pool=body.pool, container_id=body.container_id, ifname=body.ifname,
            host=body.host, netns=body.netns, labels=body.labels, ip=body.ip,
            mac=body.mac, handle=body.handle,
        )
        alloc, pool = await run(ipam.allocate_change(req, actor=actor))
        metrics.allocated(pool.name)
        return alloc_out(alloc, pool)

    async def do_release(body: ReleaseIn, actor: str) -> dict[str, Any]:
        result = await run(ipam.release_change(
            pool=body.pool, container_id=body.container_id, ifname=body.ifname, ip=body.ip,
            force=body.force, actor=actor))
        out = []
        for a in result.released:
            out.append(alloc_out(a, result.pools[a.pool]))
            metrics.released(a.pool)
        return {"released": out, "message": result.message}

    fast = {
        "/v1/allocate": _fast_handler(AllocateIn, do_allocate, TypeAdapter(Allocation), metrics),
        "/v1/release": _fast_handler(ReleaseIn, do_release, TypeAdapter(Released), metrics),
    }
    known: dict[tuple[str, str], frozenset[str]] = {}

    def known_query(request: Request) -> None:
        """Refuse query parameters the call does not take (those its document lists):
        ``?lmit=5`` is a typo, not a request for the default page size."""
        if not request.query_params:
            return
        if not known:
            known.update(_query_names(app.openapi()))
        template = getattr(request.scope.get("route"), "path", "")
        method = "GET" if request.method == "HEAD" else request.method
        takes = known.get((method, template), frozenset())
        unknown = sorted(set(request.query_params) - takes)
        if unknown:
            shown = ", ".join(repr(u[:40]) for u in unknown[:5])
            raise InvalidInput(f"unknown query parameter {shown} (this call takes: "
                               f"{', '.join(sorted(takes)) or 'none'})")

    app = FastAPI(
        title="netd IPAM", version=__version__, redirect_slashes=False,
        dependencies=[Depends(known_query)],
        description="Central IPAM of netd: pools, allocations, reservations, history. "
                    "When the server has a token, every request under /v1 needs "
                    "`Authorization: Bearer <token>`; the read-only token, if there is "
                    "one, serves GETs. /healthz, /metrics and this document are open.",
    )
    _install_error_handlers(app, metrics)
    app.router.routes.extend(ui.routes(ipam, token, read_token))  # /ui/: the web view
    app.add_middleware(_Edge, token=token, read_token=read_token, metrics=metrics,
                       router=app.router, fast=fast)

    def custom_openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version,
                                 description=app.description, routes=app.routes)
            schema.setdefault("components", {})["securitySchemes"] = {
                "bearer": {"type": "http", "scheme": "bearer"}}
            for path, ops in schema.get("paths", {}).items():
                for op in ops.values():
                    if path not in OPEN_PATHS:
                        op["security"] = [{"bearer": []}]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = custom_openapi  # type: ignore[method-assign]

    pages: Listings = listings if listings is not None else InThreads(ipam)

    async def listing(kind: str, **params: Any) -> Response:
        """A listing page, built where it cannot delay an allocation (netd.ipam.listings)."""
        return Response(await pages.page(kind, **params), media_type="application/json")

    # --- health and metrics --------------------------------------------------

    @app.get("/healthz", response_model=Health, tags=["ops"])
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics", tags=["ops"], response_class=Response,
             responses={200: {"content": {"text/plain": {}},
                              "description": "Prometheus text format"}})
    def metrics_endpoint() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    # --- pools ---------------------------------------------------------------

    @app.get("/v1/pools", response_model=PoolList, tags=["pools"], responses=_ERRORS)
    def list_pools() -> dict[str, Any]:
        return {"pools": [_pool_out(p, s) for p, s in ipam.list_pools()]}

    @app.post("/v1/pools", response_model=Pool, status_code=201, tags=["pools"],
              responses=_MUTATION_ERRORS)
    async def create_pool(body: PoolCreate, actor: Actor = "api") -> dict[str, Any]:
        spec = PoolSpec(
            name=body.name, cidr=body.cidr, gateway=body.gateway, vlan=body.vlan,
            mode=body.mode, labels=body.labels, reserved=body.reserved,
            routes=[r.model_dump(exclude_none=True) for r in body.routes],
            dns=body.dns.model_dump(exclude_unset=True) if body.dns else {},
            block_prefix=body.block_prefix, supernet=body.supernet,
            prefix_len=body.prefix_len, vlan_range=body.vlan_range,
        )
        def change() -> dict[str, Any]:
            pool = ipam.create_pool(spec, actor=actor)
            _, stats = ipam.get_pool(pool.name)
            return _pool_out(pool, stats)

        return await mutate(change)

    @app.get("/v1/pools/{name}", response_model=Pool, tags=["pools"], responses=_ERRORS)
    def get_pool(name: PoolName) -> dict[str, Any]:
        return _pool_out(*ipam.get_pool(name))

    @app.delete("/v1/pools/{name}", response_model=PoolDeleted, tags=["pools"],
                responses=_MUTATION_ERRORS)
    async def delete_pool(name: PoolName, force: QueryBool = False,
                          actor: Actor = "api") -> dict[str, Any]:
        dropped = await mutate(lambda: ipam.delete_pool(name, force=force, actor=actor))
        return {"deleted": name, "dropped_allocations": dropped}

    @app.get("/v1/pools/{name}/addresses", response_model=PoolAddresses, tags=["pools"],
             responses=_ERRORS)
    async def pool_addresses(
        name: PoolName,
        state: Literal["all", "allocated", "reserved"] = "all",
        host: str | None = None,
        limit: Limit = 1000,
        after: str | None = None,
    ) -> Response:
        return await listing("pool_addresses", name=name, state=state, host=_opt(host),
                             limit=limit, after=_opt(after))

    @app.post("/v1/pools/{name}/reserve", response_model=Reservation, status_code=201,
              tags=["pools"], responses=_MUTATION_ERRORS)
    async def reserve(name: PoolName, body: ReserveIn,
                      actor: Actor = "api") -> dict[str, Any]:
        r = await mutate(lambda: ipam.reserve(name, body.range, body.note, actor=actor))
        pool, _ = await mutate(lambda: ipam.get_pool(name))
        return res_out(r, pool)

    @app.post("/v1/pools/{name}/unreserve", response_model=Freed, tags=["pools"],
              responses=_MUTATION_ERRORS)
    async def unreserve(name: PoolName, body: UnreserveIn,
                        actor: Actor = "api") -> dict[str, int]:
        return {"freed": await mutate(lambda: ipam.unreserve(name, body.range, actor=actor))}

    @app.post("/v1/pools/{name}/assign", response_model=Reservation, tags=["pools"],
              responses=_MUTATION_ERRORS)
    async def assign(name: PoolName, body: AssignIn, actor: Actor = "api") -> dict[str, Any]:
        r = await mutate(lambda: ipam.assign(name, body.ip, body.handle, body.note,
                                             actor=actor))
        pool, _ = await mutate(lambda: ipam.get_pool(name))
        return res_out(r, pool)

    @app.get("/v1/pools/{name}/blocks", response_model=BlockList, tags=["pools"],
             responses=_ERRORS)
    def pool_blocks(name: PoolName, host: str | None = None) -> dict[str, Any]:
        pool, _ = ipam.get_pool(name)
        version, _ = _prefix(pool)
        return {"blocks": [_block_out(b, version) for b in ipam.blocks(name, _opt(host))]}

    @app.get("/v1/blocks", response_model=BlockList, tags=["blocks"], responses=_ERRORS)
    def all_blocks(host: str | None = None) -> dict[str, Any]:
        blocks = ipam.blocks(None, _opt(host))
        if not blocks:
            return {"blocks": []}
        versions = {p.name: _prefix(p)[0] for p, _ in ipam.list_pools()}
        return {"blocks": [_block_out(b, versions.get(b.pool, 4)) for b in blocks]}

    # --- addresses -------------------------------------------------------------

    @app.post("/v1/allocate", response_model=Allocation, tags=["addresses"],
              responses=_MUTATION_ERRORS)
    async def allocate(body: AllocateIn, actor: Actor = "api") -> dict[str, Any]:
        return await do_allocate(body, actor)

    @app.post("/v1/release", response_model=Released, tags=["addresses"],
              responses=_MUTATION_ERRORS)
    async def release(body: ReleaseIn, actor: Actor = "api") -> dict[str, Any]:
        return await do_release(body, actor)

    @app.get("/v1/addresses", response_model=AddressList, tags=["addresses"],
             responses=_ERRORS)
    async def addresses(
        pool: str | None = None, host: str | None = None, limit: Limit = 1000,
        after: str | None = None,
    ) -> Response:
        return await listing("addresses", pool=_opt(pool), host=_opt(host), limit=limit,
                             after=_opt(after))

    @app.get("/v1/addresses/{ip}", response_model=AddressState,
             response_model_exclude_unset=True, tags=["addresses"], responses=_ERRORS)
    def show(ip: str) -> dict[str, Any]:
        return ipam.show(ip)

    @app.post("/v1/addresses/{ip}/update", response_model=Allocation, tags=["addresses"],
              responses=_MUTATION_ERRORS)
    async def update(ip: str, body: UpdateIn, actor: Actor = "api") -> dict[str, Any]:
        a, p = await mutate(lambda: ipam.update(
            ip, container_id=body.container_id, ifname=body.ifname,
            new_container_id=body.new_container_id, labels=body.labels, actor=actor))
        return alloc_out(a, p)

    @app.post("/v1/addresses/{ip}/allowed", response_model=Allocation, tags=["addresses"],
              responses=_MUTATION_ERRORS)
    async def set_allowed(ip: str, body: AllowedIn, actor: Actor = "api") -> dict[str, Any]:
        a, p = await mutate(lambda: ipam.set_allowed(
            ip, container_id=body.container_id, allowed=body.allowed, ifname=body.ifname,
            actor=actor))
        return alloc_out(a, p)

    @app.get("/v1/addresses/{ip}/history", response_model=EventList, tags=["addresses"],
             responses=_ERRORS)
    async def address_history(ip: str, limit: Limit = 100,
                              after: Annotated[int | None, Query(ge=0)] = None) -> Response:
        return await listing("history", ip=ip, limit=limit, after=after)

    @app.get("/v1/history", response_model=EventList, tags=["history"], responses=_ERRORS)
    async def history(pool: str | None = None, limit: Limit = 100,
                      after: Annotated[int | None, Query(
                          ge=0, description="page on: the events after this event id, "
                                            "oldest first")] = None) -> Response:
        return await listing("history", pool=_opt(pool), limit=limit, after=after)

    @app.get("/v1/hosts", response_model=HostList, tags=["hosts"], responses=_ERRORS)
    def hosts() -> dict[str, Any]:
        return {"hosts": ipam.hosts()}

    return app

