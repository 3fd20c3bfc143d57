"""Usage accounting: one row per request (metadata only), folded into daily totals as it ages.

A row says who (token id, and the token's group when it ran), what (model, endpoint, node), how much
(prompt and completion tokens), how it went (status, time to first token, start and end): never a word of
the prompt or the answer. Retention (scheduler.retention) folds rows older than the policy's
``retention.usage_days`` into ``usage_daily``, one row per day, token, group, model and node; every report
reads the rows and the daily totals together, so folding changes no total.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import get_args

import sqlite_utils

from protocol.accounts import UsageDimension
from scheduler.store_audit import LOCAL, SCHEDULER, AuditLog

DIMENSIONS: tuple[UsageDimension, ...] = get_args(UsageDimension)
# Outcomes that are no error of the service: the answer was given, or the client left or stopped reading.
NOT_ERRORS = ("ok", "cancelled", "client_stalled")
DAY_FORMAT = "%Y-%m-%d"


@dataclass(frozen=True, slots=True)
class UsageRecord:
    request_id: str
    token_id: str
    model: str
    endpoint: str
    node_id: str
    status: str  # the outcome: "ok", "cancelled", "node_failed", "refused_503", ...
    prompt_tokens: int
    completion_tokens: int
    started: float
    ended: float
    group: str = "default"  # the token's group when the request ran
    ttft_ms: float | None = None  # time to the first answer bytes the node sent; None: none came


# A usage row is replaced when its node's receipt corrects the counts (scheduler.ledger). Column names are
# quoted: "group" is an SQL keyword.
_INSERT_USAGE = "INSERT OR REPLACE INTO usage ({}) VALUES ({})".format(
    ", ".join(f'"{name}"' for name in UsageRecord.__slots__), ", ".join("?" for _ in UsageRecord.__slots__)
)
_IS_ERROR = "(status not in ({}))".format(", ".join(f"'{s}'" for s in NOT_ERRORS))

# Each dimension's key in a usage row and in a daily total.
_KEYS: dict[UsageDimension, tuple[str, str]] = {
    "user": ("token_id", "token_id"),
    "group": ('"group"', '"group"'),
    "model": ("model", "model"),
    "node": ("node_id", "node_id"),
    "day": (f"strftime('{DAY_FORMAT}', started, 'unixepoch')", "day"),
}


@dataclass(frozen=True, slots=True)
class UsageTotal:
    """One line of a usage report: the totals of one token, group, model, node or day."""

    key: str
    name: str | None  # the token's name, in a report by user
    requests: int
    prompt_tokens: int
    completion_tokens: int
    errors: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def day_of(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime(DAY_FORMAT)


def start_of_day(ts: float) -> float:
    """The UTC midnight at or before ``ts``."""
    return datetime.fromtimestamp(ts, UTC).replace(hour=0, minute=0, second=0, microsecond=0).timestamp()


def start_of_month(ts: float) -> float:
    """The first instant of ``ts``'s calendar month, in UTC."""
    moment = datetime.fromtimestamp(ts, UTC)
    return moment.replace(day=1, hour=0, minute=0, second=0, microsecond=0).timestamp()


