"""The decision: may this principal send this request now, and on what terms?

``decide(principal, request, window)`` is a pure function. The scheduler hands it the principal (the token,
its group's rules), what it may see of the request (never its text) and the counters it keeps (its usage
window); it answers ``Allowed`` (what to reserve, the rules the node applies, the rate-limit figures the
answer's headers report) or ``Refused``, a structured refusal like placement's: what kind of limit, the
status, a message that says how to fix it, and when to come back.

Checks run in the order a user can act on them: terms, privacy, access (model, tier), sizes (caps), then the
counters (concurrency, rate, quota), so a request that could never run is not told to wait.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from policies.schema import GroupRules
from protocol.policy import Limits

RefusalKind = Literal[
    "terms", "e2e", "model", "tier", "max_tokens", "prompt", "concurrency", "requests", "tokens", "quota"
]
COURSE_MARKERS = 16  # tokens a chat template may spend around the course prompt's message
DEFAULT_MAX_TOKENS = (
    8192  # what a request without max_tokens reserves when neither group nor baseline caps it
)


@dataclass(frozen=True, slots=True)
class Principal:
    """Who sends the request: the token, its group's rules (baseline applied), and the terms they accepted."""

    token_id: str
    group: GroupRules
    terms_version: str | None = None  # the version in force; None: no terms to accept
    terms_accepted: str | None = None  # the version this token's holder accepted
    token_tiers: frozenset[str] | None = None  # tiers the token itself is limited to


@dataclass(frozen=True, slots=True)
class Visible:
    """What the scheduler knows about a request."""

    model: str
    max_tokens: int | None
    sealed: bool
    prompt_tokens: int = 0  # the scheduler's estimate (it cannot read a sealed prompt), for the caps
    # The most tokens the prompt can be (its size in bytes: no tokenizer makes more tokens of text than it
    # has bytes), for what a request reserves; None: the estimate.
    prompt_bound: int | None = None
    # What the endpoint gives a request that names no max_tokens (completions: 16, as OpenAI); None: the
    # group's cap.
    default_max_tokens: int | None = None
    # Answers the request asks for (n × prompts; a sealed request's header says it, and its node checks
    # that): each may be max_tokens long.
    choices: int = 1
    # False for the tokenizer endpoints (POST /tokenize …): they run no generation, so they count as a
    # request (rates, concurrency) and as no tokens (quotas, token rates).
    generates: bool = True


@dataclass(frozen=True, slots=True)
class Meter:
    """One holder's counters (a token, or a whole group) as the scheduler keeps them."""

    requests_minute: int = 0  # admitted in the last 60 s
    tokens_minute: int = 0  # reserved or used in the last 60 s
    requests_free_in: float = 0.0  # seconds until the oldest request leaves the minute window
    tokens_free_in: float = 0.0
    in_flight: int = 0
    tokens_day: int = 0  # used + reserved, this UTC day
    tokens_month: int = 0


@dataclass(frozen=True, slots=True)
class UsageWindow:
    each: Meter = field(default_factory=Meter)  # this token's
    total: Meter = field(default_factory=Meter)  # its whole group's
    day_ends_in: float = 86400.0  # seconds until the UTC day turns
    month_ends_in: float = 86400.0 * 31


@dataclass(frozen=True, slots=True)
class RateFigures:
    """What the answer's x-ratelimit-* headers say (None: no such limit)."""

    limit_requests: int | None = None
    remaining_requests: int | None = None
    reset_requests: float | None = None
    limit_tokens: int | None = None
    remaining_tokens: int | None = None
    reset_tokens: float | None = None


@dataclass(frozen=True, slots=True)
class Allowed:
    reserve: int  # tokens held against quotas until the answer ends (the most the node may use)
    rate_tokens: int  # tokens counted against per-minute rates until the answer ends (the estimate)
    max_total_tokens: int | None  # the node may use no more (set when a token count is limited)
    max_new_tokens: int | None  # the answer's cap when the request names no max_tokens
    tiers: frozenset[str]
    weight: float
    system_prompt: str | None
    rates: RateFigures


@dataclass(frozen=True, slots=True)
class Refused:
    kind: RefusalKind
    status: int  # 400, 403 or 429
    message: str
    code: str
    param: str | None = None
    retry_after: float | None = None
    rates: RateFigures = field(default_factory=RateFigures)


Decision = Allowed | Refused


