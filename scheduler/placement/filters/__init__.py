"""Filters: `(request, node, model) -> Refusal | None`, run in this order; the first refusal wins.

Each filter is a pure function in its own module. They get the node's state for the requested model
(looked up once by the pipeline) besides the node itself, so that none of them searches the node's model
list again on the hot path.
"""

from __future__ import annotations

from collections.abc import Callable

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
from scheduler.placement.snapshot import ModelState, NodeState, PlacementRequest, Refusal

Filter = Callable[[PlacementRequest, NodeState, ModelState], Refusal | None]

# Node-level rules first (they decide whether the node counts at all, even for the cold-load rule), then
# the model's state, then capacity.
NODE_FILTERS: tuple[Filter, ...] = (among_candidates, not_tried_before, healthy, not_draining, tier_allowed)
MODEL_FILTERS: tuple[Filter, ...] = (
    model_not_failed,
    context_fits,
    memory_fits,
    not_loading,
    cache_admission,
)
FILTERS: tuple[Filter, ...] = NODE_FILTERS + MODEL_FILTERS

__all__ = ["FILTERS", "MODEL_FILTERS", "NODE_FILTERS", "Filter"]
