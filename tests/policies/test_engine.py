"""The policy engine, case by case: one row per rule, each with what the user is told."""

from __future__ import annotations

from dataclasses import replace

import pytest

from policies import (
    Allowed,
    GroupRules,
    Meter,
    Policy,
    Principal,
    Refused,
    UsageWindow,
    Visible,
    decide,
    duration,
    effective,
)
from protocol.policy import Limits

OPEN = GroupRules(
    name="students", models=None, max_tokens=None, max_prompt_tokens=None, tiers=frozenset({"club", "community"}),
    require_e2e=None, weight=1.0, system_prompt=None, each=Limits(), total=Limits(),
)  # fmt: skip
ASK = Visible("llama-3-8b", max_tokens=100, sealed=True, prompt_tokens=50)
IDLE = UsageWindow()


def _group(**changes: object) -> GroupRules:
    return replace(OPEN, **changes)  # type: ignore[arg-type]


def _each(**limits: int) -> GroupRules:
    return _group(each=Limits(**limits))  # type: ignore[arg-type]


def _total(**limits: int) -> GroupRules:
    return _group(total=Limits(**limits))  # type: ignore[arg-type]


REFUSALS = [
    # terms in force and never accepted: 403, and the message says how to accept
    (Principal("t", OPEN, terms_version="2026-09"), ASK, IDLE, 403, "terms_not_accepted", "hearth terms accept"),
    # an older version accepted: asked again
    (Principal("t", OPEN, "2026-09", "2026-01"), ASK, IDLE, 403, "terms_not_accepted", "2026-09"),
    # a plaintext request from a group that must use end-to-end encryption
    (Principal("t", _group(require_e2e=True)), replace(ASK, sealed=False), IDLE, 403, "e2e_required", "hearth proxy"),
    # a model outside the group's list: 403 on the model field, naming what it may use
    (Principal("t", _group(models=("mistral-*",))), ASK, IDLE, 403, "model_not_allowed", "mistral-*"),
    # the token's own tiers and the group's have nothing in common
    (Principal("t", _group(tiers=frozenset({"club"})), token_tiers=frozenset({"community"})), ASK, IDLE, 403,
     "tier_not_allowed", "community"),
    # max_tokens over the group's cap: 400 on max_tokens
    (Principal("t", _group(max_tokens=64)), ASK, IDLE, 400, "max_tokens_over_cap", "at most 64"),
    # a prompt over the group's limit: 400
    (Principal("t", _group(max_prompt_tokens=10)), ASK, IDLE, 400, "prompt_too_long", "about 50 tokens"),
    # as many requests in flight as allowed: 429
    (Principal("t", _each(concurrent_requests=2)), ASK, UsageWindow(each=Meter(in_flight=2)), 429,
     "concurrency_limit_exceeded", "in flight"),
    # the per-minute request limit reached: 429 until the oldest request leaves the window
    (Principal("t", _each(requests_per_minute=3)), ASK, UsageWindow(each=Meter(requests_minute=3)), 429,
     "rate_limit_exceeded", "3 requests per minute"),
    # tokens per minute: this request's 150 tokens do not fit in what is left
    (Principal("t", _each(tokens_per_minute=1000)), ASK, UsageWindow(each=Meter(tokens_minute=900)), 429,
     "rate_limit_exceeded", "1000 tokens per minute"),
    # the daily quota would be overshot: 429, and a smaller max_tokens that fits is suggested
    (Principal("t", _each(tokens_per_day=1000)), ASK, UsageWindow(each=Meter(tokens_day=880)), 429,
     "quota_exceeded", "at most 70"),
    # the monthly quota, spent entirely: no suggestion
    (Principal("t", _each(tokens_per_month=500)), ASK, UsageWindow(each=Meter(tokens_month=500)), 429,
     "quota_exceeded", "this month"),
    # the whole group's daily quota, though this token used nothing
    (Principal("t", _total(tokens_per_day=1000)), ASK, UsageWindow(total=Meter(tokens_day=950)), 429,
     "quota_exceeded", "your group"),
    # one request larger than the whole quota can never run: 400, not a wait, and the max_tokens that fits
    (Principal("t", _each(tokens_per_day=100)), ASK, IDLE, 400, "max_tokens_over_limit", "at most 50 max_tokens"),
    # a prompt larger than the whole quota: no max_tokens can help, so the prompt is at fault
    (Principal("t", _each(tokens_per_day=40)), ASK, IDLE, 400, "prompt_too_long", "shorter prompt"),
]  # fmt: skip


@pytest.mark.parametrize(("principal", "visible", "window", "status", "code", "says"), REFUSALS)
def test_refusals(
    principal: Principal, visible: Visible, window: UsageWindow, status: int, code: str, says: str
) -> None:
    decision = decide(principal, visible, window)
    assert isinstance(decision, Refused), decision
    assert (decision.status, decision.code) == (status, code)
    assert says in decision.message


def test_quota_refusal_waits_until_the_window_turns() -> None:
    window = UsageWindow(each=Meter(tokens_day=1000), day_ends_in=3600.5)
    decision = decide(Principal("t", _each(tokens_per_day=1000)), ASK, window)
    assert isinstance(decision, Refused) and decision.retry_after == 3600.5


def test_rate_refusal_waits_until_the_oldest_request_leaves() -> None:
    window = UsageWindow(each=Meter(requests_minute=3, requests_free_in=12.0))
    decision = decide(Principal("t", _each(requests_per_minute=3)), ASK, window)
    assert isinstance(decision, Refused) and decision.retry_after == 12.0
    assert decision.rates.remaining_requests == 0


