"""The agent's Prometheus metrics (``metrics_listen`` in agent.toml; off by default).

Counters and histograms are recorded where things happen (the CNI handler, the
IPAM client, the duplicate-address path, the reconciler); gauges are read at
scrape time from the agent's state and its driver's status, so they cannot
drift. docs/METRICS.md lists every metric.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger("netd.agent.metrics")

LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class AgentMetrics:
    """One agent's metrics, in a registry of its own (several agents per test process)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("netd_agent_requests", "CNI requests served, by command, "
                                "mode and result (ok or the CNI error code)",
                                ["command", "mode", "result"], registry=r)
        self.request_seconds = Histogram("netd_agent_request_seconds", "CNI request latency",
                                         ["command", "mode", "result"], buckets=LATENCY,
                                         registry=r)
        self.duplicates = Counter("netd_agent_duplicate_addresses", "addresses found in use "
                                  "on the wire by someone else (then reserved)", ["mode"],
                                  registry=r)
        self.ipam_seconds = Histogram("netd_agent_ipam_request_seconds", "IPAM API call "
                                      "latency, by call", ["call"], buckets=LATENCY,
                                      registry=r)
        self.ipam_failures = Counter("netd_agent_ipam_failures", "IPAM API calls that failed, "
                                     "by call and error code", ["call", "code"], registry=r)
        self.repairs = Counter("netd_agent_reconcile_repairs", "what the reconciler repaired "
                               "or swept", ["mode"], registry=r)

    def observe_request(self, command: str, result: str, seconds: float) -> None:
        self.requests.labels(command, self.mode, result).inc()
        self.request_seconds.labels(command, self.mode, result).observe(seconds)

    def ipam_call(self, call: str, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        try:
            return fn()
        except Exception as exc:
            self.ipam_failures.labels(call, str(getattr(exc, "code", "error"))).inc()
            raise
        finally:
            self.ipam_seconds.labels(call).observe(time.perf_counter() - t0)

    def gauges(self, read: Callable[[], dict[str, Any]]) -> None:
        """Gauges from ``read()`` (the agent's :meth:`status`-like snapshot) at scrape."""
        self.registry.register(_Gauges(self.mode, read))

    def serve(self, listen: str) -> None:
        host, _, port = listen.rpartition(":")
        start_http_server(int(port), addr=host.strip("[]"), registry=self.registry)
        log.info("metrics on http://%s/metrics", listen)


class _Gauges(Collector):
    def __init__(self, mode: str, read: Callable[[], dict[str, Any]]) -> None:
        self.mode, self.read = mode, read

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            s = self.read()
        except Exception:  # a scrape must answer even when the agent is unwell
            log.exception("metrics: reading the agent's state failed")
            return
        att = GaugeMetricFamily("netd_agent_attachments", "attachments recorded, by state",
                                labels=["mode", "state"])
        for state, n in sorted(s.get("attachments", {}).items()):
            att.add_metric([self.mode, state], n)
        yield att
        yield GaugeMetricFamily("netd_agent_queued_releases", "releases waiting for the IPAM",
                                value=s.get("queued_releases", 0))
        yield GaugeMetricFamily("netd_agent_ipam_reachable", "1 when the IPAM answered its "
                                "last health check", value=1 if s.get("ipam_ok") else 0)
        for g in s.get("gauges", []):  # the mode's own (its driver's gauges())
            family = GaugeMetricFamily(f"netd_agent_{g.name}", g.help, labels=list(g.labels))
            for values, value in g.samples:
                family.add_metric(list(values), value)
            yield family


__all__ = ["AgentMetrics"]
