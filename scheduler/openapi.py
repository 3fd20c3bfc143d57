"""The OpenAPI 3.1 document of the scheduler's API, generated from the same pydantic models that validate it.

Every status a route can answer is listed, with the media types it answers in: a generation route answers
JSON, server-sent events (stream=true) or, for a sealed request, end-to-end frames. Tests keep the document
true: they check it against the routes the app serves, against real answers, and by fuzzing every operation
with Schemathesis (tests/test_fuzz_api.py).

Server-sent events are described one event at a time, as Open API tools read ``schema`` of a
``text/event-stream`` before 3.2: an object whose ``data`` holds a JSON chunk, an error, or ``[DONE]``.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from protocol.accounts import (
    MAX_AUDIT_ROWS,
    AuditLog,
    Token,
    TokenCreateRequest,
    TokenList,
    TokenRotateRequest,
    TokenSecret,
    UsageDimension,
    UsageReport,
)
from protocol.admin import (
    ApproveRequest,
    AuthorityKeys,
    DrainRequest,
    Enrollment,
    EnrollmentCode,
    EnrollmentCodeRequest,
    EnrollmentList,
    EnrollmentState,
    ModelPlacements,
    NodeList,
)
from protocol.envelope import MEDIA_TYPE as ENVELOPE
from protocol.federation import NODE_ID_PATTERN, EnrollReply, EnrollRequest, HeartbeatReply, NodeStatus
from protocol.frames import MEDIA_TYPE as FRAMES
from protocol.policy import AdminEvent, CallerPolicy, PolicyState, PolicyUpdate
from protocol.schemas import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Completion,
    CompletionChunk,
    CompletionRequest,
    DirectoryPage,
    ErrorResponse,
    Health,
    ModelList,
)
from protocol.terms import TermsAcceptRequest, TermsDocument, TermsStatusList

VERSION = "0.1.0"
_REQUESTS: list[type[BaseModel]] = [
    ChatCompletionRequest,
    CompletionRequest,
    EnrollRequest,
    NodeStatus,
    EnrollmentCodeRequest,
    ApproveRequest,
    DrainRequest,
    PolicyUpdate,
    TermsAcceptRequest,
    # accounts (protocol.accounts)
    TokenCreateRequest,
    TokenRotateRequest,
]
_REPLIES: list[type[BaseModel]] = [
    ChatCompletion,
    ChatCompletionChunk,
    Completion,
    CompletionChunk,
    ModelList,
    ErrorResponse,
    DirectoryPage,
    Health,
    EnrollReply,
    HeartbeatReply,
    EnrollmentCode,
    EnrollmentList,
    Enrollment,
    NodeList,
    ModelPlacements,
    AuthorityKeys,
    CallerPolicy,
    PolicyState,
    AdminEvent,
    TermsDocument,
    TermsStatusList,
    # accounts (protocol.accounts)
    Token,
    TokenList,
    TokenSecret,
    UsageReport,
    AuditLog,
]

_STATUS = {
    400: "Invalid request: the body is not JSON or not an object, or a field is missing, of the wrong type "
    "or out of range (`param` names it).",
    401: "Missing, invalid, revoked or expired token, or (a node's call) a bad signature.",
    403: "Refused: by policy, for the token's scope, or for the node's state (pending, revoked).",
    404: "Unknown model (model_not_found), node or enrollment (not_found).",
    409: "Conflict with the current state.",
    413: "The request body is over the size limit (payload_too_large).",
    422: "The request can never run here (model larger than every node, for example).",
    429: "A limit of the token's group (docs/policies.md): requests or tokens per minute "
    "(rate_limit_exceeded), requests in flight (concurrency_limit_exceeded) or a daily or monthly quota "
    "(quota_exceeded); see Retry-After.",
    500: "An internal error (internal_error), or the model failed before its answer started "
    "(generation_failed).",
    502: "The node answered with something that is not a valid answer (node_failed).",
    503: "No node can take the request now (no_capacity, queue_timeout, queue_full, node_failed); see "
    "Retry-After.",
}
_RETRY_AFTER = {
    "Retry-After": {"description": "Seconds to wait before trying again.", "schema": {"type": "integer"}}
}
_RATE = {"type": "string"}
# What every generation answer carries, as OpenAI sends them (a limit the group does not set is not sent).
_ANSWER_HEADERS = {
    "x-request-id": {"description": "The scheduler's id of this request (usage, audit).", "schema": _RATE},
    **{
        f"x-ratelimit-{part}-{what}": {
            "description": f"The {part} of the token's {what} per minute.",
            "schema": _RATE,
        }
        for what in ("requests", "tokens")
        for part in ("limit", "remaining", "reset")
    },
}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(name: str) -> dict[str, Any]:
    return {"application/json": {"schema": _ref(name)}}


def _errors(*statuses: int, **say: str) -> dict[str, Any]:
    """Error answers in OpenAI's shape; ``say`` (``e409="…"``) words one status for this route."""
    out: dict[str, Any] = {}
    for status in statuses:
        out[str(status)] = {
            "description": say.get(f"e{status}", _STATUS[status]),
            "content": _json("ErrorResponse"),
            **({"headers": _RETRY_AFTER} if status in (429, 503) else {}),
        }
    return out


