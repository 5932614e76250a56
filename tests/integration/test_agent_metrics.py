"""The agent's Prometheus metrics, scraped from a real lab agent after real plugin runs:
every count is what the test did."""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Iterator

import pytest

from tests.support.cnilab import (
    NETD_CNI,
    Lab,
    add_netns,
    del_netns,
    enable_agent_metrics,
    metric,
    netd_conf,
    run_plugin,
    running_lab,
    scrape_agent,
)

pytestmark = [pytest.mark.real]

PORT = 9651


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    with running_lab(tmp_path_factory.mktemp("metrics"), "nm", hosts=1) as the_lab:
        enable_agent_metrics(the_lab, "h1", PORT)
        yield the_lab


def scrape(lab: Lab) -> dict[str, float]:
    return scrape_agent(lab, "h1", PORT)


get = metric


def test_the_metrics_count_what_the_plugins_did(lab: Lab) -> None:
    before = scrape(lab)
    conf = netd_conf(f"{lab.prefix}-m", lab.socket("h1"))
    made = []
    try:
        for i in range(3):
            ns = add_netns(f"{lab.prefix}-m{i}")
            cid = secrets.token_hex(16)
            got = run_plugin(NETD_CNI, "ADD", conf, container_id=cid, netns=ns)
            assert got.rc == 0, got.err
            made.append((ns, cid))
        bad = run_plugin(NETD_CNI, "ADD", dict(conf, pool="no-such-pool"),
                         container_id=secrets.token_hex(16),
                         netns=made[0][0], ifname="eth9")
        assert bad.rc != 0
        code = str(bad.doc["code"])
        during = scrape(lab)  # nothing else runs on h1: these three are all it holds
        assert get(during, "netd_agent_attachments", mode="l2", state="ready") == 3
    finally:
        for ns, cid in made:
            run_plugin(NETD_CNI, "DEL", conf, container_id=cid, netns=ns)
            del_netns(ns)
    after = scrape(lab)

    def delta(name: str, **labels: str) -> float:
        old = 0.0
        with contextlib.suppress(KeyError):  # a series appears with its first sample
            old = get(before, name, **labels)
        return get(after, name, **labels) - old

    assert delta("netd_agent_requests_total", command="ADD", mode="l2", result="ok") == 3
    assert delta("netd_agent_requests_total", command="ADD", mode="l2", result=code) == 1
    assert delta("netd_agent_requests_total", command="DEL", mode="l2", result="ok") == 3
    assert delta("netd_agent_request_seconds_count", command="ADD", mode="l2",
                 result="ok") == 3
    assert delta("netd_agent_ipam_request_seconds_count", call="allocate") >= 3
    assert delta("netd_agent_ipam_request_seconds_count", call="release") >= 3
    assert get(after, "netd_agent_queued_releases") == 0
    assert get(after, "netd_agent_ipam_reachable") == 1
    assert not [k for k, v in after.items()
                if k.startswith("netd_agent_attachments{") and 'state="ready"' in k and v]
