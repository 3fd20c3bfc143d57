"""A draining node (the operator's word) or a yielding one (its owner needs the GPU) takes no new work."""

from __future__ import annotations

from scheduler.placement.snapshot import ModelState, NodeState, PlacementRequest, Refusal


def not_draining(request: PlacementRequest, node: NodeState, model: ModelState) -> Refusal | None:
    if node.draining:
        return Refusal("unavailable", "drain", f"{node.node_id} is draining", node.node_id)
    if node.yielding:
        why = f" ({node.yield_reason})" if node.yield_reason else ""
        return Refusal("unavailable", "drain", f"{node.node_id} is yielding to its owner{why}", node.node_id)
    return None