def decide(principal: Principal, request: Visible, window: UsageWindow) -> Decision:
    group = principal.group
    if principal.terms_version is not None and principal.terms_accepted != principal.terms_version:
        return Refused(
            "terms", 403,
            f"accept the terms of use (version {principal.terms_version}) before using this service: "
            "read them with `hearth terms show` (or GET /v1/terms), then run `hearth terms accept` "
            "(or POST /v1/terms/accept)",
            "terms_not_accepted",
        )  # fmt: skip
    if group.require_e2e and not request.sealed:
        return Refused(
            "e2e", 403,
            f"the {group.name} group sends only end-to-end encrypted requests; send them through "
            "`hearth proxy`",
            "e2e_required",
        )  # fmt: skip
    if not group.allows_model(request.model):
        allowed = ", ".join(group.models or ())
        return Refused(
            "model", 403, f"the {group.name} group may not use {request.model}; it may use: {allowed}",
            "model_not_allowed", param="model",
        )  # fmt: skip
    tiers = group.tiers
    if principal.token_tiers is not None:
        tiers = tiers & principal.token_tiers
    if not tiers:
        why = (
            f"this token may use only {', '.join(sorted(principal.token_tiers))} nodes, and the {group.name} "
            "group may reach none of those tiers"
            if principal.token_tiers is not None
            else f"the {group.name} group may reach no node tier this scheduler allows"
        )
        return Refused("tier", 403, why, "tier_not_allowed")
    if (
        request.max_tokens is not None
        and group.max_tokens is not None
        and request.max_tokens > group.max_tokens
    ):
        return Refused(
            "max_tokens", 400, f"max_tokens may be at most {group.max_tokens} for the {group.name} group",
            "max_tokens_over_cap", param="max_tokens",
        )  # fmt: skip
    if group.max_prompt_tokens is not None and request.prompt_tokens > group.max_prompt_tokens:
        return Refused(
            "prompt", 400,
            f"the prompt is about {request.prompt_tokens} tokens; the {group.name} group's limit is "
            f"{group.max_prompt_tokens}",
            "prompt_too_long", param="messages",
        )  # fmt: skip
    cost = _cost(group, request)
    rates = _rates(group, window, cost)
    for scope, limits, meter in (("you", group.each, window.each), ("your group", group.total, window.total)):
        refused = _counters(scope, limits, meter, window, cost, request.max_tokens is not None, rates)
        if refused is not None:
            return refused
    counted = any(
        getattr(lim, name) is not None
        for lim in (group.each, group.total)
        for name in ("tokens_per_minute", "tokens_per_day", "tokens_per_month")
    )
    return Allowed(
        reserve=cost.reserve,
        rate_tokens=cost.rate,
        max_total_tokens=cost.reserve if counted and request.generates else None,
        max_new_tokens=cost.max_new if request.max_tokens is None and request.generates else None,
        tiers=tiers,
        weight=group.weight,
        system_prompt=group.system_prompt,
        rates=rates,
    )


@dataclass(frozen=True, slots=True)
class Cost:
    """What one request counts: against quotas (at most), against per-minute rates (as estimated)."""

    reserve: int
    rate: int
    max_new: int


def _cost(group: GroupRules, request: Visible) -> Cost:
    if not request.generates:
        return Cost(reserve=0, rate=0, max_new=0)
    cap = group.max_tokens or DEFAULT_MAX_TOKENS
    if request.max_tokens is not None:
        max_new = request.max_tokens
    else:
        max_new = min(cap, request.default_max_tokens) if request.default_max_tokens is not None else cap
    # Quotas hold what the node may use at most: the prompt at its largest, the course prompt the node adds
    # (and its message's markers), and the answer. Per-minute token rates count, like OpenAI's, the
    # estimate: a rate is a pace, not a budget, and settles to what was used.
    course = len(group.system_prompt.encode()) + COURSE_MARKERS if group.system_prompt is not None else 0
    course *= max(1, request.choices)  # batched prompts each get it (n samples of one: a bound all the same)
    bound = request.prompt_bound if request.prompt_bound is not None else request.prompt_tokens
    answers = max_new * max(1, request.choices)
    return Cost(
        reserve=bound + course + answers, rate=request.prompt_tokens + course // 4 + answers, max_new=max_new
    )


