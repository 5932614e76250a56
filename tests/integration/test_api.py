"""The IPAM HTTP API against a real ``netd ipam serve`` process (docs/API.md)."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Server, start_server

pytestmark = pytest.mark.real


# --- helpers -------------------------------------------------------------------


@pytest.fixture
def api(server: Server) -> Iterator[httpx.Client]:
    """A keep-alive client that sends the server's token."""
    with httpx.Client(base_url=server.url, timeout=10,
                      headers={"Authorization": f"Bearer {server.token}"}) as c:
        yield c


@pytest.fixture
def anon(server: Server) -> Iterator[httpx.Client]:
    """A client without a token."""
    with httpx.Client(base_url=server.url, timeout=10) as c:
        yield c


def ok(r: httpx.Response, status: int = 200) -> Any:
    assert r.status_code == status, f"{r.request.method} {r.request.url}: {r.status_code} {r.text}"
    return r.json()


def err(r: httpx.Response, status: int, code: str) -> str:
    assert r.status_code == status, f"{r.request.method} {r.request.url}: {r.status_code} {r.text}"
    body = r.json()
    assert set(body) == {"error"}, body
    assert body["error"]["code"] == code, body
    message = body["error"]["message"]
    assert isinstance(message, str) and message and "\n" not in message
    return str(message)


def snapshot(c: httpx.Client) -> list[tuple[str, bytes]]:
    """Every piece of state the API shows, as raw bytes."""
    out = []
    pools = c.get("/v1/pools")
    out.append(("pools", pools.content))
    for p in pools.json()["pools"]:
        out.append((p["name"], c.get(f"/v1/pools/{p['name']}/addresses",
                                     params={"limit": 1000}).content))
        out.append((p["name"] + "/blocks", c.get(f"/v1/pools/{p['name']}/blocks").content))
    for path in ("/v1/history?limit=1000", "/v1/addresses?limit=1000", "/v1/hosts",
                 "/v1/blocks"):
        r = c.get(path)
        assert r.status_code == 200, r.text
        out.append((path, r.content))
    return out


def make_pool(c: httpx.Client, **fields: Any) -> dict[str, Any]:
    return dict(ok(c.post("/v1/pools", json=fields), 201))


V1_PATHS = {
    "/v1/pools", "/v1/pools/{name}", "/v1/pools/{name}/addresses",
    "/v1/pools/{name}/reserve", "/v1/pools/{name}/unreserve", "/v1/pools/{name}/assign",
    "/v1/pools/{name}/blocks", "/v1/blocks", "/v1/allocate", "/v1/release",
    "/v1/addresses", "/v1/addresses/{ip}", "/v1/addresses/{ip}/history", "/v1/history",
    "/v1/hosts",
}


# --- ops endpoints ------------------------------------------------------------------


def test_healthz_and_openapi(anon: httpx.Client) -> None:
    assert ok(anon.get("/healthz")) == {"status": "ok"}
    doc = ok(anon.get("/openapi.json"))
    paths = set(doc["paths"])
    assert paths >= V1_PATHS, V1_PATHS - paths
    assert {"/healthz", "/metrics"} <= paths
    schemas = doc["components"]["schemas"]
    for name in ("PoolCreate", "Pool", "AllocateIn", "Allocation", "ReleaseIn", "Reservation",
                 "Block", "AddressState", "Event", "ErrorBody"):
        assert name in schemas, name
    assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            if path.startswith("/v1/"):  # reads too: who holds which address is sensitive
                assert op.get("security") == [{"bearer": []}], (method, path)
                assert "401" in op["responses"], (method, path)
            else:
                assert "security" not in op, (method, path)
            if method in ("post", "delete"):
                assert "403" in op["responses"] and "413" in op["responses"], (method, path)
    alloc = schemas["Allocation"]["properties"]
    for field in ("pool", "ip", "prefix_len", "address", "gateway", "mac", "container_id",
                  "ifname", "host", "netns", "handle", "fixed", "labels", "vlan", "routes",
                  "dns", "created"):
        assert field in alloc, field


def test_metrics(api: httpx.Client, anon: httpx.Client) -> None:
    make_pool(api, name="m1", cidr="10.50.0.0/28", reserved=["10.50.0.10-10.50.0.12"])
    ok(api.post("/v1/allocate", json={"pool": "m1", "container_id": "c1"}))
    ok(api.post("/v1/allocate", json={"pool": "m1", "container_id": "c2"}))
    ok(api.post("/v1/release", json={"container_id": "c2"}))
    err(api.get("/v1/pools/nope"), 404, "pool_not_found")
    err(anon.post("/v1/allocate", json={"pool": "m1", "container_id": "c3"}), 401,
        "unauthorized")
    r = anon.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    text = r.text
    # size 14, reserved 3 + gateway, 1 allocated
    assert 'netd_ipam_pool_size{pool="m1"} 14.0' in text
    assert 'netd_ipam_pool_reserved{pool="m1"} 4.0' in text
    assert 'netd_ipam_pool_allocated{pool="m1"} 1.0' in text
    assert 'netd_ipam_pool_free{pool="m1"} 9.0' in text
    assert 'netd_ipam_allocations_total{pool="m1"} 2.0' in text
    assert 'netd_ipam_releases_total{pool="m1"} 1.0' in text
    assert 'netd_ipam_errors_total{code="pool_not_found"} 1.0' in text
    assert 'netd_ipam_errors_total{code="unauthorized"} 1.0' in text
    assert ('netd_ipam_request_duration_seconds_count{method="GET",route="/v1/pools/{name}"} '
            '1.0') in text
    assert ('netd_ipam_request_duration_seconds_count{method="POST",route="/v1/allocate"} '
            '2.0') in text


# --- pools ----------------------------------------------------------------------


