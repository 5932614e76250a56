"""The API app in-process, for what a healthy real server cannot be made to do.

Everything else about the API is tested against a real server process in
tests/integration/test_api.py.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from netd.errors import Unavailable
from netd.ipam.api import create_app
from netd.ipam.metrics import Metrics
from netd.ipam.service import IPAM
from netd.ipam.store import open_store

TOKEN = "t0k3n-for-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def ipam() -> Iterator[IPAM]:
    store = open_store("sqlite://:memory:")
    yield IPAM(store)
    store.close()


@pytest.fixture
def client(ipam: IPAM) -> Iterator[TestClient]:
    with TestClient(create_app(ipam, TOKEN, Metrics()), raise_server_exceptions=False) as c:
        yield c


def boom(*_: Any, **__: Any) -> Any:
    raise RuntimeError("kaboom")


def test_unexpected_error_is_500_and_logged(client: TestClient, ipam: IPAM,
                                            monkeypatch: pytest.MonkeyPatch,
                                            caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(ipam, "hosts", boom)
    with caplog.at_level(logging.ERROR, logger="netd.ipam.api"):
        r = client.get("/v1/hosts", headers=AUTH)
    assert r.status_code == 500
    assert r.json() == {"error": {"code": "internal", "message": "internal server error"}}
    assert "unexpected error serving GET /v1/hosts" in caplog.text
    assert "Bearer" not in caplog.text


@pytest.mark.parametrize("path", ["/v1/allocate", "/v1/release"])
def test_unexpected_error_in_fast_path(client: TestClient, ipam: IPAM, path: str,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ipam, "allocate_change", boom)
    monkeypatch.setattr(ipam, "release_change", boom)
    r = client.post(path, json={"pool": "p", "container_id": "c"}, headers=AUTH)
    assert r.status_code == 500
    assert r.json()["error"]["code"] == "internal"
    metrics = client.get("/metrics").text
    assert 'netd_ipam_errors_total{code="internal"} 1.0' in metrics


def test_datastore_busy_is_503(client: TestClient, ipam: IPAM,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    def busy(*_: Any, **__: Any) -> Any:
        raise Unavailable("datastore busy: database is locked")

    monkeypatch.setattr(ipam.store, "transact", busy)  # as SQLite says it
    monkeypatch.setattr(ipam, "list_pools", busy)
    r = client.post("/v1/allocate", json={"pool": "p", "container_id": "c"}, headers=AUTH)
    assert r.status_code == 503
    assert r.json()["error"] == {"code": "unavailable",
                                 "message": "datastore busy: database is locked"}
    assert client.get("/v1/pools", headers=AUTH).json()["error"]["code"] == "unavailable"


def test_no_token_means_open(ipam: IPAM) -> None:
    with TestClient(create_app(ipam, None, Metrics())) as c:
        assert c.post("/v1/pools", json={"name": "p", "cidr": "10.0.0.0/24"}).status_code == 201
        assert c.post("/v1/allocate", json={"pool": "p", "container_id": "c"}).json()[
            "ip"] == "10.0.0.2"


def test_metrics_registries_are_separate(ipam: IPAM) -> None:
    """Two apps in one process do not share (or collide on) metrics."""
    m1, m2 = Metrics(), Metrics()
    with TestClient(create_app(ipam, None, m1)) as c1, TestClient(create_app(ipam, None, m2)):
        c1.post("/v1/pools", json={"name": "p", "cidr": "10.0.0.0/24"})
        c1.post("/v1/allocate", json={"pool": "p", "container_id": "c"})
    assert 'netd_ipam_allocations_total{pool="p"} 1.0' in m1.render()[0].decode()
    assert "netd_ipam_allocations_total{" not in m2.render()[0].decode()
    assert 'netd_ipam_pool_allocated{pool="p"} 1.0' in m2.render()[0].decode()
