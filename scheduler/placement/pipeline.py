"""The placement pipeline: filter every node that serves the model, score the ones left, choose.

Cluster-wide rules live here, not in the filters:
- Cold loads are considered only when no eligible node (healthy, not draining, allowed tier, not already
  tried) has the model ready or loading: a request for a warm model waits for it rather than loading a
  copy everywhere, and a request for a model nobody has loaded makes one suitable node load it.
- The choice is the best weighted score; when the best two are level, one of them at random, so equal
  nodes share the work instead of the first in the list taking it all.
- When no node can take the request, the refusal returned is the most hopeful one: "busy" (wait in the
  queue) before "unavailable" (503 now) before "never" (400/422/403) before "unknown_model" (404).
"""

from __future__ import annotations

import random

from scheduler.placement.filters import MODEL_FILTERS, NODE_FILTERS
from scheduler.placement.scorers import score
from scheduler.placement.snapshot import (
    ClusterSnapshot,
    ModelState,
    NodeState,
    Placement,
    PlacementRequest,
    Refusal,
)

TIE = 1e-9
_HOPE = {"busy": 0, "unavailable": 1, "never": 2, "unknown_model": 3}


def evictions(node: NodeState, model: ModelState) -> tuple[str, ...]:
    """Idle models to unload, least recently used first, until ``model`` fits in the node's memory."""
    short = model.footprint_bytes - node.memory_free_bytes
    if short <= 0:
        return ()
    idle = sorted(
        (m for m in node.models if m is not model and m.phase == "ready" and m.active == 0),
        key=lambda m: m.last_used,
    )
    chosen: list[str] = []
    for m in idle:
        if short <= 0:
            break
        chosen.append(m.id)
        short -= m.footprint_bytes
    return tuple(chosen)


def place(
    request: PlacementRequest, snapshot: ClusterSnapshot, rng: random.Random | None = None
) -> Placement | Refusal:
    refusals: list[Refusal] = []
    warm: list[tuple[float, NodeState, ModelState]] = []
    cold: list[tuple[float, NodeState, ModelState]] = []
    warm_eligible = False
    model_id = request.model
    for node in snapshot.nodes:
        model = node.model(model_id)
        if model is None:
            continue
        refusal = None
        for node_filter in NODE_FILTERS:
            refusal = node_filter(request, node, model)
            if refusal is not None:
                break
        else:
            if model.phase == "ready" or model.phase == "loading":
                warm_eligible = True
            for model_filter in MODEL_FILTERS:
                refusal = model_filter(request, node, model)
                if refusal is not None:
                    break
        if refusal is not None:
            refusals.append(refusal)
        elif model.phase == "ready":
            warm.append((score(request, node, model), node, model))
        else:
            cold.append((score(request, node, model), node, model))
    options = warm if warm or warm_eligible else cold
    if options:
        options.sort(key=lambda option: option[0], reverse=True)
        best = options[0]
        if len(options) > 1 and best[0] - options[1][0] <= TIE:
            best = (rng or random).choice(options[:2])
        score_, node, model = best
        if model.phase == "available":
            return Placement(node.node_id, score_, "load", evictions(node, model))
        return Placement(node.node_id, score_)
    if not refusals:
        return Refusal("unknown_model", "model", f"the model '{model_id}' does not exist here")
    return _cluster_refusal(refusals)


def _cluster_refusal(refusals: list[Refusal]) -> Refusal:
    best = min(refusals, key=lambda r: _HOPE[r.kind])
    if best.kind != "never":
        return best
    # "Never" speaks for the whole cluster: say so without naming one node.
    return Refusal(
        best.kind, best.resource, f"{best.reason} (no node can take it)", None, best.requested, best.free
    )
