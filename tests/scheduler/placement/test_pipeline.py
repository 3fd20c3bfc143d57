"""The whole pipeline over small clusters: who gets the request, cold loads, ties, and the refusal."""

from __future__ import annotations

import random

import pytest

from scheduler.placement import ClusterSnapshot, Placement, Refusal, place
from tests.scheduler.placement.factory import GIB, model, node, request


def cluster(*nodes: object) -> ClusterSnapshot:
    return ClusterSnapshot(tuple(nodes))  # type: ignore[arg-type]


# (cluster, request, expected node and action, why)
# fmt: off
CHOICES = [
    (cluster(node("busy", model(active=4, outstanding_tokens=2000)), node("idle")), request(), ("idle", "run"), "idle beats busy"),
    (cluster(node("slow", model(tokens_per_s=10.0, outstanding_tokens=500)), node("fast", model(tokens_per_s=80.0, outstanding_tokens=500))), request(), ("fast", "run"), "same backlog, faster node"),
    (cluster(node("cold", model(phase="available")), node("warm")), request(), ("warm", "run"), "warm beats cold"),
    (cluster(node("a", model(phase="available")), node("b", model("other"))), request(), ("a", "load"), "nobody has it loaded: one node loads it"),
    (cluster(node("club", tier="club", healthy=False), node("vol", tier="community")), request(), ("vol", "run"), "a dead node is skipped"),
    (cluster(node("x"), node("y")), request(exclude=frozenset({"x"})), ("y", "run"), "failover skips the node that failed"),
    (cluster(node("club", model(phase="available")), node("vol", tier="community")), request(tiers=frozenset({"club"})), ("club", "load"), "the only warm copy is on a forbidden tier: load one where allowed"),
]
# fmt: on


@pytest.mark.parametrize(("snapshot", "req", "expected", "why"), CHOICES, ids=[c[3] for c in CHOICES])
def test_choice(snapshot: ClusterSnapshot, req: object, expected: tuple[str, str], why: str) -> None:
    decision = place(req, snapshot, random.Random(0))  # type: ignore[arg-type]
    assert isinstance(decision, Placement), decision
    assert (decision.node_id, decision.action) == expected, why


# (cluster, request, expected kind and resource, why)
# fmt: off
REFUSALS = [
    (cluster(node("a", model("other"))), request(), ("unknown_model", "model"), "nobody serves it"),
    (cluster(node("a", model(active=8)), node("b", model(phase="available"))), request(), ("busy", "sequences"), "warm but full: wait, do not load a second copy"),
    (cluster(node("a", model(phase="loading"))), request(), ("busy", "loading"), "loading: wait"),
    (cluster(node("a", healthy=False), node("b", draining=True)), request(), ("unavailable", "health"), "nothing up: 503 now"),
    (cluster(node("a"), node("b")), request(max_tokens=5000), ("never", "context"), "max_tokens beyond every context"),
    (cluster(node("a", model(phase="available", footprint_bytes=100 * GIB))), request(), ("never", "memory"), "larger than every node"),
    (cluster(node("a", tier="community")), request(tiers=frozenset({"club"})), ("never", "tier"), "only forbidden tiers"),
    (cluster(node("a", healthy=False), node("b", tier="community")), request(tiers=frozenset({"club"})), ("unavailable", "health"), "a down node of the right tier may come back"),
]
# fmt: on


@pytest.mark.parametrize(("snapshot", "req", "expected", "why"), REFUSALS, ids=[r[3] for r in REFUSALS])
def test_refusal(snapshot: ClusterSnapshot, req: object, expected: tuple[str, str], why: str) -> None:
    decision = place(req, snapshot)  # type: ignore[arg-type]
    assert isinstance(decision, Refusal), decision
    assert (decision.kind, decision.resource) == expected, why
    assert "m" in decision.reason or decision.kind != "unknown_model"


def test_a_cold_load_evicts_idle_models_least_recently_used_first() -> None:
    snapshot = cluster(
        node(
            "a",
            model(phase="available", footprint_bytes=12 * GIB),
            model("old", last_used=1.0, footprint_bytes=4 * GIB),
            model("busy", active=1, last_used=0.0, footprint_bytes=4 * GIB),
            model("recent", last_used=9.0, footprint_bytes=4 * GIB),
            memory_free_bytes=4 * GIB,
        )
    )
    decision = place(request(), snapshot)
    assert isinstance(decision, Placement)
    assert decision.action == "load" and decision.evict == ("old", "recent")


def test_ties_are_broken_at_random_between_the_best_two() -> None:
    snapshot = cluster(node("a"), node("b"), node("c", model(outstanding_tokens=100)))
    chosen = {place(request(), snapshot, random.Random(seed)).node_id for seed in range(40)}  # type: ignore[union-attr]
    assert chosen == {"a", "b"}


def test_a_never_refusal_names_no_single_node() -> None:
    decision = place(request(max_tokens=5000), cluster(node("a")))
    assert isinstance(decision, Refusal) and decision.node_id is None and "no node" in decision.reason
