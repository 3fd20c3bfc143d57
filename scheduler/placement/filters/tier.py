"""Policy decides which tiers (club servers, volunteers' machines) a request may reach."""

from __future__ import annotations

from scheduler.placement.snapshot import ModelState, NodeState, PlacementRequest, Refusal


def tier_allowed(request: PlacementRequest, node: NodeState, model: ModelState) -> Refusal | None:
    if node.tier not in request.tiers:
        allowed = ", ".join(sorted(request.tiers))
        return Refusal(
            "never",
            "tier",
            f"{request.model} is served only by nodes outside the tiers allowed here ({allowed})",
            node.node_id,
        )
    return None
