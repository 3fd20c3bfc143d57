"""Fitting a conversation into the model's context window.

The prompt and the completion share the context, so the prompt may use at most ``budget`` tokens (the
context length less the request's ``max_tokens``). A conversation that is too long is refused unless the
client asked for ``"truncation": "auto"``; then the oldest turns go first, because the system prompt
(course rules, the operator's instructions) and the latest message matter most.

Counting means rendering the chat template and tokenizing the whole prompt, which costs milliseconds per
call on long conversations, so the number of dropped messages is found by binary search: dropping more
never makes the prompt longer, so the first cut that fits is found in O(log n) counts.

Errors here quote token counts only, never the conversation.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from node.templates import Message
from protocol.errors import ContextLengthExceeded

log = logging.getLogger(__name__)

# ``developer`` is OpenAI's newer name for the system role; both are part of the kept preamble.
_SYSTEM_ROLES = frozenset({"system", "developer"})


@dataclass(frozen=True)
class FitResult:
    messages: tuple[Message, ...]
    prompt_tokens: int
    dropped: int


def fit_prompt(n_prompt_tokens: int, *, budget: int) -> None:
    """Refuse a plain-completions prompt that leaves the completion no room; there is nothing to drop."""
    if n_prompt_tokens <= budget:
        return
    if budget <= 0:
        raise _no_room()
    raise ContextLengthExceeded(
        f"this prompt has {n_prompt_tokens} tokens but at most {budget} fit in the model's context with the "
        "requested max_tokens; shorten it or lower max_tokens",
        param="prompt",
    )


def fit_messages(
    messages: Sequence[Message],
    *,
    count_tokens: Callable[[Sequence[Message]], int],
    budget: int,
    truncate: bool,
) -> FitResult:
    """Return the conversation as it will be sent: whole if it fits, else (with ``truncate``) without
    its oldest turns.

    Leading system messages and the last message are always kept. Cuts are made just before a user
    message, so what remains reads as a conversation that starts with the user; only when no such cut
    fits is everything but the system prompt and the last message dropped.
    """
    whole = tuple(messages)
    n_tokens = count_tokens(whole)
    if n_tokens <= budget:
        return FitResult(whole, n_tokens, 0)
    if budget <= 0:
        raise _no_room()
    if not truncate:
        raise ContextLengthExceeded(
            f"this conversation needs {n_tokens} prompt tokens but at most {budget} fit in the model's "
            'context with the requested max_tokens; shorten it or send "truncation": "auto"',
            param="messages",
        )

    n_system = 0
    while n_system < len(whole) and whole[n_system].get("role") in _SYSTEM_ROLES:
        n_system += 1
    head, body = whole[:n_system], whole[n_system:]
    cuts = _cuts(body)
    counted: dict[int, int] = {}

    def candidate(cut: int) -> tuple[Message, ...]:
        return head + body[cut:]

    def fits(cut: int) -> bool:
        counted[cut] = count_tokens(candidate(cut))
        return counted[cut] <= budget

    # The first index into ``cuts`` whose cut fits; ``len(cuts)`` if none does.
    lo, hi = 0, len(cuts)
    while lo < hi:
        mid = (lo + hi) // 2
        if fits(cuts[mid]):
            hi = mid
        else:
            lo = mid + 1

    if lo == len(cuts):
        smallest = counted[cuts[-1]] if cuts else n_tokens
        raise ContextLengthExceeded(
            f"even the system prompt and the last message alone need {smallest} prompt tokens but at most "
            f"{budget} fit in the model's context with the requested max_tokens; shorten them or lower "
            "max_tokens",
            param="messages",
        )
    cut = cuts[lo]
    log.debug("dropped the %d oldest of %d messages to fit %d prompt tokens", cut, len(whole), budget)
    return FitResult(candidate(cut), counted[cut], cut)


def _cuts(body: Sequence[Message]) -> list[int]:
    """How many leading messages of ``body`` may be dropped, ascending: each cut before a user message
    (so whole user-and-assistant exchanges go), then the last resort of keeping only the last message."""
    if len(body) < 2:
        return []
    last = len(body) - 1
    cuts = [i for i in range(1, last) if body[i].get("role") == "user"]
    cuts.append(last)
    return cuts


def _no_room() -> ContextLengthExceeded:
    # The prompt is not at fault here, so the error points at the parameter that is.
    return ContextLengthExceeded(
        "the requested max_tokens fills the model's whole context and leaves no room for a prompt; "
        "lower max_tokens",
        param="max_tokens",
    )
