"""max_tokens must leave room for a prompt in the model's context.

Only max_tokens is checked here: the prompt's size is an estimate from its visible length, and the node,
which counts tokens exactly, refuses (or fits) a prompt that is too long.
"""

from __future__ import annotations

from scheduler.placement.snapshot import ModelState, NodeState, PlacementRequest, Refusal


def context_fits(request: PlacementRequest, node: NodeState, model: ModelState) -> Refusal | None:
    context = model.context_length
    if context is not None and request.max_tokens is not None and request.max_tokens >= context:
        return Refusal(
            "never",
            "context",
            f"max_tokens {request.max_tokens} does not fit {model.id}'s context of {context} tokens, prompt "
            "included",
            node.node_id,
            request.max_tokens,
            context,
        )
    return None
