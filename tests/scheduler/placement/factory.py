"""Snapshot builders for placement tables: a node and its model in one line."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from scheduler.placement import ModelState, NodeState, PlacementRequest

GIB = 1 << 30


def model(model_id: str = "m", **changes: Any) -> ModelState:
    base = ModelState(
        id=model_id, phase="ready", context_length=4096, footprint_bytes=8 * GIB, cache_tokens=16384,
        max_sequences=8, default_max_tokens=512, tokens_per_s=40.0, load_seconds=20.0,
    )  # fmt: skip
    return replace(base, **changes)


def node(node_id: str = "n1", *models: ModelState, **changes: Any) -> NodeState:
    base = NodeState(
        node_id=node_id, tier="club", healthy=True, memory_total_bytes=24 * GIB, memory_free_bytes=16 * GIB,
        models=models or (model(),),
    )  # fmt: skip
    return replace(base, **changes)


def request(**changes: Any) -> PlacementRequest:
    return replace(PlacementRequest("m", 256, prompt_tokens=100), **changes)