def test_pool_lifecycle(api: httpx.Client, anon: httpx.Client) -> None:
    p = make_pool(api, name="web", cidr="10.30.0.0/24", vlan=30, mode="vlan",
                  labels={"tenant": "a"}, reserved=["10.30.0.2-10.30.0.9", "10.30.0.250/31"],
                  routes=[{"dst": "0.0.0.0/0"}, {"dst": "10.31.0.0/16", "gw": "10.30.0.254"}],
                  dns={"nameservers": ["10.0.0.53"], "search": ["corp"]})
    assert p["name"] == "web" and p["cidr"] == "10.30.0.0/24"
    assert p["gateway"] == "10.30.0.1" and p["vlan"] == 30 and p["mode"] == "vlan"
    assert p["labels"] == {"tenant": "a"}
    assert p["routes"][1] == {"dst": "10.31.0.0/16", "gw": "10.30.0.254"}
    assert p["dns"]["nameservers"] == ["10.0.0.53"] and p["dns"]["search"] == ["corp"]
    assert p["size"] == 254 and p["reserved"] == 8 + 2 + 1 and p["allocated"] == 0
    assert p["free"] == 254 - 11
    assert p["utilisation"] == pytest.approx(11 / 254)
    assert p["block_prefix"] is None and p["created"] > 0

    assert ok(api.get("/v1/pools/web")) == p
    assert [x["name"] for x in ok(api.get("/v1/pools"))["pools"]] == ["web"]
    err(api.post("/v1/pools", json={"name": "web", "cidr": "10.99.0.0/24"}), 409, "pool_exists")
    err(api.post("/v1/pools", json={"name": "web2", "cidr": "10.30.0.128/25"}), 409,
        "pool_overlap")

    gen = make_pool(api, name="gen", supernet="10.30.0.0/16", prefix_len=24, vlan="auto",
                    vlan_range=[100, 200])
    assert gen["cidr"] == "10.30.1.0/24" and gen["vlan"] == 100

    v6 = make_pool(api, name="six", cidr="2001:db8:1::/64")
    assert v6["size"] == 2**64 - 1 and v6["free"] == 2**64 - 2
    assert v6["gateway"] == "2001:db8:1::1"

    ok(api.post("/v1/allocate", json={"pool": "web", "container_id": "c1"}))
    err(api.delete("/v1/pools/web"), 409, "pool_in_use")
    assert ok(api.delete("/v1/pools/web", params={"force": "true"})) == {
        "deleted": "web", "dropped_allocations": 1}
    err(api.get("/v1/pools/web"), 404, "pool_not_found")
    err(api.delete("/v1/pools/web"), 404, "pool_not_found")
    assert ok(api.delete("/v1/pools/gen")) == {"deleted": "gen", "dropped_allocations": 0}
    actions = [e["action"] for e in ok(api.get("/v1/history", params={"pool": "web"}))["events"]]
    # the two reserved ranges and the gateway are recorded at creation
    assert actions == ["pool-create", "reserve", "reserve", "reserve", "allocate", "release",
                       "pool-delete"]


# --- allocation -------------------------------------------------------------------


def test_allocate_release(api: httpx.Client, anon: httpx.Client) -> None:
    make_pool(api, name="app", cidr="10.40.0.0/24", vlan=40,
              routes=[{"dst": "0.0.0.0/0"}], dns={"nameservers": ["10.40.0.53"]})
    a = ok(api.post("/v1/allocate", json={
        "pool": "app", "container_id": "ctr-1", "host": "h1", "netns": "/proc/1/ns/net",
        "labels": {"app": "x"}}))
    assert a["pool"] == "app" and a["ip"] == "10.40.0.2" and a["prefix_len"] == 24
    assert a["address"] == "10.40.0.2/24" and a["gateway"] == "10.40.0.1"
    assert a["mac"] == "0a:58:0a:28:00:02" and a["ifname"] == "eth0"
    assert a["container_id"] == "ctr-1" and a["host"] == "h1"
    assert a["netns"] == "/proc/1/ns/net" and a["labels"] == {"app": "x"}
    assert a["vlan"] == 40 and a["routes"] == [{"dst": "0.0.0.0/0"}]
    assert a["dns"]["nameservers"] == ["10.40.0.53"]
    assert a["handle"] is None and a["fixed"] is False and a["created"] > 0

    # idempotent: the same owner gets the same answer
    assert ok(api.post("/v1/allocate", json={"pool": "app", "container_id": "ctr-1",
                                             "host": "h1"}))["ip"] == "10.40.0.2"
    b = ok(api.post("/v1/allocate", json={"pool": "app", "container_id": "ctr-2",
                                          "ifname": "net1", "ip": "10.40.0.77",
                                          "mac": "02-AA-BB-CC-DD-EE"}))
    assert b["ip"] == "10.40.0.77" and b["mac"] == "02:aa:bb:cc:dd:ee" and b["ifname"] == "net1"
    err(api.post("/v1/allocate", json={"pool": "app", "container_id": "ctr-3",
                                       "ip": "10.40.0.77"}), 409, "address_in_use")
    err(api.post("/v1/allocate", json={"pool": "app", "container_id": "ctr-3",
                                       "mac": "02:aa:bb:cc:dd:ee"}), 409, "mac_in_use")
    err(api.post("/v1/allocate", json={"pool": "nope", "container_id": "ctr-3"}), 404,
        "pool_not_found")

    # queries
    listed = ok(api.get("/v1/addresses", params={"pool": "app"}))["addresses"]
    assert [x["ip"] for x in listed] == ["10.40.0.2", "10.40.0.77"]
    assert listed[0] == a
    assert [x["ip"] for x in ok(api.get("/v1/addresses", params={"host": "h1"}))[
        "addresses"]] == ["10.40.0.2"]
    page = ok(api.get("/v1/addresses", params={"pool": "app", "limit": 1,
                                               "after": "10.40.0.2"}))["addresses"]
    assert [x["ip"] for x in page] == ["10.40.0.77"]
    pa = ok(api.get("/v1/pools/app/addresses", params={"state": "allocated"}))
    assert [x["ip"] for x in pa["allocated"]] == ["10.40.0.2", "10.40.0.77"]
    assert pa["reserved"] == []
    shown = ok(api.get("/v1/addresses/10.40.0.2"))
    assert shown["state"] == "allocated" and shown["container_id"] == "ctr-1"
    assert shown["mac"] == a["mac"] and shown["host"] == "h1" and shown["pool"] == "app"
    assert ok(api.get("/v1/addresses/10.40.0.3"))["state"] == "free"
    assert ok(api.get("/v1/addresses/10.40.0.1"))["state"] == "reserved"
    assert ok(api.get("/v1/addresses/10.40.0.255"))["state"] == "unusable"
    err(api.get("/v1/addresses/192.0.2.1"), 404, "not_found")
    err(api.get("/v1/addresses/not-an-ip"), 422, "invalid_input")
    hosts = ok(api.get("/v1/hosts"))["hosts"]
    assert {"host": "h1", "allocations": 1, "pools": {"app": 1}, "blocks": 0} in hosts
    assert ok(api.get("/v1/pools/app"))["allocated"] == 2

    # release: by ip needs the owner or force; other owners release nothing
    err(api.post("/v1/release", json={"ip": "10.40.0.2"}), 422, "invalid_input")
    r = ok(api.post("/v1/release", json={"ip": "10.40.0.2", "container_id": "other"}))
    assert r["released"] == [] and r["message"]
    r = ok(api.post("/v1/release", json={"container_id": "ctr-1"}))
    assert [x["ip"] for x in r["released"]] == ["10.40.0.2"] and r["released"][0]["vlan"] == 40
    r = ok(api.post("/v1/release", json={"container_id": "ctr-1"}))
    assert r["released"] == []
    r = ok(api.post("/v1/release", json={"ip": "10.40.0.77", "force": True},
                    headers={"X-Netd-Actor": "netctl:alice"}))
    assert [x["container_id"] for x in r["released"]] == ["ctr-2"]
    assert ok(api.get("/v1/pools/app"))["allocated"] == 0

    # an address's history also shows the events of ranges and pools covering it
    events = ok(api.get("/v1/addresses/10.40.0.77/history"))["events"]
    assert [(e["action"], e["actor"], e["ip"]) for e in events] == [
        ("pool-create", "api", "10.40.0.0/24"), ("allocate", "api", "10.40.0.77"),
        ("release", "netctl:alice", "10.40.0.77")]
    events = events[1:]
    assert events[0]["mac"] == "02:aa:bb:cc:dd:ee" and events[0]["container_id"] == "ctr-2"
    assert set(events[0]) == {"id", "ts", "pool", "ip", "action", "container_id", "ifname",
                              "host", "mac", "actor", "note"}
    assert len(ok(api.get("/v1/addresses/10.40.0.77/history",
                           params={"limit": 1}))["events"]) == 1
    assert len(ok(api.get("/v1/history", params={"limit": 2}))["events"]) == 2


