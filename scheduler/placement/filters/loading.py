"""A model that is loading takes requests once it is ready; until then they wait in the queue."""

from __future__ import annotations

from scheduler.placement.snapshot import ModelState, NodeState, PlacementRequest, Refusal


def not_loading(request: PlacementRequest, node: NodeState, model: ModelState) -> Refusal | None:
    if model.phase == "loading":
        return Refusal("busy", "loading", f"{model.id} is loading on {node.node_id}", node.node_id)
    return None
