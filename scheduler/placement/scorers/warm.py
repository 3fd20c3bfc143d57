"""Warm models beat cold loads: a loaded model answers now, a cold one after its load."""

from __future__ import annotations

from scheduler.placement.snapshot import ModelState, NodeState, PlacementRequest


def warm(request: PlacementRequest, node: NodeState, model: ModelState) -> float:
    return 100.0 if model.phase == "ready" else 0.0
