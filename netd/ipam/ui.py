"""The IPAM's read-only web view under ``/ui/``: pools, addresses, search, history, hosts.

Server-rendered (Jinja2 templates in ``templates/``, autoescaped: labels and names
come from users), usable without JavaScript, every page one paged query: a pool of
100,000 allocations shows 100 at a time, found again by the same cursor as the API.

Authentication is the API's read authentication: the ``Authorization: Bearer``
header, or the login form, which checks the token (the read-only one or the full
one) and sets a cookie: an expiry and an HMAC of it keyed by that token, so the
cookie is not the token, needs no session store (``--workers N``), and dies with a
changed token. ``HttpOnly``, ``SameSite=Strict``, ``Path=/ui``, ``Secure`` over
HTTPS. Nothing here changes the IPAM.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote

from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import Route

from netd.errors import NetdError
from netd.ipam.model import Pool, ip_str
from netd.ipam.service import IPAM, cursor

COOKIE = "netd_ui"
SESSION_S = 12 * 3600
PAGE = 100
MAX_FORM = 4096

_env = Environment(loader=FileSystemLoader(Path(__file__).with_name("templates")),
                   autoescape=select_autoescape(["html"]), trim_blocks=True,
                   lstrip_blocks=True)


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC") if ts else ""


_env.filters["when"] = _when
_env.filters["q"] = lambda v: quote(str(v), safe="")


class Sessions:
    """The login cookie: ``EXPIRY.HMAC(token, "netd-ui|EXPIRY")`` (see the module)."""

    def __init__(self, tokens: list[str], clock: Callable[[], float] = time.time) -> None:
        self.tokens = [t.encode() for t in tokens if t]
        self.clock = clock

    @staticmethod
    def _mac(token: bytes, expiry: int) -> str:
        return hmac.new(token, f"netd-ui|{expiry}".encode(), hashlib.sha256).hexdigest()

    def token_ok(self, given: str) -> bytes | None:
        """The configured token ``given`` is (each compared: timing tells nothing)."""
        found = None
        for t in self.tokens:
            if hmac.compare_digest(given.encode(), t):
                found = t
        return found

    def issue(self, token: bytes) -> str:
        expiry = int(self.clock()) + SESSION_S
        return f"{expiry}.{self._mac(token, expiry)}"

    def valid(self, cookie: str | None) -> bool:
        if not cookie or "." not in cookie:
            return False
        expiry_text, _, mac = cookie.partition(".")
        if not expiry_text.isdigit() or int(expiry_text) < self.clock():
            return False
        ok = False
        for t in self.tokens:
            ok |= hmac.compare_digest(mac, self._mac(t, int(expiry_text)))
        return ok


def _pool_row(pool: Pool, stats: Any) -> dict[str, Any]:
    size = max(stats.size, 1)
    return {"pool": pool, "stats": stats,
            "pct": {k: round(100 * getattr(stats, k) / size, 2)
                    for k in ("allocated", "reserved", "free")}}


def _alloc_row(a: Any, pool: Pool) -> dict[str, Any]:
    return {"a": a, "ip": ip_str(pool.version, a.ip), "pool": pool,
            "state": "fixed" if a.fixed else "allocated"}


def routes(ipam: IPAM, token: str | None, read_token: str | None) -> list[Route]:
    """The ``/ui/`` routes (the API's edge lets them through: they check for themselves)."""
    sessions = Sessions([t for t in (token, read_token) if t])
    open_ = token is None

    def authorised(request: Request) -> bool:
        if open_:
            return True
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() == "bearer" and sessions.token_ok(given.strip()):
            return True
        return sessions.valid(request.cookies.get(COOKIE))

    def page(name: str, status: int = 200, **context: Any) -> HTMLResponse:
        html = _env.get_template(name).render(open=open_, **context)
        return HTMLResponse(html, status_code=status, headers={
            "Cache-Control": "no-store", "X-Frame-Options": "DENY",
            "Content-Security-Policy": "default-src 'none'; style-src 'self' 'unsafe-inline'; "
                                       "img-src 'self'; form-action 'self'",
            "Referrer-Policy": "no-referrer"})

    def guarded(view: Callable[[Request], Awaitable[Response]]
                ) -> Callable[[Request], Awaitable[Response]]:
        async def run(request: Request) -> Response:
            if not authorised(request):
                target = request.url.path + (f"?{request.url.query}" if request.url.query
                                             else "")
                return RedirectResponse(f"/ui/login?next={quote(target, safe='')}", 303)
            try:
                return await view(request)
            except NetdError as exc:
                return page("error.html", exc.status, title=exc.code.replace("_", " "),
                            message=exc.message)
        return run

    async def pools(request: Request) -> Response:
        rows = [_pool_row(p, s) for p, s in await run_in_threadpool(ipam.list_pools)]
        return page("pools.html", rows=rows, title="Pools")

    async def pool(request: Request) -> Response:
        name = request.path_params["name"]
        host = request.query_params.get("host") or None
        after = request.query_params.get("after") or None
        p, stats = await run_in_threadpool(ipam.get_pool, name)
        got = await run_in_threadpool(ipam.addresses, name, host, PAGE + 1, after)
        more = len(got) > PAGE
        rows = [_alloc_row(a, pl) for a, pl in got[:PAGE]]
        nxt = cursor(got[PAGE - 1][0], got[PAGE - 1][1]) if more else None
        reservations: list[Any] = []
        if after is None and host is None:
            _, reservations = await run_in_threadpool(ipam.reservations, name)
        return page("pool.html", title=f"Pool {name}", row=_pool_row(p, stats), rows=rows,
                    host=host or "", next=nxt, first=after is None,
                    reservations=[{"r": r, "lo": ip_str(p.version, r.lo),
                                   "hi": ip_str(p.version, r.hi)} for r in reservations])

    async def search(request: Request) -> Response:
        text = request.query_params.get("q", "")
        found = await run_in_threadpool(ipam.search, text) if text.strip() else None
        rows = [_alloc_row(a, p) for a, p in found["allocations"]] if found else []
        held = ([{"r": r, "pool": p, "lo": ip_str(p.version, r.lo)}
                 for r, p in found["reservations"]] if found else [])
        return page("search.html", title="Search", q=text, found=found, rows=rows, held=held)

    async def address(request: Request) -> Response:
        ip = request.path_params["ip"]
        shown = await run_in_threadpool(ipam.show, ip)
        events = await run_in_threadpool(lambda: ipam.history(ip=ip, limit=200))
        return page("address.html", title=f"Address {shown['ip']}", shown=shown,
                    events=list(reversed(events)))

    async def hosts(request: Request) -> Response:
        rows = await run_in_threadpool(ipam.hosts)
        blocks = await run_in_threadpool(ipam.blocks)
        versions = {p.name: p.version for p, _ in await run_in_threadpool(ipam.list_pools)}
        by_host: dict[str, list[str]] = {}
        for b in blocks:
            by_host.setdefault(b.host, []).append(
                f"{b.pool} {ip_str(versions.get(b.pool, 4), b.lo)}/{b.prefix}")
        return page("hosts.html", title="Hosts", rows=rows, blocks=by_host)

    async def login(request: Request) -> Response:
        nxt = request.query_params.get("next", "/ui/")
        if not nxt.startswith("/ui/"):  # only back into the view: never elsewhere
            nxt = "/ui/"
        if request.method == "GET":
            return page("login.html", 401 if not open_ else 200, title="Log in", next=nxt)
        body = await request.body()
        form = parse_qs(body[:MAX_FORM].decode("utf-8", "replace"))
        given = (form.get("token") or [""])[0].strip()
        matched = sessions.token_ok(given) if given else None
        if matched is None:
            return page("login.html", 401, title="Log in", next=nxt,
                        error="That is not a token of this IPAM.")
        response = RedirectResponse(nxt, 303)
        response.set_cookie(COOKIE, sessions.issue(matched), max_age=SESSION_S, path="/ui",
                            httponly=True, samesite="strict",
                            secure=request.url.scheme == "https")
        return response

    async def logout(request: Request) -> Response:
        response = RedirectResponse("/ui/login", 303)
        response.delete_cookie(COOKIE, path="/ui", httponly=True, samesite="strict")
        return response

    async def home(request: Request) -> Response:
        return RedirectResponse("/ui/", 307)

    return [
        Route("/ui", home, methods=["GET"]),
        Route("/ui/", guarded(pools), methods=["GET"]),
        Route("/ui/pools/{name}", guarded(pool), methods=["GET"]),
        Route("/ui/search", guarded(search), methods=["GET"]),
        Route("/ui/addresses/{ip}", guarded(address), methods=["GET"]),
        Route("/ui/hosts", guarded(hosts), methods=["GET"]),
        Route("/ui/login", login, methods=["GET", "POST"]),
        Route("/ui/logout", logout, methods=["POST"]),
    ]


__all__ = ["COOKIE", "Sessions", "routes"]
