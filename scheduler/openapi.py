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
    AuditLog,
    Token,
    TokenCreateRequest,
    TokenList,
    TokenRotateRequest,
    TokenSecret,
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
    ModelAction,
    ModelActionRequest,
    ModelPlacements,
    NodeList,
    QueueState,
)
from protocol.envelope import MEDIA_TYPE as ENVELOPE
from protocol.federation import EnrollReply, EnrollRequest, HeartbeatReply, NodeStatus
from protocol.frames import MEDIA_TYPE as FRAMES
from protocol.policy import AdminEvent, CallerPolicy, PolicyState, PolicyUpdate
from protocol.responses import (
    ChatCompletion,
    ChatCompletionChunk,
    Completion,
    CompletionChunk,
    DirectoryPage,
    ErrorResponse,
    Health,
    ModelCard,
    ModelList,
)
from protocol.schemas import ChatCompletionRequest, CompletionRequest
from protocol.terms import TermsAcceptRequest, TermsDocument, TermsStatusList
from protocol.tokenizer import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
    TokenizerInfo,
    TokenizerInfoRequest,
)
from scheduler.openapi_admin import (
    _accounts_paths,
    _admin_paths,
    _model_paths,
    _policy_paths,
    _terms_paths,
)
from scheduler.openapi_parts import ANSWER_HEADERS, errors, get_operation, json_body, ok, ref

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
    # a model on a node (scheduler.admin_models)
    ModelActionRequest,
    # the tokenizer endpoints (scheduler.tokenizer_api)
    TokenizeRequest,
    DetokenizeRequest,
    TokenizerInfoRequest,
]
_REPLIES: list[type[BaseModel]] = [
    ChatCompletion,
    ChatCompletionChunk,
    Completion,
    CompletionChunk,
    ModelList,
    ModelCard,
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
    QueueState,
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
    # a model on a node (scheduler.admin_models)
    ModelAction,
    TokenizeResponse,
    DetokenizeResponse,
    TokenizerInfo,
]


def _events(chunk: str) -> dict[str, Any]:
    """One server-sent event of a stream: a chunk, an error that ends the stream, or the final [DONE]."""
    return {
        "type": "object",
        "required": ["data"],
        "properties": {
            "data": {
                "anyOf": [
                    {"type": "string", "contentMediaType": "application/json", "contentSchema": ref(chunk)},
                    {
                        "type": "string",
                        "contentMediaType": "application/json",
                        "contentSchema": ref("ErrorResponse"),
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
                    **json_body(request),
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
                    "headers": ANSWER_HEADERS,
                    "content": {
                        **json_body(response),
                        "text/event-stream": {"schema": _events(chunk)},
                        FRAMES: {"schema": {"type": "string", "format": "binary"}},
                    },
                },
                **errors(
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


def _tokenizer_op(summary: str, request: str | None, response: str) -> dict[str, Any]:
    """A tokenizer endpoint (scheduler.tokenizer_api): JSON in and out, or sealed by `hearth proxy`."""
    op: dict[str, Any] = {
        "summary": summary,
        "security": [{"bearer": []}],
        "responses": {
            "200": {
                "description": f"A {response}; for a sealed request, end-to-end encrypted frames.",
                "headers": ANSWER_HEADERS,
                "content": {
                    **json_body(response),
                    FRAMES: {"schema": {"type": "string", "format": "binary"}},
                },
            },
            **errors(400, 401, 403, 404, 409, 413, 429, 500, 502, 503),
        },
    }
    if request is not None:
        op["requestBody"] = {
            "required": True,
            "content": {
                **json_body(request),
                ENVELOPE: {
                    "schema": {"type": "object", "description": "The request sealed by `hearth proxy`."}
                },
            },
        }
    return op


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
                    "responses": {**ok("ModelList", description="The models."), **errors(401)},
                }
            },
            "/v1/models/{model_id}": {
                "get": {
                    "summary": "One model the cluster serves (its id may contain '/').",
                    "security": [{"bearer": []}],
                    "parameters": [
                        {"name": "model_id", "in": "path", "required": True, "schema": {"type": "string"}}
                    ],
                    "responses": {
                        **ok("ModelCard", description="The model."),
                        **errors(401, 404, e404="No node serves this model (model_not_found)."),
                    },
                }
            },
            "/v1/chat/completions": _generation(
                "Create a chat completion.", "ChatCompletionRequest", "ChatCompletion", "ChatCompletionChunk"
            ),
            "/v1/completions": _generation(
                "Create a completion.", "CompletionRequest", "Completion", "CompletionChunk"
            ),
            "/tokenize": {
                "post": _tokenizer_op(
                    "Tokenize text or a conversation (vLLM's shape).", "TokenizeRequest", "TokenizeResponse"
                )
            },
            "/detokenize": {
                "post": _tokenizer_op(
                    "Turn token ids back into text (vLLM's shape).", "DetokenizeRequest", "DetokenizeResponse"
                )
            },
            "/tokenizer_info": {
                "get": {
                    **_tokenizer_op(
                        "The model's tokenizer: special tokens, chat template.", None, "TokenizerInfo"
                    ),
                    "parameters": [
                        {
                            "name": "model",
                            "in": "query",
                            "required": False,
                            "schema": {"type": "string", "minLength": 1, "maxLength": 256},
                        }
                    ],
                },
                "post": _tokenizer_op(
                    "The same, the model in a body (how `hearth proxy` seals it).",
                    "TokenizerInfoRequest",
                    "TokenizerInfo",
                ),
            },
            "/openapi.json": get_operation(
                "This document.",
                {"200": {"description": "OpenAPI 3.1.", "content": {"application/json": {"schema": {}}}}},
            ),
            "/healthz": get_operation("Liveness.", ok("Health", description="Serving.")),
            "/metrics": get_operation(
                "Prometheus metrics.",
                {
                    "200": {
                        "description": "Prometheus' text format.",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            ),
            "/v1/directory": get_operation(
                "The node directory: a hash-chained log of node certificates, key statements and "
                "revocations (docs/protocol.md).",
                {**ok("DirectoryPage", description="Entries from `since` on."), **errors(400)},
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
                    "requestBody": {"required": True, "content": json_body("EnrollRequest")},
                    "responses": {
                        **ok("EnrollReply", 201, "Enrolled: pending the operator's approval."),
                        **errors(
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
                    "requestBody": {"required": True, "content": json_body("NodeStatus")},
                    "responses": {
                        **ok("HeartbeatReply", description="Accepted."),
                        **errors(
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
            **_model_paths(),
            **_policy_paths(),
            **_terms_paths(),
            **_accounts_paths(),
        },
    }
