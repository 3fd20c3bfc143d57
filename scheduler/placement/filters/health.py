"""A node whose heartbeats stopped (or that a relay saw fail) gets no new work until it is heard again."""

from __future__ import annotations

from scheduler.placement.snapshot import ModelState, NodeState, PlacementRequest, Refusal


def healthy(request: PlacementRequest, node: NodeState, model: ModelState) -> Refusal | None:
    if not node.healthy:
        return Refusal("unavailable", "health", f"{node.node_id} is not answering", node.node_id)
    return None