def _events(chunk: str) -> dict[str, Any]:
    """One server-sent event of a stream: a chunk, an error that ends the stream, or the final [DONE]."""
    return {
        "type": "object",
        "required": ["data"],
        "properties": {
            "data": {
                "anyOf": [
                    {"type": "string", "contentMediaType": "application/json", "contentSchema": _ref(chunk)},
                    {
                        "type": "string",
                        "contentMediaType": "application/json",
                        "contentSchema": _ref("ErrorResponse"),
                    },
                    {"const": "[DONE]"},
                ]
            }
        },
    }


def _generation(summary: str, request: str, response: str, chunk: str) -> dict[str, Any]:
    return {
        "post": {
            "summary": summary,
            "security": [{"bearer": []}],
            "requestBody": {
                "required": True,
                "content": {
                    **_json(request),
                    ENVELOPE: {
                        "schema": {
                            "type": "object",
                            "description": "The request sealed end to end by `hearth proxy` "
                            "(docs/protocol.md): only its candidate nodes can open it.",
                        }
                    },
                },
            },
            "responses": {
                "200": {
                    "description": f"A {response} (stream=false); server-sent events, each a {chunk} and the "
                    "last `data: [DONE]`, or an error event that ends the stream (stream=true); or, for a "
                    "sealed request, end-to-end encrypted frames (docs/protocol.md).",
                    "headers": _ANSWER_HEADERS,
                    "content": {
                        **_json(response),
                        "text/event-stream": {"schema": _events(chunk)},
                        FRAMES: {"schema": {"type": "string", "format": "binary"}},
                    },
                },
                **_errors(
                    400,
                    401,
                    403,
                    404,
                    409,
                    413,
                    422,
                    429,
                    500,
                    502,
                    503,
                    e409="A sealed request none of whose candidates can take it (reseal): "
                    "`candidates` names nodes to seal to instead.",
                ),
            },
        }
    }


def _get(summary: str, responses: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"get": {"summary": summary, "responses": responses, **extra}}


# What a node id is (protocol.federation.NodeId); any other is a 404, as an unknown one is.
_NODE_ID = [
    {
        "name": "node_id",
        "in": "path",
        "required": True,
        "schema": {"type": "string", "pattern": NODE_ID_PATTERN},
    }
]
_DECIDED = _errors(
    401, 403, 404, 409, e409="The node is not in a state this decision applies to (wrong_state)."
)


def _admin(
    summary: str, ok: dict[str, Any], *, body: str | None = None, body_required: bool = True, **more: Any
) -> dict[str, Any]:
    op: dict[str, Any] = {
        "summary": summary,
        "security": [{"bearer": []}],
        "responses": {**ok, **_errors(401, 403), **more.pop("errors", {})},
    }
    if body is not None:
        op["requestBody"] = {"required": body_required, "content": _json(body)}
    if more.pop("node_id", False):
        op["parameters"] = _NODE_ID
    op.update(more)
    return op


def _ok(name: str, status: int = 200, description: str = "OK.") -> dict[str, Any]:
    return {str(status): {"description": description, "content": _json(name)}}


def _admin_paths() -> dict[str, Any]:
    states: list[EnrollmentState] = ["pending", "approved", "rejected", "revoked"]
    body_errors = _errors(400, 413)
    return {
        "/admin/enrollment-codes": {
            "post": _admin(
                "Create a one-time enrollment code for a tier.",
                _ok("EnrollmentCode", 201, "Created; the code is shown only now."),
                body="EnrollmentCodeRequest",
                errors=body_errors,
            )
        },
        "/admin/enrollments": {
            "get": _admin(
                "Nodes that asked to join, and the operator's decisions.",
                _ok("EnrollmentList"),
                errors=_errors(400, e400="An unknown state."),
                parameters=[{"name": "state", "in": "query", "required": False, "schema": {"enum": states}}],
            )
        },
        "/admin/enrollments/{node_id}/approve": {
            "post": _admin(
                "Approve a pending node with a certificate the authority signed.",
                _ok("Enrollment"),
                body="ApproveRequest",
                node_id=True,
                errors={
                    **body_errors,
                    **_DECIDED,
                    **_errors(
                        403,
                        e403="Not an admin token, or a certificate another authority issued or whose "
                        "signature does not verify.",
                    ),
                },
            )
        },
        "/admin/enrollments/{node_id}/reject": {
            "post": _admin("Refuse a pending node.", _ok("Enrollment"), node_id=True, errors=_DECIDED)
        },
        "/admin/nodes": {"get": _admin("Approved nodes: health, memory, models, load.", _ok("NodeList"))},
        "/admin/nodes/{node_id}/revoke": {
            "post": _admin(
                "Take a pending or approved node out of the cluster now.",
                _ok("Enrollment"),
                node_id=True,
                errors=_DECIDED,
            )
        },
        "/admin/nodes/{node_id}/drain": {
            "post": _admin(
                "Drain a node (or undo it with drain=false).",
                _ok("Enrollment"),
                body="DrainRequest",
                body_required=False,  # no body: drain
                node_id=True,
                errors={**body_errors, **_errors(404)},
            )
        },
        "/admin/models": {"get": _admin("Where each model runs.", _ok("ModelPlacements"))},
        "/admin/authority": {
            "get": _admin("The authority key this scheduler trusts, and its own key.", _ok("AuthorityKeys"))
        },
    }


