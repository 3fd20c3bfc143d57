"""A cold load must fit: the model's footprint (weights + cache + reserve, from hardware.estimator) within
the node's free memory plus what unloading its idle models would free. Busy models are never evicted."""

from __future__ import annotations

from scheduler.placement.snapshot import ModelState, NodeState, PlacementRequest, Refusal


def evictable_bytes(node: NodeState, model: ModelState) -> int:
    return sum(
        m.footprint_bytes for m in node.models if m is not model and m.phase == "ready" and m.active == 0
    )


def memory_fits(request: PlacementRequest, node: NodeState, model: ModelState) -> Refusal | None:
    if model.phase != "available":
        return None
    need = model.footprint_bytes
    if need > node.memory_total_bytes:
        return Refusal(
            "never",
            "memory",
            f"{model.id} needs {need / 2**30:.1f} GiB of memory, more than {node.node_id} has "
            f"({node.memory_total_bytes / 2**30:.1f} GiB)",
            node.node_id,
            need,
            node.memory_total_bytes,
        )
    free = node.memory_free_bytes
    if need > free and need > free + evictable_bytes(node, model):
        return Refusal(
            "busy",
            "memory",
            f"{node.node_id} has no memory free for {model.id} while its other models work",
            node.node_id,
            need,
            free,
        )
    return None
