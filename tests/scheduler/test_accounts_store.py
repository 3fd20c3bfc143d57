"""Tokens, usage and the audit log in the real SQLite database: what a secret is worth at each moment of
its life, reports that read rows and folded daily totals alike, and a log nobody can rewrite."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from scheduler.retention import cutoff, keep_usage
from scheduler.rules import Rules, parse_policy
from scheduler.store import AsyncStore, Store, TokenRecord, TokenRefusal, UsageRecord, UsageTotal, hash_token
from scheduler.store_usage import DIMENSIONS

DAY = 86400.0
# A fixed "now" in the middle of a month, so that "this month" and "last month" are far from its edges.
NOW = datetime(2026, 3, 15, 12, 0, tzinfo=UTC).timestamp()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "hearth.db")
    yield s
    s.close()


def _secrets_in_files(path: Path, secrets: list[str]) -> list[str]:
    raw = b"".join(p.read_bytes() for p in path.iterdir() if p.is_file())
    return [s for s in secrets if s.encode() in raw]


# What a secret is worth at a moment of its token's life. Each case builds the token's history from a
# fresh store and returns (the secret to present, the moment to present it).
Life = Callable[[Store], tuple[str, float]]


def _fresh(store: Store) -> tuple[str, float]:
    return store.create_token("a")[0], NOW


def _revoked(store: Store) -> tuple[str, float]:
    secret, record = store.create_token("a")
    store.revoke_token(record.id)
    return secret, NOW


def _expired(store: Store) -> tuple[str, float]:
    return store.create_token("a", expires=NOW - 1)[0], NOW


def _expires_later(store: Store) -> tuple[str, float]:
    return store.create_token("a", expires=NOW + 1)[0], NOW


def _old_secret_after_rotation(store: Store) -> tuple[str, float]:
    secret, record = store.create_token("a")
    store.rotate_token(record.id)
    return secret, time.time()  # the next request


def _new_secret_after_rotation(store: Store) -> tuple[str, float]:
    _, record = store.create_token("a")
    return store.rotate_token(record.id)[0], NOW


def _old_secret_within_grace(store: Store) -> tuple[str, float]:
    secret, record = store.create_token("a")
    store.rotate_token(record.id, grace_s=600)
    return secret, 0.0  # long before the grace ends (the store took its own clock for the rotation)


def _old_secret_after_grace(store: Store) -> tuple[str, float]:
    secret, record = store.create_token("a")
    store.rotate_token(record.id, grace_s=600)
    return secret, 4e9  # long after it


def _secret_from_two_rotations_ago(store: Store) -> tuple[str, float]:
    secret, record = store.create_token("a")
    store.rotate_token(record.id, grace_s=600)
    store.rotate_token(record.id, grace_s=600)
    return secret, 0.0


def _revoked_within_grace(store: Store) -> tuple[str, float]:
    secret, record = store.create_token("a")
    store.rotate_token(record.id, grace_s=600)
    store.revoke_token(record.id)
    return secret, 0.0


def _unknown(store: Store) -> tuple[str, float]:
    store.create_token("a")
    return "hth_never-issued", NOW


# fmt: off
LIVES: list[tuple[Life, TokenRefusal | None]] = [
    (_fresh, None),                                         # a new token works
    (_revoked, TokenRefusal("revoked")),                    # revoked: refused, and says so
    (_expired, TokenRefusal("expired", NOW - 1)),           # expired: refused, and says when
    (_expires_later, None),                                 # works until its expiry
    (_old_secret_after_rotation, TokenRefusal("replaced")), # rotated without grace: the old one stops at once
    (_new_secret_after_rotation, None),                     # the new one works
    (_old_secret_within_grace, None),                       # with grace: the old one works meanwhile
    (_old_secret_after_grace, TokenRefusal("replaced")),    # and stops when the grace ends
    (_secret_from_two_rotations_ago, TokenRefusal("unknown")),  # only the last secret is remembered
    (_revoked_within_grace, TokenRefusal("revoked")),       # revocation beats a grace period
    (_unknown, TokenRefusal("unknown")),                    # never issued
]
# fmt: on


@pytest.mark.parametrize(("life", "refusal"), LIVES, ids=[f.__name__.strip("_") for f, _ in LIVES])
def test_what_a_secret_is_worth(store: Store, life: Life, refusal: TokenRefusal | None) -> None:
    secret, moment = life(store)
    outcome = store.verify_token(secret, now=moment)
    if refusal is None:
        assert isinstance(outcome, TokenRecord), outcome
    else:
        assert outcome == refusal


def test_refusals_say_which_and_when() -> None:
    at = datetime(2026, 1, 2, 3, 4, tzinfo=UTC).timestamp()
    assert TokenRefusal("expired", at).message == (
        "this token expired at 2026-01-02 03:04 UTC; ask an operator for a new one"
    )
    assert TokenRefusal("revoked").message == "this token was revoked"
    assert TokenRefusal("unknown").message == "invalid API token"


def test_the_token_check_is_one_indexed_query(store: Store) -> None:
    """It runs on every request: both of its lookups (current and previous secret) use an index."""
    plan = store.db.execute(
        "explain query plan select * from tokens where hash = ? or prev_hash = ? limit 1", ["a", "b"]
    ).fetchall()
    details = " ".join(row[-1] for row in plan)
    assert "SCAN" not in details, details
    assert "USING INDEX idx_tokens_hash " in details and "USING INDEX idx_tokens_prev_hash " in details, (
        details
    )


def test_rotation_keeps_the_identity_and_its_usage(store: Store) -> None:
    old, record = store.create_token("alice", group="students", expires=NOW + DAY)
    store.record_usage([_row("r1", record.id, started=NOW - 60, prompt=3, completion=4)])
    new, rotated = store.rotate_token(record.id)
    assert new != old and rotated == record
    now_valid = store.verify_token(new, now=NOW)
    assert now_valid == record  # same id, name, group, expiry
    (summary,) = store.token_summaries(now=NOW)
    assert (summary.record.id, summary.month_tokens, summary.last_used) == (record.id, 7, NOW - 60)


def test_secrets_are_never_stored_in_clear(tmp_path: Path) -> None:
    store = Store(tmp_path / "hearth.db")
    first, record = store.create_token("alice", "admin", group="default")
    second, _ = store.rotate_token(record.id, grace_s=60)
    third, _ = store.rotate_token(record.id)
    store.revoke_token(record.id)
    store.close()
    assert _secrets_in_files(tmp_path, [first, second, third]) == []


def test_has_admin_token_ignores_expired_and_revoked(store: Store) -> None:
    store.create_token("old", "admin", expires=NOW - 1)
    _, revoked = store.create_token("gone", "admin")
    store.revoke_token(revoked.id)
    store.create_token("user", "user")
    assert not store.has_admin_token()
    store.create_token("op", "admin")
    assert store.has_admin_token()


# ----- usage -----


def _row(
    request_id: str,
    token_id: str,
    *,
    started: float,
    prompt: int = 1,
    completion: int = 1,
    status: str = "ok",
    group: str = "default",
    model: str = "m",
    node: str = "n1",
) -> UsageRecord:
    return UsageRecord(
        request_id, token_id, model, "chat", node, status, prompt, completion, started, started + 2, group,
        120.0,
    )  # fmt: skip


def _history(store: Store) -> tuple[str, str]:
    """Two users over three days: rows that retention will fold (older) and rows it will keep (today)."""
    _, alice = store.create_token("alice", group="students")
    _, bob = store.create_token("bob", group="faculty")
    store.record_usage(
        [
            _row("a1", alice.id, started=NOW - 2 * DAY, prompt=10, completion=20, group="students"),
            _row("a2", alice.id, started=NOW - 2 * DAY + 60, prompt=1, completion=2, group="students",
                 status="node_failed"),
            _row("a3", alice.id, started=NOW - DAY, prompt=5, completion=5, group="students", model="big"),
            _row("b1", bob.id, started=NOW - DAY, prompt=100, completion=1, group="faculty", node="n2"),
            _row("b2", bob.id, started=NOW - 60, prompt=7, completion=0, group="faculty", status="cancelled"),
            _row("a4", alice.id, started=NOW - 30, prompt=2, completion=3, group="students"),
        ]
    )  # fmt: skip
    return alice.id, bob.id


def _day(offset: float) -> str:
    return datetime.fromtimestamp(NOW + offset, UTC).strftime("%Y-%m-%d")


def _expected(alice: str, bob: str) -> dict[str, list[tuple[str, str | None, int, int, int, int]]]:
    """(key, name, requests, prompt, completion, errors) per dimension, most tokens first."""
    return {
        "user": [(bob, "bob", 2, 107, 1, 0), (alice, "alice", 4, 18, 30, 1)],
        "group": [("faculty", None, 2, 107, 1, 0), ("students", None, 4, 18, 30, 1)],
        "model": [("m", None, 5, 120, 26, 1), ("big", None, 1, 5, 5, 0)],
        "node": [("n2", None, 1, 100, 1, 0), ("n1", None, 5, 25, 30, 1)],
        "day": [(_day(-DAY), None, 2, 105, 6, 0), (_day(-2 * DAY), None, 2, 11, 22, 1),
                (_day(0), None, 2, 9, 3, 0)],
    }  # fmt: skip


def _report(store: Store, by: str) -> list[tuple[str, str | None, int, int, int, int]]:
    rows: list[UsageTotal] = store.usage_report(by, since=NOW - 3 * DAY)  # type: ignore[arg-type]
    return [(t.key, t.name, t.requests, t.prompt_tokens, t.completion_tokens, t.errors) for t in rows]


@pytest.mark.parametrize("by", DIMENSIONS)
@pytest.mark.parametrize(
    "fold_before",
    [
        None,  # nothing folded: every total from rows
        NOW - DAY - 3600,  # the oldest day folded: rows and daily totals together
        NOW + DAY,  # everything folded: daily totals alone
    ],
    ids=["rows", "mixed", "folded"],
)
def test_reports_by_every_dimension_read_rows_and_folded_days_alike(
    store: Store, by: str, fold_before: float | None
) -> None:
    alice, bob = _history(store)
    if fold_before is not None:
        assert store.fold_usage(fold_before) > 0
    assert _report(store, by) == _expected(alice, bob)[by]


def test_folding_is_idempotent_and_adds_to_a_days_totals(store: Store) -> None:
    alice, bob = _history(store)
    cut = NOW - DAY - 3600
    assert store.fold_usage(cut) == 2
    once = _report(store, "user")
    assert store.fold_usage(cut) == 0  # the rows are gone: nothing to fold twice
    assert _report(store, "user") == once
    # A row of an already folded day that arrives late (a corrected count) adds to that day's total.
    store.record_usage(
        [_row("late", alice, started=NOW - 2 * DAY + 120, prompt=1, completion=1, group="students")]
    )
    assert store.fold_usage(cut) == 1
    day = [r for r in _report(store, "day") if r[0] == _day(-2 * DAY)]
    assert day == [(_day(-2 * DAY), None, 3, 12, 23, 1)]
    daily = store.db.execute("select count(*) from usage_daily").fetchone()[0]
    assert daily == 1  # one key (day, token, group, model, node): added to, not duplicated
    assert store.db.execute("select count(*) from usage where started < ?", [cut]).fetchone()[0] == 0
    assert bob  # untouched by the fold: its rows are newer


def test_last_use_and_this_months_tokens_count_folded_days(store: Store) -> None:
    alice, bob = _history(store)
    _, idle = store.create_token("idle")
    last_month = datetime(2026, 2, 20, tzinfo=UTC).timestamp()
    store.record_usage([_row("feb", bob, started=last_month, prompt=1000, completion=1000, group="faculty")])
    store.fold_usage(NOW - DAY - 3600)
    by_id = {s.record.id: s for s in store.token_summaries(now=NOW)}
    assert (by_id[alice].last_used, by_id[alice].month_tokens) == (NOW - 30, 48)
    assert (by_id[bob].last_used, by_id[bob].month_tokens) == (NOW - 60, 108)  # February not counted
    assert (by_id[idle.id].last_used, by_id[idle.id].month_tokens) == (None, 0)
    store.fold_usage(NOW + DAY)  # all folded: last use is still exact (kept with the day's totals)
    assert store.token_summaries(now=NOW)[0].last_used == NOW - 30


def test_usage_rows_keep_group_and_time_to_first_token(store: Store) -> None:
    store.record_usage([_row("r", "tok_x", started=NOW, group="students")])
    row = store.db.execute('select "group", ttft_ms, ended - started, status from usage').fetchone()
    assert row == ("students", 120.0, 2.0, "ok")


# ----- migration -----


def test_a_database_from_before_accounts_is_migrated(tmp_path: Path) -> None:
    """The tables as the scheduler made them before groups, expiry, rotation, ttft and actors."""
    path = tmp_path / "hearth.db"
    secret = "hth_issued-before-groups"
    with sqlite3.connect(path) as db:
        db.executescript(
            """
            create table tokens (id text primary key, name text not null, scope text not null,
                hash text not null, created float not null, revoked float, tiers text);
            create unique index idx_tokens_hash on tokens (hash);
            create table usage (request_id text primary key, token_id text, model text, endpoint text,
                node_id text, status text, prompt_tokens integer, completion_tokens integer,
                started float, ended float);
            create table audit (id integer primary key, at float, action text, subject text, detail text);
            insert into audit (at, action, subject, detail) values (1.0, 'approved', 'n1', '');
            """
        )
        db.execute(
            "insert into tokens values ('tok_000000000001', 'old', 'user', ?, 1.0, null, null)",
            [hash_token(secret)],
        )
        db.execute(
            "insert into usage values ('r0', 'tok_000000000001', 'm', 'chat', 'n', 'ok', 3, 4, ?, ?)",
            [NOW, NOW + 1],
        )
    store = Store(path)
    verified = store.verify_token(secret)
    assert isinstance(verified, TokenRecord)
    assert (verified.id, verified.group, verified.expires) == ("tok_000000000001", "default", None)
    assert _report(store, "group") == [("default", None, 1, 3, 4, 0)]
    (entry,) = store.audit_log()
    assert (entry.action, entry.actor, entry.origin) == ("approved", "-", "-")
    new, _ = store.rotate_token("tok_000000000001")  # the new columns work on the old rows
    assert store.verify_token(new) == verified
    store.close()


# ----- the audit log -----


def test_the_audit_log_is_append_only(store: Store) -> None:
    store.audit("drain", "n1", actor="tok_admin", origin="10.0.0.7")
    (entry,) = store.audit_log()
    assert (entry.action, entry.subject, entry.actor, entry.origin) == (
        "drain",
        "n1",
        "tok_admin",
        "10.0.0.7",
    )
    for statement in ("update audit set actor = 'someone else'", "delete from audit"):
        with pytest.raises(sqlite3.DatabaseError, match="append-only"), store.db.conn:
            store.db.execute(statement)
    assert store.audit_log() == [entry]


def test_token_changes_are_audited_without_their_secrets(store: Store) -> None:
    secret, record = store.create_token("alice", group="students", actor="cli:ann")
    rotated, _ = store.rotate_token(record.id, grace_s=60, actor="tok_op", origin="192.0.2.1")
    store.revoke_token(record.id, actor="tok_op", origin="192.0.2.1")
    store.revoke_token(record.id, actor="tok_op", origin="192.0.2.1")  # again: nothing changes
    entries = store.audit_log()
    assert [(e.action, e.subject, e.actor, e.origin) for e in entries] == [
        ("token_created", record.id, "cli:ann", "local"),
        ("token_rotated", record.id, "tok_op", "192.0.2.1"),
        ("token_revoked", record.id, "tok_op", "192.0.2.1"),
    ]
    assert "group=students" in entries[0].detail
    text = " ".join(f"{e.subject} {e.detail}" for e in entries)
    assert secret not in text and rotated not in text


def test_the_audit_log_reads_since_and_keeps_the_newest_within_its_limit(store: Store) -> None:
    for i in range(5):
        store.audit("drain", f"n{i}")
    assert [e.subject for e in store.audit_log(limit=2)] == ["n3", "n4"]
    assert store.audit_log(since=4e9) == []


# ----- retention -----


@pytest.mark.parametrize(
    ("now", "days", "cut"),
    [
        (NOW, 1, datetime(2026, 3, 14, tzinfo=UTC)),  # a day back, to that day's midnight
        (NOW, 90, datetime(2025, 12, 15, tzinfo=UTC)),  # the default
        (datetime(2026, 3, 15, tzinfo=UTC).timestamp(), 1, datetime(2026, 3, 14, tzinfo=UTC)),  # at midnight
    ],
)
def test_retention_cuts_at_a_utc_midnight(now: float, days: int, cut: datetime) -> None:
    assert cutoff(now, days) == cut.timestamp()


async def test_the_retention_task_folds_with_the_policy_in_force(tmp_path: Path) -> None:
    store = AsyncStore(tmp_path / "hearth.db")
    await store.open()
    try:
        now = time.time()
        old, recent = now - 10 * DAY, now - 3600
        await store.record_usage([_row("old", "tok_a", started=old), _row("new", "tok_a", started=recent)])
        rules = Rules(current=parse_policy("[retention]\nusage_days = 5\n", "policies.toml"))
        task = asyncio.create_task(keep_usage(store, rules, interval_s=3600))
        try:
            for _ in range(400):  # its first pass runs at once
                left = await store.run(
                    lambda: store.store.db.execute("select count(*) from usage").fetchone()
                )
                if left[0] == 1:
                    break
                await asyncio.sleep(0.05)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        assert left[0] == 1, "the old row was not folded"
        report = await store.run(lambda: store.store.usage_report("user", 0.0))
        assert [(t.key, t.requests) for t in report] == [("tok_a", 2)]  # one row, one daily total
        (entry,) = await store.run(lambda: store.store.audit_log())
        assert (entry.action, entry.actor, entry.detail) == ("usage_folded", "scheduler", "rows folded: 1")
    finally:
        await store.close()