def _policy_paths() -> dict[str, Any]:
    return {
        "/v1/policy": _get(
            "The rules that apply to the caller: group, limits, course prompt, counters, terms.",
            {**_ok("CallerPolicy"), **_errors(401, 403)},
            security=[{"bearer": []}],
        ),
        "/admin/policy": {
            "get": _admin("The policy in force, each group's rules as they apply.", _ok("PolicyState")),
            "put": _admin(
                "Replace the policy file: validated, written and applied at once (audited).",
                _ok("PolicyState"),
                body="PolicyUpdate",
                errors={
                    **_errors(400, 413, e400="Not a valid policy: the message names the line and field."),
                    **_errors(409, e409="The policy changed since `digest` (policy_changed)."),
                },
            ),
        },
        "/admin/events": {
            "get": _admin(
                "Live events (server-sent events, metadata only): nodes joining, leaving and yielding, "
                "requests admitted, refused and finished, policy reloads.",
                {
                    "200": {
                        "description": "An endless stream; each event's `data` is an AdminEvent.",
                        "content": {"text/event-stream": {"schema": {"type": "object", "properties": {
                            "data": {"type": "string", "contentMediaType": "application/json",
                                     "contentSchema": _ref("AdminEvent")}}}}},
                    }
                },
            )
        },
    }  # fmt: skip


def _terms_paths() -> dict[str, Any]:
    """The terms of use (scheduler.terms_api): any token reads and accepts them; admins see who did."""
    return {
        "/v1/terms": {
            "get": {
                "summary": "The terms of use in force, and whether this token accepted them.",
                "security": [{"bearer": []}],
                "responses": {**_ok("TermsDocument"), **_errors(401)},
            }
        },
        "/v1/terms/accept": {
            "post": {
                "summary": "Accept the terms of use in force (accepting them again changes nothing).",
                "security": [{"bearer": []}],
                "requestBody": {"required": True, "content": _json("TermsAcceptRequest")},
                "responses": {
                    **_ok("TermsDocument", description="Accepted: the terms, as GET /v1/terms shows them."),
                    **_errors(
                        400,
                        401,
                        409,
                        413,
                        e409="The version is not the one in force (terms_version_changed: the message "
                        "names it), or there are no terms to accept (no_terms).",
                    ),
                },
            }
        },
        "/admin/terms": {
            "get": _admin("Which version of the terms each token accepted.", _ok("TermsStatusList"))
        },
    }


# ----- accounts: tokens, usage, the audit log (scheduler.admin_accounts) -----

_TOKEN_ID = [
    {
        "name": "token_id",
        "in": "path",
        "required": True,
        "schema": {"type": "string", "pattern": "^tok_[0-9a-f]{12}$"},
    }
]
_SINCE = {
    "name": "since",
    "in": "query",
    "required": False,
    "description": 'How far back: seconds, or a duration such as "7d", "12h", "30m" (default 7d).',
    "schema": {"type": "string", "pattern": r"^\s*[0-9]+(\.[0-9]+)?\s*[smhdw]?\s*$"},
}