def test_exhausted(api: httpx.Client) -> None:
    make_pool(api, name="tiny", cidr="10.41.0.0/30")  # .1 gateway, .2 the only address
    assert ok(api.post("/v1/allocate", json={"pool": "tiny", "container_id": "a"}))[
        "ip"] == "10.41.0.2"
    err(api.post("/v1/allocate", json={"pool": "tiny", "container_id": "b"}), 409,
        "pool_exhausted")
    ok(api.post("/v1/release", json={"container_id": "a"}))
    assert ok(api.post("/v1/allocate", json={"pool": "tiny", "container_id": "b"}))[
        "ip"] == "10.41.0.2"


def test_ipv6_allocation(api: httpx.Client) -> None:
    make_pool(api, name="v6", cidr="2001:db8:5::/64")
    macs = set()
    for i in range(5):
        a = ok(api.post("/v1/allocate", json={"pool": "v6", "container_id": f"c{i}"}))
        assert ipaddress.ip_address(a["ip"]) in ipaddress.ip_network("2001:db8:5::/64")
        assert a["prefix_len"] == 64 and a["address"] == f"{a['ip']}/64"
        first = int(a["mac"][:2], 16)
        assert first & 0b11 == 0b10  # locally administered unicast
        macs.add(a["mac"])
    assert len(macs) == 5


def test_reserve_unreserve_assign(api: httpx.Client, anon: httpx.Client) -> None:
    make_pool(api, name="res", cidr="10.42.0.0/24")
    r = ok(api.post("/v1/pools/res/reserve", json={"range": "10.42.0.10-10.42.0.19",
                                                   "note": "lb"}), 201)
    assert r == {**r, "pool": "res", "range": "10.42.0.10-10.42.0.19", "first": "10.42.0.10",
                 "last": "10.42.0.19", "count": 10, "note": "lb", "handle": None}
    one = ok(api.post("/v1/pools/res/reserve", json={"range": "10.42.0.30"}), 201)
    assert one["range"] == "10.42.0.30" and one["count"] == 1
    err(api.post("/v1/pools/res/reserve", json={"range": "10.42.0.16/30"}), 409,
        "address_in_use")
    st = ok(api.get("/v1/addresses/10.42.0.12"))
    assert st["state"] == "reserved" and st["note"] == "lb"
    assert ok(api.get("/v1/pools/res"))["reserved"] == 1 + 10 + 1

    assert ok(api.post("/v1/pools/res/unreserve", json={"range": "10.42.0.18-10.42.0.30"})) == {
        "freed": 3}
    reserved = ok(api.get("/v1/pools/res/addresses", params={"state": "reserved"}))
    assert reserved["allocated"] == []
    assert [x["range"] for x in reserved["reserved"]] == ["10.42.0.1", "10.42.0.10-10.42.0.17"]

    fixed = ok(api.post("/v1/pools/res/assign", json={"ip": "10.42.0.50", "handle": "db-0",
                                                      "note": "primary"}))
    assert fixed["range"] == "10.42.0.50" and fixed["handle"] == "db-0"
    assert fixed["note"] == "primary"
    a = ok(api.post("/v1/allocate", json={"pool": "res", "container_id": "db-0-abc",
                                          "handle": "db-0"}))
    assert a["ip"] == "10.42.0.50" and a["fixed"] is True and a["handle"] == "db-0"
    err(api.post("/v1/pools/res/unreserve", json={"range": "10.42.0.50"}), 409,
        "address_in_use")
    err(api.post("/v1/pools/res/assign", json={"ip": "10.42.0.51", "handle": "db-0"}), 409,
        "address_in_use")
    ok(api.post("/v1/release", json={"container_id": "db-0-abc"}))
    assert ok(api.get("/v1/addresses/10.42.0.50"))["handle"] == "db-0"
    a2 = ok(api.post("/v1/allocate", json={"pool": "res", "container_id": "db-0-def",
                                           "handle": "db-0"}))
    assert a2["ip"] == "10.42.0.50"
    err(api.post("/v1/pools/nope/reserve", json={"range": "10.42.0.60"}), 404, "pool_not_found")
    actions = [e["action"] for e in ok(api.get("/v1/history", params={"pool": "res"}))["events"]]
    assert actions == ["pool-create", "reserve", "reserve", "reserve", "unreserve", "assign",
                       "allocate", "release", "allocate"]


