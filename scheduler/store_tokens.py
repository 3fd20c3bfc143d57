"""API tokens: stored as hashes only, each with a scope, a group, an optional expiry, and rotation.

``verify_token`` runs on every request (on the store's reader thread), so it is one indexed query; it tells
a valid token from an unknown, revoked, expired or replaced one, so the 401 can say which. Rotation gives a
token a new secret and keeps its id (and so its usage and counters); the old secret stops at once, or
after a grace period during which both work.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import sqlite_utils

from protocol.accounts import TokenScope, TokenState
from protocol.errors import ConflictError, NotFound
from scheduler.store_audit import LOCAL, SCHEDULER, AuditLog
from scheduler.store_usage import UsageBook

TOKEN_PREFIX = "hth_"
DEFAULT_GROUP = "default"  # as policies.schema names it
Scope = TokenScope


def hash_token(token: str) -> str:
    # Tokens carry 256 random bits, so a fast hash is enough: there is nothing to brute-force.
    return hashlib.sha256(token.encode()).hexdigest()


def utc(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M UTC")


@dataclass(frozen=True, slots=True)
class TokenRecord:
    id: str
    name: str
    scope: Scope
    created: float
    revoked: float | None
    tiers: tuple[str, ...] | None = None  # node tiers this token's requests may reach; None: the policy's
    group: str = DEFAULT_GROUP  # the policy group whose rules apply (policies.schema)
    expires: float | None = None  # Unix time from which it is refused; None: never

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> TokenRecord:
        tiers = tuple(row["tiers"].split(",")) if row.get("tiers") else None
        return cls(
            row["id"], row["name"], row["scope"], row["created"], row["revoked"], tiers,
            row.get("group") or DEFAULT_GROUP, row.get("expires"),
        )  # fmt: skip

    def state(self, now: float) -> TokenState:
        if self.revoked is not None:
            return "revoked"
        if self.expires is not None and self.expires <= now:
            return "expired"
        return "active"


@dataclass(frozen=True, slots=True)
class TokenRefusal:
    """Why a secret is not a valid token, in words for the person who sent it."""

    reason: Literal["unknown", "revoked", "expired", "replaced"]
    at: float | None = None  # when it expired

    @property
    def message(self) -> str:
        if self.reason == "revoked":
            return "this token was revoked"
        if self.reason == "expired":
            assert self.at is not None
            return f"this token expired at {utc(self.at)}; ask an operator for a new one"
        if self.reason == "replaced":
            return "this token's secret was replaced (rotated); use the new one"
        return "invalid API token"


@dataclass(frozen=True, slots=True)
class TokenSummary:
    """A token as `hearth tokens list` and `GET /admin/tokens` show it."""

    record: TokenRecord
    last_used: float | None  # the start of its latest request
    month_tokens: int  # prompt + completion tokens this calendar month (UTC)


class Tokens(UsageBook, AuditLog):
    """The token part of the Store (a mixin: the Store holds the database)."""

    db: sqlite_utils.Database

    def _migrate_tokens(self) -> None:
        tokens = self.db.table("tokens")
        if not tokens.exists():
            tokens.create(
                {"id": str, "name": str, "scope": str, "hash": str, "created": float, "revoked": float},
                pk="id",
                not_null={"name", "scope", "hash", "created"},
            )
            tokens.create_index(["hash"], unique=True)
        columns = tokens.columns_dict
        if "tiers" not in columns:  # databases from before per-token tiers
            tokens.add_column("tiers", str)
        if "group" not in columns:  # … before groups, expiry and rotation
            tokens.add_column("group", str, not_null_default=DEFAULT_GROUP)
        for name, kind in (("expires", float), ("prev_hash", str), ("prev_until", float)):
            if name not in columns:
                tokens.add_column(name, kind)
        tokens.create_index(["prev_hash"], if_not_exists=True)

    def create_token(
        self,
        name: str,
        scope: Scope = "user",
        tiers: tuple[str, ...] | None = None,
        *,
        group: str = DEFAULT_GROUP,
        expires: float | None = None,
        actor: str = SCHEDULER,
        origin: str = LOCAL,
    ) -> tuple[str, TokenRecord]:
        """Make a token; the clear text is returned once and never stored. ``expires``: Unix time."""
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        record = TokenRecord(
            f"tok_{secrets.token_hex(6)}", name, scope, time.time(), None, tiers or None, group, expires
        )
        with self.db.conn:
            self.db.conn.execute(
                'insert into tokens (id, name, scope, hash, created, tiers, "group", expires) '
                "values (?, ?, ?, ?, ?, ?, ?, ?)",
                [record.id, name, scope, hash_token(token), record.created,
                 ",".join(tiers) if tiers else None, group, expires],
            )  # fmt: skip
        self.audit("token_created", record.id, _describe(record), actor=actor, origin=origin)
        return token, record

    def verify_token(self, token: str, now: float | None = None) -> TokenRecord | TokenRefusal:
        """The token whose secret this is, or why it is refused."""
        digest = hash_token(token)
        row = self.db.execute(
            'select id, name, scope, created, revoked, tiers, "group", expires, hash, prev_until '
            "from tokens where hash = ? or prev_hash = ? limit 1",
            [digest, digest],
        ).fetchone()
        if row is None:
            return TokenRefusal("unknown")
        now = time.time() if now is None else now
        record = TokenRecord(
            row[0], row[1], row[2], row[3], row[4], tuple(row[5].split(",")) if row[5] else None,
            row[6] or DEFAULT_GROUP, row[7],
        )  # fmt: skip
        if record.revoked is not None:
            return TokenRefusal("revoked")
        if row[8] != digest and (row[9] is None or row[9] <= now):
            return TokenRefusal("replaced")
        if record.expires is not None and record.expires <= now:
            return TokenRefusal("expired", record.expires)
        return record

    def token(self, token_id: str) -> TokenRecord:
        rows = list(self.db.table("tokens").rows_where("id = ?", [token_id]))
        if not rows:
            raise NotFound(f"no token with id {token_id} (see `hearth tokens list`)")
        return TokenRecord.from_row(rows[0])

    def list_tokens(self) -> list[TokenRecord]:
        return [TokenRecord.from_row(r) for r in self.db.table("tokens").rows_where(order_by="created")]

    def token_summaries(self, now: float | None = None) -> list[TokenSummary]:
        activity = self.token_activity(now)
        return [TokenSummary(r, *activity.get(r.id, (None, 0))) for r in self.list_tokens()]

    def revoke_token(self, token_id: str, *, actor: str = SCHEDULER, origin: str = LOCAL) -> TokenRecord:
        """Revoke a token (NotFound if there is none): refused from its next request on. Revoking it
        again changes nothing and is not audited again."""
        record = self.token(token_id)
        if record.revoked is None:
            with self.db.conn:
                self.db.conn.execute(
                    "update tokens set revoked = ? where id = ? and revoked is null", [time.time(), token_id]
                )
            self.audit("token_revoked", token_id, record.name, actor=actor, origin=origin)
        return self.token(token_id)

    def rotate_token(
        self, token_id: str, grace_s: float = 0, *, actor: str = SCHEDULER, origin: str = LOCAL
    ) -> tuple[str, TokenRecord]:
        """A new secret for the token, same id (so the same usage, counters and group). The old secret
        stops now, or works ``grace_s`` more seconds; a secret from before it is forgotten."""
        record = self.token(token_id)
        if record.revoked is not None:
            raise ConflictError(f"token {token_id} is revoked; create a new one instead", code="wrong_state")
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        now = time.time()
        with self.db.conn:
            self.db.conn.execute(
                "update tokens set prev_hash = hash, prev_until = ?, hash = ? where id = ?",
                [now + max(0.0, grace_s), hash_token(token), token_id],
            )
        detail = f"old secret works {grace_s:g} s more" if grace_s > 0 else "old secret stopped"
        self.audit("token_rotated", token_id, detail, actor=actor, origin=origin)
        return token, record

    def has_admin_token(self) -> bool:
        return (
            self.db.table("tokens").count_where(
                "scope = 'admin' and revoked is null and (expires is null or expires > ?)", [time.time()]
            )
            > 0
        )


def _describe(record: TokenRecord) -> str:
    """What the audit log says of a new token (never its secret)."""
    parts = [f"name={record.name}", f"scope={record.scope}", f"group={record.group}"]
    if record.expires is not None:
        parts.append(f"expires={utc(record.expires)}")
    if record.tiers:
        parts.append(f"tiers={','.join(record.tiers)}")
    return " ".join(parts)
