"""Every scorer stays within 0..100 and orders nodes the way its rule says."""

from __future__ import annotations

import pytest

from scheduler.placement import SCORERS, score
from scheduler.placement.scorers.expected_wait import expected_wait
from scheduler.placement.scorers.free_cache import free_cache
from scheduler.placement.scorers.load_cost import load_cost
from scheduler.placement.scorers.warm import warm
from tests.scheduler.placement.factory import GIB, model, node, request

# (scorer, better model, worse model, why)
# fmt: off
ORDERS = [
    (warm, model(), model(phase="available"), "a warm model beats a cold load"),
    (expected_wait, model(outstanding_tokens=0), model(outstanding_tokens=4000), "an idle node beats a backlog"),
    (expected_wait, model(outstanding_tokens=800, tokens_per_s=80.0), model(outstanding_tokens=800, tokens_per_s=20.0), "the same backlog clears sooner on a faster node"),
    (expected_wait, model(outstanding_tokens=400, tokens_per_s=40.0), model(outstanding_tokens=400, tokens_per_s=0.0), "an unmeasured node is assumed slow"),
    (free_cache, model(reserved_tokens=0), model(reserved_tokens=12000), "room for the next burst"),
    (free_cache, model(phase="available", footprint_bytes=4 * GIB), model(phase="available", footprint_bytes=12 * GIB), "a small load leaves more memory"),
    (load_cost, model(phase="available", load_seconds=5.0), model(phase="available", load_seconds=120.0), "a quick load beats a slow one"),
    (load_cost, model(), model(phase="available", load_seconds=1.0), "no load beats any load"),
]
# fmt: on


@pytest.mark.parametrize(("scorer", "better", "worse", "why"), ORDERS, ids=[o[3] for o in ORDERS])
def test_scorer_orders(scorer: object, better: object, worse: object, why: str) -> None:
    good = scorer(request(), node("n1", better), better)  # type: ignore[operator]
    bad = scorer(request(), node("n1", worse), worse)  # type: ignore[operator]
    assert 0.0 <= bad < good <= 100.0, why


@pytest.mark.parametrize("scorer", [s for s, _ in SCORERS])
def test_scores_stay_in_range_at_the_extremes(scorer: object) -> None:
    extremes = [
        model(reserved_tokens=16384, outstanding_tokens=10**9, tokens_per_s=0.0),
        model(phase="available", footprint_bytes=10**15, load_seconds=10**6),
        model(cache_tokens=0),
    ]
    for m in extremes:
        value = scorer(request(), node("n1", m, memory_total_bytes=0), m)  # type: ignore[operator]
        assert 0.0 <= value <= 100.0


def test_the_weighted_score_is_a_mean() -> None:
    best = model()
    assert score(request(), node("n1", best), best) <= 100.0
    assert all(weight > 0 for _, weight in SCORERS)
