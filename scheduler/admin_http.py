"""What every admin route shares: the admin check, typed bodies and replies, and who is acting."""

from __future__ import annotations

from typing import TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

from protocol.errors import InvalidRequest, PermissionDenied
from protocol.schemas import validation_error
from protocol.web import json_response, parse_json, read_body
from scheduler.state import authenticate
from scheduler.store import TokenRecord

B = TypeVar("B", bound=BaseModel)


async def admin_token(request: web.Request) -> TokenRecord:
    """The request's token, if it has admin scope: 401 without a valid token, 403 with a user's."""
    token = await authenticate(request)
    if token.scope != "admin":
        raise PermissionDenied("this needs an admin token (`hearth tokens create --scope admin`)")
    return token


def origin(request: web.Request) -> str:
    """Where an admin call came from, for the audit log."""
    return request.remote or "unknown"


async def body(request: web.Request, model: type[B]) -> B:
    """The request's JSON body as ``model``; no body at all reads as {} (every field's default)."""
    raw = await read_body(request)
    doc = parse_json(raw) if raw else {}
    if not isinstance(doc, dict):
        raise InvalidRequest("the request body must be a JSON object")
    try:
        return model.model_validate(doc)
    except ValidationError as exc:
        raise validation_error(exc) from None


def reply(doc: BaseModel, status: int = 200) -> web.Response:
    return json_response(doc.model_dump(mode="json"), status=status)
