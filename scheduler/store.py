"""The scheduler's SQLite database (sqlite-utils): API tokens (hashes only), usage (metadata only), nodes,
enrollment codes (hashes only) and an audit log of operator actions.

``Store`` is synchronous and used from one thread at a time; the CLI uses it directly. Inside the server,
``AsyncStore`` gives it one dedicated thread, so every query runs off the event loop and all writes come from
one writer. WAL mode lets `hearth tokens` work while the server runs.

No prompt or completion text is ever stored here: the usage table has token counts and times only.
"""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import sqlite_utils

from protocol.admin import EnrollmentState
from protocol.directory import EMPTY, GENESIS, Head, Kind, entry_hash, make_entry
from protocol.errors import ConfigError, ConflictError, NotFound
from scheduler.store_audit import LOCAL, SCHEDULER, AuditRecord
from scheduler.store_tokens import (
    TOKEN_PREFIX,
    Scope,
    TokenRecord,
    TokenRefusal,
    Tokens,
    TokenSummary,
    hash_token,
)
from scheduler.store_usage import UsageRecord, UsageTotal

__all__ = [
    "TOKEN_PREFIX",
    "AsyncStore",
    "AuditRecord",
    "CodeRecord",
    "NodeRecord",
    "Scope",
    "Store",
    "TokenRecord",
    "TokenRefusal",
    "TokenSummary",
    "UsageRecord",
    "UsageTotal",
    "hash_token",
]

CODE_PREFIX = "hec"
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class NodeRecord:
    """A node the scheduler knows of: enrolled with a code or seen on the LAN, and what the operator said."""

    node_id: str
    state: EnrollmentState
    source: str  # "code" or "discovered"
    tier: str
    identity_key: str
    encryption_key: str
    fingerprint: str
    url: str | None
    certificate: dict[str, Any] | None
    drain: bool
    created: float
    updated: float

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> NodeRecord:
        cert = json.loads(row["certificate"]) if row["certificate"] else None
        return cls(
            row["node_id"], row["state"], row["source"], row["tier"], row["identity_key"],
            row["encryption_key"], row["fingerprint"], row["url"], cert, bool(row["drain"]),
            row["created"], row["updated"],
        )  # fmt: skip


@dataclass(frozen=True, slots=True)
class CodeRecord:
    tier: str
    expires: float
    note: str


def new_enrollment_code() -> str:
    # 100 random bits in Crockford-style base32 groups: short enough to read over the phone, and one-time
    # and expiring besides.
    raw = base64.b32encode(secrets.token_bytes(15)).decode().lower()
    return f"{CODE_PREFIX}-" + "-".join(raw[i : i + 6] for i in range(0, 24, 6))


