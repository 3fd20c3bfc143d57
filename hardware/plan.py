"""Capacity planning: will this fleet serve model M to N users within a service level, and at what cost?

`plan(PlanInput)` answers in a `PlanResult` (JSON-ready with `to_dict`), in the order `hearth plan` prints:
1. a verdict sentence, computed from the simulation sweep;
2. fit: how the fleet's cards group into copies of the model (each copy split layer by layer over its
   cards, as exllamav2's autosplit does), what each card holds, the cache left and the sequences it fits;
3. speed: prefill and decode tokens per second of each copy, at batch 1 and at the batch its cache allows;
4. simulation: the demand replayed through `hardware.simulator` (the real placement code) for a sweep of
   user counts, and the most users the fleet serves within the service level;
5. cost: owning vs renting vs an API (`hardware.prices`).

How cards become copies: each card type first forms copies of its own (the fewest cards of that type that
hold the weights, one full-context sequence and a reserve per card); the cards left over are pooled,
largest first, into mixed copies. A copy spread over several cards runs its layers one card after another,
so its speed is the layer-weighted harmonic mean of its cards' (the simulator sees one device with those
figures). Estimates, not measurements, except for the cards `hearth plan calibrate` measured
(`hardware.calibration`): see docs/planning.md for the assumptions and limits.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from hardware.calibration import CardCalibration
from hardware.catalog import GpuSpec
from hardware.estimator import (
    DEFAULT_RESERVE_BYTES,
    decode_tokens_per_s,
    kv_bytes_per_token,
    prefill_tokens_per_s,
    split_footprint,
    weight_bytes,
)
from hardware.model_spec import ModelSpec
from hardware.plan_inputs import FleetEntry, PlanInputError
from hardware.prices import DAYS_PER_MONTH, Cost, Prices, cost
from hardware.simulator import NodeSpec, Result, Simulation, Slo, TraceRequest, scale, servable

__all__ = ["Copy", "PlanInput", "PlanResult", "ServiceLevel", "SweepPoint", "form_copies", "plan"]

MAX_BATCH = 32  # sequences a copy runs at once at most (the simulator's and the node's default)
SWEEP_SHARES = (0.1, 0.25, 0.4, 0.55, 0.7, 0.85, 1.0, 1.2, 1.5, 2.0)  # of the estimated capacity
REFINE_STEPS = 4  # bisection steps between the last user count within the service level and the first out
WITHIN_SHARE = 0.99  # a user count is served when 99 % of requests meet the service level


@dataclass(frozen=True, slots=True)
class ServiceLevel:
    ttft_p99_s: float = 2.0
    tokens_per_s: float = 10.0  # per stream, after the first token

    def __post_init__(self) -> None:
        if not (self.ttft_p99_s > 0 and self.tokens_per_s > 0):
            raise PlanInputError("the service level's TTFT and tokens per second must be positive")


@dataclass(frozen=True, slots=True)
class PlanInput:
    model: ModelSpec
    fleet: tuple[FleetEntry, ...]
    trace: tuple[TraceRequest, ...]  # the demand's shape; arrivals are rescaled to each user count
    demand: str  # where the trace came from, for the report
    bits: float = 4.0
    cache_bits: int = 16
    context: int = 8192
    users: int | None = None
    requests_per_user_hour: float = 6.0
    slo: ServiceLevel = field(default_factory=ServiceLevel)
    prices: Prices = field(default_factory=Prices)
    user_counts: tuple[int, ...] = ()  # the sweep; empty: shares of the estimated capacity
    # The cards whose figures were calibrated (their specs in `fleet` already scaled, calibration.apply):
    # the result says which copies' speeds are measured rather than estimated.
    calibration: Mapping[str, CardCalibration] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.fleet:
            raise PlanInputError("the fleet has no cards")
        if not self.trace:
            raise PlanInputError("the demand has no requests")
        if not 1 <= self.context <= self.model.max_context:
            raise PlanInputError(
                f"context must be between 1 and {self.model.name}'s {self.model.max_context} tokens"
            )
        if self.users is not None and self.users < 1:
            raise PlanInputError("users must be at least 1")
        if not self.requests_per_user_hour > 0:
            raise PlanInputError("requests per user-hour must be positive")
        if any(u < 1 for u in self.user_counts):
            raise PlanInputError("every user count in the sweep must be at least 1")


@dataclass(frozen=True, slots=True)
class Copy:
    """One copy of the model over one or more cards."""

    cards: tuple[GpuSpec, ...]
    bytes_per_card: tuple[int, ...]  # weights, cache and reserve each card holds
    cache_tokens: int

    @property
    def label(self) -> str:
        return _fleet_label(self.cards)


@dataclass(frozen=True, slots=True)
class CopyFit:
    copy: str
    cards: tuple[str, ...]
    gib_per_card: tuple[float, ...]
    weights_gib: float
    cache_gib: float
    reserve_gib: float
    cache_tokens: int
    sequences_at_context: int  # full-context sequences the cache holds at once
    batch: int  # sequences of the demand's mean size that run at once (cache and MAX_BATCH allowing)


@dataclass(frozen=True, slots=True)
class CopySpeed:
    copy: str
    prefill_tokens_per_s: float
    decode_batch1_tokens_per_s: float
    batch: int
    decode_batch_tokens_per_s: float  # summed over the batch
    stream_tokens_per_s_at_batch: float
    figures: str = "estimated"  # "measured" when every card of the copy is calibrated, "partly measured"


@dataclass(frozen=True, slots=True)
class SweepPoint:
    users: int
    requests_per_s: float
    completed: int
    ttft_p50_s: float
    ttft_p99_s: float
    tpot_p50_s: float  # time per output token after the first, over requests of more than one token
    tpot_p99_s: float
    latency_p50_s: float  # a whole request, arrival to last token
    latency_p99_s: float
    queue_mean: float  # requests waiting to be placed, time-weighted over the run
    queue_max: int  # the most waiting at once
    goodput_rps: float
    within_slo: float  # share of requests that met the service level
    ok: bool


@dataclass(frozen=True, slots=True)
class PlanResult:
    verdict: str
    inputs: dict[str, Any]
    fit: tuple[CopyFit, ...]
    unused_cards: tuple[str, ...]
    speed: tuple[CopySpeed, ...]
    sweep: tuple[SweepPoint, ...]
    max_users: int
    dropped_requests: int  # prompts or answers as long as the context, which the service would refuse
    cost_users: int
    cost: Cost

    def to_dict(self) -> dict[str, Any]:
        """The result as plain JSON types (infinities, from runs where nothing completed, become null)."""
        plain: dict[str, Any] = _finite(dataclasses.asdict(self))
        return plain


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _fleet_label(cards: Sequence[GpuSpec]) -> str:
    counts: dict[str, int] = {}
    for card in cards:
        counts[card.name] = counts.get(card.name, 0) + 1
    return " + ".join(f"{n}×{name}" for name, n in counts.items())


def _split(p: PlanInput, cards: Sequence[GpuSpec], cache_tokens: int) -> tuple[int, ...] | None:
    return split_footprint(
        p.model, p.bits, cache_tokens, [c.vram_bytes for c in cards], cache_bits=p.cache_bits
    )


def _copy(p: PlanInput, cards: Sequence[GpuSpec]) -> Copy | None:
    """The copy these cards make with the largest cache they hold, or None if one full context won't fit."""
    if _split(p, cards, p.context) is None:
        return None
    lo, hi = p.context, sum(c.vram_bytes for c in cards) // kv_bytes_per_token(p.model, p.cache_bits) + 1
    while hi - lo > 1:  # the largest cache that still splits: lo fits, hi does not
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if _split(p, cards, mid) is not None else (lo, mid)
    split = _split(p, cards, lo)
    assert split is not None
    used = tuple(c for c, b in zip(cards, split, strict=True) if b)
    return Copy(used, tuple(b for b in split if b), lo)


