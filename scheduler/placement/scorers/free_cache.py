"""Room left after this request: the cache a warm model keeps free, or the memory a cold load leaves."""

from __future__ import annotations

from scheduler.placement.filters.cache import tokens_needed
from scheduler.placement.snapshot import ModelState, NodeState, PlacementRequest


def free_cache(request: PlacementRequest, node: NodeState, model: ModelState) -> float:
    if model.phase == "ready":
        if model.cache_tokens <= 0:
            return 0.0
        left = model.cache_tokens - model.reserved_tokens - tokens_needed(request, model)
        return max(0.0, 100.0 * left / model.cache_tokens)
    if node.memory_total_bytes <= 0:
        return 0.0
    left = node.memory_free_bytes - model.footprint_bytes
    return max(0.0, 100.0 * left / node.memory_total_bytes)
