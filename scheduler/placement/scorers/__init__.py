"""Scorers: `(request, node, model) -> 0..100`, higher is better, combined by weight.

The weights say what matters most: a warm model and a short wait first (a cold load costs seconds to
minutes, and a backlog costs every token of it), then room in the cache (so bursts fit), then how cheap a
cold load would be. `tests/bench/bench_placement_quality.py` measures the result against simpler policies.
"""

from __future__ import annotations

from collections.abc import Callable

from scheduler.placement.scorers.expected_wait import expected_wait
from scheduler.placement.scorers.free_cache import free_cache
from scheduler.placement.scorers.load_cost import load_cost
from scheduler.placement.scorers.warm import warm
from scheduler.placement.snapshot import ModelState, NodeState, PlacementRequest

Scorer = Callable[[PlacementRequest, NodeState, ModelState], float]

SCORERS: tuple[tuple[Scorer, float], ...] = (
    (warm, 3.0),
    (expected_wait, 3.0),
    (free_cache, 2.0),
    (load_cost, 1.0),
)
TOTAL_WEIGHT = sum(weight for _, weight in SCORERS)


def score(request: PlacementRequest, node: NodeState, model: ModelState) -> float:
    """The weighted mean of every scorer, 0..100."""
    return sum(weight * scorer(request, node, model) for scorer, weight in SCORERS) / TOTAL_WEIGHT


__all__ = ["SCORERS", "Scorer", "score"]
