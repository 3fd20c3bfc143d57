"""The policy over HTTP: what applies to a caller, the policy in force for operators, and the live events.

GET  /v1/policy        the caller's group, its rules (course prompt included), counters and terms
GET  /admin/policy     the policy in force: its file, digest, every group's effective rules, when it was
                       put in force and why the file was last refused
PUT  /admin/policy     {text, digest?}: validate, write the file, apply it (audited); 400 names the line
POST /admin/policy/reload   read the file now, as the watcher would (audited); 400 names the line
GET  /admin/events     server-sent events: nodes, requests admitted, refused and finished, reloads
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import tempfile
from pathlib import Path

from aiohttp import web

from policies import GroupRules
from protocol.errors import ConflictError, InvalidRequest
from protocol.policy import (
    AdminEvent,
    CallerPolicy,
    CallerTerms,
    GroupView,
    Meter,
    PolicyState,
    PolicyUpdate,
)
from scheduler.admin_http import admin_token, origin, reply
from scheduler.admin_http import body as parse_body
from scheduler.rules import PolicyFileError, parse_policy
from scheduler.state import ENFORCER, EVENTS, RULES, STORE, authenticate

KEEPALIVE_S = 15.0


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/policy", caller_policy)
    app.router.add_get("/admin/policy", get_policy)
    app.router.add_put("/admin/policy", put_policy)
    app.router.add_post("/admin/policy/reload", reload_policy)
    app.router.add_get("/admin/events", events)


def group_view(group: GroupRules) -> GroupView:
    return GroupView(
        name=group.name,
        models=list(group.models) if group.models is not None else None,
        max_tokens=group.max_tokens,
        max_prompt_tokens=group.max_prompt_tokens,
        tiers=sorted(group.tiers),
        require_e2e=bool(group.require_e2e),
        weight=group.weight,
        system_prompt=group.system_prompt,
        each=group.each,
        total=group.total,
    )


def _meter(request: web.Request, kind: str, name: str) -> Meter:
    m = request.app[ENFORCER].meters.meter(kind, name)
    return Meter(
        requests_minute=m.requests_minute,
        tokens_minute=m.tokens_minute,
        in_flight=m.in_flight,
        tokens_today=m.tokens_day,
        tokens_this_month=m.tokens_month,
    )


async def caller_policy(request: web.Request) -> web.Response:
    token = await authenticate(request)
    enforcer = request.app[ENFORCER]
    group = enforcer.group_of(token)
    version = request.app[RULES].current.terms_version
    accepted = version is None or enforcer.terms_accepted(token.id) == version
    return reply(
        CallerPolicy(
            token_id=token.id,
            group=group.name,
            rules=group_view(group),
            usage=_meter(request, "token", token.id),
            group_usage=_meter(request, "group", group.name),
            terms=CallerTerms(version=version, accepted=accepted),
        )
    )


def _state(request: web.Request) -> PolicyState:
    enforcer = request.app[ENFORCER]
    rules = request.app[RULES]
    current = rules.current
    groups = [enforcer.group(name) for name in sorted(current.groups)]
    return PolicyState(
        source=current.source,
        digest=current.digest,
        text=current.text,
        terms_version=current.terms_version,
        groups=[group_view(g) for g in groups if g is not None],
        loaded_at=rules.loaded_at,
        last_error=rules.last_error,
    )


async def get_policy(request: web.Request) -> web.Response:
    await admin_token(request)
    return reply(_state(request))


async def put_policy(request: web.Request) -> web.Response:
    """Validate the new file exactly as a reload would, write it in place atomically, and apply it now
    (the watcher then sees nothing new). The old policy stays when anything fails."""
    token = await admin_token(request)
    body = await parse_body(request, PolicyUpdate)
    rules = request.app[RULES]
    if rules.path is None:
        raise ConflictError("this scheduler has no policy file to write", code="no_policy_file")
    async with rules.writing:
        if body.digest is not None and body.digest != rules.current.digest:
            raise ConflictError(
                "the policy changed since you read it; read it again (GET /admin/policy) and redo the change",
                code="policy_changed",
            )
        path = rules.path
        try:
            loaded = await asyncio.to_thread(parse_policy, body.text, str(path), path.parent)
        except PolicyFileError as exc:
            raise InvalidRequest(exc.message, param="text", code="invalid_policy") from None
        await asyncio.to_thread(_write_atomically, path, body.text)
        rules.adopt(loaded)
    store = request.app[STORE]
    where = origin(request)
    await store.write(
        lambda db: db.audit("policy_put", str(path), loaded.digest[:16], actor=token.id, origin=where)
    )
    request.app[EVENTS].publish("policy_reloaded", outcome="applied")
    return reply(_state(request))


async def reload_policy(request: web.Request) -> web.Response:
    """Read the policy file now, changed or not, and apply it as the watcher would: the operator need not
    wait for the watcher, nor touch the file to have a changed terms file read. A bad file is refused (400,
    the line and field named) and the policy in force stays; either is audited with who asked."""
    token = await admin_token(request)
    rules = request.app[RULES]
    if rules.path is None:
        raise ConflictError("this scheduler has no policy file to read", code="no_policy_file")
    outcome, detail = await rules.reload_now()
    if outcome != "unchanged":
        subject, where = str(rules.path), origin(request)
        await request.app[STORE].write(
            lambda db: db.audit("policy_" + outcome, subject, detail, actor=token.id, origin=where)
        )
        request.app[EVENTS].publish("policy_reloaded", outcome=outcome)
    if outcome == "refused":
        raise InvalidRequest(f"{detail}; the policy in force stays", code="invalid_policy")
    return reply(_state(request))


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".policies-", suffix=".toml")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


async def events(request: web.Request) -> web.StreamResponse:
    """Server-sent events until the client leaves; a comment line every few seconds keeps proxies from
    closing an idle stream. Each event's ``data`` is an AdminEvent."""
    await admin_token(request)
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    async with request.app[EVENTS].subscribe() as sub:
        await response.write(b": connected\n\n")
        while True:
            try:
                event = await asyncio.wait_for(sub.queue.get(), KEEPALIVE_S)
            except TimeoutError:
                await response.write(b": keepalive\n\n")
                continue
            if sub.dropped:
                lost = AdminEvent(seq=0, at=event["at"], kind="dropped", count=sub.dropped)
                sub.dropped = 0
                await response.write(_sse(lost))
            await response.write(_sse(AdminEvent.model_validate(event)))


def _sse(event: AdminEvent) -> bytes:
    doc = event.model_dump(mode="json", exclude_none=True)
    return b"data: " + json.dumps(doc, separators=(",", ":")).encode() + b"\n\n"
