"""The counters policy decisions are made against: rates, requests in flight and quotas, per token and per
group, exact under any concurrency.

Everything here runs on the event loop without awaiting between the check and the hold: ``admit`` asks the
engine (policies.decide) with the counters as they are and, when it allows, takes the hold in the same step,
so 50 requests arriving together against a limit of 10 admit exactly 10.

- Rates are sliding 60-second logs per token and per group: a request counts once, its tokens as reserved
  until its usage is known, then as used.
- Quotas (per UTC day and month) count what usage rows say was used, plus what requests in flight have
  reserved (prompt estimate + max_tokens). The node is told to use no more than the reservation
  (protocol.rules.JobRules.max_total_tokens), so a settled request can only refund, and a quota is never
  overshot.
- Used tokens come from the usage rows the scheduler writes (``charged``), so the counters and the usage
  table agree, and a restart rebuilds them from it (scheduler.quota_store). Reservations are written to the
  database too; those of requests that died with an old process are released when the next one starts.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from policies import Allowed, Meter, Principal, Refused, UsageWindow, Visible, decide

WINDOW_S = 60.0
Key = tuple[str, str]  # ("token", id) or ("group", name)


def periods(at: float) -> tuple[str, str]:
    """The UTC day and month a moment falls in, as quota periods: ("2026-12-05", "2026-12")."""
    day = datetime.fromtimestamp(at, UTC)
    return day.strftime("%Y-%m-%d"), day.strftime("%Y-%m")


def _ends(at: float) -> tuple[float, float]:
    """Seconds from ``at`` until the UTC day, and the month, turn."""
    now = datetime.fromtimestamp(at, UTC)
    day = now.replace(hour=0, minute=0, second=0, microsecond=0) + timedelta(days=1)
    month = (now.replace(day=1, hour=0, minute=0, second=0, microsecond=0) + timedelta(days=32)).replace(
        day=1
    )
    return (day - now).total_seconds(), (month - now).total_seconds()


class _Minute:
    """One holder's last 60 seconds: [time, tokens] per request, oldest first."""

    __slots__ = ("entries", "tokens")

    def __init__(self) -> None:
        self.entries: deque[list[float]] = deque()
        self.tokens = 0.0

    def prune(self, now: float) -> None:
        while self.entries and self.entries[0][0] <= now - WINDOW_S:
            gone = self.entries.popleft()
            self.tokens -= gone[1]
            gone[0] = -1.0  # out of the window: a later settlement must not touch the window's sum

    def add(self, now: float, tokens: float) -> list[float]:
        entry = [now, tokens]
        self.entries.append(entry)
        self.tokens += tokens
        return entry

    def free_in(self, now: float) -> float:
        return max(0.0, self.entries[0][0] + WINDOW_S - now) if self.entries else 0.0


@dataclass(eq=False)
class Hold:
    """What one admitted request holds until it ends."""

    request_id: str
    keys: tuple[Key, Key]
    reserve: int
    day: str
    month: str
    entries: list[list[float]]  # its entries in the minute logs (token's, group's)
    charged: int = 0  # what its usage row says so far
    released: bool = False
    decision: Allowed = field(repr=False, default=None)  # type: ignore[assignment]


class Meters:
    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.time,
        on_hold: Callable[[Hold], None] = lambda hold: None,
        on_release: Callable[[Hold], None] = lambda hold: None,
    ) -> None:
        self._clock = clock
        self._on_hold = on_hold  # persistence of reservations (scheduler.quota_store)
        self._on_release = on_release
        self._minutes: dict[Key, _Minute] = {}
        self._in_flight: Counter[Key] = Counter()
        self._quota: Counter[tuple[Key, str]] = Counter()  # (key, period) → used + reserved
        self._holds: dict[str, Hold] = {}

    # ----- the request path -----

    def admit(self, request_id: str, principal: Principal, visible: Visible) -> Allowed | Refused:
        """Decide, and when allowed take the hold in the same step (no await between the two)."""
        now = self._clock()
        keys: tuple[Key, Key] = (("token", principal.token_id), ("group", principal.group.name))
        day, month = periods(now)
        day_ends, month_ends = _ends(now)
        window = UsageWindow(
            each=self._meter(keys[0], now, day, month),
            total=self._meter(keys[1], now, day, month),
            day_ends_in=day_ends,
            month_ends_in=month_ends,
        )
        decision = decide(principal, visible, window)
        if isinstance(decision, Refused):
            return decision
        hold = Hold(request_id, keys, decision.reserve, day, month, [], decision=decision)
        for key in keys:
            hold.entries.append(self._minutes.setdefault(key, _Minute()).add(now, decision.rate_tokens))
            self._in_flight[key] += 1
            self._quota[key, day] += decision.reserve
            self._quota[key, month] += decision.reserve
        self._holds[request_id] = hold
        self._on_hold(hold)
        return decision

    def release(self, request_id: str) -> None:
        """The request ended: its reservation gives way to what its usage row said it used."""
        hold = self._holds.pop(request_id, None)
        if hold is None or hold.released:
            return
        hold.released = True
        for key, entry in zip(hold.keys, hold.entries, strict=True):
            self._in_flight[key] -= 1
            if self._in_flight[key] <= 0:
                del self._in_flight[key]
            minute = self._minutes.get(key)
            if minute is not None and entry[0] >= 0 and entry[1] != hold.charged:
                minute.tokens += hold.charged - entry[1]
                entry[1] = hold.charged
            for period in (hold.day, hold.month):
                self._quota[key, period] += hold.charged - hold.reserve
        self._on_release(hold)

    def charged(
        self, request_id: str, token_id: str, group: str, started: float, tokens: int, *, delta: bool
    ) -> None:
        """A usage row was written (``delta``: a correction by this many tokens). Rows of a request still in
        flight replace each other (a failover's last attempt is its row); later ones count directly."""
        hold = self._holds.get(request_id)
        if hold is not None and not delta:
            hold.charged = tokens
            return
        if hold is not None:
            hold.charged += tokens
            return
        self.add_used(token_id, group, started, tokens)

    def add_used(self, token_id: str, group: str, at: float, tokens: int) -> None:
        day, month = periods(at)
        for key in (("token", token_id), ("group", group)):
            self._quota[key, day] += tokens
            self._quota[key, month] += tokens

    def load_used(self, kind: str, name: str, period: str, tokens: int) -> None:
        """What the database says was used in ``period`` (at start)."""
        self._quota[(kind, name), period] += tokens

    # ----- reading -----

    def _meter(self, key: Key, now: float, day: str, month: str) -> Meter:
        minute = self._minutes.get(key)
        if minute is not None:
            minute.prune(now)
            if not minute.entries and key not in self._in_flight:
                del self._minutes[key]
                minute = None
        free = minute.free_in(now) if minute is not None else 0.0
        return Meter(
            requests_minute=len(minute.entries) if minute is not None else 0,
            tokens_minute=round(minute.tokens) if minute is not None else 0,
            requests_free_in=free,
            tokens_free_in=free,
            in_flight=self._in_flight.get(key, 0),
            tokens_day=self._quota.get((key, day), 0),
            tokens_month=self._quota.get((key, month), 0),
        )

    def meter(self, kind: str, name: str) -> Meter:
        now = self._clock()
        day, month = periods(now)
        return self._meter((kind, name), now, day, month)

    @property
    def in_flight(self) -> int:
        return len(self._holds)

    def forget_periods(self) -> None:
        """Drop the counters of days and months that have ended (bounded memory)."""
        day, month = periods(self._clock())
        for key, period in [k for k in self._quota if k[1] not in (day, month)]:
            del self._quota[key, period]
