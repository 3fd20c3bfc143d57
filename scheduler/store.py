"""The scheduler's SQLite database (sqlite-utils): API tokens (hashes only) and usage (metadata only).

``Store`` is synchronous and used from one thread at a time; the CLI uses it directly. Inside the server,
``AsyncStore`` gives it one dedicated thread, so every query runs off the event loop and all writes come from
one writer. WAL mode lets `hearth tokens` work while the server runs.

No prompt or completion text is ever stored here: the usage table has token counts and times only.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import sqlite_utils

from protocol.errors import ConfigError

TOKEN_PREFIX = "hth_"
Scope = Literal["user", "admin"]
T = TypeVar("T")


def hash_token(token: str) -> str:
    # Tokens carry 256 random bits, so a fast hash is enough: there is nothing to brute-force.
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class TokenRecord:
    id: str
    name: str
    scope: Scope
    created: float
    revoked: float | None

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> TokenRecord:
        return cls(row["id"], row["name"], row["scope"], row["created"], row["revoked"])


@dataclass(frozen=True, slots=True)
class UsageRecord:
    request_id: str
    token_id: str
    model: str
    endpoint: str
    node_id: str
    status: str
    prompt_tokens: int
    completion_tokens: int
    started: float
    ended: float


class Store:
    def __init__(self, path: Path) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite_utils.Database(path)
            self.db.enable_wal()
            # In WAL mode NORMAL cannot corrupt the database; a power cut may lose the last usage rows,
            # and a commit no longer waits for an fsync (1-12 ms on a slow disk).
            self.db.execute("PRAGMA synchronous=NORMAL")
        except OSError as exc:
            raise ConfigError(f"cannot open the database {path}: {exc.strerror}") from None
        self._migrate()

    def _migrate(self) -> None:
        tokens = self.db.table("tokens")
        if not tokens.exists():
            tokens.create(
                {"id": str, "name": str, "scope": str, "hash": str, "created": float, "revoked": float},
                pk="id",
                not_null={"name", "scope", "hash", "created"},
            )
            tokens.create_index(["hash"], unique=True)
        usage = self.db.table("usage")
        if not usage.exists():
            usage.create(
                {
                    "request_id": str,
                    "token_id": str,
                    "model": str,
                    "endpoint": str,
                    "node_id": str,
                    "status": str,
                    "prompt_tokens": int,
                    "completion_tokens": int,
                    "started": float,
                    "ended": float,
                },
                pk="request_id",
            )
            usage.create_index(["token_id", "started"])

    def close(self) -> None:
        self.db.close()

    # tokens

    def create_token(self, name: str, scope: Scope = "user") -> tuple[str, TokenRecord]:
        """Make a token; the clear text is returned once and never stored."""
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        record = TokenRecord(f"tok_{secrets.token_hex(6)}", name, scope, time.time(), None)
        self.db.table("tokens").insert(
            {
                "id": record.id,
                "name": name,
                "scope": scope,
                "hash": hash_token(token),
                "created": record.created,
                "revoked": None,
            }
        )
        return token, record

    def verify_token(self, token: str) -> TokenRecord | None:
        rows = list(
            self.db.query("select * from tokens where hash = ? and revoked is null", [hash_token(token)])
        )
        return TokenRecord.from_row(rows[0]) if rows else None

    def list_tokens(self) -> list[TokenRecord]:
        return [TokenRecord.from_row(r) for r in self.db.table("tokens").rows_where(order_by="created")]

    def revoke_token(self, token_id: str) -> TokenRecord:
        table = self.db.table("tokens")
        rows = list(table.rows_where("id = ?", [token_id]))
        if not rows:
            raise ConfigError(f"no token with id {token_id} (see `hearth tokens list`)")
        if rows[0]["revoked"] is None:
            table.update(token_id, {"revoked": time.time()})
        return TokenRecord.from_row(next(iter(table.rows_where("id = ?", [token_id]))))

    def has_admin_token(self) -> bool:
        return self.db.table("tokens").count_where("scope = 'admin' and revoked is null") > 0

    # usage

    def record_usage(self, records: Sequence[UsageRecord]) -> None:
        self.db.table("usage").insert_all(
            ({f: getattr(r, f) for f in UsageRecord.__slots__} for r in records), replace=True
        )


class AsyncStore:
    """The Store behind two threads: one writer, and one reader for token checks.

    Coroutines never block the loop, all writes come from one thread, and a token check never waits
    behind a usage commit (WAL lets the reader see the last committed state meanwhile). Revocation by
    `hearth tokens revoke` in another process is seen by the next request.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="hearth-db")
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="hearth-db-read")
        self._store: Store | None = None
        self._read_store: Store | None = None

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        self._store = await loop.run_in_executor(self._writer, lambda: Store(self._path))
        self._read_store = await loop.run_in_executor(self._reader, lambda: Store(self._path))

    async def run(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the writer thread."""
        return await asyncio.get_running_loop().run_in_executor(self._writer, fn)

    @property
    def store(self) -> Store:
        assert self._store is not None, "AsyncStore.open() was not awaited"
        return self._store

    async def verify_token(self, token: str) -> TokenRecord | None:
        reader = self._read_store
        assert reader is not None, "AsyncStore.open() was not awaited"
        return await asyncio.get_running_loop().run_in_executor(
            self._reader, lambda: reader.verify_token(token)
        )

    async def record_usage(self, records: Sequence[UsageRecord]) -> None:
        store = self.store
        await self.run(lambda: store.record_usage(records))

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        if self._read_store is not None:
            await loop.run_in_executor(self._reader, self._read_store.close)
        if self._store is not None:
            await self.run(self._store.close)
        self._reader.shutdown(wait=True)
        self._writer.shutdown(wait=True)
