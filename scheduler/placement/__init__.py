"""Placement: pure functions over a frozen snapshot of the cluster (interim single-module pipeline)."""

from __future__ import annotations

import random

from scheduler.placement.snapshot import (
    ClusterSnapshot,
    ModelState,
    NodeState,
    Placement,
    PlacementRequest,
    Refusal,
)

__all__ = ["ClusterSnapshot", "ModelState", "NodeState", "Placement", "PlacementRequest", "Refusal", "place"]

_ORDER = {"busy": 0, "unavailable": 1, "never": 2, "unknown_model": 3}


def _eligible(request: PlacementRequest, node: NodeState) -> Refusal | None:
    if node.node_id in request.exclude:
        return Refusal("unavailable", "failover", f"{node.node_id} already failed this request", node.node_id)
    if not node.healthy:
        return Refusal("unavailable", "health", f"{node.node_id} is not answering", node.node_id)
    if node.draining or node.yielding:
        return Refusal("unavailable", "drain", f"{node.node_id} is draining", node.node_id)
    if node.tier not in request.tiers:
        return Refusal(
            "never", "tier", f"{request.model} runs only on tiers this request may not use", node.node_id
        )
    return None


def _fit(request: PlacementRequest, node: NodeState, m: ModelState) -> Refusal | None:
    if m.phase == "failed":
        return Refusal(
            "unavailable", "model", f"{request.model} failed to load on {node.node_id}", node.node_id
        )
    if (
        m.context_length is not None
        and request.max_tokens is not None
        and request.max_tokens >= m.context_length
    ):
        return Refusal(
            "never", "context",
            f"max_tokens {request.max_tokens} does not fit {request.model}'s context of {m.context_length} tokens",
            node.node_id, request.max_tokens, m.context_length,
        )  # fmt: skip
    if m.phase == "available":
        if m.footprint_bytes > node.memory_total_bytes:
            return Refusal(
                "never", "memory",
                f"{request.model} needs {m.footprint_bytes} bytes of memory, more than any node has",
                node.node_id, m.footprint_bytes, node.memory_total_bytes,
            )  # fmt: skip
        idle = sum(o.footprint_bytes for o in node.models if o.idle)
        if m.footprint_bytes > node.memory_free_bytes + idle:
            return Refusal(
                "busy", "memory", f"{node.node_id} has no memory free for {request.model}", node.node_id
            )
        return None
    if m.phase == "loading":
        return Refusal("busy", "loading", f"{request.model} is loading on {node.node_id}", node.node_id)
    need = request.prompt_tokens + (
        request.max_tokens if request.max_tokens is not None else m.default_max_tokens
    )
    if m.context_length is not None:
        need = min(need, m.context_length)
    if need > m.cache_tokens:
        return Refusal(
            "never", "cache", f"{request.model}'s cache is too small for this request", node.node_id
        )
    if m.active >= m.max_sequences or m.reserved_tokens + need > m.cache_tokens:
        return Refusal("busy", "sequences", f"{node.node_id} is busy with {request.model}", node.node_id)
    return None


def _score(node: NodeState, m: ModelState) -> float:
    if m.phase == "available":
        return 10.0 / (1 + m.load_seconds) + 10.0 * node.memory_free_bytes / max(1, node.memory_total_bytes)
    speed = m.tokens_per_s or 20.0
    wait = m.outstanding_tokens / speed
    free = (m.cache_tokens - m.reserved_tokens) / max(1, m.cache_tokens)
    return 50.0 + 30.0 / (1 + wait) + 20.0 * free


def _evictions(node: NodeState, m: ModelState) -> tuple[str, ...]:
    short = m.footprint_bytes - node.memory_free_bytes
    out: list[str] = []
    for other in sorted((o for o in node.models if o.idle), key=lambda o: o.last_used):
        if short <= 0:
            break
        out.append(other.id)
        short -= other.footprint_bytes
    return tuple(out)


def place(
    request: PlacementRequest, snapshot: ClusterSnapshot, rng: random.Random | None = None
) -> Placement | Refusal:
    refusals: list[Refusal] = []
    warm: list[Placement] = []
    cold: list[Placement] = []
    warm_somewhere = False
    for node in snapshot.nodes:
        m = node.model(request.model)
        if m is None:
            continue
        refusal = _eligible(request, node)
        if refusal is None:
            if m.warm:
                warm_somewhere = True
            refusal = _fit(request, node, m)
        if refusal is not None:
            refusals.append(refusal)
        elif m.phase == "available":
            cold.append(Placement(node.node_id, _score(node, m), "load", _evictions(node, m)))
        else:
            warm.append(Placement(node.node_id, _score(node, m)))
    options = warm or ([] if warm_somewhere else cold)
    if options:
        options.sort(key=lambda p: p.score, reverse=True)
        if len(options) > 1 and options[0].score - options[1].score < 1e-6:
            return (rng or random).choice(options[:2])
        return options[0]
    if warm_somewhere and cold:
        return Refusal("busy", "sequences", f"every node serving {request.model} is busy")
    if not refusals:
        return Refusal("unknown_model", "model", f"the model '{request.model}' does not exist here")
    refusals.sort(key=lambda r: _ORDER[r.kind])
    best = refusals[0]
    if best.kind == "never":
        return Refusal("never", best.resource, best.reason.replace(f" on {best.node_id}", ""), None,
                       best.requested, best.free)  # fmt: skip
    return best