def _accounts_paths() -> dict[str, Any]:
    body_errors = _errors(400, 413)
    dimensions: list[UsageDimension] = ["user", "group", "model", "node", "day"]
    return {
        "/admin/tokens": {
            "post": _admin(
                "Create an API token in a policy group.",
                _ok("TokenSecret", 201, "Created; the secret is shown only now."),
                body="TokenCreateRequest",
                errors=_errors(400, 413, e400="A field is invalid, or the group is not in the policy."),
            ),
            "get": _admin(
                "Every token: scope, group, state, expiry, last use, tokens used this month.",
                _ok("TokenList"),
            ),
        },
        "/admin/tokens/{token_id}/revoke": {
            "post": _admin(
                "Revoke a token: refused from its next request on.",
                _ok("Token"),
                parameters=_TOKEN_ID,
                errors=_errors(404),
            )
        },
        "/admin/tokens/{token_id}/rotate": {
            "post": _admin(
                "Give a token a new secret (same id, group and usage); the old one stops now or after a "
                "grace period.",
                _ok("TokenSecret", description="The new secret, shown only now."),
                body="TokenRotateRequest",
                body_required=False,  # no body: no grace
                parameters=_TOKEN_ID,
                errors={
                    **body_errors,
                    **_errors(404, 409, e409="The token is revoked (wrong_state)."),
                },
            )
        },
        "/admin/usage": {
            "get": _admin(
                "Usage totals by user (token), group, model, node or day (metadata only).",
                _ok("UsageReport"),
                errors=_errors(400, e400="An unknown dimension (by) or a malformed duration (since)."),
                parameters=[
                    {"name": "by", "in": "query", "required": False, "schema": {"enum": dimensions}},
                    _SINCE,
                ],
            )
        },
        "/admin/audit": {
            "get": _admin(
                "The audit log: who changed what, when and from where (oldest first).",
                _ok("AuditLog"),
                errors=_errors(400, e400="A malformed duration (since) or limit."),
                parameters=[
                    _SINCE,
                    {
                        "name": "limit",
                        "in": "query",
                        "required": False,
                        "description": "The newest this many entries at most (default 1000).",
                        "schema": {"type": "integer", "minimum": 1, "maximum": MAX_AUDIT_ROWS},
                    },
                ],
            )
        },
    }


@cache
def openapi_document() -> dict[str, Any]:
    _, schemas = models_json_schema(
        [(m, "validation") for m in _REQUESTS] + [(m, "serialization") for m in _REPLIES],
        ref_template="#/components/schemas/{model}",
    )
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Hearth",
            "version": VERSION,
            "description": "OpenAI-compatible API of a Hearth scheduler, and its node and admin APIs.",
        },
        "components": {
            "schemas": schemas["$defs"],
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "paths": {
            "/v1/models": {
                "get": {
                    "summary": "List the models the cluster serves.",
                    "security": [{"bearer": []}],
                    "responses": {**_ok("ModelList", description="The models."), **_errors(401)},
                }
            },
            "/v1/chat/completions": _generation(
                "Create a chat completion.", "ChatCompletionRequest", "ChatCompletion", "ChatCompletionChunk"
            ),
            "/v1/completions": _generation(
                "Create a completion.", "CompletionRequest", "Completion", "CompletionChunk"
            ),
            "/openapi.json": _get(
                "This document.",
                {"200": {"description": "OpenAPI 3.1.", "content": {"application/json": {"schema": {}}}}},
            ),
            "/healthz": _get("Liveness.", _ok("Health", description="Serving.")),
            "/metrics": _get(
                "Prometheus metrics.",
                {
                    "200": {
                        "description": "Prometheus' text format.",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            ),
            "/v1/directory": _get(
                "The node directory: a hash-chained log of node certificates, key statements and "
                "revocations (docs/protocol.md).",
                {**_ok("DirectoryPage", description="Entries from `since` on."), **_errors(400)},
                parameters=[
                    {
                        "name": "since",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "integer", "minimum": 0, "maximum": 10**15 - 1},
                    },
                ],
            ),
            "/v1/enroll": {
                "post": {
                    "summary": "A node redeems a one-time enrollment code (then waits for approval).",
                    "requestBody": {"required": True, "content": _json("EnrollRequest")},
                    "responses": {
                        **_ok("EnrollReply", 201, "Enrolled: pending the operator's approval."),
                        **_errors(
                            400,
                            403,
                            409,
                            413,
                            e403="The proof does not match the identity key, or the code is unknown, used "
                            "or expired (invalid_enrollment_code).",
                            e409="The node id belongs to another machine's key (conflict).",
                        ),
                    },
                }
            },
            "/v1/nodes/heartbeat": {
                "post": {
                    "summary": "An approved node's status, signed with its identity key "
                    "(X-Hearth-* headers).",
                    "requestBody": {"required": True, "content": _json("NodeStatus")},
                    "responses": {
                        **_ok("HeartbeatReply", description="Accepted."),
                        **_errors(
                            400,
                            401,
                            403,
                            413,
                            e401="Unsigned, unknown signer, stale or replayed.",
                            e403="The node is pending approval, rejected or revoked, or reports on another.",
                        ),
                    },
                }
            },
            **_admin_paths(),
            **_policy_paths(),
            **_terms_paths(),
            **_accounts_paths(),
        },
    }
