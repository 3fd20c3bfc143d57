"""Prometheus metrics of one scheduler (a registry per app, no module globals)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "hearth_requests",
            "Generation requests by endpoint and outcome.",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.tokens = Counter(
            "hearth_tokens",
            "Tokens processed, by kind (prompt or completion).",
            ["kind"],
            registry=self.registry,
        )
        self.receipts = Counter(
            "hearth_usage_receipts",
            "Jobs by what their node's signed usage receipt said: confirmed (the counts the relay saw), "
            "corrected, or unconfirmed (none came in time).",
            ["outcome"],
            registry=self.registry,
        )
        self.ttfb = Histogram(
            "hearth_time_to_first_byte_seconds",
            "Time from request to the node's first frame.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
