"""Tokens are stored only as hashes; usage rows hold metadata only."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from protocol.errors import NotFound
from scheduler.store import Store, TokenRefusal, UsageRecord


def test_tokens_are_random_hashed_and_revocable(tmp_path: Path) -> None:
    store = Store(tmp_path / "hearth.db")
    token, record = store.create_token("alice")
    other, _ = store.create_token("bob", "admin")
    assert token != other and len(token) > 40
    assert store.verify_token(token) == record
    assert store.verify_token(token + "x") == TokenRefusal("unknown")
    assert store.has_admin_token()
    store.revoke_token(record.id)
    assert store.verify_token(token) == TokenRefusal("revoked")
    with pytest.raises(NotFound):
        store.revoke_token("tok_missing")
    store.close()
    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir())
    assert token.encode() not in raw and other.encode() not in raw


def test_usage_is_recorded(tmp_path: Path) -> None:
    store = Store(tmp_path / "hearth.db")
    rec = UsageRecord("r1", "tok_a", "m", "chat", "local", "ok", 10, 5, 1.0, 2.0)
    store.record_usage([rec])
    store.close()
    with sqlite3.connect(tmp_path / "hearth.db") as db:
        rows = db.execute("select request_id, prompt_tokens, completion_tokens, status from usage").fetchall()
    assert rows == [("r1", 10, 5, "ok")]


def test_usage_batches_of_any_size_and_corrections(tmp_path: Path) -> None:
    store = Store(tmp_path / "hearth.db")
    ids = iter(range(1000))
    for size in (1, 7, 100, 101, 256):  # sqlite-utils chunked at 100; the single-row statement does not care
        store.record_usage(
            [
                UsageRecord(f"r{next(ids)}", "tok_a", "m", "chat", "n", "ok", 3, 2, 1.0, 2.0)
                for _ in range(size)
            ]
        )
    # A node's receipt corrects a row: the same request id, other counts, replaces it.
    store.record_usage([UsageRecord("r0", "tok_a", "m", "chat", "n", "ok", 4, 9, 1.0, 2.0)])
    store.close()
    with sqlite3.connect(tmp_path / "hearth.db") as db:
        count, completion = db.execute("select count(*), sum(completion_tokens) from usage").fetchone()
        first = db.execute(
            "select prompt_tokens, completion_tokens from usage where request_id = 'r0'"
        ).fetchone()
    assert (count, completion, first) == (465, 464 * 2 + 9, (4, 9))