class Store(Tokens):
    """The database; its token, usage and audit parts are in scheduler.store_tokens, store_usage and
    store_audit."""

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
        self._migrate_audit()
        self._migrate_tokens()
        self._migrate_usage()
        nodes = self.db.table("nodes")
        if not nodes.exists():
            nodes.create(
                {
                    "node_id": str, "state": str, "source": str, "tier": str, "identity_key": str,
                    "encryption_key": str, "fingerprint": str, "url": str, "certificate": str,
                    "drain": int, "created": float, "updated": float,
                },
                pk="node_id",
                not_null={"state", "source", "tier", "identity_key", "encryption_key", "fingerprint"},
            )  # fmt: skip
        codes = self.db.table("enrollment_codes")
        if not codes.exists():
            codes.create(
                {"hash": str, "tier": str, "note": str, "created": float, "expires": float, "used": float,
                 "used_by": str},
                pk="hash",
            )  # fmt: skip
        directory = self.db.table("directory")
        if not directory.exists():
            # The node directory's append-only log (protocol.directory): rows are never changed.
            directory.create(
                {"seq": int, "prev": str, "kind": str, "node_id": str, "doc": str, "at": int, "hash": str},
                pk="seq",
                not_null={"prev", "kind", "node_id", "doc", "at", "hash"},
            )

    def close(self) -> None:
        self.db.close()

    # enrollment codes and nodes

    def create_code(
        self, tier: str, ttl_s: float, note: str = "", *, actor: str = SCHEDULER, origin: str = LOCAL
    ) -> tuple[str, float]:
        """A one-time enrollment code for a node of ``tier``; only its hash is kept."""
        code = new_enrollment_code()
        now = time.time()
        expires = now + ttl_s
        self.db.table("enrollment_codes").insert(
            {"hash": hash_token(code), "tier": tier, "note": note, "created": now, "expires": expires}
        )
        self.audit("code_created", tier, note, actor=actor, origin=origin)
        return code, expires

    def redeem_code(self, code: str, node_id: str) -> CodeRecord | None:
        """Use a code once: its record if it was valid, unused and unexpired, else None."""
        now = time.time()
        with self.db.conn:
            cursor = self.db.execute(
                "update enrollment_codes set used = ?, used_by = ? "
                "where hash = ? and used is null and expires > ?",
                [now, node_id, hash_token(code), now],
            )
            if cursor.rowcount != 1:
                return None
            row = next(self.db.query("select * from enrollment_codes where hash = ?", [hash_token(code)]))
        return CodeRecord(row["tier"], row["expires"], row["note"] or "")

    def node(self, node_id: str) -> NodeRecord | None:
        rows = list(self.db.query("select * from nodes where node_id = ?", [node_id]))
        return NodeRecord.from_row(rows[0]) if rows else None

    def nodes(self, state: EnrollmentState | None = None) -> list[NodeRecord]:
        where, args = ("state = ?", [state]) if state else (None, [])
        return [
            NodeRecord.from_row(r) for r in self.db.table("nodes").rows_where(where, args, order_by="created")
        ]

    def upsert_pending(
        self,
        *,
        node_id: str,
        source: str,
        tier: str,
        identity_key: str,
        encryption_key: str,
        fingerprint: str,
        url: str | None,
    ) -> NodeRecord:
        """Record a node asking to join. An approved or revoked node keeps its state; a key that differs
        from the one on record for this node id is refused (ConflictError)."""
        now = time.time()
        existing = self.node(node_id)
        if existing is not None and existing.identity_key != identity_key:
            raise ConflictError(f"the node id {node_id} belongs to another machine; choose another name")
        if existing is not None and existing.state in ("approved", "revoked") and source == "discovered":
            return existing
        state: EnrollmentState = "pending"
        if existing is not None and existing.state == "approved":
            state = "approved"
        self.db.table("nodes").upsert(
            {
                "node_id": node_id, "state": state, "source": source, "tier": tier,
                "identity_key": identity_key, "encryption_key": encryption_key, "fingerprint": fingerprint,
                "url": url, "certificate": existing.certificate and json.dumps(existing.certificate)
                if existing and state == "approved" else None,
                "drain": 0, "created": existing.created if existing else now, "updated": now,
            },
            pk="node_id",
        )  # fmt: skip
        if existing is None or existing.state != state or source == "code":
            self.audit("enrollment", node_id, f"{source} {tier}")
        record = self.node(node_id)
        assert record is not None
        return record

    def set_node_state(
        self,
        node_id: str,
        state: EnrollmentState,
        *,
        certificate: dict[str, Any] | None = None,
        allowed_from: tuple[EnrollmentState, ...] | None = None,
        actor: str = SCHEDULER,
        origin: str = LOCAL,
    ) -> NodeRecord:
        """Record the operator's decision; ConflictError if the node is in none of ``allowed_from``
        (checked and written in one step, so two decisions at once cannot both pass the check)."""
        existing = self.node(node_id)
        if existing is None:
            raise NotFound(f"no node or enrollment called {node_id} (see `hearth enroll list`)")
        if allowed_from is not None and existing.state not in allowed_from:
            raise ConflictError(
                f"{node_id} is {existing.state}; only a node that is {' or '.join(allowed_from)} can be "
                f"{state}" + (" (a node can enroll again with a new code)" if state == "approved" else ""),
                code="wrong_state",
            )
        update: dict[str, Any] = {"state": state, "updated": time.time()}
        if certificate is not None or state != "approved":
            update["certificate"] = json.dumps(certificate) if certificate is not None else None
        self.db.table("nodes").update(node_id, update)
        self.audit(state, node_id, actor=actor, origin=origin)
        record = self.node(node_id)
        assert record is not None
        return record

    def set_node_drain(
        self, node_id: str, drain: bool, *, actor: str = SCHEDULER, origin: str = LOCAL
    ) -> NodeRecord:
        if self.node(node_id) is None:
            raise NotFound(f"no node called {node_id} (see `hearth enroll list`)")
        self.db.table("nodes").update(node_id, {"drain": int(drain), "updated": time.time()})
        self.audit("drain" if drain else "undrain", node_id, actor=actor, origin=origin)
        record = self.node(node_id)
        assert record is not None
        return record

    def set_node_url(self, node_id: str, url: str) -> None:
        self.db.table("nodes").update(node_id, {"url": url})

    # the directory log

    def append_directory(self, kind: Kind, node_id: str, doc: dict[str, Any], at: int) -> dict[str, Any]:
        """Append one entry after the current head, in one transaction; returns the entry."""
        with self.db.conn:
            row = self.db.execute("select seq, hash from directory order by seq desc limit 1").fetchone()
            seq, prev = (row[0] + 1, row[1]) if row else (0, GENESIS)
            entry = make_entry(seq, prev, kind, doc, at)
            self.db.execute(
                "insert into directory (seq, prev, kind, node_id, doc, at, hash) "
                "values (?, ?, ?, ?, ?, ?, ?)",
                [seq, prev, kind, node_id, json.dumps(doc), at, entry_hash(entry)],
            )
        return entry

    def directory_entries(self, since: int = 0, limit: int = 10_000) -> list[dict[str, Any]]:
        rows = self.db.execute(
            "select seq, prev, kind, doc, at from directory where seq >= ? order by seq limit ?",
            [since, limit],
        ).fetchall()
        return [make_entry(seq, prev, kind, json.loads(doc), at) for seq, prev, kind, doc, at in rows]

    def directory_head(self) -> Head:
        row = self.db.execute("select seq, hash from directory order by seq desc limit 1").fetchone()
        return Head(row[0] + 1, row[1]) if row else EMPTY


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

    async def write(self, fn: Callable[[Store], T]) -> T:
        """Run ``fn`` on the writer thread, handing it the store there: callers never hold the connection
        outside that thread, and every write comes from it."""
        store = self.store
        return await asyncio.get_running_loop().run_in_executor(self._writer, lambda: fn(store))

    async def run(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the writer thread (tests; the server's code uses ``write``)."""
        return await asyncio.get_running_loop().run_in_executor(self._writer, fn)

    @property
    def store(self) -> Store:
        assert self._store is not None, "AsyncStore.open() was not awaited"
        return self._store

    async def verify_token(self, token: str) -> TokenRecord | TokenRefusal:
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