def test_bgp_blocks(api: httpx.Client, anon: httpx.Client) -> None:
    make_pool(api, name="rack1", cidr="10.43.0.0/24", mode="bgp", block_prefix=28)
    make_pool(api, name="rack6", cidr="2001:db8:43::/120", mode="bgp", block_prefix=124)
    a = ok(api.post("/v1/allocate", json={"pool": "rack1", "container_id": "c1", "host": "h1"}))
    b = ok(api.post("/v1/allocate", json={"pool": "rack1", "container_id": "c2", "host": "h2"}))
    ok(api.post("/v1/allocate", json={"pool": "rack6", "container_id": "c3", "host": "h1"}))
    assert ipaddress.ip_address(a["ip"]) in ipaddress.ip_network("10.43.0.0/28")
    assert ipaddress.ip_address(b["ip"]) in ipaddress.ip_network("10.43.0.16/28")
    assert ok(api.get("/v1/pools/rack1/blocks"))["blocks"] == [
        {"pool": "rack1", "cidr": "10.43.0.0/28", "host": "h1"},
        {"pool": "rack1", "cidr": "10.43.0.16/28", "host": "h2"}]
    assert ok(api.get("/v1/pools/rack1/blocks", params={"host": "h2"}))["blocks"] == [
        {"pool": "rack1", "cidr": "10.43.0.16/28", "host": "h2"}]
    assert ok(api.get("/v1/blocks", params={"host": "h1"}))["blocks"] == [
        {"pool": "rack1", "cidr": "10.43.0.0/28", "host": "h1"},
        {"pool": "rack6", "cidr": "2001:db8:43::/124", "host": "h1"}]
    assert len(ok(api.get("/v1/blocks"))["blocks"]) == 3
    err(api.get("/v1/pools/nope/blocks"), 404, "pool_not_found")
    hosts = {h["host"]: h for h in ok(api.get("/v1/hosts"))["hosts"]}
    assert hosts["h1"]["blocks"] == 2 and hosts["h1"]["pools"] == {"rack1": 1, "rack6": 1}


# --- auth, actor, protocol errors ---------------------------------------------------


MUTATIONS: list[tuple[str, str, dict[str, Any] | None]] = [
    ("POST", "/v1/pools", {"name": "evil", "cidr": "10.66.0.0/24"}),
    ("DELETE", "/v1/pools/base", None),
    ("POST", "/v1/pools/base/reserve", {"range": "10.60.0.9"}),
    ("POST", "/v1/pools/base/unreserve", {"range": "10.60.0.5"}),
    ("POST", "/v1/pools/base/assign", {"ip": "10.60.0.8", "handle": "h"}),
    ("POST", "/v1/allocate", {"pool": "base", "container_id": "intruder"}),
    ("POST", "/v1/release", {"container_id": "c1"}),
    ("POST", "/v1/release", {"ip": "10.60.0.2", "force": True}),
]


READS = ("/v1/pools", "/v1/pools/base", "/v1/pools/base/addresses", "/v1/pools/base/blocks",
         "/v1/addresses", "/v1/history", "/v1/hosts", "/v1/blocks", "/v1/addresses/10.60.0.2",
         "/v1/addresses/10.60.0.2/history")
BAD_AUTH: tuple[dict[str, str], ...] = ({}, {"Authorization": "Bearer"},
                                        {"Authorization": "Bearer x"})


def test_auth(server: Server, api: httpx.Client, anon: httpx.Client) -> None:
    make_pool(api, name="base", cidr="10.60.0.0/24", reserved=["10.60.0.5"])
    ok(api.post("/v1/allocate", json={"pool": "base", "container_id": "c1"}))
    before = snapshot(api)
    wrong = {"Authorization": "Bearer " + "0" * len(server.token)}
    refusals = (*BAD_AUTH, wrong, {"Authorization": server.token},
                {"Authorization": f"Basic {server.token}"},
                {"Authorization": f"Bearer {server.token}x"})
    for method, path, body in MUTATIONS:
        for headers in refusals:
            r = anon.request(method, path, json=body, headers=headers)
            err(r, 401, "unauthorized")
            assert r.headers["www-authenticate"] == "Bearer"
        # an unauthenticated request is refused before its body is even parsed
        err(anon.request(method, path, content=b"{not json", headers={
            "content-type": "application/json"}), 401, "unauthorized")
    # reads need the token too (0.1.0 served them to anyone): nothing about who holds
    # which address leaks, not even whether a pool exists
    for path in (*READS, "/v1/pools/nope", "/v1/addresses/192.0.2.1"):
        for headers in refusals:
            err(anon.get(path, headers=headers), 401, "unauthorized")
    assert snapshot(api) == before
    # liveness, metrics and the API's description stay open; the scheme name is
    # case-insensitive
    for path in ("/healthz", "/metrics", "/openapi.json"):
        assert anon.get(path).status_code == 200, path
    ok(anon.post("/v1/allocate", json={"pool": "base", "container_id": "c9"},
                 headers={"Authorization": f"bearer {server.token}"}))
    ok(anon.get("/v1/pools", headers={"Authorization": f"BEARER {server.token}"}))


def test_read_only_token(tmp_path: Path) -> None:
    """--read-token-file: a second token for dashboards; it reads everything and changes
    nothing (403)."""
    srv = start_server(tmp_path, read_token="r3ad-0nly")
    try:
        with httpx.Client(base_url=srv.url, timeout=10,
                          headers={"Authorization": f"Bearer {srv.token}"}) as admin, \
                httpx.Client(base_url=srv.url, timeout=10,
                             headers={"Authorization": "Bearer r3ad-0nly"}) as reader:
            make_pool(admin, name="base", cidr="10.60.0.0/24", reserved=["10.60.0.5"])
            ok(admin.post("/v1/allocate", json={"pool": "base", "container_id": "c1"}))
            before = snapshot(admin)
            for path in READS:
                assert reader.get(path).content == admin.get(path).content, path
            for method, path, body in MUTATIONS:
                msg = err(reader.request(method, path, json=body), 403, "forbidden")
                assert "read-only" in msg
            assert snapshot(admin) == before
            err(httpx.get(srv.url + "/v1/pools"), 401, "unauthorized")
    finally:
        srv.stop()


def test_read_token_alone_or_equal_to_the_token_is_refused(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="must differ"):
        start_server(tmp_path, token="same", read_token="same")
    with pytest.raises(RuntimeError, match="needs --token-file"):
        start_server(tmp_path, token="", read_token="r", extra=["--no-token"])


def test_empty_token_file_refused(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match=r"token file .* is empty"):
        start_server(tmp_path, token="")


