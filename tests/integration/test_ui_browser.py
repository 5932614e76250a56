"""The web view in a real headless browser: Debian's chromium, driven by Playwright with
the system browser's executable (no browser download), against a real ``netd ipam
serve`` process.

``NETD_SCREENSHOTS=docs/ui`` writes the main pages' screenshots there (the README's);
otherwise they go to the test's temporary directory and are only checked to exist.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import REPO, Server, bin_path, require, start_server

pytestmark = [pytest.mark.real]

CHROMIUM = Path("/usr/bin/chromium")
READ = "ui-read-token-" + "r" * 20
MARKUP = '<b id="pwn">owned</b>'


@dataclass
class Site:
    server: Server
    shots: Path
    macs: dict[str, str]

    def api(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        r = httpx.request(method, self.server.url + path, json=body, timeout=10,
                          headers={"Authorization": f"Bearer {self.server.token}"})
        assert r.status_code < 300, r.text
        return r.json()


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    if not CHROMIUM.exists() and os.geteuid() == 0:
        subprocess.run([str(REPO / "scripts" / "install-deps"), "chromium"], check=False,
                       timeout=900)
    require(CHROMIUM.exists(), "chromium is missing (apt-get install chromium)")
    tmp = tmp_path_factory.mktemp("ui")
    server = start_server(tmp, read_token=READ)
    shots = Path(os.environ.get("NETD_SCREENSHOTS") or tmp / "shots")
    shots.mkdir(parents=True, exist_ok=True)
    s = Site(server, shots, {})
    try:
        s.api("POST", "/v1/pools", {"name": "rack1", "cidr": "198.18.1.0/24",
                                    "reserved": ["198.18.1.2-198.18.1.19"]})
        s.api("POST", "/v1/pools", {"name": "vlan100", "cidr": "198.18.100.0/24",
                                    "vlan": 100, "mode": "vlan"})
        s.api("POST", "/v1/pools", {"name": "blocks", "cidr": "10.70.0.0/22", "mode": "bgp",
                                    "block_prefix": 26})
        for i in range(40):
            pool = ("rack1", "vlan100", "blocks")[i % 3]
            got = s.api("POST", "/v1/allocate", {
                "pool": pool, "container_id": f"ctr{i:02d}", "host": f"node-{i % 4}",
                "labels": {"k8s.pod": f"shop/web-{i}", "team": "payments"}})
            s.macs[f"ctr{i:02d}"] = got["mac"]
        got = s.api("POST", "/v1/allocate", {"pool": "rack1", "container_id": "evil",
                                             "host": "node-0", "labels": {"note": MARKUP}})
        s.macs["evil"] = got["mac"]
        s.api("POST", "/v1/release", {"pool": "rack1", "container_id": "ctr03"})
        s.api("POST", "/v1/release", {"pool": "rack1", "container_id": "ctr06"})
        yield s
    finally:
        server.stop()


@pytest.fixture
def page(site: Site) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM),
                                    args=["--no-sandbox", "--disable-gpu"])
        try:
            context = browser.new_context(viewport={"width": 1366, "height": 800})
            yield context.new_page()
        finally:
            browser.close()


def log_in(page: Any, site: Site) -> None:
    page.goto(site.server.url + "/ui/")
    page.fill('input[name="token"]', READ)
    page.click('button:has-text("Log in")')
    page.wait_for_url(site.server.url + "/ui/")


def test_an_unauthenticated_visit_gets_the_login_page(page: Any, site: Site) -> None:
    page.goto(site.server.url + "/ui/pools/rack1")
    assert "/ui/login?next=" in page.url
    assert page.locator('input[name="token"]').is_visible()
    assert page.locator("table").count() == 0  # nothing of the pools shows
    page.fill('input[name="token"]', "not-the-token")
    page.click('button:has-text("Log in")')
    assert page.locator(".error").inner_text().startswith("That is not a token")
    page.screenshot(path=str(site.shots / "login.png"))


def test_the_pool_list_shows_what_netctl_shows(page: Any, site: Site) -> None:
    log_in(page, site)
    token = site.shots.parent / "token-for-netctl"
    token.write_text(READ)
    try:
        listed = json.loads(subprocess.run(
            [bin_path("netctl"), "--server", site.server.url, "--token-file", str(token),
             "--json", "pool", "list"], capture_output=True, text=True, timeout=60,
            check=True).stdout)["pools"]
    finally:
        token.unlink()
    assert len(listed) == 3
    for p in listed:
        row = page.locator(f'tr[data-pool="{p["name"]}"]')
        for col in ("allocated", "reserved", "free"):
            assert int(row.locator(f'td[data-col="{col}"]').inner_text()) == p[col], (
                p["name"], col)
    assert int(page.locator('tr[data-pool="rack1"] td[data-col="allocated"]').inner_text()) \
        == 13  # 14 allocated there, 2 released, plus "evil"
    page.screenshot(path=str(site.shots / "pools.png"), full_page=True)


def test_a_search_by_mac_finds_the_container(page: Any, site: Site) -> None:
    log_in(page, site)
    page.fill('input[name="q"]', site.macs["ctr10"].upper())
    page.press('input[name="q"]', "Enter")
    page.wait_for_selector("#found")
    assert "by mac" in page.locator("#found").inner_text()
    assert page.locator("table.allocations tbody tr").count() == 1
    assert "ctr10/eth0" in page.locator("table.allocations").inner_text()
    page.screenshot(path=str(site.shots / "search.png"), full_page=True)


def test_an_addresses_history_shows_allocate_and_release_with_owners(
        page: Any, site: Site) -> None:
    log_in(page, site)
    page.fill('input[name="q"]', "ctr03")
    page.press('input[name="q"]', "Enter")
    page.wait_for_selector("#found")
    assert page.locator("table.allocations tbody tr td.mono").count() == 0  # released
    history = site.api("GET", "/v1/history?pool=rack1&limit=1000")["events"]
    ip = next(e["ip"] for e in history if e["container_id"] == "ctr03")
    page.goto(f"{site.server.url}/ui/addresses/{ip}")
    items = page.locator("#timeline li")
    actions = [items.nth(i).get_attribute("data-action") for i in range(items.count())]
    assert actions[:2] == ["release", "allocate"]
    assert "ctr03/eth0" in items.nth(0).inner_text() and "node-3" in items.nth(1).inner_text()
    assert page.locator("#state").inner_text() == "free"
    page.screenshot(path=str(site.shots / "history.png"), full_page=True)


def test_a_label_with_markup_is_shown_as_text(page: Any, site: Site) -> None:
    log_in(page, site)
    page.goto(site.server.url + "/ui/pools/rack1")
    assert page.locator("#pwn").count() == 0  # no element was made of it
    assert page.get_by_text(f"note={MARKUP}").is_visible()
    page.screenshot(path=str(site.shots / "pool.png"), full_page=True)


def test_hosts_and_their_blocks(page: Any, site: Site) -> None:
    log_in(page, site)
    page.goto(site.server.url + "/ui/hosts")
    rows = page.locator("#hosts tbody tr")
    assert rows.count() == 4
    assert "blocks 10.70." in page.locator('tr[data-host="node-1"]').inner_text()
    page.screenshot(path=str(site.shots / "hosts.png"), full_page=True)
    for name in ("pools", "pool", "search", "history", "hosts", "login"):
        if (site.shots / f"{name}.png").exists():
            assert (site.shots / f"{name}.png").stat().st_size > 5000
    assert shutil.which("true")