def _counters(
    scope: str,
    limits: Limits,
    meter: Meter,
    window: UsageWindow,
    cost: Cost,
    asked: bool,
    rates: RateFigures,
) -> Refused | None:
    """The first counter this request would take past its limit, as a refusal."""
    if limits.concurrent_requests is not None and meter.in_flight >= limits.concurrent_requests:
        return Refused(
            "concurrency", 429,
            f"{scope} already have {meter.in_flight} requests in flight, the most allowed at once; wait "
            "for one to finish",
            "concurrency_limit_exceeded", retry_after=1.0, rates=rates,
        )  # fmt: skip
    if limits.requests_per_minute is not None and meter.requests_minute >= limits.requests_per_minute:
        return Refused(
            "requests", 429, f"{scope} reached {limits.requests_per_minute} requests per minute",
            "rate_limit_exceeded", retry_after=meter.requests_free_in, rates=rates,
        )  # fmt: skip
    for limit, used, need, name, free_in in (
        (limits.tokens_per_minute, meter.tokens_minute, cost.rate, "per minute", meter.tokens_free_in),
        (limits.tokens_per_day, meter.tokens_day, cost.reserve, "today", window.day_ends_in),
        (limits.tokens_per_month, meter.tokens_month, cost.reserve, "this month", window.month_ends_in),
    ):
        if limit is None or used + need <= limit:
            continue
        kind: RefusalKind = "tokens" if name == "per minute" else "quota"
        code = "rate_limit_exceeded" if kind == "tokens" else "quota_exceeded"
        what = f"{limit} tokens {name}" if kind == "tokens" else f"the quota of {limit} tokens {name}"
        prompt = need - cost.max_new
        if prompt >= limit:  # no max_tokens could make it fit: the prompt is too large for this limit
            return Refused(
                kind, 400,
                f"this request's prompt counts as up to {prompt} tokens, more than {what} that {scope} may "
                "use; send a shorter prompt",
                "prompt_too_long", param="messages", rates=rates,
            )  # fmt: skip
        if need > limit:
            return Refused(
                kind, 400,
                f"this request could use {need} tokens (its prompt and max_tokens), more than {what} that "
                f"{scope} may use; ask for at most {limit - prompt} max_tokens",
                "max_tokens_over_limit", param="max_tokens", rates=rates,
            )  # fmt: skip
        left = max(0, limit - used)
        smaller = left - prompt if asked else 0  # the max_tokens that would fit now
        hint = (
            f"; {left} are left: a request with max_tokens of at most {smaller} fits now"
            if smaller > 0
            else ""
        )
        return Refused(
            kind, 429,
            f"this request could use {need} tokens, which would take {scope} past {what}{hint}",
            code, param="max_tokens" if hint else None, retry_after=free_in, rates=rates,
        )  # fmt: skip
    return None


def _rates(group: GroupRules, window: UsageWindow, cost: Cost) -> RateFigures:
    """What the answer's x-ratelimit-* headers report: of the limits set on requests, and of those set on
    tokens (per minute, then the day's and month's quotas), the one with the least left after this
    request, the token's own or its group's. A dimension with no limit at all is not reported."""
    requests = [
        # An empty window resets a minute after this request, which opens it.
        (limit, max(0, limit - meter.requests_minute - 1), meter.requests_free_in or 60.0)
        for limit, meter in ((group.each.requests_per_minute, window.each),
                             (group.total.requests_per_minute, window.total))
        if limit is not None
    ]  # fmt: skip
    tokens = [
        (limit, max(0, limit - used - need), reset)
        for lim, meter in ((group.each, window.each), (group.total, window.total))
        for limit, used, need, reset in (
            (lim.tokens_per_minute, meter.tokens_minute, cost.rate, meter.tokens_free_in or 60.0),
            (lim.tokens_per_day, meter.tokens_day, cost.reserve, window.day_ends_in),
            (lim.tokens_per_month, meter.tokens_month, cost.reserve, window.month_ends_in),
        )
        if limit is not None
    ]
    req = min(requests, key=lambda r: r[1], default=None)
    tok = min(tokens, key=lambda t: t[1], default=None)
    return RateFigures(
        limit_requests=None if req is None else req[0],
        remaining_requests=None if req is None else req[1],
        reset_requests=None if req is None else req[2],
        limit_tokens=None if tok is None else tok[0],
        remaining_tokens=None if tok is None else tok[1],
        reset_tokens=None if tok is None else tok[2],
    )


def duration(seconds: float) -> str:
    """A reset time as OpenAI writes it: "1s", "6m0s", "20ms"."""
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    whole = math.ceil(seconds)
    minutes, secs = divmod(whole, 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"