def test_actor(api: httpx.Client) -> None:
    make_pool(api, name="act", cidr="10.61.0.0/24")
    ok(api.post("/v1/allocate", json={"pool": "act", "container_id": "c1"},
                headers={"X-Netd-Actor": "agent:host-1"}))
    ok(api.post("/v1/pools/act/reserve", json={"range": "10.61.0.200"},
                headers={"X-Netd-Actor": "netctl:bob"}), 201)
    events = ok(api.get("/v1/history", params={"pool": "act"}))["events"]
    assert [(e["action"], e["actor"]) for e in events] == [
        ("pool-create", "api"), ("reserve", "api"), ("allocate", "agent:host-1"),
        ("reserve", "netctl:bob")]
    before = snapshot(api)
    for bad in ("x" * 65, ""):
        err(api.post("/v1/allocate", json={"pool": "act", "container_id": "c2"},
                     headers={"X-Netd-Actor": bad}), 422, "invalid_input")
        err(api.post("/v1/pools/act/reserve", json={"range": "10.61.0.201"},
                     headers={"X-Netd-Actor": bad}), 422, "invalid_input")
    assert snapshot(api) == before
    assert ok(api.post("/v1/allocate", json={"pool": "act", "container_id": "c2"},
                       headers={"X-Netd-Actor": "x" * 64}))["ip"]


def test_protocol_errors(api: httpx.Client, anon: httpx.Client) -> None:
    make_pool(api, name="proto", cidr="10.62.0.0/24")
    msg = err(anon.get("/nope"), 404, "not_found")
    assert "/nope" in msg
    err(api.get("/v1/pools/"), 404, "not_found")
    err(api.post("/v1/nope", json={}), 404, "not_found")
    err(api.put("/v1/pools", json={}), 405, "method_not_allowed")
    msg = err(api.post("/v1/allocate", content=b'{"pool": "proto",',
                       headers={"content-type": "application/json"}), 422, "invalid_input")
    assert msg.startswith("malformed JSON body")
    msg = err(api.post("/v1/allocate", json={"pool": "proto"}), 422, "invalid_input")
    assert "container_id" in msg
    err(api.post("/v1/allocate", content=b'{"pool": "proto", "container_id": "c"}',
                 headers={"content-type": "text/plain"}), 422, "invalid_input")
    err(api.post("/v1/allocate", content=b'{"pool": "proto", "container_id": "c"}'), 422,
        "invalid_input")
    err(api.post("/v1/allocate", json=["proto"]), 422, "invalid_input")
    err(api.post("/v1/allocate", json={"pool": "proto", "container_id": "c", "colour": 1}),
        422, "invalid_input")
    err(api.post("/v1/release"), 422, "invalid_input")
    err(api.get("/v1/addresses", params={"limit": 0}), 422, "invalid_input")
    err(api.get("/v1/addresses", params={"limit": "many"}), 422, "invalid_input")
    err(api.get("/v1/pools/proto/addresses", params={"state": "weird"}), 422, "invalid_input")
    err(api.get("/v1/addresses", params={"pool": "proto", "after": "x"}), 422, "invalid_input")
    err(api.get("/v1/addresses", params={"after": "10.62.0.9"}), 422, "invalid_input")
    err(api.post("/v1/pools", json={"name": "big", "cidr": "10.63.0.0/24",
                                    "labels": {"k": "v" * (1 << 20)}}), 413, "invalid_input")
    assert ok(api.get("/v1/pools/proto"))["allocated"] == 0


def test_wrong_methods_are_405_with_or_without_the_token(api: httpx.Client,
                                                         anon: httpx.Client) -> None:
    """0.1.0 answered 401 to a mutating method on any path: the route is checked first
    (a 404 or 405 touches no data), then the token."""
    make_pool(api, name="meth", cidr="10.62.8.0/24")
    before = snapshot(api)
    for client in (api, anon):
        for method, path in (("DELETE", "/v1/allocate"), ("PUT", "/v1/pools"),
                             ("PATCH", "/v1/pools/meth"), ("GET", "/v1/release"),
                             ("POST", "/v1/hosts"), ("DELETE", "/v1/history")):
            err(client.request(method, path), 405, "method_not_allowed")
        err(client.post("/v1/nope", json={}), 404, "not_found")
    assert snapshot(api) == before


def test_fast_and_routed_paths_agree(api: httpx.Client) -> None:
    """Allocate/release answer the same through the edge's fast path and FastAPI."""
    make_pool(api, name="fp", cidr="10.64.0.0/24", vlan=7, dns={"domain": "x"})
    fast = ok(api.post("/v1/allocate", json={"pool": "fp", "container_id": "a"}))
    routed = ok(api.post("/v1/allocate", content=b'{"pool": "fp", "container_id": "b"}',
                         headers={"content-type": "application/vnd.netd+json"}))
    assert set(fast) == set(routed)
    assert fast["dns"] == routed["dns"] == {"nameservers": [], "domain": "x", "search": [],
                                            "options": []}
    assert {k: v for k, v in fast.items() if k not in ("ip", "mac", "container_id", "created",
                                                       "address")} == \
        {k: v for k, v in routed.items() if k not in ("ip", "mac", "container_id", "created",
                                                      "address")}
    r1 = ok(api.post("/v1/release", json={"container_id": "a"}))
    r2 = ok(api.post("/v1/release", content=b'{"container_id": "b"}',
                     headers={"content-type": "application/vnd.netd+json"}))
    assert r1["released"][0]["vlan"] == r2["released"][0]["vlan"] == 7


# --- bad input changes nothing ------------------------------------------------------------

LONG = "c" * 256

