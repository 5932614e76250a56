"""The IPAM client: error decoding, transport failures, request shapes.

Uses httpx.MockTransport as a fake server; the real server is exercised in
tests/integration/test_netctl.py.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import httpx
import pytest

from netd import errors
from netd.ipam.client import Client

URL = "http://ipam.test:9650"
Handler = Callable[[httpx.Request], httpx.Response]


def client(handler: Handler, **kw: object) -> Client:
    return Client(URL, transport=httpx.MockTransport(handler), **kw)  # type: ignore[arg-type]


def answer(status: int, code: str | None, message: str = "boom") -> Handler:
    def handler(request: httpx.Request) -> httpx.Response:
        if code is None:
            return httpx.Response(status, text="<html>bad gateway</html>")
        return httpx.Response(status, json={"error": {"code": code, "message": message}})
    return handler


@pytest.mark.parametrize(("status", "code", "cls"), [
    (404, "pool_not_found", errors.PoolNotFound),
    (404, "not_found", errors.NotFound),
    (409, "pool_exists", errors.PoolExists),
    (409, "pool_overlap", errors.PoolOverlap),
    (409, "pool_exhausted", errors.PoolExhausted),
    (409, "pool_in_use", errors.PoolInUse),
    (409, "address_in_use", errors.AddressInUse),
    (409, "mac_in_use", errors.MacInUse),
    (422, "invalid_input", errors.InvalidInput),
    (401, "unauthorized", errors.Unauthorized),
    (503, "unavailable", errors.Unavailable),
])
def test_known_codes_map_to_their_class(status: int, code: str,
                                        cls: type[errors.NetdError]) -> None:
    with client(answer(status, code, f"the {code} message")) as c, pytest.raises(cls) as info:
        c.get_pool("web")
    assert type(info.value) is cls
    assert info.value.code == code
    assert info.value.message == f"the {code} message"


def test_specific_classes_keep_their_family() -> None:
    with client(answer(404, "pool_not_found")) as c, pytest.raises(errors.NotFound):
        c.get_pool("web")
    with client(answer(409, "pool_exhausted")) as c, pytest.raises(errors.Conflict):
        c.allocate("web", "cid")


@pytest.mark.parametrize(("status", "cls"), [
    (404, errors.NotFound),
    (409, errors.Conflict),
    (422, errors.InvalidInput),
    (401, errors.Unauthorized),
    (500, errors.NetdError),
    (418, errors.NetdError),
])
def test_unknown_code_maps_by_status_and_keeps_code(status: int,
                                                    cls: type[errors.NetdError]) -> None:
    with client(answer(status, "brand_new_code", "news")) as c, pytest.raises(cls) as info:
        c.list_pools()
    assert type(info.value) is cls
    assert info.value.code == "brand_new_code"
    assert info.value.message == "news"


def test_non_json_error_names_status_and_url() -> None:
    with client(answer(502, None)) as c, pytest.raises(errors.NetdError) as info:
        c.list_pools()
    assert type(info.value) is errors.NetdError
    assert "502" in info.value.message
    assert f"{URL}/v1/pools" in info.value.message
    assert "bad gateway" in info.value.message


def test_fastapi_detail_body_is_used_as_message() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(404, json={"detail": "Not Found"})
    with client(handler) as c, pytest.raises(errors.NotFound, match="Not Found"):
        c.hosts()


@pytest.mark.parametrize("exc", [
    httpx.ConnectError("Connection refused"),
    httpx.ReadTimeout("timed out"),
    httpx.ConnectTimeout("timed out"),
    httpx.RemoteProtocolError("server disconnected"),
])
def test_transport_failures_are_unavailable_naming_the_url(exc: Exception) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc
    with client(handler) as c, pytest.raises(errors.Unavailable) as info:
        c.health()
    assert URL in info.value.message
    assert info.value.code == "unavailable"


def test_real_refused_connection_is_unavailable() -> None:
    import socket
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with Client(f"http://127.0.0.1:{port}", timeout=2) as c, \
            pytest.raises(errors.Unavailable, match=f"127.0.0.1:{port}"):
        c.list_pools()


@pytest.mark.parametrize("url", ["foo", "ftp://x", "http://", "http://[::1", "http://256.1.1.1"])
def test_bad_base_url_is_invalid_input(url: str) -> None:
    with pytest.raises(errors.InvalidInput, match="invalid server URL"):
        Client(url)


def test_token_that_cannot_be_a_header_is_invalid_input() -> None:
    with pytest.raises(errors.InvalidInput, match="token"):
        Client(URL, token="caf\u00e9")
    with pytest.raises(errors.InvalidInput, match="token"):
        Client(URL, token="two words")


def test_non_object_answer_is_an_error() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json=[1, 2])
    with client(handler) as c, pytest.raises(errors.NetdError, match="unexpected answer"):
        c.list_pools()


def test_non_json_success_is_an_error() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, text="ok")
    with client(handler) as c, pytest.raises(errors.NetdError, match="non-JSON"):
        c.health()


# --- request shapes ------------------------------------------------------------


class Recorder:
    def __init__(self, reply: dict[str, object] | None = None) -> None:
        self.requests: list[httpx.Request] = []
        self.reply = reply or {"ok": True}

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return httpx.Response(200, json=self.reply)

    @property
    def last(self) -> httpx.Request:
        return self.requests[-1]

    def body(self) -> object:
        return json.loads(self.last.content)


def test_headers_token_and_actor() -> None:
    rec = Recorder()
    with client(rec, token="s3cret\n", actor="netctl:alice") as c:
        c.create_pool(name="web", cidr="10.0.0.0/24")
    assert rec.last.headers["Authorization"] == "Bearer s3cret"
    assert rec.last.headers["X-Netd-Actor"] == "netctl:alice"
    rec2 = Recorder()
    with client(rec2) as c:
        c.list_pools()
    assert "Authorization" not in rec2.last.headers
    assert rec2.last.headers["X-Netd-Actor"] == "api"


def test_actor_is_cut_to_what_the_api_accepts() -> None:
    rec = Recorder()
    with client(rec, actor="agent:h\u00f6st\n" + "x" * 100) as c:
        c.health()
    actor = rec.last.headers["X-Netd-Actor"]
    assert actor.startswith("agent:hst") and len(actor) == 64


def test_one_client_serves_many_calls() -> None:
    rec = Recorder()
    with client(rec) as c:
        c.list_pools()
        c.hosts()
    assert len(rec.requests) == 2


def test_request_paths_and_bodies() -> None:
    rec = Recorder()
    with client(rec) as c:
        assert c.list_pools() == {"ok": True}
        c.delete_pool("web")
        assert (rec.last.method, rec.last.url.path, rec.last.url.query) == (
            "DELETE", "/v1/pools/web", b"")
        c.delete_pool("web", force=True)
        assert rec.last.url.params["force"] == "true"
        c.addresses(pool="web")
        assert rec.last.url.path == "/v1/addresses"
        assert dict(rec.last.url.params) == {"pool": "web", "limit": "1000"}
        c.pool_addresses("web", state="reserved")
        assert rec.last.url.path == "/v1/pools/web/addresses"
        assert rec.last.url.params["state"] == "reserved"
        c.allocate("web", "cid1", ip="10.0.0.9")
        assert rec.body() == {"pool": "web", "container_id": "cid1", "ifname": "eth0",
                              "host": "", "netns": "", "labels": {}, "ip": "10.0.0.9"}
        c.release(ip="10.0.0.9", force=True)
        assert rec.last.url.path == "/v1/release"
        assert rec.body() == {"ip": "10.0.0.9", "force": True}
        c.release(container_id="cid1", ifname="eth1", pool="web")
        assert rec.body() == {"pool": "web", "container_id": "cid1", "ifname": "eth1",
                              "force": False}
        c.reserve("web", "10.0.0.10-10.0.0.20", note="lb")
        assert rec.last.url.path == "/v1/pools/web/reserve"
        assert rec.body() == {"range": "10.0.0.10-10.0.0.20", "note": "lb"}
        c.unreserve("web", "10.0.0.10")
        assert rec.body() == {"range": "10.0.0.10"}
        c.assign("web", "10.0.0.30", "db-0")
        assert rec.body() == {"ip": "10.0.0.30", "handle": "db-0", "note": ""}
        c.show("2001:db8::5")
        assert rec.last.url.path == "/v1/addresses/2001:db8::5"
        c.history("10.0.0.5", limit=5)
        assert rec.last.url.path == "/v1/addresses/10.0.0.5/history"
        assert rec.last.url.params["limit"] == "5"
        c.pool_history()
        assert rec.last.url.path == "/v1/history"
        assert "pool" not in rec.last.url.params
        c.blocks()
        assert rec.last.url.path == "/v1/blocks"
        c.blocks(pool="bgp1", host="h1")
        assert rec.last.url.path == "/v1/pools/bgp1/blocks"
        assert rec.last.url.params["host"] == "h1"
        c.hosts()
        assert rec.last.url.path == "/v1/hosts"
        c.health()
        assert rec.last.url.path == "/healthz"


def test_path_segments_are_escaped() -> None:
    rec = Recorder()
    with client(rec) as c:
        c.get_pool("../v1/hosts")
    assert rec.last.url.raw_path == b"/v1/pools/..%2Fv1%2Fhosts"


def test_close_is_idempotent_and_context_manager_closes() -> None:
    rec = Recorder()
    c = client(rec)
    with c:
        c.health()
    assert c._http.is_closed
    c.close()
