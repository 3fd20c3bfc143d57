"""Placement is a pure function over a snapshot; each case names the rule it checks."""

from __future__ import annotations

import random

import pytest

from scheduler.placement import (
    ClusterSnapshot,
    ModelState,
    NodeState,
    Placement,
    PlacementRequest,
    Refusal,
    place,
)


def node(
    node_id: str, *, healthy: bool = True, ready: bool = True, active: int = 0, ctx: int = 2048
) -> NodeState:
    return NodeState(
        node_id,
        healthy,
        (ModelState("m", "ready" if ready else "loading", ctx if ready else None, active, 0),),
    )


@pytest.mark.parametrize(
    ("nodes", "max_tokens", "expected"),
    [
        ([node("a")], 16, "a"),  # the only node
        ([node("a", active=3), node("b", active=0)], 16, "b"),  # least busy wins
        ([node("a", healthy=False), node("b")], 16, "b"),  # unhealthy skipped
        ([node("a", ready=False), node("b")], 16, "b"),  # still loading skipped
        ([node("a", healthy=False)], 16, "retry"),  # only node down: try later
        ([node("a", ready=False)], 16, "retry"),  # only node loading: try later
        ([node("a", ctx=1024)], 1024, "never"),  # max_tokens fills the whole context
        ([node("a", ctx=1024), node("b", healthy=False)], 1024, "retry"),  # b may come back
        ([], 16, "unknown_model"),  # empty cluster
        ([NodeState("a", True, ())], 16, "unknown_model"),  # nobody serves the model
    ],
)
def test_place(nodes: list[NodeState], max_tokens: int, expected: str) -> None:
    decision = place(PlacementRequest("m", max_tokens), ClusterSnapshot(tuple(nodes)), random.Random(0))
    if isinstance(decision, Placement):
        assert decision.node_id == expected
    else:
        assert isinstance(decision, Refusal)
        assert decision.kind == expected
        assert decision.reason


def test_ties_are_broken_at_random_between_the_best_two() -> None:
    snapshot = ClusterSnapshot((node("a"), node("b"), node("c", active=5)))
    rng = random.Random(1)
    chosen = {place(PlacementRequest("m", None), snapshot, rng).node_id for _ in range(50)}  # type: ignore[union-attr]
    assert chosen == {"a", "b"}
