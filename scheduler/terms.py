"""Who accepted which version of the terms of use: an append-only table in the scheduler's database, and
the latest acceptance per token kept in memory, so the request path checks a token without a query.

Rows are never changed or deleted: each acceptance is a new row (token id, version, when, from where), so
the table is the record of what each holder agreed to and when. Token ids stay the same when a token's
secret is rotated, so an acceptance outlives rotation; a new terms version simply has no row yet.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import sqlite_utils

from scheduler.store import AsyncStore, Store

TABLE = "terms_acceptances"


@dataclass(frozen=True, slots=True)
class Acceptance:
    version: str
    at: float  # Unix time


def _migrate(db: sqlite_utils.Database) -> None:
    table = db.table(TABLE)
    if not table.exists():
        table.create(
            {"id": int, "token_id": str, "version": str, "accepted_at": float, "origin": str},
            pk="id",
            not_null={"token_id", "version", "accepted_at", "origin"},
        )
        table.create_index(["token_id", "id"])


def _latest(db: sqlite_utils.Database) -> dict[str, Acceptance]:
    """Each token's last acceptance (the highest row id: rows are only ever appended)."""
    rows = db.execute(
        f"SELECT token_id, version, accepted_at FROM {TABLE} "
        f"WHERE id IN (SELECT max(id) FROM {TABLE} GROUP BY token_id)"
    ).fetchall()
    return {token_id: Acceptance(version, at) for token_id, version, at in rows}


def _append(db: sqlite_utils.Database, token_id: str, version: str, at: float, origin: str) -> None:
    with db.conn:
        db.execute(
            f"INSERT INTO {TABLE} (token_id, version, accepted_at, origin) VALUES (?, ?, ?, ?)",
            [token_id, version, at, origin],
        )


class TermsBook:
    """The acceptances of the scheduler's tokens; ``open`` reads them once, ``accept`` writes through."""

    def __init__(self, store: AsyncStore, latest: dict[str, Acceptance]) -> None:
        self._store = store
        self._latest = latest
        self._lock = asyncio.Lock()

    @classmethod
    async def open(cls, store: AsyncStore) -> TermsBook:
        """Create the table if it is missing, and read the latest acceptance of every token (on the
        store's writer thread, so the loop never waits on SQLite)."""

        def load(db: Store) -> dict[str, Acceptance]:
            _migrate(db.db)
            return _latest(db.db)

        return cls(store, await store.write(load))

    def accepted(self, token_id: str) -> str | None:
        """The version ``token_id`` accepted last, or None (no query: the request path calls this)."""
        found = self._latest.get(token_id)
        return found.version if found is not None else None

    def acceptance(self, token_id: str) -> Acceptance | None:
        return self._latest.get(token_id)

    async def accept(self, token_id: str, version: str, origin: str) -> Acceptance:
        """Record that ``token_id`` accepts ``version``; accepting the version it accepted last again
        changes nothing and answers the first acceptance. Written before it counts: a token is never let
        through on an acceptance the database does not hold."""
        async with self._lock:  # two accepts at once: one row, not two
            found = self._latest.get(token_id)
            if found is not None and found.version == version:
                return found
            accepted = Acceptance(version, time.time())
            await self._store.write(lambda db: _append(db.db, token_id, version, accepted.at, origin[:200]))
            self._latest[token_id] = accepted
            return accepted
