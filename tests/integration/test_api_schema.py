"""The OpenAPI document is the contract: schemathesis against a real ``netd ipam serve``.

Cases are generated from ``/openapi.json`` (bounded: ``EXAMPLES`` per operation, schema
valid and invalid data), sent with the token and without it:

- with the token: no 5xx, and every answer is one the document lists (status, content
  type, body schema, headers); invalid data is refused with a 4xx. Inputs the schema
  allows but the domain refuses (a random string as a CIDR) get a documented 4xx, so
  schemathesis' "positive data is accepted" check does not apply.
- without the token: nothing under /v1 is served (401), and the IPAM's state is the
  same after every case as before it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance

from tests.conftest import Server, start_server
from tests.integration.test_api import make_pool, snapshot

pytestmark = pytest.mark.real

EXAMPLES = int(os.environ.get("NETD_SCHEMA_EXAMPLES", "25"))
BOUNDED = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                   suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def contract_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start_server(tmp_path_factory.mktemp("schema"))
    try:
        with httpx.Client(base_url=srv.url, timeout=10,
                          headers={"Authorization": f"Bearer {srv.token}"}) as api:
            # something for the generated requests to find (and not change, without token)
            make_pool(api, name="a", cidr="10.80.0.0/24", vlan=80)
            make_pool(api, name="b", cidr="10.81.0.0/24", mode="bgp", block_prefix=28)
            api.post("/v1/allocate", json={"pool": "a", "container_id": "c1", "host": "h1"})
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def admin(contract_server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=contract_server.url, timeout=10, headers={
            "Authorization": f"Bearer {contract_server.token}"}) as c:
        yield c


@pytest.fixture(scope="module")
def api_schema(contract_server: Server) -> Any:
    return schemathesis.openapi.from_url(f"{contract_server.url}/openapi.json")


def _labels() -> list[str]:
    """The operations, from the same app code the server runs (at collection time; the
    test itself reads the served document)."""
    from netd.ipam.api import create_app
    from netd.ipam.metrics import Metrics
    from netd.ipam.service import IPAM
    from netd.ipam.store import open_store

    store = open_store("sqlite://:memory:")
    try:
        doc = create_app(IPAM(store), "t", Metrics()).openapi()
    finally:
        store.close()
    return [f"{m.upper()} {p}" for p, ops in doc["paths"].items() for m in ops]


LABELS = _labels()


def strategy(api_schema: Any, label: str) -> Any:
    """Schema-valid and schema-invalid cases of one operation."""
    from hypothesis import strategies as st

    op = next(r.ok() for r in api_schema.get_all_operations() if r.ok().label == label)
    return st.one_of(op.as_strategy(GenerationMode.POSITIVE),
                     op.as_strategy(GenerationMode.NEGATIVE))


@pytest.mark.parametrize("label", LABELS)
def test_with_the_token_every_answer_is_documented(label: str, api_schema: Any,
                                                  contract_server: Server) -> None:
    auth = {"Authorization": f"Bearer {contract_server.token}"}

    @given(case=strategy(api_schema, label))
    @BOUNDED
    def run(case: Any) -> None:
        case.call_and_validate(headers=auth, excluded_checks=[positive_data_acceptance])

    run()


@pytest.mark.parametrize("label", LABELS)
def test_without_the_token_nothing_is_served_or_changed(label: str, api_schema: Any,
                                                       admin: httpx.Client) -> None:
    before = snapshot(admin)

    @given(case=strategy(api_schema, label))
    @BOUNDED
    def run(case: Any) -> None:
        response = case.call()
        if case.path.startswith("/v1/"):
            assert response.status_code == 401, (case.method, case.formatted_path,
                                                 response.status_code, response.text[:200])
        else:  # /healthz, /metrics
            assert response.status_code in (200, 405)

    run()
    assert snapshot(admin) == before


def test_the_document_is_what_the_server_serves(contract_server: Server, tmp_path: Path) -> None:
    """The checked document is the served one (not a copy that could drift)."""
    doc = httpx.get(f"{contract_server.url}/openapi.json", timeout=10).json()
    assert doc["info"]["title"] == "netd IPAM"
    assert len(doc["paths"]) >= 17
