"""Prometheus metrics of one node (a registry per app, no module globals)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector


class _Load(Collector):
    """Reads queue depth at scrape time instead of keeping gauges in step on every job."""

    def __init__(self, read: Callable[[], Iterable[tuple[str, int, int]]]) -> None:
        self._read = read

    def collect(self) -> Iterable[GaugeMetricFamily]:
        active = GaugeMetricFamily("hearth_node_jobs_active", "Jobs generating now.", labels=["model"])
        queued = GaugeMetricFamily("hearth_node_jobs_queued", "Jobs waiting for the model.", labels=["model"])
        for model, n_active, n_queued in self._read():
            active.add_metric([model], n_active)
            queued.add_metric([model], n_queued)
        return [active, queued]


class NodeMetrics:
    def __init__(self, load: Callable[[], Iterable[tuple[str, int, int]]]) -> None:
        self.registry = CollectorRegistry()
        self.jobs = Counter(
            "hearth_node_jobs",
            "Jobs by model and finish reason.",
            ["model", "finish_reason"],
            registry=self.registry,
        )
        self.tokens = Counter(
            "hearth_node_tokens",
            "Tokens by model and kind (prompt, completion).",
            ["model", "kind"],
            registry=self.registry,
        )
        self.registry.register(_Load(load))

    def render(self) -> bytes:
        return generate_latest(self.registry)
