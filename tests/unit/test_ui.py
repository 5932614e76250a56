"""The web view (/ui/) in-process, on both stores: authentication, escaping, paging,
search, history (the browser tests in tests/integration/test_ui_browser.py drive a real
server with chromium)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from netd.ipam.api import create_app
from netd.ipam.metrics import Metrics
from netd.ipam.service import IPAM, AllocRequest, PoolSpec
from netd.ipam.ui import Sessions

TOKEN, READ = "the-write-token", "the-read-token"
FORM = {"content-type": "application/x-www-form-urlencoded"}


@pytest.fixture
def ipam(store: Any) -> IPAM:
    ipam = IPAM(store, cooldown=0)
    ipam.create_pool(PoolSpec(name="web", cidr="10.30.0.0/22", vlan=120, mode="vlan"))
    ipam.create_pool(PoolSpec(name="bgp", cidr="10.31.0.0/24", mode="bgp", block_prefix=28))
    return ipam


@pytest.fixture
def client(ipam: IPAM) -> Iterator[TestClient]:
    app = create_app(ipam, TOKEN, Metrics(), read_token=READ)
    with TestClient(app, follow_redirects=False) as c:
        yield c


def login(c: TestClient, token: str = READ) -> Any:
    return c.post("/ui/login?next=/ui/", content=f"token={token}", headers=FORM)


def test_an_unauthenticated_visit_gets_the_login_page(client: TestClient) -> None:
    for path in ("/ui/", "/ui/pools/web", "/ui/search?q=x", "/ui/hosts",
                 "/ui/addresses/10.30.0.5"):
        r = client.get(path)
        assert r.status_code == 303 and r.headers["location"].startswith("/ui/login?next=")
    page = client.get("/ui/login")
    assert page.status_code == 401 and 'name="token"' in page.text
    assert "web" not in re.sub(r"<[^>]+>", "", page.text.split("<main>")[1])


def test_a_wrong_token_sets_no_cookie_and_changes_nothing(client: TestClient,
                                                          ipam: IPAM) -> None:
    before = ipam.list_pools()
    r = login(client, "guess")
    assert r.status_code == 401 and "set-cookie" not in r.headers
    assert "not a token" in r.text
    assert client.get("/ui/").status_code == 303
    assert ipam.list_pools() == before


@pytest.mark.parametrize("token", [READ, TOKEN])
def test_either_token_logs_in_with_a_strict_httponly_cookie_that_is_not_the_token(
        client: TestClient, token: str) -> None:
    r = login(client, token)
    assert r.status_code == 303 and r.headers["location"] == "/ui/"
    cookie = r.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/ui" in cookie
    assert token not in cookie
    assert client.get("/ui/").status_code == 200
    # the cookie opens the view only: the API still wants its bearer token
    assert client.get("/v1/pools").status_code == 401


def test_the_bearer_header_works_as_for_the_api(client: TestClient) -> None:
    r = client.get("/ui/", headers={"Authorization": f"Bearer {READ}"})
    assert r.status_code == 200 and "10.30.0.0/22" in r.text


def test_a_cookie_expires_and_a_forged_one_is_refused() -> None:
    now = [1_000_000.0]
    s = Sessions([READ], clock=lambda: now[0])
    cookie = s.issue(READ.encode())
    assert s.valid(cookie)
    expiry, mac = cookie.split(".")
    assert not s.valid(f"{int(expiry) + 3600}.{mac}")  # a later expiry, same MAC
    assert not s.valid(cookie[:-1] + ("0" if cookie[-1] != "0" else "1"))
    assert not Sessions(["another token"], clock=lambda: now[0]).valid(cookie)
    now[0] += 13 * 3600
    assert not s.valid(cookie)


def test_login_goes_back_only_into_the_view(client: TestClient) -> None:
    r = client.post("/ui/login?next=https://evil.example/", content=f"token={READ}",
                    headers=FORM)
    assert r.headers["location"] == "/ui/"
    r = client.post("/ui/login?next=/ui/hosts", content=f"token={READ}", headers=FORM)
    assert r.headers["location"] == "/ui/hosts"


def test_the_view_changes_nothing(client: TestClient) -> None:
    login(client)
    for path in ("/ui/", "/ui/pools/web", "/ui/hosts"):
        assert client.post(path).status_code == 405
        assert client.delete(path).status_code == 405


def pools_table(html: str) -> dict[str, dict[str, int]]:
    out = {}
    for row in re.findall(r'<tr data-pool="([^"]+)">(.*?)</tr>', html, re.S):
        cells = dict(re.findall(r'data-col="(\w+)">(\d+)<', row[1]))
        out[row[0]] = {k: int(v) for k, v in cells.items()}
    return out


def test_the_pool_list_shows_the_apis_counts(client: TestClient, ipam: IPAM) -> None:
    for i in range(30):
        ipam.allocate(AllocRequest(pool="web", container_id=f"c{i}", host=f"h{i % 3}"))
    ipam.reserve("web", "10.30.1.0-10.30.1.9", "printers")
    ipam.release(pool="web", container_id="c7")
    login(client)
    shown = pools_table(client.get("/ui/").text)
    for name in ("web", "bgp"):
        _, stats = ipam.get_pool(name)
        assert shown[name] == {"allocated": stats.allocated, "reserved": stats.reserved,
                               "free": stats.free}
    assert shown["web"]["allocated"] == 29


def test_markup_in_labels_and_names_is_shown_as_text(client: TestClient, ipam: IPAM) -> None:
    ipam.allocate(AllocRequest(pool="web", container_id="x1", host="h1",
                               labels={"app": '<script id="pwn">alert(1)</script>'}))
    login(client)
    html = client.get("/ui/pools/web").text
    assert '<script id="pwn">' not in html
    assert "&lt;script id=&#34;pwn&#34;&gt;alert(1)&lt;/script&gt;" in html
    r = client.get('/ui/search?q=<img src=x onerror=alert(1)>')
    assert "<img src=x" not in r.text and "&lt;img src=x" in r.text


def test_a_pool_is_paged_with_the_apis_cursor(client: TestClient, ipam: IPAM) -> None:
    for i in range(250):
        ipam.allocate(AllocRequest(pool="web", container_id=f"p{i}", host="h1"))
    login(client)
    seen: list[str] = []
    url = "/ui/pools/web"
    pages = 0
    while url:
        html = client.get(url).text
        seen += re.findall(r'<tr data-ip="([^"]+)">', html)
        pages += 1
        m = re.search(r'<a id="next" href="([^"]+)"', html)
        url = m.group(1).replace("&amp;", "&") if m else ""
    assert pages == 3 and len(seen) == 250 and len(set(seen)) == 250
    assert seen == sorted(seen, key=lambda s: tuple(int(x) for x in s.split(".")))
    # and by host, through the index
    ipam.allocate(AllocRequest(pool="web", container_id="other", host="h9"))
    only = client.get("/ui/pools/web?host=h9").text
    assert re.findall(r'<tr data-ip="([^"]+)">', only) and "other/eth0" in only
    assert "p1/eth0" not in only


def test_search_by_address_mac_container_and_handle(client: TestClient, ipam: IPAM) -> None:
    a, _ = ipam.allocate(AllocRequest(pool="web", container_id="abc123", host="h1",
                                      handle="default/web-0"))
    ipam.assign("web", "10.30.2.50", "default/web-1", "web-1's")
    login(client)
    ip = str(a.ip >> 24) + "." + ".".join(str((a.ip >> s) & 255) for s in (16, 8, 0))
    by_mac = client.get(f"/ui/search?q={a.mac.upper()}").text
    assert "abc123/eth0" in by_mac and "by mac" in by_mac
    assert "abc123/eth0" in client.get("/ui/search?q=abc123").text
    assert "abc123/eth0" in client.get("/ui/search?q=default/web-0").text
    held = client.get("/ui/search?q=default/web-1").text
    assert "10.30.2.50" in held and "Held for it" in held
    assert f'/ui/addresses/{ip}' in client.get(f"/ui/search?q={ip}").text
    assert "0 allocation(s)" in client.get("/ui/search?q=nobody").text


def test_an_addresses_history_shows_who_held_it_when(client: TestClient, ipam: IPAM) -> None:
    a, _ = ipam.allocate(AllocRequest(pool="web", container_id="first", host="h1"))
    ipam.release(pool="web", container_id="first")
    ip = ".".join(str((a.ip >> s) & 255) for s in (24, 16, 8, 0))
    ipam.allocate(AllocRequest(pool="web", container_id="second", host="h2", ip=ip))
    login(client)
    html = client.get(f"/ui/addresses/{ip}").text
    actions = re.findall(r'data-action="([^"]+)"', html)
    assert actions == ["allocate", "release", "allocate", "pool-create"]  # newest first
    assert html.index("second/eth0") < html.index("first/eth0")
    assert re.search(r'id="state">allocated<', html)


def test_hosts_with_their_blocks(client: TestClient, ipam: IPAM) -> None:
    ipam.allocate(AllocRequest(pool="bgp", container_id="b1", host="rack1-h1"))
    login(client)
    html = client.get("/ui/hosts").text
    assert 'data-host="rack1-h1"' in html and "bgp 10.31.0.0/28" in html
