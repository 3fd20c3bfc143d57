"""A sealed request can go only to the nodes it was sealed to (its candidates)."""

from __future__ import annotations

from scheduler.placement.snapshot import ModelState, NodeState, PlacementRequest, Refusal


def among_candidates(request: PlacementRequest, node: NodeState, model: ModelState) -> Refusal | None:
    if request.candidates is not None and node.node_id not in request.candidates:
        return Refusal("unavailable", "candidates", "the request was not sealed to this node", node.node_id)
    return None
