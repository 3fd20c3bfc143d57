"""Retention: usage rows older than the policy's ``retention.usage_days`` become daily totals.

Whole days are folded, the last one ending at the UTC midnight before the cut-off, so a day's requests
are either all rows or all one total, and a report by day reads each day alike. Reports add rows and
totals together (scheduler.store_usage), so folding changes no total.
"""

from __future__ import annotations

import asyncio
import logging
import time
from functools import partial

from protocol.web import log_unexpected
from scheduler.rules import Rules
from scheduler.store import AsyncStore, Store
from scheduler.store_usage import start_of_day

log = logging.getLogger("hearth.scheduler")

DAY_S = 86_400.0
INTERVAL_S = 3600.0  # how often the scheduler looks for rows to fold


def cutoff(now: float, usage_days: int) -> float:
    """Rows of requests that started before this are folded: the UTC midnight ``usage_days`` back."""
    return start_of_day(now - usage_days * DAY_S)


async def keep_usage(store: AsyncStore, rules: Rules, interval_s: float = INTERVAL_S) -> None:
    """Fold old usage rows now, then every ``interval_s`` seconds, with the retention in force then (a
    reloaded policy applies at the next pass). Runs until cancelled; a failed pass is logged and retried
    at the next."""
    while True:
        days = rules.current.policy.retention.usage_days
        try:
            folded = await store.write(partial(_fold, before=cutoff(time.time(), days)))
        except Exception as exc:  # retention must never take the scheduler down
            log_unexpected("folding old usage rows", exc)
        else:
            if folded:
                log.info("folded %d usage rows older than %d days into daily totals", folded, days)
        await asyncio.sleep(interval_s)


def _fold(db: Store, *, before: float) -> int:
    return db.fold_usage(before)
