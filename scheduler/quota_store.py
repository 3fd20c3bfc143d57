"""Quota counters across restarts: what the database says was used, and the reservations in flight.

Used tokens are not kept in a table of their own: they are the sum of the usage rows (and of the daily
totals old rows are folded into), so the counters and `hearth usage` can never disagree. Reservations of
requests in flight are written as they are taken and deleted as they end; the ones a starting scheduler
finds belonged to requests that died with the previous process, and are released (and audited).

Functions here take the synchronous ``Store`` and run on its writer thread (``AsyncStore.run``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from scheduler.store import Store

RESERVATIONS = "quota_reservations"


@dataclass(frozen=True, slots=True)
class UsedTokens:
    kind: str  # "token" or "group"
    name: str
    period: str  # "2026-12-05" or "2026-12"
    tokens: int


def migrate(store: Store) -> None:
    table = store.db.table(RESERVATIONS)
    if not table.exists():
        table.create(
            {"request_id": str, "token_id": str, "group_name": str, "tokens": int, "day": str, "month": str,
             "created": float},
            pk="request_id",
        )  # fmt: skip


def release_orphans(store: Store) -> tuple[int, int]:
    """Delete reservations left by a previous process: (how many, how many tokens)."""
    with store.db.conn:
        row = store.db.execute(f"select count(*), coalesce(sum(tokens), 0) from {RESERVATIONS}").fetchone()
        store.db.execute(f"delete from {RESERVATIONS}")
    return int(row[0]), int(row[1])


def write_reservations(
    store: Store, taken: Sequence[tuple[str, str, str, int, str, str]], ended: Sequence[str]
) -> None:
    """Reservations taken (request id, token, group, tokens, day, month) and ended, in one transaction."""
    now = time.time()
    with store.db.conn:
        store.db.conn.executemany(
            f"insert or replace into {RESERVATIONS} (request_id, token_id, group_name, tokens, day, month, "
            "created) values (?, ?, ?, ?, ?, ?, ?)",
            [(*row, now) for row in taken],
        )
        store.db.conn.executemany(f"delete from {RESERVATIONS} where request_id = ?", [(r,) for r in ended])


def used_since(store: Store, now: float) -> list[UsedTokens]:
    """Tokens used this UTC day and month, per token and per group, from usage rows and daily totals."""
    today = datetime.fromtimestamp(now, UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    month_start = today.replace(day=1)
    day, month = today.strftime("%Y-%m-%d"), today.strftime("%Y-%m")
    out: list[UsedTokens] = []
    sources = [
        ("usage", "started >= ?", month_start.timestamp(), "strftime('%Y-%m-%d', started, 'unixepoch')"),
    ]
    if store.db.table("usage_daily").exists():
        sources.append(("usage_daily", "day >= ?", month, "day"))  # type: ignore[arg-type]
    for table, where, since, day_expr in sources:
        for column, kind in (("token_id", "token"), ('"group"', "group")):
            rows = store.db.execute(
                f"select {column}, {day_expr} as d, sum(prompt_tokens + completion_tokens) from {table} "
                f"where {where} group by {column}, d",
                [since],
            ).fetchall()
            for name, d, tokens in rows:
                if name is None or not tokens:
                    continue
                out.append(UsedTokens(kind, name, month, int(tokens)))
                if d == day:
                    out.append(UsedTokens(kind, name, day, int(tokens)))
    return out