BAD: list[tuple[str, str, str, Any, int, str]] = [
    # id, method, path, json body (bytes: raw body), status, code
    ("malformed-json-pool", "POST", "/v1/pools", b'{"name": "x", "cidr": ', 422,
     "invalid_input"),
    ("malformed-json-alloc", "POST", "/v1/allocate", b'{"pool": "a"', 422, "invalid_input"),
    ("invalid-cidr", "POST", "/v1/pools", {"name": "x", "cidr": "10.9.0.0/33"}, 422,
     "invalid_input"),
    ("cidr-host-bits", "POST", "/v1/pools", {"name": "x", "cidr": "10.9.0.1/24"}, 422,
     "invalid_input"),
    ("cidr-garbage", "POST", "/v1/pools", {"name": "x", "cidr": "banana"}, 422,
     "invalid_input"),
    ("gateway-outside", "POST", "/v1/pools",
     {"name": "x", "cidr": "10.9.0.0/24", "gateway": "10.9.1.1"}, 422, "invalid_input"),
    ("gateway-broadcast", "POST", "/v1/pools",
     {"name": "x", "cidr": "10.9.0.0/24", "gateway": "10.9.0.255"}, 422, "invalid_input"),
    ("vlan-0", "POST", "/v1/pools", {"name": "x", "cidr": "10.9.0.0/24", "vlan": 0}, 422,
     "invalid_input"),
    ("vlan-4095", "POST", "/v1/pools", {"name": "x", "cidr": "10.9.0.0/24", "vlan": 4095}, 422,
     "invalid_input"),
    ("vlan-string", "POST", "/v1/pools", {"name": "x", "cidr": "10.9.0.0/24", "vlan": "ten"},
     422, "invalid_input"),
    ("reserved-outside", "POST", "/v1/pools",
     {"name": "x", "cidr": "10.9.0.0/24", "reserved": ["10.9.1.0-10.9.1.9"]}, 422,
     "invalid_input"),
    ("bad-mode", "POST", "/v1/pools", {"name": "x", "cidr": "10.9.0.0/24", "mode": "vxlan"},
     422, "invalid_input"),
    ("bad-route", "POST", "/v1/pools",
     {"name": "x", "cidr": "10.9.0.0/24", "routes": [{"dst": "nowhere"}]}, 422,
     "invalid_input"),
    ("pool-name-long", "POST", "/v1/pools", {"name": "p" * 64, "cidr": "10.9.0.0/24"}, 422,
     "invalid_input"),
    ("pool-name-chars", "POST", "/v1/pools", {"name": "Bad Name", "cidr": "10.9.0.0/24"}, 422,
     "invalid_input"),
    ("pool-exists", "POST", "/v1/pools", {"name": "a", "cidr": "10.9.0.0/24"}, 409,
     "pool_exists"),
    ("pool-overlap", "POST", "/v1/pools", {"name": "x", "cidr": "10.70.0.0/16"}, 409,
     "pool_overlap"),
    ("pool-in-use", "DELETE", "/v1/pools/a", None, 409, "pool_in_use"),
    ("delete-unknown", "DELETE", "/v1/pools/nope", None, 404, "pool_not_found"),
    ("unknown-pool", "POST", "/v1/allocate", {"pool": "nope", "container_id": "c"}, 404,
     "pool_not_found"),
    ("ip-of-other-pool", "POST", "/v1/allocate",
     {"pool": "a", "container_id": "c", "ip": "10.71.0.50"}, 422, "invalid_input"),
    ("ip-in-use", "POST", "/v1/allocate",
     {"pool": "a", "container_id": "c", "ip": "10.70.0.2"}, 409, "address_in_use"),
    ("ip-reserved", "POST", "/v1/allocate",
     {"pool": "a", "container_id": "c", "ip": "10.70.0.100"}, 409, "address_in_use"),
    ("ip-gateway", "POST", "/v1/allocate",
     {"pool": "a", "container_id": "c", "ip": "10.70.0.1"}, 409, "address_in_use"),
    ("ip-network", "POST", "/v1/allocate",
     {"pool": "a", "container_id": "c", "ip": "10.70.0.0"}, 422, "invalid_input"),
    ("owner-has-other-ip", "POST", "/v1/allocate",
     {"pool": "a", "container_id": "owner-a", "ip": "10.70.0.9"}, 409, "address_in_use"),
    ("mac-in-use", "POST", "/v1/allocate",
     {"pool": "b", "container_id": "c", "mac": "02:00:00:00:00:01"}, 409, "mac_in_use"),
    ("exhausted", "POST", "/v1/allocate", {"pool": "full", "container_id": "c"}, 409,
     "pool_exhausted"),
    ("bad-mac", "POST", "/v1/allocate", {"pool": "a", "container_id": "c", "mac": "zz:zz"},
     422, "invalid_input"),
    ("multicast-mac", "POST", "/v1/allocate",
     {"pool": "a", "container_id": "c", "mac": "01:00:5e:00:00:01"}, 422, "invalid_input"),
    ("container-id-long", "POST", "/v1/allocate", {"pool": "a", "container_id": LONG}, 422,
     "invalid_input"),
    ("container-id-empty", "POST", "/v1/allocate", {"pool": "a", "container_id": ""}, 422,
     "invalid_input"),
    ("host-long", "POST", "/v1/allocate", {"pool": "a", "container_id": "c", "host": LONG},
     422, "invalid_input"),
    ("ifname-long", "POST", "/v1/allocate",
     {"pool": "a", "container_id": "c", "ifname": "eth0123456789012"}, 422, "invalid_input"),
    ("ifname-slash", "POST", "/v1/allocate",
     {"pool": "a", "container_id": "c", "ifname": "a/b"}, 422, "invalid_input"),
    ("bad-handle", "POST", "/v1/allocate",
     {"pool": "a", "container_id": "c", "handle": "-bad handle"}, 422, "invalid_input"),
    ("labels-not-str", "POST", "/v1/allocate",
     {"pool": "a", "container_id": "c", "labels": {"k": 1}}, 422, "invalid_input"),
    ("release-nothing-named", "POST", "/v1/release", {}, 422, "invalid_input"),
    ("release-ip-no-owner", "POST", "/v1/release", {"ip": "10.70.0.2"}, 422, "invalid_input"),
    ("release-ip-other-pool", "POST", "/v1/release",
     {"pool": "a", "ip": "10.71.0.2", "force": True}, 422, "invalid_input"),
    ("release-unknown-pool", "POST", "/v1/release", {"pool": "nope", "container_id": "c"}, 404,
     "pool_not_found"),
    ("release-ip-nowhere", "POST", "/v1/release", {"ip": "192.0.2.1", "force": True}, 404,
     "not_found"),
    ("release-ifname-long", "POST", "/v1/release",
     {"container_id": "owner-a", "ifname": "x" * 16}, 422, "invalid_input"),
    ("release-container-id-long", "POST", "/v1/release", {"container_id": LONG}, 422,
     "invalid_input"),
    ("reserve-outside", "POST", "/v1/pools/a/reserve", {"range": "10.71.0.0/28"}, 422,
     "invalid_input"),
    ("reserve-backwards", "POST", "/v1/pools/a/reserve", {"range": "10.70.0.20-10.70.0.10"},
     422, "invalid_input"),
    ("reserve-allocated", "POST", "/v1/pools/a/reserve", {"range": "10.70.0.2"}, 409,
     "address_in_use"),
    ("reserve-reserved", "POST", "/v1/pools/a/reserve", {"range": "10.70.0.100-10.70.0.110"},
     409, "address_in_use"),
    ("reserve-unknown-pool", "POST", "/v1/pools/nope/reserve", {"range": "10.70.0.9"}, 404,
     "pool_not_found"),
    ("unreserve-garbage", "POST", "/v1/pools/a/unreserve", {"range": "x-y"}, 422,
     "invalid_input"),
    ("assign-range", "POST", "/v1/pools/a/assign", {"ip": "10.70.0.8/30", "handle": "h"}, 422,
     "invalid_input"),
    ("assign-allocated", "POST", "/v1/pools/a/assign", {"ip": "10.70.0.2", "handle": "h"}, 409,
     "address_in_use"),
    ("assign-gateway", "POST", "/v1/pools/a/assign", {"ip": "10.70.0.1", "handle": "h"}, 409,
     "address_in_use"),
    ("assign-bad-handle", "POST", "/v1/pools/a/assign", {"ip": "10.70.0.8", "handle": "a b"},
     422, "invalid_input"),
    ("extra-field", "POST", "/v1/pools/a/reserve", {"range": "10.70.0.9", "force": True}, 422,
     "invalid_input"),
]


