"""Policy on the request path: who the caller is under the policy in force, the decision, and its hold.

``Enforcer.admit`` turns a token and what the scheduler may see of a request into a ``Grant`` (the tiers,
fair-queue weight and node rules it runs under, and the x-ratelimit-* figures its answer reports) or raises
the refusal in OpenAI's shape. ``Enforcer.release`` ends the hold when the answer ends. The counters live in
scheduler.limits; reservations are persisted in batches by one task (scheduler.quota_store).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from policies import (
    Allowed,
    GroupRules,
    Policy,
    Principal,
    RateFigures,
    Refused,
    Visible,
    duration,
    effective,
)
from protocol.errors import HearthError, InvalidRequest, PermissionDenied, RateLimited
from protocol.rules import JobRules
from protocol.web import log_unexpected
from scheduler import quota_store
from scheduler.limits import Hold, Meters
from scheduler.rules import LoadedPolicy, Rules
from scheduler.store import AsyncStore, Store, TokenRecord

log = logging.getLogger("hearth.scheduler.policy")

FLUSH_S = 0.2  # reservations reach the database within about this long
RATE_HEADERS = "x-ratelimit-"


@dataclass(frozen=True, slots=True)
class Grant:
    request_id: str
    group: str
    tiers: frozenset[str]
    weight: float
    rules: bytes  # the JobRules JSON the node is sent (b"" when none)
    headers: dict[str, str]


class Enforcer:
    def __init__(
        self,
        rules: Rules,
        baseline: Policy,
        *,
        terms_accepted: Callable[[str], str | None] = lambda token_id: None,
        on_refused: Callable[[str, Refused], None] = lambda group, refused: None,
    ) -> None:
        self.rules = rules
        self.baseline = baseline
        self.terms_accepted = terms_accepted  # token id → the terms version its holder accepted
        self.on_refused = on_refused
        self._taken: list[tuple[str, str, str, int, str, str]] = []
        self._ended: list[str] = []
        self._dirty = asyncio.Event()
        self.meters = Meters(on_hold=self._held, on_release=self._released)
        self._groups: tuple[LoadedPolicy, dict[str, GroupRules]] | None = None

    def group(self, name: str | None) -> GroupRules | None:
        """A group's rules under the baseline, as the policy in force says (cached per loaded policy)."""
        current = self.rules.current
        if self._groups is None or self._groups[0] is not current:
            self._groups = (current, {k: effective(self.baseline, g) for k, g in current.groups.items()})
        return self._groups[1].get(name or "default")

    def group_of(self, token: TokenRecord) -> GroupRules:
        """The token's group's rules, or 403 when the policy in force no longer defines that group."""
        group = self.group(token.group)
        if group is None:
            raise PermissionDenied(
                f"this token belongs to the group {token.group}, which the policy in force no longer "
                "defines; ask an operator to move it to another group",
                code="unknown_group",
            )
        return group

    def admit(self, token: TokenRecord, visible: Visible, request_id: str) -> Grant:
        group = self.group_of(token)
        principal = Principal(
            token_id=token.id,
            group=group,
            terms_version=self.rules.current.terms_version,
            terms_accepted=self.terms_accepted(token.id),
            token_tiers=frozenset(token.tiers) if token.tiers is not None else None,
        )
        decision = self.meters.admit(request_id, principal, visible)
        if isinstance(decision, Refused):
            self.on_refused(group.name, decision)
            raise refusal_error(decision)
        return Grant(
            request_id, group.name, decision.tiers, decision.weight, _job_rules(decision),
            rate_headers(decision.rates, request_id),
        )  # fmt: skip

    def release(self, request_id: str) -> None:
        self.meters.release(request_id)

    def charged(
        self, request_id: str, token_id: str, group: str, started: float, tokens: int, *, delta: bool
    ) -> None:
        self.meters.charged(request_id, token_id, group, started, tokens, delta=delta)

    # ----- persistence -----

    def _held(self, hold: Hold) -> None:
        self._taken.append(
            (hold.request_id, hold.keys[0][1], hold.keys[1][1], hold.reserve, hold.day, hold.month)
        )
        self._dirty.set()

    def _released(self, hold: Hold) -> None:
        self._ended.append(hold.request_id)
        self._dirty.set()

    async def start(self, store: AsyncStore) -> None:
        """Rebuild the quota counters from the usage rows, and release what a dead process reserved."""

        def load(db: Store) -> tuple[list[quota_store.UsedTokens], tuple[int, int]]:
            quota_store.migrate(db)
            orphans = quota_store.release_orphans(db)
            if orphans[0]:
                db.audit(
                    "reservations_released", "quota",
                    f"{orphans[0]} reservations ({orphans[1]} tokens) of requests that ended with the "
                    "previous scheduler process",
                )  # fmt: skip
            return quota_store.used_since(db, time.time()), orphans

        used, orphans = await store.write(load)
        for row in used:
            self.meters.load_used(row.kind, row.name, row.period, row.tokens)
        if orphans[0]:
            log.info("released %d reservations left by the previous process", orphans[0])

    async def persist(self, store: AsyncStore) -> None:
        """Write reservations taken and ended, in batches (runs until cancelled, then flushes)."""
        try:
            while True:
                await self._dirty.wait()
                await asyncio.sleep(FLUSH_S)
                await self._flush(store)
        finally:
            await asyncio.shield(self._flush(store))

    async def _flush(self, store: AsyncStore) -> None:
        self._dirty.clear()
        taken, ended = self._taken, self._ended
        self._taken, self._ended = [], []
        if not taken and not ended:
            return
        try:
            await store.write(lambda db: quota_store.write_reservations(db, taken, ended))
        except Exception as exc:  # the counters in memory stay exact; only the restart record lags
            log_unexpected("recording quota reservations", exc)


