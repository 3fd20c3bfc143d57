"""Job rules as pure functions (node.rules): parsing, where the course's prompt goes, what the budget
allows, and that context fitting never drops the course's prompt. The node applying them to real jobs:
tests/node/test_job_rules.py."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from node.context import fit_messages
from node.rules import course_messages, course_prompt, parse_rules, within_budget
from node.templates import ChatTemplate, Message
from protocol.errors import InvalidRequest, RateLimited
from protocol.rules import JobRules

COURSE = "You are a tutor for Biology 101. Never write the student's essay."
SECRET = "CANARY-course-9f2"


@pytest.mark.parametrize(
    ("doc", "expected"),
    [
        (None, None),  # absent or null: no rules, today's job
        ({}, None),  # an empty document sets no rule either
        ({"system_prompt": None, "max_total_tokens": None}, None),  # nor do explicit nulls
        ({"system_prompt": COURSE}, JobRules(system_prompt=COURSE)),  # a course prompt alone
        ({"max_total_tokens": 1}, JobRules(max_total_tokens=1)),  # the smallest budget
        (  # both
            {"system_prompt": "x" * 8000, "max_total_tokens": 500},
            JobRules(system_prompt="x" * 8000, max_total_tokens=500),
        ),
    ],
)
def test_rules_that_parse(doc: Any, expected: JobRules | None) -> None:
    assert parse_rules(doc) == expected


@pytest.mark.parametrize(
    ("doc", "field"),
    [
        ("be nice", "rules"),  # not an object
        ([COURSE], "rules"),  # nor is a list
        ({"system_prompt": ""}, "rules.system_prompt"),  # an empty course prompt says nothing
        ({"system_prompt": SECRET + "x" * 8000}, "rules.system_prompt"),  # over 8000 characters
        ({"system_prompt": 7}, "rules.system_prompt"),  # not text
        ({"max_total_tokens": 0}, "rules.max_total_tokens"),  # a budget of nothing
        ({"max_total_tokens": -5}, "rules.max_total_tokens"),  # or less
        ({"max_total_tokens": "100"}, "rules.max_total_tokens"),  # a number as text is not a number
        ({"max_total_tokens": 1.5}, "rules.max_total_tokens"),  # tokens are whole
        ({"max_total_tokens": True}, "rules.max_total_tokens"),  # a boolean is not a count
        ({"max_tokens": 5}, "rules.max_tokens"),  # a rule this node does not know is not ignored
    ],
)
def test_malformed_rules_are_refused_naming_the_field_not_its_value(doc: Any, field: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        parse_rules(doc)
    err = caught.value
    assert (err.status, err.code, err.param) == (400, "invalid_rules", "rules")
    assert field in err.message
    assert SECRET not in err.message, "the error quotes the course prompt"


@pytest.mark.parametrize(
    ("client", "rules", "expected"),
    [
        # no rules: the client's conversation as sent
        ([("user", "hi")], None, [("user", "hi")]),
        # a budget alone changes no message
        ([("user", "hi")], JobRules(max_total_tokens=9), [("user", "hi")]),
        # the course's prompt leads
        ([("user", "hi")], JobRules(system_prompt=COURSE), [("system", COURSE), ("user", "hi")]),
        # the client's own system prompt stays, after the course's
        (
            [("system", "Be brief."), ("user", "hi")],
            JobRules(system_prompt=COURSE),
            [("system", COURSE), ("system", "Be brief."), ("user", "hi")],
        ),
        # and so does a developer message, or a history that starts on the assistant
        (
            [("developer", "JSON only."), ("assistant", "Hello!"), ("user", "hi")],
            JobRules(system_prompt=COURSE),
            [("system", COURSE), ("developer", "JSON only."), ("assistant", "Hello!"), ("user", "hi")],
        ),
    ],
)
def test_the_course_prompt_comes_first_in_a_chat(
    client: list[tuple[str, str]], rules: JobRules | None, expected: list[tuple[str, str]]
) -> None:
    messages: list[Message] = [{"role": r, "content": c} for r, c in client]
    got = course_messages(messages, rules)
    assert [(m["role"], m["content"]) for m in got] == expected
    assert [(m["role"], m["content"]) for m in messages] == client, "the client's list is left as it was"


@pytest.mark.parametrize(
    ("prompt", "rules", "expected"),
    [
        ("Once upon a time", None, "Once upon a time"),  # no rules: the prompt as sent
        ("Once upon a time", JobRules(max_total_tokens=9), "Once upon a time"),  # a budget alone
        ("Once upon a time", JobRules(system_prompt=COURSE), f"{COURSE}\n\nOnce upon a time"),  # a blank line
    ],
)
def test_the_course_prompt_goes_before_a_raw_prompt(
    prompt: str, rules: JobRules | None, expected: str
) -> None:
    assert course_prompt(prompt, rules) == expected


@pytest.mark.parametrize(
    ("max_new", "prompt_tokens", "budget", "expected"),
    [
        (64, 10, None, 64),  # no budget: the answer as the request and context allow
        (64, 10, 1000, 64),  # a budget with room to spare changes nothing
        (64, 10, 74, 64),  # exactly enough
        (64, 10, 30, 20),  # the answer is cut to what is left after the prompt
        (64, 10, 11, 1),  # one token left
        (64, 10, 10, None),  # the prompt alone fills the budget: refused
        (64, 10, 3, None),  # or is larger than it
    ],
)
def test_the_budget_counts_prompt_and_answer(
    max_new: int, prompt_tokens: int, budget: int | None, expected: int | None
) -> None:
    rules = JobRules(max_total_tokens=budget) if budget is not None else None
    if expected is not None:
        assert within_budget(max_new, prompt_tokens, rules) == expected
        return
    assert budget is not None
    with pytest.raises(RateLimited) as caught:
        within_budget(max_new, prompt_tokens, rules)
    err = caught.value
    assert (err.status, err.code, err.error_type) == (429, "quota_exceeded", "rate_limit_error")
    assert err.message == (
        f"this request's prompt is {prompt_tokens} tokens; the quota left for it is {budget} tokens"
    )


def test_a_resumed_answer_counts_as_prompt_and_says_so() -> None:
    with pytest.raises(RateLimited, match="prompt and the answer so far are 12 tokens"):
        within_budget(64, 12, JobRules(max_total_tokens=12), resumed=True)


CHATML = ChatTemplate.named("chatml")


def count_words(messages: Sequence[Message]) -> int:
    """A stand-in tokenizer: words of the chatml rendering."""
    return len(CHATML.render(messages).split())


@pytest.mark.parametrize(
    ("client_roles", "budget", "kept"),
    [
        # the oldest exchange goes; the course's prompt stays
        ("u a u a u", 30, [0, 3, 4, 5]),
        # room for only the course's prompt and the last message: both stay
        ("u a u a u", 20, [0, 5]),
        # the client's own system prompt is kept too, after the course's
        ("s u a u a u", 30, [0, 1, 4, 5, 6]),
        # a conversation that is one message long loses nothing
        ("u", 15, [0, 1]),
    ],
)
def test_fitting_never_drops_the_course_prompt(client_roles: str, budget: int, kept: list[int]) -> None:
    roles = {"s": "system", "u": "user", "a": "assistant"}
    client: list[Message] = [
        {"role": roles[code], "content": f"m{i} two three four"}
        for i, code in enumerate(client_roles.split())
    ]
    messages = course_messages(client, JobRules(system_prompt="course rules two three"))
    fitted = fit_messages(messages, count_tokens=count_words, budget=budget, truncate=True)
    assert fitted.messages == tuple(messages[i] for i in kept)
    assert fitted.messages[0] == {"role": "system", "content": "course rules two three"}