def _pool(name: str, cidr: str, **more: Any) -> dict[str, Any]:
    return {"name": name, "cidr": cidr, **more}


DEEP_ARRAY = b"[" * 100_000 + b"]" * 100_000
DEEP_OBJECT = b'{"a":' * 5_000 + b"1" + b"}" * 5_000
#: mutations whose bodies must never reach a JSON parser's recursion limit
BODY_PATHS = ("/v1/pools", "/v1/allocate", "/v1/release", "/v1/pools/a/reserve",
              "/v1/pools/a/unreserve", "/v1/pools/a/assign", "/v1/addresses/10.70.0.2/update",
              "/v1/addresses/10.70.0.2/allowed")

# issue 8: what 0.1.0 took (or answered with 400/500) and must refuse, changing nothing
BAD += [
    # pools on ranges whose addresses are never a container's
    *[(f"special-{cidr}", "POST", "/v1/pools", _pool("x", cidr), 422, "invalid_input")
      for cidr in ("224.1.0.0/24", "239.255.255.0/24", "127.0.0.0/24", "169.254.7.0/24",
                   "0.0.0.0/24", "255.255.255.0/24", "0.0.0.0/0", "ff02::/64", "fe80::/64",
                   "::/120", "::ffff:10.0.0.0/120")],
    ("special-supernet", "POST", "/v1/pools",
     {"name": "x", "supernet": "224.0.0.0/8", "prefix_len": 24}, 422, "invalid_input"),
    # IPv6 zone ids (were stored)
    ("zone-cidr", "POST", "/v1/pools", _pool("x", "2001:db8:9::%eth0/64"), 422,
     "invalid_input"),
    ("zone-gateway", "POST", "/v1/pools",
     _pool("x", "2001:db8:9::/64", gateway="2001:db8:9::1%eth0"), 422, "invalid_input"),
    ("zone-route-gw", "POST", "/v1/pools",
     _pool("x", "2001:db8:9::/64", routes=[{"dst": "::/0", "gw": "fe80::1%eth0"}]), 422,
     "invalid_input"),
    ("zone-nameserver", "POST", "/v1/pools",
     _pool("x", "2001:db8:9::/64", dns={"nameservers": ["fe80::53%eth0"]}), 422,
     "invalid_input"),
    ("zone-reserved", "POST", "/v1/pools",
     _pool("x", "2001:db8:9::/64", reserved=["2001:db8:9::5%eth0"]), 422, "invalid_input"),
    ("zone-release-ip", "POST", "/v1/release", {"ip": "fe80::1%eth0", "force": True}, 422,
     "invalid_input"),
    # BGP blocks that leave nothing to hand out, or that are silently replaced
    *[(f"block-prefix-{bp}", "POST", "/v1/pools",
       _pool("x", "10.9.0.0/24", mode="bgp", block_prefix=bp), 422, "invalid_input")
      for bp in (32, 33, 0, 23)],
    ("block-prefix-128", "POST", "/v1/pools",
     _pool("x", "2001:db8:9::/64", mode="bgp", block_prefix=128), 422, "invalid_input"),
    # booleans are booleans
    *[(f"force-{v!r}", "POST", "/v1/release", {"ip": "10.70.0.2", "force": v}, 422,
       "invalid_input") for v in ("yes", "true", 1, "1")],
    *[(f"query-force-{v}", "DELETE", f"/v1/pools/a?force={v}", None, 422, "invalid_input")
      for v in ("yes", "1", "on")],
    # characters that steer terminals, in ids, handles, labels and notes
    ("id-bidi", "POST", "/v1/allocate", {"pool": "a", "container_id": "c\u202egpj.exe"}, 422,
     "invalid_input"),
    ("id-escape", "POST", "/v1/allocate", {"pool": "a", "container_id": "c\x1b[2J"}, 422,
     "invalid_input"),
    ("id-zero-width", "POST", "/v1/allocate", {"pool": "a", "container_id": "owner\u200b-a"},
     422, "invalid_input"),
    ("id-line-separator", "POST", "/v1/allocate", {"pool": "a", "container_id": "c\u2028x"},
     422, "invalid_input"),
    ("id-surrogate", "POST", "/v1/allocate",
     b'{"pool": "a", "container_id": "c\\ud800"}', 422, "invalid_input"),
    ("host-nul", "POST", "/v1/allocate", {"pool": "a", "container_id": "c", "host": "h\x00"},
     422, "invalid_input"),
    ("label-key-bidi", "POST", "/v1/allocate",
     {"pool": "a", "container_id": "c", "labels": {"k\u202e": "v"}}, 422, "invalid_input"),
    ("label-value-bell", "POST", "/v1/allocate",
     {"pool": "a", "container_id": "c", "labels": {"k": "v\x07"}}, 422, "invalid_input"),
    ("pool-label-bidi", "POST", "/v1/pools",
     _pool("x", "10.9.0.0/24", labels={"owner": "\u2066team\u2069"}), 422, "invalid_input"),
    ("note-osc", "POST", "/v1/pools/a/reserve", {"range": "10.70.0.9",
                                                "note": "\x1b]0;pwned\x07"}, 422,
     "invalid_input"),
    ("update-label-bidi", "POST", "/v1/addresses/10.70.0.2/update",
     {"container_id": "owner-a", "labels": {"x": "\u202e"}}, 422, "invalid_input"),
    ("update-new-owner-bidi", "POST", "/v1/addresses/10.70.0.2/update",
     {"container_id": "owner-a", "new_container_id": "n\u202e"}, 422, "invalid_input"),
    # bounded routes and DNS (30,000 routes made every allocation answer 739 KB)
    ("routes-33", "POST", "/v1/pools",
     _pool("x", "10.9.0.0/24", routes=[{"dst": f"10.{i}.0.0/16"} for i in range(33)]), 422,
     "invalid_input"),
    ("nameservers-9", "POST", "/v1/pools",
     _pool("x", "10.9.0.0/24", dns={"nameservers": [f"10.0.0.{i}" for i in range(9)]}), 422,
     "invalid_input"),
    ("search-33", "POST", "/v1/pools",
     _pool("x", "10.9.0.0/24", dns={"search": [f"d{i}.corp" for i in range(33)]}), 422,
     "invalid_input"),
    ("nameserver-multicast", "POST", "/v1/pools",
     _pool("x", "10.9.0.0/24", dns={"nameservers": ["224.0.0.251"]}), 422, "invalid_input"),
    ("route-gw-multicast", "POST", "/v1/pools",
     _pool("x", "10.9.0.0/24", routes=[{"dst": "0.0.0.0/0", "gw": "224.0.0.1"}]), 422,
     "invalid_input"),
    ("search-space", "POST", "/v1/pools",
     _pool("x", "10.9.0.0/24", dns={"search": ["a b"]}), 422, "invalid_input"),
    # deeply nested and undecodable bodies: 422 everywhere (were 500 and 400)
    *[(f"deep-{kind}-{path}", "POST", path, body, 422, "invalid_input")
      for path in BODY_PATHS for kind, body in (("array", DEEP_ARRAY), ("object", DEEP_OBJECT))],
    *[(f"undecodable-{path}", "POST", path, b"\xff\xfe{\x00", 422, "invalid_input")
      for path in ("/v1/pools", "/v1/allocate", "/v1/pools/a/reserve")],
]


