"""A model whose last load failed on a node is not placed there (an operator has to look)."""

from __future__ import annotations

from scheduler.placement.snapshot import ModelState, NodeState, PlacementRequest, Refusal


def model_not_failed(request: PlacementRequest, node: NodeState, model: ModelState) -> Refusal | None:
    if model.phase == "failed":
        return Refusal("unavailable", "model", f"{model.id} failed to load on {node.node_id}", node.node_id)
    return None