class UsageBook(AuditLog):
    """The usage part of the Store (a mixin: the Store holds the database)."""

    db: sqlite_utils.Database

    def _migrate_usage(self) -> None:
        usage = self.db.table("usage")
        if not usage.exists():
            usage.create(
                {
                    "request_id": str, "token_id": str, "model": str, "endpoint": str, "node_id": str,
                    "status": str, "prompt_tokens": int, "completion_tokens": int, "started": float,
                    "ended": float,
                },
                pk="request_id",
            )  # fmt: skip
            usage.create_index(["token_id", "started"])
        columns = usage.columns_dict
        if "group" not in columns:  # databases from before groups: their rows were the default group's
            usage.add_column("group", str, not_null_default="default")
        if "ttft_ms" not in columns:
            usage.add_column("ttft_ms", float)
        usage.create_index(["started"], if_not_exists=True)  # reports and retention read by time
        daily = self.db.table("usage_daily")
        if not daily.exists():
            daily.create(
                {
                    "day": str, "token_id": str, "group": str, "model": str, "node_id": str,
                    "requests": int, "prompt_tokens": int, "completion_tokens": int, "errors": int,
                    "last_used": float,
                },
                pk=("day", "token_id", "group", "model", "node_id"),
                not_null={"requests", "prompt_tokens", "completion_tokens", "errors"},
            )  # fmt: skip
            daily.create_index(["token_id", "day"])

    def record_usage(self, records: Sequence[UsageRecord]) -> None:
        # One single-row statement run once per record, not sqlite-utils' multi-row INSERT: that one's text
        # changes with the batch size, and SQLite keeps a compiled statement (tens of KiB) for every size it
        # has seen, up to the 128 that Python's sqlite3 caches. The soak benchmark saw that as the
        # scheduler's memory creeping up long after its page cache was full (docs/benchmarks.md, "Soak").
        with self.db.conn:
            self.db.conn.executemany(
                _INSERT_USAGE, ([getattr(r, f) for f in UsageRecord.__slots__] for r in records)
            )

    def fold_usage(self, before: float) -> int:
        """Fold the rows of requests that started before ``before`` into daily totals and delete them, in
        one transaction; return how many were folded. Folding again changes nothing (the rows are gone),
        and totals already there for a day are added to, never replaced."""
        with self.db.conn:
            # WHERE before GROUP BY, and a WHERE at all, so that SQLite reads ON CONFLICT as the upsert.
            self.db.execute(
                f"""insert into usage_daily (day, token_id, "group", model, node_id, requests,
                    prompt_tokens, completion_tokens, errors, last_used)
                select {_KEYS["day"][0]}, token_id, coalesce("group", 'default'), model, node_id, count(*),
                    sum(prompt_tokens), sum(completion_tokens), sum({_IS_ERROR}), max(started)
                from usage where started < ? group by 1, 2, 3, 4, 5
                on conflict (day, token_id, "group", model, node_id) do update set
                    requests = requests + excluded.requests,
                    prompt_tokens = prompt_tokens + excluded.prompt_tokens,
                    completion_tokens = completion_tokens + excluded.completion_tokens,
                    errors = errors + excluded.errors,
                    last_used = max(coalesce(last_used, 0), excluded.last_used)""",
                [before],
            )
            count = self.db.execute("delete from usage where started < ?", [before]).rowcount
            if not count:
                return 0
            # Not self.audit(): sqlite-utils would commit this transaction half done.
            self.db.conn.execute(
                "insert into audit (at, action, subject, detail, actor, origin) values (?, ?, ?, ?, ?, ?)",
                [time.time(), "usage_folded", f"before {day_of(before)}", f"rows folded: {count}",
                 SCHEDULER, LOCAL],
            )  # fmt: skip
        return int(count)

    def usage_report(self, by: UsageDimension, since: float) -> list[UsageTotal]:
        """Totals by ``by`` of the requests that started at ``since`` or later, most tokens first. Folded
        days count whole: a day folded into totals is in the report if ``since`` falls on it or before."""
        row_key, daily_key = _KEYS[by]
        name = "(select name from tokens where id = key)" if by == "user" else "null"
        rows = self.db.execute(
            f"""select key, {name}, sum(requests), sum(prompt), sum(completion), sum(errors) from (
                    select {row_key} as key, count(*) as requests, sum(prompt_tokens) as prompt,
                        sum(completion_tokens) as completion, sum({_IS_ERROR}) as errors
                    from usage where started >= ? group by 1
                    union all
                    select {daily_key}, sum(requests), sum(prompt_tokens), sum(completion_tokens),
                        sum(errors)
                    from usage_daily where day >= ? group by 1
                ) group by key order by sum(prompt) + sum(completion) desc, key""",
            [since, day_of(since)],
        ).fetchall()
        return [UsageTotal(str(k), n, int(r), int(p), int(c), int(e)) for k, n, r, p, c, e in rows]

    def token_activity(self, now: float | None = None) -> dict[str, tuple[float | None, int]]:
        """Per token id: when it was last used (the start of its latest request), and the tokens it used
        this calendar month (UTC). Each is one index lookup per token, rows and daily totals together."""
        month = start_of_month(time.time() if now is None else now)
        rows = self.db.execute(
            """select t.id,
                (select max(started) from usage u where u.token_id = t.id),
                (select max(last_used) from usage_daily d where d.token_id = t.id),
                (select coalesce(sum(prompt_tokens + completion_tokens), 0) from usage u
                    where u.token_id = t.id and u.started >= ?),
                (select coalesce(sum(prompt_tokens + completion_tokens), 0) from usage_daily d
                    where d.token_id = t.id and d.day >= ?)
            from tokens t""",
            [month, day_of(month)],
        ).fetchall()
        out: dict[str, tuple[float | None, int]] = {}
        for token_id, last_row, last_daily, month_rows, month_daily in rows:
            seen = [t for t in (last_row, last_daily) if t is not None]
            out[token_id] = (max(seen) if seen else None, int(month_rows) + int(month_daily))
        return out