@pytest.fixture(scope="module")
def populated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    """One server for all bad requests: none of them may change it."""
    srv = start_server(tmp_path_factory.mktemp("bad-input"))
    try:
        with httpx.Client(base_url=srv.url, timeout=10,
                          headers={"Authorization": f"Bearer {srv.token}"}) as api:
            make_pool(api, name="a", cidr="10.70.0.0/24", vlan=70,
                      reserved=["10.70.0.100-10.70.0.109"])
            make_pool(api, name="b", cidr="10.71.0.0/24")
            make_pool(api, name="full", cidr="10.72.0.0/30")
            make_pool(api, name="bgp", cidr="10.73.0.0/24", mode="bgp", block_prefix=28)
            ok(api.post("/v1/allocate", json={"pool": "a", "container_id": "owner-a",
                                              "host": "h1"}))
            ok(api.post("/v1/allocate", json={"pool": "b", "container_id": "owner-b",
                                              "mac": "02:00:00:00:00:01"}))
            ok(api.post("/v1/allocate", json={"pool": "full", "container_id": "owner-f"}))
            ok(api.post("/v1/allocate", json={"pool": "bgp", "container_id": "owner-g",
                                              "host": "h2"}))
            ok(api.post("/v1/pools/a/assign", json={"ip": "10.70.0.50", "handle": "fixed-1"}))
            yield api
    finally:
        srv.stop()


@pytest.mark.parametrize(("method", "path", "body", "status", "code"),
                         [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_changes_nothing(populated: httpx.Client, method: str, path: str, body: Any,
                                   status: int, code: str) -> None:
    before = snapshot(populated)
    if isinstance(body, bytes):
        r = populated.request(method, path, content=body,
                              headers={"content-type": "application/json"})
    else:
        r = populated.request(method, path, json=body)
    err(r, status, code)
    assert snapshot(populated) == before


# --- secrets ---------------------------------------------------------------------


def test_token_never_logged(tmp_path: Path) -> None:
    srv = start_server(tmp_path, extra=["--log-level", "debug"])
    try:
        auth = {"Authorization": f"Bearer {srv.token}"}
        with httpx.Client(base_url=srv.url, headers=auth, timeout=10) as c:
            ok(c.post("/v1/pools", json={"name": "s", "cidr": "10.80.0.0/24"}), 201)
            ok(c.post("/v1/allocate", json={"pool": "s", "container_id": "c1"}))
            c.post("/v1/allocate", json={"pool": "s"})
            c.post("/v1/allocate", content=b"{", headers={"content-type": "application/json"})
            c.post("/v1/allocate", json={"pool": "s", "container_id": "x"},
                   headers={"Authorization": f"Bearer {srv.token}-wrong"})
            c.get("/nope")
    finally:
        srv.stop()
    log = srv.log.read_text()
    assert "serving on" in log
    assert srv.token not in log
    assert "Authorization" not in log and "authorization" not in log


def test_update_owner_and_labels(api: httpx.Client, anon: httpx.Client) -> None:
    """``POST /v1/addresses/{ip}/update``: the Docker driver's hand-over and relabel."""
    ok(api.post("/v1/pools", json={"name": "up", "cidr": "10.9.0.0/24"}), 201)
    a = ok(api.post("/v1/allocate", json={"pool": "up", "container_id": "tmp",
                                          "labels": {"a": "1"}}))
    ip = a["ip"]
    path = f"/v1/addresses/{ip}/update"
    err(anon.post(path, json={"container_id": "tmp", "labels": {"b": "2"}}), 401, "unauthorized")
    err(api.post(path, json={"container_id": "other"}), 409, "address_in_use")
    err(api.post("/v1/addresses/10.9.0.99/update", json={"container_id": "tmp"}), 404,
        "not_found")
    err(api.post(path, json={"container_id": "tmp", "bogus": 1}), 422, "invalid_input")
    b = ok(api.post(path, json={"container_id": "tmp", "new_container_id": "ep1",
                                "labels": {"container_name": "web"}},
                    headers={"X-Netd-Actor": "agent:h1"}))
    assert (b["ip"], b["mac"], b["container_id"]) == (ip, a["mac"], "ep1")
    assert b["labels"] == {"a": "1", "container_name": "web"}
    event = next(e for e in ok(api.get(f"/v1/addresses/{ip}/history"))["events"]
                 if e["action"] == "update")
    assert (event["action"], event["actor"], event["container_id"]) == ("update", "agent:h1",
                                                                       "ep1")
    assert ok(api.get(f"/v1/addresses/{ip}"))["container_id"] == "ep1"