ALLOWED = [
    # nothing limited: reserve prompt + max_tokens, no budget for the node, no rate figures
    (OPEN, ASK, 150, 150, None, None),
    # a daily quota: the node may use no more than was reserved
    (_each(tokens_per_day=10_000), ASK, 150, 150, 150, None),
    # no max_tokens asked: the group's cap is what may be used
    (_group(max_tokens=256, each=Limits(tokens_per_day=10_000)), replace(ASK, max_tokens=None), 306, 306, 306,
     None),
    # a request limit: the answer reports what is left of it
    (_each(requests_per_minute=10), ASK, 150, 150, None, 9),
    # the prompt's largest size is reserved when the scheduler knows it (its bytes), not the estimate
    (_each(tokens_per_day=10_000), replace(ASK, prompt_bound=200), 300, 150, 300, None),
    # a course prompt the node will add is reserved too, with its message's markers (26 bytes: ~6 tokens)
    (_group(system_prompt="Ten bytes.", each=Limits(tokens_per_day=10_000)), ASK, 176, 156, 176, None),
    # a per-minute token rate counts the estimate, so a prompt whose bytes exceed it still runs
    (_each(tokens_per_minute=500), replace(ASK, prompt_bound=5000), 5100, 150, 5100, None),
    # several choices (n × prompts, read from a plaintext request): max_tokens for each one
    (_each(tokens_per_day=10_000), replace(ASK, prompt_bound=200, choices=4), 600, 450, 600, None),
]  # fmt: skip


@pytest.mark.parametrize(("group", "visible", "reserve", "rate", "budget", "remaining"), ALLOWED)
def test_allowed(
    group: GroupRules, visible: Visible, reserve: int, rate: int, budget: int | None, remaining: int | None
) -> None:
    decision = decide(Principal("t", group), visible, IDLE)
    assert isinstance(decision, Allowed), decision
    assert (decision.reserve, decision.rate_tokens, decision.max_total_tokens) == (reserve, rate, budget)
    assert decision.rates.remaining_requests == remaining


def test_a_request_without_max_tokens_carries_the_groups_cap_to_the_node() -> None:
    capped = _group(max_tokens=4)
    asked = decide(Principal("t", capped), ASK, IDLE)
    unasked = decide(Principal("t", capped), replace(ASK, max_tokens=None), IDLE)
    assert isinstance(asked, Refused) and asked.code == "max_tokens_over_cap"  # 100 > 4, named
    assert isinstance(unasked, Allowed) and unasked.max_new_tokens == 4  # none named: the node caps it
    # a completion that names none has the endpoint's default of 16, under the cap
    defaulted = decide(Principal("t", capped), replace(ASK, max_tokens=None, default_max_tokens=16), IDLE)
    assert isinstance(defaulted, Allowed) and (defaulted.max_new_tokens, defaulted.reserve) == (4, 54)
    roomy = decide(
        Principal("t", _group(max_tokens=64)), replace(ASK, max_tokens=None, default_max_tokens=16), IDLE
    )
    assert isinstance(roomy, Allowed) and roomy.reserve == 66  # 16, not the cap, is what it can use


def test_an_empty_window_resets_a_minute_after_this_request() -> None:
    decision = decide(Principal("t", _each(requests_per_minute=5, tokens_per_minute=1000)), ASK, IDLE)
    assert isinstance(decision, Allowed)
    assert decision.rates.reset_requests == 60.0 and decision.rates.reset_tokens == 60.0


def test_terms_accepted_and_course_prompt_carried() -> None:
    course = _group(system_prompt="Explain step by step.", weight=2.0)
    decision = decide(Principal("t", course, "v2", "v2"), ASK, IDLE)
    assert isinstance(decision, Allowed)
    assert (decision.system_prompt, decision.weight) == ("Explain step by step.", 2.0)


BASELINES = [
    # the baseline caps max_tokens below the group's
    (Policy(max_tokens_cap=100), _group(max_tokens=500), "max_tokens", 100),
    # the group's cap is stricter: it stays
    (Policy(max_tokens_cap=8192), _group(max_tokens=500), "max_tokens", 500),
    # no group cap: the baseline's
    (Policy(max_tokens_cap=4096), OPEN, "max_tokens", 4096),
    # the baseline's tiers narrow the group's
    (Policy(tiers=["club"]), OPEN, "tiers", frozenset({"club"})),
    # a baseline that requires E2E holds for every group
    (Policy(require_e2e=True), _group(require_e2e=False), "require_e2e", True),
    # a group may require E2E where the baseline does not
    (Policy(require_e2e=False), _group(require_e2e=True), "require_e2e", True),
]  # fmt: skip


@pytest.mark.parametrize(("baseline", "group", "field", "value"), BASELINES)
def test_baseline_is_never_loosened(baseline: Policy, group: GroupRules, field: str, value: object) -> None:
    assert getattr(effective(baseline, group), field) == value


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.02, "20ms"),  # under a second: milliseconds, as OpenAI writes them
        (1.0, "1s"),  # whole seconds
        (59.2, "1m0s"),  # rounded up, never promising a reset too early
        (360.0, "6m0s"),  # minutes and seconds
        (3725.0, "1h2m5s"),  # hours
    ],
)
def test_reset_durations(seconds: float, text: str) -> None:
    assert duration(seconds) == text
