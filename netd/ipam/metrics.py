"""Prometheus metrics of the IPAM server, in a registry of their own.

Per-pool gauges are computed at scrape time from :meth:`IPAM.list_pools`, so
they are right even when several servers share one store. Counters and the
latency histogram are per server: with ``--workers N`` the workers keep them in
files of a directory they share (prometheus_client's multiprocess mode,
:func:`shared_between_processes`), and a scrape of any worker sums them all.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    values,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


@contextlib.contextmanager
def shared_between_processes() -> Iterator[str]:
    """Around forking the workers: metrics made in them after this keep their values in
    files of one private directory (removed afterwards), so each scrape sums them."""
    path = tempfile.mkdtemp(prefix="netd-ipam-metrics-")
    os.chmod(path, 0o700)
    os.environ[MULTIPROC_ENV] = path
    values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]  # at import
    try:
        yield path
    finally:
        os.environ.pop(MULTIPROC_ENV, None)
        values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]
        shutil.rmtree(path, ignore_errors=True)

if TYPE_CHECKING:
    from netd.ipam.service import IPAM

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                   2.5, 5.0)


class PoolCollector:
    """Custom collector: free/reserved/allocated/size per pool, read at scrape time."""

    def __init__(self, ipam: IPAM) -> None:
        self.ipam = ipam

    def describe(self) -> list[Any]:
        return []  # names are not known before a scrape; skip collision checks

    def collect(self) -> Iterator[GaugeMetricFamily]:
        families = {
            name: GaugeMetricFamily(f"netd_ipam_pool_{name}", help_text, labels=["pool"])
            for name, help_text in (
                ("size", "Usable addresses in the pool"),
                ("free", "Free addresses in the pool"),
                ("reserved", "Reserved addresses in the pool"),
                ("allocated", "Allocated addresses in the pool"),
                ("utilisation", "(reserved + allocated) / size"),
            )
        }
        for pool, stats in self.ipam.list_pools():
            families["size"].add_metric([pool.name], float(stats.size))
            families["free"].add_metric([pool.name], float(stats.free))
            families["reserved"].add_metric([pool.name], float(stats.reserved))
            families["allocated"].add_metric([pool.name], float(stats.allocated))
            families["utilisation"].add_metric([pool.name], stats.utilisation)
        yield from families.values()


class Metrics:
    """Owns a :class:`CollectorRegistry`; no global prometheus state is touched."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.allocations = Counter(
            "netd_ipam_allocations", "Addresses allocated (new or idempotent repeats)",
            ["pool"], registry=self.registry)
        self.releases = Counter(
            "netd_ipam_releases", "Addresses released", ["pool"], registry=self.registry)
        self.errors = Counter(
            "netd_ipam_errors", "Error answers by code", ["code"], registry=self.registry)
        self.latency = Histogram(
            "netd_ipam_request_duration_seconds", "Request latency by route and method",
            ["route", "method"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self._tracked: PoolCollector | None = None
        # labelled children cached: .labels() takes a lock and builds a tuple
        self._latency: dict[tuple[str, str], Any] = {}
        self._allocs: dict[str, Any] = {}
        self._releases: dict[str, Any] = {}
        self._errors: dict[str, Any] = {}

    def track(self, ipam: IPAM) -> None:
        """Export per-pool gauges of ``ipam`` (once; later calls are ignored)."""
        if self._tracked is None:
            self._tracked = PoolCollector(ipam)
            self.registry.register(self._tracked)

    def observe(self, route: str, method: str, seconds: float) -> None:
        child = self._latency.get((route, method))
        if child is None:
            child = self._latency[(route, method)] = self.latency.labels(route, method)
        child.observe(seconds)

    def allocated(self, pool: str) -> None:
        child = self._allocs.get(pool)
        if child is None:
            child = self._allocs[pool] = self.allocations.labels(pool)
        child.inc()

    def released(self, pool: str, n: int = 1) -> None:
        child = self._releases.get(pool)
        if child is None:
            child = self._releases[pool] = self.releases.labels(pool)
        child.inc(n)

    def error(self, code: str) -> None:
        child = self._errors.get(code)
        if child is None:
            child = self._errors[code] = self.errors.labels(code)
        child.inc()

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition and its content type (every worker's counters
        when several share them)."""
        if not os.environ.get(MULTIPROC_ENV):
            return generate_latest(self.registry), CONTENT_TYPE_LATEST
        registry = CollectorRegistry(auto_describe=False)
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        if self._tracked is not None:
            registry.register(self._tracked)
        return generate_latest(registry), CONTENT_TYPE_LATEST