def _job_rules(decision: Allowed) -> bytes:
    if (
        decision.system_prompt is None
        and decision.max_total_tokens is None
        and decision.max_new_tokens is None
    ):
        return b""  # without building a model
    rules = JobRules(
        system_prompt=decision.system_prompt,
        max_total_tokens=decision.max_total_tokens,
        max_new_tokens=decision.max_new_tokens,
    )
    return b"" if rules.empty else rules.model_dump_json(exclude_none=True).encode()


def refusal_error(refused: Refused) -> HearthError:
    """The engine's refusal in OpenAI's shape, with the x-ratelimit-* figures and Retry-After."""
    klass: type[HearthError] = {400: InvalidRequest, 403: PermissionDenied, 429: RateLimited}.get(
        refused.status, HearthError
    )
    error = klass(
        refused.message, code=refused.code, param=refused.param, retry_after=_ceil(refused.retry_after)
    )
    error.relayed_headers.update(rate_headers(refused.rates, None))
    return error


def _ceil(seconds: float | None) -> float | None:
    return None if seconds is None else max(1.0, float(int(seconds) + (seconds % 1 > 0)))


def rate_headers(rates: RateFigures, request_id: str | None) -> dict[str, str]:
    """OpenAI's x-ratelimit-* headers for the limits that apply (none for a limit the group does not
    set), and x-request-id."""
    out: dict[str, str] = {}
    for what, limit, remaining, reset in (
        ("requests", rates.limit_requests, rates.remaining_requests, rates.reset_requests),
        ("tokens", rates.limit_tokens, rates.remaining_tokens, rates.reset_tokens),
    ):
        if limit is not None:
            out[f"{RATE_HEADERS}limit-{what}"] = str(limit)
            out[f"{RATE_HEADERS}remaining-{what}"] = str(remaining)
            out[f"{RATE_HEADERS}reset-{what}"] = duration(reset or 0.0)
    if request_id is not None:
        out["x-request-id"] = request_id
    return out
