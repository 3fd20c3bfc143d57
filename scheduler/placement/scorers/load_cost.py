"""A cold load costs its load time (reading the checkpoint); a warm model costs nothing."""

from __future__ import annotations

from scheduler.placement.snapshot import ModelState, NodeState, PlacementRequest

HALF_SCORE_S = 30.0


def load_cost(request: PlacementRequest, node: NodeState, model: ModelState) -> float:
    if model.phase == "ready":
        return 100.0
    return 100.0 * HALF_SCORE_S / (HALF_SCORE_S + model.load_seconds)
