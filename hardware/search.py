"""The cheapest fleet from a shopping list serving N users within the service level (`plan --search`).

The shopping list is a `PlanInput` fleet read as "at most this many of each card". Every sub-fleet of it
(any count from 0 to the maximum of each card, at least one card) is a candidate, ranked by what owning it
costs a month: the cards amortised plus their electricity at the load N users put on them
(`hardware.prices.cost`, the same arithmetic `plan` reports as "own"), all cards of the candidate counted.

The search is bounded:
1. Candidates are visited cheapest first without costing them all: a candidate's price with its cards idle
   is a lower bound on its cost, so candidates are drawn in that order and costed only when their bound
   is below the cheapest costed one (a heap), so a list of many card types stays cheap to walk.
2. A candidate is simulated only if the model fits on it and its estimated flat-out capacity (prefill and
   decode throughput, as `plan` estimates it for its sweep) covers N users. That bound is loose (within
   the service level a fleet serves a third to a half of it where long prompts meet slow prefill), so the
   plausible candidates are checked in order, cheapest first, without skipping any.
3. A check replays the demand once, at N users (`plan` with that one user count and no bisection); the
   first candidate within the service level then gets the full `plan` sweep, which must confirm at least
   N users. At most MAX_SIMULATIONS simulation runs in all; a few runner-ups after the winner are checked
   too.

Nothing passing is an answer, not an error: the verdict names the best fleet found and the users it serves.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import statistics
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from hardware.plan import PlanInput, PlanResult, _fit_and_speed, form_copies, plan
from hardware.plan_inputs import FleetEntry, PlanInputError
from hardware.prices import DAYS_PER_MONTH, IDLE_SHARE, cost

__all__ = ["MAX_SIMULATIONS", "RUNNERS_UP", "Candidate", "SearchResult", "search"]

MAX_SIMULATIONS = 60  # simulation runs at most: a check is one run at N users, a full plan one more
RUNNERS_UP = 2  # candidates after the winner checked as well, so the planner sees the next options
MAX_CANDIDATES = 1_000_000  # sub-fleets of the list at most: beyond, the list is not a shopping list


@dataclass(frozen=True, slots=True)
class Candidate:
    fleet: str  # "2×RTX 4090 + 1×RTX 3090"
    gpus: str  # the same as a --gpus value, to plan it again
    cards: int
    usd_per_month: float  # owning: cards amortised + electricity at N users' load
    estimated_users: int  # flat-out capacity from the estimated throughput (an upper bound)
    max_users: int | None  # users within the service level (swept); unswept: N if ok, else None (fewer)
    swept: bool  # max_users comes from the full sweep; otherwise from the check at N users only
    ok: bool  # serves N users within the service level
    within_slo: float  # at N users, the share of requests within the service level (the check's figure)


@dataclass(frozen=True, slots=True)
class SearchResult:
    verdict: str
    users: int
    shopping_list: str
    cost_basis: str
    fleets_in_list: int
    fleets_costed: int
    simulations: int
    best: Candidate | None  # the cheapest that serves N users; None when none does
    tried: tuple[Candidate, ...]  # every candidate simulated, cheapest first
    plan: PlanResult  # the full plan of the best (or, when none passes, of the best found)

    def to_dict(self) -> dict[str, Any]:
        """The search without its plan, as plain JSON types (the plan is the document's other keys)."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "plan"}


def _plain(value: Any) -> Any:
    if isinstance(value, Candidate):
        return dataclasses.asdict(value)
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


@dataclass(frozen=True, slots=True)
class _Costed:
    counts: tuple[int, ...]
    usd_per_month: float
    estimated_users: int


def _sub_fleets(p: PlanInput) -> Iterator[tuple[float, tuple[int, ...]]]:
    """Every sub-fleet of the list with the lower bound of its monthly cost, lowest bound first."""
    hours = p.prices.hours_per_day * DAYS_PER_MONTH
    floor = [
        p.prices.card(e.gpu) / (p.prices.amortisation_years * 12)
        + e.gpu.tdp_w * IDLE_SHARE / 1000 * hours * p.prices.electricity_usd_per_kwh
        for e in p.fleet
    ]
    bounds = sorted(
        (sum(n * f for n, f in zip(counts, floor, strict=True)), counts)
        for counts in itertools.product(*(range(e.count + 1) for e in p.fleet))
        if any(counts)
    )
    yield from bounds


def _entries(p: PlanInput, counts: tuple[int, ...]) -> tuple[FleetEntry, ...]:
    return tuple(FleetEntry(e.gpu, n) for e, n in zip(p.fleet, counts, strict=True) if n)


def _cost(p: PlanInput, counts: tuple[int, ...], users: int, mean_tokens: float) -> _Costed | None:
    """The candidate's monthly cost of owning at N users' load and its estimated capacity; None if no fit."""
    sub = dataclasses.replace(p, fleet=_entries(p, counts))
    copies, _ = form_copies(sub)
    if not copies:
        return None
    capacity_rps = sum(_fit_and_speed(sub, c, mean_tokens)[2] for c in copies)
    per_user_rps = p.requests_per_user_hour / 3600
    tokens_month = users * p.requests_per_user_hour * mean_tokens * p.prices.hours_per_day * DAYS_PER_MONTH
    cards = tuple(e.gpu for e in sub.fleet for _ in range(e.count))
    own = cost(cards, tokens_month, users * per_user_rps / capacity_rps, p.prices).options[0]
    assert own.name == "own" and own.usd_per_month is not None
    return _Costed(counts, own.usd_per_month, int(capacity_rps / per_user_rps))


def _cheapest_first(p: PlanInput, users: int, mean_tokens: float) -> Iterator[_Costed]:
    """Candidates the model fits on, by exact monthly cost, costing only those a bound cannot rule out."""
    heap: list[tuple[float, tuple[int, ...], _Costed]] = []
    for bound, counts in _sub_fleets(p):
        while heap and heap[0][0] <= bound:
            yield heapq.heappop(heap)[2]
        costed = _cost(p, counts, users, mean_tokens)
        if costed is not None:
            heapq.heappush(heap, (costed.usd_per_month, counts, costed))
    while heap:
        yield heapq.heappop(heap)[2]


def search(p: PlanInput, progress: Callable[[int, int], None] | None = None) -> SearchResult:
    """The cheapest sub-fleet of `p.fleet` serving `p.users`; `progress(done, total)` follows every
    simulation run (the total is the bound until a full plan starts, then that plan's runs)."""
    if p.users is None:
        raise PlanInputError("--search needs --users: the number of users the fleet must serve")
    users = p.users
    size = 1
    for e in p.fleet:
        size *= e.count + 1
    if size - 1 > MAX_CANDIDATES:
        raise PlanInputError(
            f"the shopping list has {size - 1:,} sub-fleets; at most {MAX_CANDIDATES:,} are searched "
            "(lower the counts)"
        )
    mean_tokens = statistics.fmean(min(p.context, r.prompt_tokens + r.output_tokens) for r in p.trace)
    tried: list[Candidate] = []
    best: tuple[Candidate, PlanResult] | None = None
    costed = 0
    simulations = 0
    runners = 0
    fitting: list[_Costed] = []  # candidates the model fits on, to name the strongest when none is plausible

    def sweep(counts: tuple[int, ...]) -> PlanResult:
        """The full plan of a sub-fleet, its runs counted after the checks so far."""
        base = simulations
        tick = None if progress is None else lambda done, total: progress(base + done, base + total)
        return plan(dataclasses.replace(p, fleet=_entries(p, counts)), tick)

    def check(c: _Costed) -> Candidate:
        nonlocal simulations
        simulations += 1
        one = plan(dataclasses.replace(p, fleet=_entries(p, c.counts), user_counts=(users,)), refine=False)
        if progress is not None:
            progress(simulations, MAX_SIMULATIONS)
        point = one.sweep[0]
        return _candidate(p, c, users if point.ok else None, swept=False, within_slo=point.within_slo)

    for c in _cheapest_first(p, users, mean_tokens):
        costed += 1
        fitting.append(c)
        if c.estimated_users < users:
            continue  # even flat out, with no latency target, it would not keep up
        if simulations >= MAX_SIMULATIONS or (best is not None and runners >= RUNNERS_UP):
            break
        found = check(c)
        if found.ok and best is None:
            full = sweep(c.counts)
            simulations += 1
            found = _candidate(p, c, full.max_users, swept=True, within_slo=found.within_slo)
            if found.ok:
                best = (found, full)
        elif best is not None:
            runners += 1
        tried.append(found)
    if not fitting:  # not even the whole list holds the model: plan() says why, in its one-line error
        plan(dataclasses.replace(p, user_counts=(users,)))
        raise AssertionError("plan() refuses a fleet that holds no copy")
    if best is not None:
        chosen, full = best
        verdict = (
            f"The cheapest fleet for {users} users is {chosen.fleet} at ${chosen.usd_per_month:,.0f} a month "
            f"to own; it serves {chosen.max_users} users within the service level "
            f"({costed} fleets costed, {simulations} simulation runs)"
        )
    else:
        if not tried:  # none plausible: simulate the strongest, so the verdict can say how far it falls short
            strongest = max(fitting, key=lambda c: (c.estimated_users, -c.usd_per_month))
            tried.append(check(strongest))
        near = max(tried, key=lambda c: (c.within_slo, -c.usd_per_month))  # the closest to the level
        counts = next(c.counts for c in fitting if _label(p, c.counts) == near.fleet)
        full = sweep(counts)
        simulations += 1
        tried[tried.index(near)] = dataclasses.replace(near, max_users=full.max_users, swept=True)
        verdict = (
            f"No fleet from the list serves {users} users within the service level; the best found, "
            f"{near.fleet} (${near.usd_per_month:,.0f} a month to own), serves {full.max_users} users "
            f"({costed} fleets costed, {simulations} simulation runs)"
        )
    return SearchResult(
        verdict=verdict,
        users=users,
        shopping_list=_label(p, tuple(e.count for e in p.fleet)),
        cost_basis="own: cards amortised + electricity at the load of the users asked",
        fleets_in_list=size - 1,
        fleets_costed=costed,
        simulations=simulations,
        best=best[0] if best else None,
        tried=tuple(sorted(tried, key=lambda c: c.usd_per_month)),
        plan=full,
    )


def _label(p: PlanInput, counts: tuple[int, ...]) -> str:
    return " + ".join(f"{n}×{e.gpu.name}" for e, n in zip(p.fleet, counts, strict=True) if n)


def _candidate(
    p: PlanInput, c: _Costed, max_users: int | None, *, swept: bool, within_slo: float
) -> Candidate:
    assert p.users is not None
    return Candidate(
        fleet=_label(p, c.counts),
        gpus=",".join(f"{e.gpu.name}x{n}" for e, n in zip(p.fleet, c.counts, strict=True) if n),
        cards=sum(c.counts),
        usd_per_month=round(c.usd_per_month, 2),
        estimated_users=c.estimated_users,
        max_users=max_users,
        swept=swept,
        ok=max_users is not None and max_users >= p.users,
        within_slo=within_slo,
    )
