"""Expected wait: the tokens the node still owes for this model, over the speed measured there.

The request's own tokens are left out on purpose: counting them sends even light traffic to the fastest
nodes, which shortens end-to-end latency but lengthens p99 time to first token, as bigger batches there
make every newcomer's prefill wait (measured in docs/benchmarks.md). At equal backlogs, free_cache prefers
the nodes with more room, which are usually the larger cards anyway.

A node that has not measured its speed yet is assumed to be slow rather than fast, so that a new node earns
its share of work by showing what it can do instead of attracting every request at once.
"""

from __future__ import annotations

from scheduler.placement.snapshot import ModelState, NodeState, PlacementRequest

UNMEASURED_TOKENS_PER_S = 10.0
HALF_SCORE_S = 10.0  # a backlog of this many seconds halves the score


def expected_wait_seconds(model: ModelState) -> float:
    speed = model.tokens_per_s if model.tokens_per_s > 0 else UNMEASURED_TOKENS_PER_S
    return model.outstanding_tokens / speed


def expected_wait(request: PlacementRequest, node: NodeState, model: ModelState) -> float:
    if model.phase != "ready":
        return 100.0  # a cold model has no backlog; its load is load_cost's to judge
    return 100.0 * HALF_SCORE_S / (HALF_SCORE_S + expected_wait_seconds(model))
