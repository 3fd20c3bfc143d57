"""Wire schemas of the admin API's accounts: tokens, usage and the audit log.

As in protocol.admin: the scheduler validates requests and builds replies with these models, and the
OpenAPI document is generated from them. Request bodies ignore unknown fields; replies have exactly these.
A token's secret appears in one document only, the answer that creates or rotates it.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictFloat

from protocol.federation import Tier
from protocol.messages import Text

TokenScope = Literal["user", "admin"]
TokenState = Literal["active", "revoked", "expired"]
UsageDimension = Literal["user", "group", "model", "node", "day"]

MAX_NAME = 200
MAX_GROUP = 64
MAX_EXPIRY_S = 10 * 366 * 24 * 3600.0
# Far enough back for any "since" (an epoch of 0 is 1970); past it a number is a typo, not a time.
MAX_SINCE_S = 100 * 366 * 86400.0
MAX_GRACE_S = 30 * 24 * 3600.0
MAX_AUDIT_ROWS = 10_000

_DURATION = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([smhdw]?)\s*$")
_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 7 * 86400.0}


def parse_duration(text: str) -> float:
    """Seconds in "30d", "12h", "10m", "90s", "2w" or a plain number of seconds; ValueError otherwise."""
    m = _DURATION.match(text)
    if m is None:
        raise ValueError(f"{text!r} is not a duration like 30d, 12h, 10m or 90s")
    return float(m.group(1)) * _UNITS[m.group(2)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class _Reply(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ----- requests -----


class TokenCreateRequest(_Body):
    name: Annotated[Text, Field(strict=True, min_length=1, max_length=MAX_NAME)] = Field(
        description="A label to recognise the token by (shown in lists, usage and the audit log)."
    )
    group: Annotated[Text, Field(strict=True, min_length=1, max_length=MAX_GROUP)] = Field(
        default="default", description="The policy group whose rules apply; it must exist in the policy."
    )
    scope: TokenScope = Field(default="user", description="`admin` may also use the admin API.")
    expires_in_seconds: Annotated[StrictFloat, Field(gt=0, le=MAX_EXPIRY_S, allow_inf_nan=False)] | None = (
        Field(default=None, description="Seconds from now until it is refused; none: it never expires.")
    )
    tiers: list[Tier] | None = Field(
        default=None,
        min_length=1,
        description="Node tiers this token's requests may reach (default: those its policy allows).",
    )


class TokenRotateRequest(_Body):
    grace_seconds: Annotated[StrictFloat, Field(ge=0, le=MAX_GRACE_S, allow_inf_nan=False)] = Field(
        default=0.0, description="Seconds the old secret keeps working (0: it stops now)."
    )


# ----- replies -----


class Token(_Reply):
    id: str = Field(description="The token's id (its secret is stored only as a hash).")
    name: str
    scope: TokenScope
    group: str = Field(description="The policy group whose rules apply.")
    tiers: list[str] | None = Field(description="Node tiers it is limited to; null: its policy's.")
    state: TokenState
    created: float = Field(description="Unix time.")
    expires: float | None = Field(description="Unix time from which it is refused; null: never.")
    revoked: float | None = Field(description="Unix time it was revoked; null: it is not.")
    last_used: float | None = Field(description="When its latest request started; null: never used.")
    tokens_this_month: int = Field(description="Prompt + completion tokens since the 1st of the month (UTC).")


class TokenList(_Reply):
    tokens: list[Token]


class TokenSecret(_Reply):
    secret: str = Field(description="The token itself, shown only in this answer: pass it as a Bearer token.")
    token: Token


class UsageRow(_Reply):
    key: str = Field(description="The token id, group, model, node id or day (YYYY-MM-DD, UTC).")
    name: str | None = Field(description="The token's name, in a report by user; else null.")
    requests: int
    errors: int = Field(description="Requests that ended otherwise than answered or left by their client.")
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class UsageReport(_Reply):
    by: UsageDimension
    since: float = Field(description="Unix time the report starts at (folded days count whole).")
    rows: list[UsageRow] = Field(description="Most tokens first.")


class AuditEntry(_Reply):
    id: int
    at: float = Field(description="Unix time.")
    action: str
    subject: str
    detail: str
    actor: str = Field(description='The admin token id, "cli:<os user>", or "scheduler" for its own acts.')
    origin: str = Field(description='The client\'s address, or "local".')


class AuditLog(_Reply):
    entries: list[AuditEntry] = Field(description="Oldest first.")
