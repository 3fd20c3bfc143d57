"""The audit log: who did what to the scheduler, when and from where. Append-only.

Rows are never changed or deleted: the database refuses it (triggers), so a bug or a careless script
cannot rewrite history either. ``actor`` is the admin token's id for the admin API, ``cli:<os user>`` for
the `hearth` command on the scheduler's machine, and ``scheduler`` for what it does on its own (policy
reloads, usage folded by retention); ``origin`` is the client's address, or ``local``.
Secrets (tokens, enrollment codes) never appear in a row.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import sqlite_utils

SCHEDULER = "scheduler"
LOCAL = "local"


@dataclass(frozen=True, slots=True)
class AuditRecord:
    id: int
    at: float
    action: str
    subject: str
    detail: str
    actor: str
    origin: str

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> AuditRecord:
        return cls(
            row["id"], row["at"], row["action"], row["subject"] or "", row["detail"] or "",
            row["actor"] or "-", row["origin"] or "-",
        )  # fmt: skip


class AuditLog:
    """The audit part of the Store (a mixin: the Store holds the database)."""

    db: sqlite_utils.Database

    def _migrate_audit(self) -> None:
        audit = self.db.table("audit")
        if not audit.exists():
            audit.create({"id": int, "at": float, "action": str, "subject": str, "detail": str}, pk="id")
        for column in ("actor", "origin"):  # databases from before the who and the where
            if column not in audit.columns_dict:
                audit.add_column(column, str)
        for verb in ("update", "delete"):
            self.db.execute(
                f"create trigger if not exists audit_no_{verb} before {verb} on audit "
                "begin select raise(abort, 'the audit log is append-only'); end"
            )

    def audit(
        self, action: str, subject: str, detail: str = "", *, actor: str = SCHEDULER, origin: str = LOCAL
    ) -> None:
        self.db.table("audit").insert(
            {
                "at": time.time(),
                "action": action,
                "subject": subject,
                "detail": detail,
                "actor": actor,
                "origin": origin,
            }
        )

    def audit_log(self, since: float = 0.0, limit: int = 1000) -> list[AuditRecord]:
        """Rows from ``since`` on, the newest ``limit`` of them, oldest first."""
        rows = self.db.query(
            "select * from (select * from audit where at >= ? order by id desc limit ?) order by id",
            [since, limit],
        )
        return [AuditRecord.from_row(r) for r in rows]