def form_copies(p: PlanInput) -> tuple[list[Copy], list[GpuSpec]]:
    """Copies of the model the fleet makes, and the cards left out of every copy."""
    copies: list[Copy] = []
    left: list[GpuSpec] = []
    for entry in p.fleet:
        per_copy = next(
            (k for k in range(1, entry.count + 1) if _split(p, [entry.gpu] * k, p.context) is not None), None
        )
        if per_copy is None:
            left += [entry.gpu] * entry.count
            continue
        for _ in range(entry.count // per_copy):
            made = _copy(p, [entry.gpu] * per_copy)
            assert made is not None
            copies.append(made)
        left += [entry.gpu] * (entry.count % per_copy)
    group: list[GpuSpec] = []
    unused: list[GpuSpec] = []
    for card in sorted(left, key=lambda c: -c.vram_bytes):
        group.append(card)
        made = _copy(p, group)
        if made is not None:
            copies.append(made)
            unused += [c for c in group if c not in made.cards]
            group = []
    return copies, unused + group


def _effective(copy: Copy, p: PlanInput) -> GpuSpec:
    """One device standing for the copy in the simulator: the cards' harmonic speeds, its cache in VRAM."""
    shares = [b / sum(copy.bytes_per_card) for b in copy.bytes_per_card]
    bandwidth = 1 / sum(s / c.bandwidth_gbs for s, c in zip(shares, copy.cards, strict=True))
    tflops = 1 / sum(s / c.fp16_tflops for s, c in zip(shares, copy.cards, strict=True))
    # The simulator sizes its cache as VRAM - weights - reserve at 16-bit cache entries: give it the memory
    # that yields this copy's cache (in tokens, whatever the cache precision), with half an entry of slack.
    kv16 = kv_bytes_per_token(p.model, 16)
    vram = weight_bytes(p.model, p.bits) + DEFAULT_RESERVE_BYTES + copy.cache_tokens * kv16 + kv16 // 2
    return dataclasses.replace(
        copy.cards[0], name=copy.label, vram_gib=vram / 2**30, bandwidth_gbs=bandwidth, fp16_tflops=tflops,
        aliases=(),
    )  # fmt: skip


def _fit_and_speed(p: PlanInput, copy: Copy, mean_tokens: float) -> tuple[CopyFit, CopySpeed, float]:
    """The copy's fit and speed rows, and the requests per second it serves flat out (for the sweep)."""
    device = _effective(copy, p)
    batch = max(1, min(MAX_BATCH, int(copy.cache_tokens // max(1.0, mean_tokens))))
    weights = weight_bytes(p.model, p.bits)
    cache = copy.cache_tokens * kv_bytes_per_token(p.model, p.cache_bits)
    ctx = min(p.context, round(mean_tokens))
    decode1 = decode_tokens_per_s(p.model, p.bits, device, 1, ctx, cache_bits=p.cache_bits)
    decode_b = decode_tokens_per_s(p.model, p.bits, device, batch, ctx, cache_bits=p.cache_bits)
    prefill = prefill_tokens_per_s(p.model, device)
    fit = CopyFit(
        copy=copy.label,
        cards=tuple(c.name for c in copy.cards),
        gib_per_card=tuple(round(b / 2**30, 2) for b in copy.bytes_per_card),
        weights_gib=round(weights / 2**30, 2),
        cache_gib=round(cache / 2**30, 2),
        reserve_gib=round(len(copy.cards) * DEFAULT_RESERVE_BYTES / 2**30, 2),
        cache_tokens=copy.cache_tokens,
        sequences_at_context=copy.cache_tokens // p.context,
        batch=batch,
    )
    calibrated = [c.name in p.calibration for c in copy.cards]
    figures = "measured" if all(calibrated) else "partly measured" if any(calibrated) else "estimated"
    speed = CopySpeed(copy.label, prefill, decode1, batch, decode_b, decode_b / batch, figures)
    prompt = statistics.fmean(r.prompt_tokens for r in p.trace)
    output = statistics.fmean(r.output_tokens for r in p.trace)
    return fit, speed, 1 / (prompt / prefill + output / decode_b)


def _point(users: int, rate: float, r: Result, slo: ServiceLevel) -> SweepPoint:
    ok = r.ttft_p99 <= slo.ttft_p99_s and r.slo_attainment >= WITHIN_SHARE
    return SweepPoint(
        users, rate, r.completed, r.ttft_p50, r.ttft_p99, r.tpot_p50, r.tpot_p99, r.latency_p50,
        r.latency_p99, r.queue_mean, r.queue_max, r.goodput_rps, r.slo_attainment, ok,
    )  # fmt: skip


def _nice(n: float) -> int:
    """A round user count near n (two significant figures)."""
    if n < 10:
        return max(1, round(n))
    step = int(10 ** (len(str(int(n))) - 2))
    return max(1, round(n / step)) * step


def plan(
    p: PlanInput, progress: Callable[[int, int], None] | None = None, *, refine: bool = True
) -> PlanResult:
    """The whole answer; `progress(done, total)` is called after each simulation run. Without `refine`,
    only the sweep's user counts are simulated (no bisection where the service level is first missed)."""
    copies, unused = form_copies(p)
    if not copies:
        need = weight_bytes(p.model, p.bits) + p.context * kv_bytes_per_token(p.model, p.cache_bits)
        raise PlanInputError(
            f"{p.model.name} at {p.bits:g} bpw with a {p.context}-token context fits on none of the cards "
            f"({_fleet_label([e.gpu for e in p.fleet for _ in range(e.count)])}): it needs "
            f"{need / 2**30:.1f} GiB plus {DEFAULT_RESERVE_BYTES / 2**30:.0f} GiB per card"
        )
    if not any(servable(r, p.context) for r in p.trace):
        raise PlanInputError(
            f"every request of the demand has a prompt or an answer as long as the {p.context}-token "
            "context, which the service would refuse: raise --context or shorten the requests"
        )
    mean_tokens = statistics.fmean(min(p.context, r.prompt_tokens + r.output_tokens) for r in p.trace)
    rows = [_fit_and_speed(p, c, mean_tokens) for c in copies]
    capacity_rps = sum(rps for _, _, rps in rows)
    per_user_rps = p.requests_per_user_hour / 3600
    capacity_users = capacity_rps / per_user_rps
    counts = set(p.user_counts) or {_nice(capacity_users * s) for s in SWEEP_SHARES}
    if p.users is not None:
        counts.add(p.users)
    users_sorted = sorted(counts)
    total = len(users_sorted) + (REFINE_STEPS if refine else 0)
    done = 0
    sim = Simulation(
        [NodeSpec(str(i), _effective(c, p), max_sequences=MAX_BATCH) for i, c in enumerate(copies)],
        p.model,
        bits_per_weight=p.bits,
        context=p.context,
        slo=Slo(ttft_s=p.slo.ttft_p99_s, time_per_token_s=1 / p.slo.tokens_per_s),
    )

    def run(users: int) -> SweepPoint:
        nonlocal done
        rate = users * per_user_rps
        point = _point(users, rate, sim.run(scale(p.trace, rate), "hearth"), p.slo)
        done += 1
        if progress:
            progress(done, total)
        return point

    points = {u: run(u) for u in users_sorted}
    first_bad = next((u for u in users_sorted if not points[u].ok), None)
    good = [u for u in users_sorted if points[u].ok and (first_bad is None or u < first_bad)]
    lo, hi = (good[-1] if good else 0), first_bad
    for _ in range(REFINE_STEPS if refine else 0):
        if hi is None or hi - lo <= max(1, hi // 50):
            break
        mid = (lo + hi) // 2 if lo else max(1, hi // 2)
        if mid in points or mid < 1:
            break
        points[mid] = run(mid)
        lo, hi = (mid, hi) if points[mid].ok else (lo, mid)
    if progress and done < total:
        progress(total, total)
    sweep = tuple(points[u] for u in sorted(points))
    cost_users = p.users if p.users is not None else max(lo, 1)
    used = tuple(c for copy in copies for c in copy.cards)
    tokens_per_user_hour = p.requests_per_user_hour * mean_tokens
    tokens_month = cost_users * tokens_per_user_hour * p.prices.hours_per_day * DAYS_PER_MONTH
    inputs = {
        "model": p.model.name,
        "bits": p.bits,
        "cache_bits": p.cache_bits,
        "context": p.context,
        "fleet": _fleet_label([e.gpu for e in p.fleet for _ in range(e.count)]),
        "users": p.users,
        "requests_per_user_hour": p.requests_per_user_hour,
        "demand": p.demand,
        "requests_simulated": len(p.trace),
        "slo": dataclasses.asdict(p.slo),
        "prices": {k: v if not isinstance(v, dict) else dict(v) for k, v in _prices(p.prices).items()},
        "calibration": {
            e.gpu.name: p.calibration[e.gpu.name].summary() for e in p.fleet if e.gpu.name in p.calibration
        },
    }
    return PlanResult(
        verdict=_verdict(p, used, points, lo, hi),
        inputs=inputs,
        fit=tuple(f for f, _, _ in rows),
        unused_cards=tuple(c.name for c in unused),
        speed=tuple(s for _, s, _ in rows),
        sweep=sweep,
        max_users=lo,
        dropped_requests=sum(1 for r in p.trace if not servable(r, p.context)),
        cost_users=cost_users,
        cost=cost(used, tokens_month, cost_users * per_user_rps / capacity_rps, p.prices),
    )


def _prices(prices: Prices) -> dict[str, Any]:
    return {f.name: getattr(prices, f.name) for f in dataclasses.fields(prices)}


def _verdict(
    p: PlanInput, used: Sequence[GpuSpec], points: dict[int, SweepPoint], lo: int, hi: int | None
) -> str:
    what = f"{p.model.name} at {p.bits:g} bpw"
    stream = f"{p.slo.tokens_per_s:g} tok/s"
    fleet = _fleet_label(used)
    verb = "serves" if len(used) == 1 else "serve"
    if hi is not None:
        bad = points[hi]
        if bad.ttft_p99_s > p.slo.ttft_p99_s:
            why = f"TTFT p99 exceeds {p.slo.ttft_p99_s:g} s ({_s(bad.ttft_p99_s)})"
        else:
            why = (
                f"only {bad.within_slo:.0%} of requests get {stream} "
                f"and a first token within {p.slo.ttft_p99_s:g} s"
            )
    if lo == 0:
        assert hi is not None
        sentence = f"{fleet} cannot serve {what} within the service level even to {hi} users: {why}"
    else:
        head = f"{fleet} {verb} {what} to {lo} users at {stream} with TTFT p99 {_s(points[lo].ttft_p99_s)}"
        tail = (
            f"at {hi} users {why}" if hi is not None else f"the sweep stopped at {lo} users, still within it"
        )
        sentence = f"{head}; {tail}"
    if p.users is not None:
        enough = "enough for" if lo >= p.users else "short of"
        sentence += f" ({enough} the {p.users} users asked)"
    return sentence


def _s(seconds: float) -> str:
    return "never (no request completed)" if not math.isfinite(seconds) else f"{seconds:.1f} s"
