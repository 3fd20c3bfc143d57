"""Context fitting: what is kept, what is dropped, how often the prompt is counted, and errors that quote
counts but never the conversation."""

from __future__ import annotations

import math
from collections.abc import Sequence

import pytest

from node.context import FitResult, fit_messages, fit_prompt
from node.templates import ChatTemplate, Message
from protocol.errors import ContextLengthExceeded

CANARY = "CANARY-4c1e"
CHATML = ChatTemplate.named("chatml")
ROLES = {"s": "system", "d": "developer", "u": "user", "a": "assistant", "t": "tool"}


def count_words(messages: Sequence[Message]) -> int:
    """A stand-in tokenizer: render with chatml and count words. A message of four words costs five
    (its role header is one more), and the generation prompt one."""
    return len(CHATML.render(messages).split())


def conversation(roles: str) -> list[Message]:
    """``"s u a u"`` -> messages of four words each, every one carrying the canary and its index."""
    return [
        {"role": ROLES[code], "content": f"{CANARY} m{i} two three"} for i, code in enumerate(roles.split())
    ]


class Counter:
    """count_words that remembers how often it was called."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, messages: Sequence[Message]) -> int:
        self.calls += 1
        return count_words(messages)


@pytest.mark.parametrize(
    ("roles", "budget", "kept"),
    [
        # fits: returned unchanged
        ("s u a u", 21, [0, 1, 2, 3]),
        # one exchange too many: the oldest user+assistant pair goes, the system prompt stays
        ("s u a u a u", 21, [0, 3, 4, 5]),
        # room for five messages, but dropping a lone user turn would start on the assistant: a pair goes
        ("s u a u a u", 26, [0, 3, 4, 5]),
        # room only for the system prompt and the last message
        ("s u a u a u", 20, [0, 5]),
        # no system prompt: the oldest pairs go
        ("u a u a u", 16, [2, 3, 4]),
        # several leading system messages, developer included, are all kept
        ("s d u a u", 16, [0, 1, 4]),
        # a system message later in the conversation is old history like any other
        ("s u s a u a u", 21, [0, 4, 5, 6]),
        # the conversation ends on an assistant message (a prefill): as last resort only it is kept
        ("s u a u a", 11, [0, 4]),
        # tool messages go with the exchange they belong to
        ("s u a t a u a", 21, [0, 5, 6]),
    ],
)
def test_fit_messages_truncates_oldest_turns(roles: str, budget: int, kept: list[int]) -> None:
    messages = conversation(roles)
    result = fit_messages(messages, count_tokens=count_words, budget=budget, truncate=True)
    assert result.messages == tuple(messages[i] for i in kept)
    assert result.dropped == len(messages) - len(kept)
    assert result.prompt_tokens == count_words(result.messages) <= budget


@pytest.mark.parametrize(
    ("roles", "truncate"),
    [
        # fits with truncation off
        ("s u a u", False),
        # fits with truncation on: nothing is dropped
        ("s u a u", True),
        # a single message that fits
        ("u", False),
    ],
)
def test_fit_messages_returns_fitting_conversation_unchanged(roles: str, truncate: bool) -> None:
    messages = conversation(roles)
    counter = Counter()
    result = fit_messages(messages, count_tokens=counter, budget=1000, truncate=truncate)
    assert result == FitResult(tuple(messages), count_words(messages), 0)
    assert counter.calls == 1


def test_fit_messages_refuses_without_truncation() -> None:
    messages = conversation("s u a u a u")
    with pytest.raises(ContextLengthExceeded) as caught:
        fit_messages(messages, count_tokens=count_words, budget=30, truncate=False)
    error = caught.value
    assert error.message == (
        "this conversation needs 31 prompt tokens but at most 30 fit in the model's context with the "
        'requested max_tokens; shorten it or send "truncation": "auto"'
    )
    assert error.param == "messages"
    assert error.code == "context_length_exceeded"
    assert error.status == 400


@pytest.mark.parametrize(
    ("roles", "budget", "param", "needed"),
    [
        # the system prompt and the last message alone are over budget
        ("s u a u", 10, "messages", "11 prompt tokens"),
        # a single message that does not fit: nothing to drop
        ("u", 5, "messages", "6 prompt tokens"),
        # only system messages: nothing may be dropped
        ("s s", 10, "messages", "11 prompt tokens"),
        # max_tokens leaves no room at all: the error points at max_tokens
        ("s u", 0, "max_tokens", "no room"),
    ],
)
def test_fit_messages_impossible_fit_raises(roles: str, budget: int, param: str, needed: str) -> None:
    with pytest.raises(ContextLengthExceeded) as caught:
        fit_messages(conversation(roles), count_tokens=count_words, budget=budget, truncate=True)
    assert caught.value.param == param
    assert needed in caught.value.message


def long_conversation(n: int) -> list[Message]:
    return conversation("s " + " ".join("u" if i % 2 == 0 else "a" for i in range(n - 1)))


def brute_force_kept(messages: list[Message], budget: int) -> int:
    """Fewest messages to drop, tried one cut at a time, with the same rule (cut before a user message,
    else keep only the last)."""
    body = messages[1:]
    for cut in range(1, len(body)):
        if body[cut]["role"] == "user" and count_words(messages[:1] + body[cut:]) <= budget:
            return cut
    return len(body) - 1


@pytest.mark.parametrize(
    "budget",
    [
        # just under the whole conversation: one pair goes
        2500,
        # about half of it
        1234,
        # a few turns only
        60,
        # the system prompt and the last message exactly
        11,
    ],
)
def test_fit_messages_counts_logarithmically(budget: int) -> None:
    messages = long_conversation(500)
    counter = Counter()
    result = fit_messages(messages, count_tokens=counter, budget=budget, truncate=True)
    # one count of the whole conversation, then a binary search over the ~250 places to cut
    assert counter.calls <= 2 + math.ceil(math.log2(500))
    assert result.dropped == brute_force_kept(messages, budget)
    assert result.prompt_tokens <= budget


def test_fit_messages_counts_logarithmically_when_impossible() -> None:
    counter = Counter()
    with pytest.raises(ContextLengthExceeded):
        fit_messages(long_conversation(500), count_tokens=counter, budget=10, truncate=True)
    assert counter.calls <= 2 + math.ceil(math.log2(500))


@pytest.mark.parametrize(
    ("roles", "budget", "truncate"),
    [
        # refused because truncation is off
        ("s u a u", 10, False),
        # refused because even the system prompt and the last message are too long
        ("s u a u", 10, True),
        # refused because max_tokens leaves no room
        ("s u a u", 0, True),
    ],
)
def test_errors_never_quote_the_conversation(roles: str, budget: int, truncate: bool) -> None:
    with pytest.raises(ContextLengthExceeded) as caught:
        fit_messages(conversation(roles), count_tokens=count_words, budget=budget, truncate=truncate)
    assert CANARY not in str(caught.value)
    assert CANARY not in str(caught.value.to_body())


@pytest.mark.parametrize(
    ("n_prompt_tokens", "budget", "param"),
    [
        # well within budget
        (10, 100, None),
        # exactly at the budget
        (100, 100, None),
        # one over
        (101, 100, "prompt"),
        # max_tokens leaves no room at all
        (5, 0, "max_tokens"),
    ],
)
def test_fit_prompt(n_prompt_tokens: int, budget: int, param: str | None) -> None:
    if param is None:
        fit_prompt(n_prompt_tokens, budget=budget)
        return
    with pytest.raises(ContextLengthExceeded) as caught:
        fit_prompt(n_prompt_tokens, budget=budget)
    assert caught.value.param == param
    assert caught.value.code == "context_length_exceeded"
