"""Cache admission, by the backend's own rule: exllamav2's dynamic generator reserves cache pages (256
tokens each) for the prompt plus max_new_tokens when it admits a job, so a job starts only when that many
tokens are free, and never on a node whose whole cache is smaller. Sequences are capped by the backend's
batch size."""

from __future__ import annotations

from scheduler.placement.snapshot import ModelState, NodeState, PlacementRequest, Refusal


def tokens_needed(request: PlacementRequest, model: ModelState) -> int:
    """Cache tokens the backend reserves for the request: prompt + max_tokens (at most the context),
    in whole pages."""
    new = request.max_tokens if request.max_tokens is not None else model.default_max_tokens
    need = request.prompt_tokens + new
    context = model.context_length
    if context is not None and need > context:
        need = context
    page = model.page_tokens
    return -(-need // page) * page


def cache_admission(request: PlacementRequest, node: NodeState, model: ModelState) -> Refusal | None:
    if model.phase != "ready":
        return None
    need = tokens_needed(request, model)
    if need > model.cache_tokens:
        return Refusal(
            "never",
            "cache",
            f"this request needs {need} cache tokens; {model.id} on {node.node_id} has "
            f"{model.cache_tokens} in all",
            node.node_id,
            need,
            model.cache_tokens,
        )
    if model.active >= model.max_sequences:
        return Refusal(
            "busy",
            "sequences",
            f"{model.id} on {node.node_id} runs {model.active} of {model.max_sequences} sequences",
            node.node_id,
            1,
            model.max_sequences - model.active,
        )
    free = model.cache_tokens - model.reserved_tokens
    if need > free:
        return Refusal(
            "busy",
            "cache",
            f"{model.id} on {node.node_id} has {free} cache tokens free, this request needs {need}",
            node.node_id,
            need,
            free,
        )
    return None
