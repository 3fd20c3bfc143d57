"""Enrollment state in the scheduler's database: one-time expiring codes, node records, the audit log."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from protocol.errors import ConflictError, NotFound
from scheduler.store import Store

KEY_A, KEY_B = "A" * 43, "B" * 43


def pending(store: Store, node_id: str = "n1", key: str = KEY_A, source: str = "code") -> None:
    store.upsert_pending(node_id=node_id, source=source, tier="community", identity_key=key,
                         encryption_key=key, fingerprint="f" * 20, url=None)  # fmt: skip


def test_a_code_works_once(tmp_path: Path) -> None:
    store = Store(tmp_path / "db")
    code, expires = store.create_code("club", 60, "for alice")
    assert code.startswith("hec-") and expires > time.time()
    first = store.redeem_code(code, "n1")
    assert first is not None and first.tier == "club" and first.note == "for alice"
    assert store.redeem_code(code, "n2") is None
    assert store.redeem_code("hec-wrong", "n2") is None
    # Only the hash is kept.
    assert code not in str(list(store.db.query("select * from enrollment_codes")))


def test_an_expired_code_is_refused(tmp_path: Path) -> None:
    store = Store(tmp_path / "db")
    code, _ = store.create_code("club", 0.001)
    time.sleep(0.01)
    assert store.redeem_code(code, "n1") is None


def test_a_node_id_belongs_to_one_key(tmp_path: Path) -> None:
    store = Store(tmp_path / "db")
    pending(store)
    with pytest.raises(ConflictError):
        pending(store, key=KEY_B)


def test_decisions_are_kept_and_audited(tmp_path: Path) -> None:
    store = Store(tmp_path / "db")
    pending(store)
    cert = {"certificate": {"node_id": "n1"}, "signature": "x"}
    assert store.set_node_state("n1", "approved", certificate=cert).certificate == cert
    # A LAN sighting of an approved node changes nothing.
    pending(store, source="discovered")
    record = store.node("n1")
    assert record is not None and record.state == "approved" and record.certificate == cert
    assert store.set_node_drain("n1", True).drain is True
    assert store.set_node_state("n1", "revoked").certificate is None
    actions = [r["action"] for r in store.db.query("select action from audit order by id")]
    assert actions == ["enrollment", "approved", "drain", "revoked"]
    with pytest.raises(NotFound):
        store.set_node_state("nobody", "approved")


def test_a_database_from_before_token_tiers_is_upgraded_in_place(tmp_path: Path) -> None:
    import sqlite3

    with sqlite3.connect(tmp_path / "db") as db:
        db.execute("create table tokens (id text primary key, name text not null, scope text not null, "
                   "hash text not null, created float not null, revoked float)")  # fmt: skip
        db.execute("insert into tokens values ('tok_old', 'old', 'user', 'h', 1.0, null)")
    store = Store(tmp_path / "db")
    assert [t.tiers for t in store.list_tokens()] == [None]
    _, record = store.create_token("new", tiers=("club",))
    assert record.tiers == ("club",) and store.list_tokens()[-1].tiers == ("club",)
