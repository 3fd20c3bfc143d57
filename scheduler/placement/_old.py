"""Placement: pure functions over a frozen snapshot of the cluster.

Filters say yes or give a structured reason; the scorer ranks the nodes left. No I/O happens here: the
registry builds the snapshot before, the relay applies the decision after. The federation issue grows this
into the full pipeline (VRAM fit, cache admission, tiers, cold loads); the shape stays.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

RefusalKind = Literal["retry", "never", "unknown_model"]


ModelPhase = Literal["loading", "ready", "failed"]


@dataclass(frozen=True, slots=True)
class ModelState:
    id: str
    phase: ModelPhase
    context_length: int | None
    active: int
    queued: int

    @property
    def ready(self) -> bool:
        return self.phase == "ready"


@dataclass(frozen=True, slots=True)
class NodeState:
    node_id: str
    healthy: bool
    models: tuple[ModelState, ...]

    def model(self, model_id: str) -> ModelState | None:
        return next((m for m in self.models if m.id == model_id), None)


@dataclass(frozen=True, slots=True)
class ClusterSnapshot:
    nodes: tuple[NodeState, ...]

    def model_ids(self) -> list[str]:
        return sorted({m.id for n in self.nodes for m in n.models})


@dataclass(frozen=True, slots=True)
class PlacementRequest:
    model: str
    max_tokens: int | None


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a node (or the whole cluster) cannot take a request."""

    kind: RefusalKind
    reason: str


@dataclass(frozen=True, slots=True)
class Placement:
    node_id: str
    score: float


def filter_node(request: PlacementRequest, node: NodeState) -> Refusal | None:
    model = node.model(request.model)
    if model is None:
        return Refusal("unknown_model", f"{node.node_id} does not serve {request.model}")
    if not node.healthy:
        return Refusal("retry", f"{node.node_id} is not answering")
    if model.phase == "failed":
        return Refusal("retry", f"{request.model} failed to load on {node.node_id}")
    if not model.ready or model.context_length is None:
        return Refusal("retry", f"{request.model} is still loading on {node.node_id}")
    if request.max_tokens is not None and request.max_tokens >= model.context_length:
        return Refusal(
            "never",
            f"max_tokens {request.max_tokens} does not fit {request.model}'s context of "
            f"{model.context_length} tokens",
        )
    return None


def score_node(request: PlacementRequest, node: NodeState) -> float:
    """0–100: fewer jobs running or waiting for the model is better."""
    model = node.model(request.model)
    assert model is not None
    return 100.0 / (1 + model.active + model.queued)


def place(
    request: PlacementRequest, snapshot: ClusterSnapshot, rng: random.Random | None = None
) -> Placement | Refusal:
    refusals: list[Refusal] = []
    feasible: list[Placement] = []
    for node in snapshot.nodes:
        refusal = filter_node(request, node)
        if refusal is None:
            feasible.append(Placement(node.node_id, score_node(request, node)))
        else:
            refusals.append(refusal)
    if feasible:
        feasible.sort(key=lambda p: p.score, reverse=True)
        top = feasible[:2]
        if len(top) == 2 and top[0].score == top[1].score:
            return (rng or random).choice(top)
        return top[0]
    relevant = [r for r in refusals if r.kind != "unknown_model"]
    if not relevant:
        return Refusal("unknown_model", f"no node serves the model '{request.model}'")
    # "Never" only when no node could ever take it; one that may come back makes it worth retrying.
    if all(r.kind == "never" for r in relevant):
        return relevant[0]
    return next(r for r in relevant if r.kind == "retry")
