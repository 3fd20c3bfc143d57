"""The admin API's accounts: tokens, usage and the audit log (admin-scope tokens only).

    POST /admin/tokens                     {name, group?, scope?, expires_in_seconds?, tiers?} → its secret
    GET  /admin/tokens                     every token: group, expiry, last used, tokens used this month
    POST /admin/tokens/{token_id}/revoke   refused from its next request on
    POST /admin/tokens/{token_id}/rotate   {grace_seconds?} → a new secret, same id
    GET  /admin/usage?by=…&since=…         totals by user, group, model, node or day
    GET  /admin/audit?since=…&limit=…      the audit log

Every change is written to the audit log with the admin token's id and the caller's address; secrets never.
"""

from __future__ import annotations

import time
from typing import get_args

from aiohttp import web

from protocol.accounts import (
    MAX_AUDIT_ROWS,
    MAX_SINCE_S,
    AuditEntry,
    AuditLog,
    Token,
    TokenCreateRequest,
    TokenList,
    TokenRotateRequest,
    TokenSecret,
    UsageDimension,
    UsageReport,
    UsageRow,
    parse_duration,
)
from protocol.errors import InvalidRequest
from scheduler.admin_http import admin_token, body, origin, reply
from scheduler.state import RULES, STORE
from scheduler.store import TokenRecord, TokenSummary

DEFAULT_SINCE_S = 7 * 86400.0


def add_routes(app: web.Application) -> None:
    app.router.add_post("/admin/tokens", create_token)
    app.router.add_get("/admin/tokens", list_tokens)
    app.router.add_post("/admin/tokens/{token_id}/revoke", revoke_token)
    app.router.add_post("/admin/tokens/{token_id}/rotate", rotate_token)
    app.router.add_get("/admin/usage", usage)
    app.router.add_get("/admin/audit", audit)


def token_doc(summary: TokenSummary, now: float) -> Token:
    r = summary.record
    return Token(
        id=r.id, name=r.name, scope=r.scope, group=r.group, tiers=list(r.tiers) if r.tiers else None,
        state=r.state(now), created=r.created, expires=r.expires, revoked=r.revoked,
        last_used=summary.last_used, tokens_this_month=summary.month_tokens,
    )  # fmt: skip


async def _summary(request: web.Request, record: TokenRecord) -> Token:
    store = request.app[STORE]
    now = time.time()
    activity = await store.write(lambda db: db.token_activity(now))
    return token_doc(TokenSummary(record, *activity.get(record.id, (None, 0))), now)


async def create_token(request: web.Request) -> web.Response:
    admin = await admin_token(request)
    doc = await body(request, TokenCreateRequest)
    groups = request.app[RULES].current.groups
    if doc.group not in groups:
        raise InvalidRequest(
            f"no group {doc.group!r} in the policy in force; groups: {', '.join(sorted(groups))}",
            param="group",
        )
    expires = time.time() + doc.expires_in_seconds if doc.expires_in_seconds is not None else None
    tiers = tuple(sorted(set(doc.tiers))) if doc.tiers else None
    store = request.app[STORE]
    secret, record = await store.write(
        lambda db: db.create_token(
            doc.name, doc.scope, tiers, group=doc.group, expires=expires, actor=admin.id,
            origin=origin(request),
        )
    )  # fmt: skip
    return reply(TokenSecret(secret=secret, token=await _summary(request, record)), status=201)


async def list_tokens(request: web.Request) -> web.Response:
    await admin_token(request)
    store = request.app[STORE]
    now = time.time()
    summaries = await store.write(lambda db: db.token_summaries(now))
    return reply(TokenList(tokens=[token_doc(s, now) for s in summaries]))


async def revoke_token(request: web.Request) -> web.Response:
    admin = await admin_token(request)
    token_id = request.match_info["token_id"]
    store = request.app[STORE]
    record = await store.write(lambda db: db.revoke_token(token_id, actor=admin.id, origin=origin(request)))
    return reply(await _summary(request, record))


async def rotate_token(request: web.Request) -> web.Response:
    admin = await admin_token(request)
    token_id = request.match_info["token_id"]
    grace = (await body(request, TokenRotateRequest)).grace_seconds
    store = request.app[STORE]
    secret, record = await store.write(
        lambda db: db.rotate_token(token_id, grace, actor=admin.id, origin=origin(request))
    )
    return reply(TokenSecret(secret=secret, token=await _summary(request, record)))


def _since(request: web.Request) -> float:
    """``since`` as Unix time: a duration back from now ("7d", "3600"); default seven days."""
    text = request.query.get("since")
    if text is None:
        return time.time() - DEFAULT_SINCE_S
    try:
        seconds = parse_duration(text)
    except ValueError as exc:
        raise InvalidRequest(f"since: {exc}", param="since") from None
    if seconds > MAX_SINCE_S:
        raise InvalidRequest("since: at most 100 years back", param="since")
    return time.time() - seconds


async def usage(request: web.Request) -> web.Response:
    await admin_token(request)
    by = request.query.get("by", "user")
    dimensions: tuple[UsageDimension, ...] = get_args(UsageDimension)
    if by not in dimensions:
        raise InvalidRequest(f"by must be one of {', '.join(dimensions)}", param="by")
    since = _since(request)
    store = request.app[STORE]
    dimension: UsageDimension = by  # type: ignore[assignment]  # checked above
    totals = await store.write(lambda db: db.usage_report(dimension, since))
    rows = [UsageRow.model_validate(t, from_attributes=True) for t in totals]
    return reply(UsageReport(by=dimension, since=since, rows=rows))


async def audit(request: web.Request) -> web.Response:
    await admin_token(request)
    since = _since(request)
    text = request.query.get("limit", "1000")
    if not (text.isascii() and text.isdigit() and len(text) <= 6 and 1 <= int(text) <= MAX_AUDIT_ROWS):
        raise InvalidRequest(f"limit must be a whole number from 1 to {MAX_AUDIT_ROWS}", param="limit")
    limit = int(text)
    store = request.app[STORE]
    rows = await store.write(lambda db: db.audit_log(since, limit))
    entries = [AuditEntry.model_validate(r, from_attributes=True) for r in rows]
    return reply(AuditLog(entries=entries))
