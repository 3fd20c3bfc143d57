"""The terms of use over HTTP: reading them, accepting them, and the operator's view of who accepted.

    GET  /v1/terms          the terms in force and where the caller's token stands   (any token)
    POST /v1/terms/accept   {version}: accept the version in force                   (any token)
    GET  /admin/terms       every token's acceptance                                 (admin tokens)

The terms come from the policy in force (scheduler.rules), so a new version in the policy file is asked
for as soon as the file is reloaded; acceptances live in scheduler.terms.
"""

from __future__ import annotations

from aiohttp import web
from pydantic import ValidationError

from protocol.errors import ConflictError, InvalidRequest, PermissionDenied
from protocol.schemas import validation_error
from protocol.terms import TermsAcceptRequest, TermsDocument, TermsStatus, TermsStatusList
from protocol.web import json_response, parse_json, read_body
from scheduler.state import RULES, STORE, TERMS, authenticate


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/terms", show)
    app.router.add_post("/v1/terms/accept", accept)
    app.router.add_get("/admin/terms", status)


def _document(request: web.Request, token_id: str) -> TermsDocument:
    policy = request.app[RULES].current
    mine = request.app[TERMS].acceptance(token_id)
    version = policy.terms_version
    return TermsDocument(
        version=version,
        text=policy.terms_text if version is not None else None,
        accepted=version is None or (mine is not None and mine.version == version),
        accepted_version=mine.version if mine is not None else None,
        accepted_at=mine.at if mine is not None else None,
    )


async def show(request: web.Request) -> web.Response:
    token = await authenticate(request)
    return json_response(_document(request, token.id).model_dump(mode="json"))


async def accept(request: web.Request) -> web.Response:
    token = await authenticate(request)
    raw = await read_body(request)
    doc = parse_json(raw) if raw else {}
    if not isinstance(doc, dict):
        raise InvalidRequest("the request body must be a JSON object")
    try:
        body = TermsAcceptRequest.model_validate(doc)
    except ValidationError as exc:
        raise validation_error(exc) from None
    # Read once: the policy may be reloaded while this request waits for the database.
    current = request.app[RULES].current.terms_version
    if current is None:
        raise ConflictError("this scheduler has no terms of use to accept", code="no_terms")
    if body.version != current:
        raise ConflictError(
            f"the terms in force are version {current}, not {body.version}: read them (GET /v1/terms, or "
            f"`hearth terms show`) and accept version {current}",
            param="version",
            code="terms_version_changed",
        )
    await request.app[TERMS].accept(token.id, current, origin=request.remote or "unknown")
    return json_response(_document(request, token.id).model_dump(mode="json"))


async def status(request: web.Request) -> web.Response:
    token = await authenticate(request)
    if token.scope != "admin":
        raise PermissionDenied("this needs an admin token (`hearth tokens create --admin`)")
    store = request.app[STORE]
    tokens = await store.write(lambda db: db.list_tokens())
    version = request.app[RULES].current.terms_version
    book = request.app[TERMS]
    rows = []
    for record in tokens:
        if record.revoked is not None:
            continue
        mine = book.acceptance(record.id)
        rows.append(
            TermsStatus(
                token_id=record.id,
                name=record.name,
                accepted_version=mine.version if mine is not None else None,
                accepted_at=mine.at if mine is not None else None,
                current=version is None or (mine is not None and mine.version == version),
            )
        )
    return json_response(TermsStatusList(version=version, tokens=rows).model_dump(mode="json"))
