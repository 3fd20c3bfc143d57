"""A node that already failed this request (before its first token) is not tried again for it."""

from __future__ import annotations

from scheduler.placement.snapshot import ModelState, NodeState, PlacementRequest, Refusal


def not_tried_before(request: PlacementRequest, node: NodeState, model: ModelState) -> Refusal | None:
    if node.node_id in request.exclude:
        return Refusal("unavailable", "failover", f"{node.node_id} failed this request already", node.node_id)
    return None
