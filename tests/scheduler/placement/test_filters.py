"""Every filter, table-driven: each row is one rule, with the refusal it must give (or None)."""

from __future__ import annotations

import pytest

from scheduler.placement import FILTERS, NodeState, PlacementRequest, Refusal
from scheduler.placement.filters.cache import cache_admission
from scheduler.placement.filters.candidates import among_candidates
from scheduler.placement.filters.context import context_fits
from scheduler.placement.filters.drain import not_draining
from scheduler.placement.filters.failover import not_tried_before
from scheduler.placement.filters.health import healthy
from scheduler.placement.filters.loading import not_loading
from scheduler.placement.filters.memory import memory_fits
from scheduler.placement.filters.model_failed import model_not_failed
from scheduler.placement.filters.tier import tier_allowed
from tests.scheduler.placement.factory import GIB, model, node, request

# (filter, request, node, expected (kind, resource) or None)
# fmt: off
CASES = [
    (among_candidates, request(), node(), None),  # a plaintext request may go anywhere
    (among_candidates, request(candidates=frozenset({"n1", "n2"})), node(), None),  # sealed to this node too
    (among_candidates, request(candidates=frozenset({"n2"})), node(), ("unavailable", "candidates")),  # not to it
    (not_tried_before, request(), node(), None),  # a fresh request may go anywhere
    (not_tried_before, request(exclude=frozenset({"n1"})), node(), ("unavailable", "failover")),  # failed here before
    (healthy, request(), node(), None),
    (healthy, request(), node(healthy=False), ("unavailable", "health")),  # silent node
    (not_draining, request(), node(draining=True), ("unavailable", "drain")),  # operator drains it
    (not_draining, request(), node(yielding=True), ("unavailable", "drain")),  # owner needs the GPU
    (tier_allowed, request(tiers=frozenset({"club"})), node(tier="community"), ("never", "tier")),  # policy
    (tier_allowed, request(tiers=frozenset({"club", "community"})), node(tier="community"), None),
    (model_not_failed, request(), node("n1", model(phase="failed")), ("unavailable", "model")),
    (context_fits, request(max_tokens=4096), node(), ("never", "context")),  # max_tokens = whole context
    (context_fits, request(max_tokens=4095), node(), None),  # one token left for the prompt: the node decides
    (context_fits, request(max_tokens=None, prompt_tokens=10**6), node(), None),  # prompt estimates never refuse
    (memory_fits, request(), node("n1", model(phase="available", footprint_bytes=30 * GIB)), ("never", "memory")),
    (memory_fits, request(), node("n1", model(phase="available", footprint_bytes=8 * GIB)), None),  # fits free
    # 20 GiB does not fit 16 free, but unloading the idle 8 GiB model makes room.
    (memory_fits, request(), node("n1", model(phase="available", footprint_bytes=20 * GIB), model("idle")), None),
    # ...not when that model is busy.
    (memory_fits, request(), node("n1", model(phase="available", footprint_bytes=20 * GIB), model("busy", active=1)), ("busy", "memory")),
    (not_loading, request(), node("n1", model(phase="loading")), ("busy", "loading")),
    (cache_admission, request(), node(), None),
    (cache_admission, request(max_tokens=20000, prompt_tokens=0), node("n1", model(context_length=None)), ("never", "cache")),  # bigger than the whole cache
    (cache_admission, request(), node("n1", model(active=8)), ("busy", "sequences")),  # batch full
    (cache_admission, request(), node("n1", model(reserved_tokens=16384 - 300)), ("busy", "cache")),  # 356 needed, 300 free
    (cache_admission, request(), node("n1", model(reserved_tokens=16384 - 356)), None),  # exactly enough
    (cache_admission, request(max_tokens=None), node("n1", model(reserved_tokens=16384 - 600)), ("busy", "cache")),  # default max_tokens counts
    (cache_admission, request(), node("n1", model(page_tokens=256, reserved_tokens=16384 - 511)), ("busy", "cache")),  # 356 is two 256-token pages
    (cache_admission, request(), node("n1", model(page_tokens=256, reserved_tokens=16384 - 512)), None),  # exactly two pages free
    (cache_admission, request(), node("n1", model(phase="available")), None),  # cold: memory's business
]
# fmt: on


@pytest.mark.parametrize(("check", "req", "state", "expected"), CASES)
def test_filter(
    check: object, req: PlacementRequest, state: NodeState, expected: tuple[str, str] | None
) -> None:
    m = state.model("m")
    assert m is not None
    refusal = check(req, state, m)  # type: ignore[operator]
    if expected is None:
        assert refusal is None
    else:
        assert isinstance(refusal, Refusal)
        assert (refusal.kind, refusal.resource) == expected
        assert refusal.node_id == state.node_id and refusal.reason


def test_every_filter_is_in_the_pipeline_once() -> None:
    assert len(set(FILTERS)) == len(FILTERS) == 10


def test_refusals_carry_numbers_for_the_api_and_the_tui() -> None:
    refusal = cache_admission(
        request(), node("n1", model(reserved_tokens=16384 - 300)), model(reserved_tokens=16384 - 300)
    )
    assert refusal is not None and (refusal.requested, refusal.free) == (356, 300)
