"""The OpenAPI 3.1 document of the public API, generated from the same pydantic models that validate it."""

from __future__ import annotations

from functools import cache
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from protocol.federation import EnrollReply, EnrollRequest, HeartbeatReply, NodeStatus
from protocol.schemas import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    ErrorResponse,
    ModelList,
)

VERSION = "0.1.0"
_MODELS: list[type[BaseModel]] = [
    ChatCompletionRequest,
    CompletionRequest,
    ChatCompletion,
    ChatCompletionChunk,
    Completion,
    ModelList,
    ErrorResponse,
    EnrollRequest,
    EnrollReply,
    NodeStatus,
    HeartbeatReply,
]
_VALIDATED = {"ChatCompletionRequest", "CompletionRequest", "EnrollRequest", "NodeStatus"}

# The admin API (admin-scope tokens): method, path, summary.
_ADMIN = [
    ("post", "/admin/enrollment-codes", "Create a one-time enrollment code for a tier."),
    ("get", "/admin/enrollments", "Nodes that asked to join, and the operator's decisions."),
    ("post", "/admin/enrollments/{node_id}/approve", "Approve with a certificate the authority signed."),
    ("post", "/admin/enrollments/{node_id}/reject", "Refuse a pending node."),
    ("get", "/admin/nodes", "Approved nodes: health, memory, models, load."),
    ("post", "/admin/nodes/{node_id}/revoke", "Take a node out of the cluster now."),
    ("post", "/admin/nodes/{node_id}/drain", "Drain a node (or undo it with drain=false)."),
    ("get", "/admin/models", "Where each model runs."),
    ("get", "/admin/authority", "The authority key this scheduler trusts, and its own key."),
]


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _errors(*statuses: int) -> dict[str, Any]:
    descriptions = {
        400: "Invalid request (bad JSON, wrong field, context_length_exceeded).",
        401: "Missing, invalid or revoked API token.",
        403: "Refused by policy or by the node's state (pending, revoked).",
        404: "Unknown model (model_not_found) or node.",
        409: "The node id belongs to another machine.",
        422: "The request can never run here (model larger than every node, for example).",
        413: "Request body over the size limit.",
        503: "No node can take the request now; see Retry-After.",
    }
    return {
        str(s): {
            "description": descriptions[s],
            "content": {"application/json": {"schema": _ref("ErrorResponse")}},
        }
        for s in statuses
    }


def _generation(summary: str, request: str, response: str, chunk: str) -> dict[str, Any]:
    return {
        "post": {
            "summary": summary,
            "security": [{"bearer": []}],
            "requestBody": {"required": True, "content": {"application/json": {"schema": _ref(request)}}},
            "responses": {
                "200": {
                    "description": f"A {response} (stream=false) or server-sent events of {chunk} objects "
                    "ending with `data: [DONE]` (stream=true).",
                    "content": {
                        "application/json": {"schema": _ref(response)},
                        "text/event-stream": {"schema": _ref(chunk)},
                    },
                },
                **_errors(400, 401, 403, 404, 413, 422, 503),
            },
        }
    }


@cache
def openapi_document() -> dict[str, Any]:
    _, schemas = models_json_schema(
        [(m, "validation" if m.__name__ in _VALIDATED else "serialization") for m in _MODELS],
        ref_template="#/components/schemas/{model}",
    )
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Hearth",
            "version": VERSION,
            "description": "OpenAI-compatible API of a Hearth scheduler.",
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
                    "responses": {
                        "200": {
                            "description": "The models.",
                            "content": {"application/json": {"schema": _ref("ModelList")}},
                        },
                        **_errors(401),
                    },
                }
            },
            "/v1/chat/completions": _generation(
                "Create a chat completion.", "ChatCompletionRequest", "ChatCompletion", "ChatCompletionChunk"
            ),
            "/v1/completions": _generation(
                "Create a completion.", "CompletionRequest", "Completion", "Completion"
            ),
            "/openapi.json": {
                "get": {"summary": "This document.", "responses": {"200": {"description": "OpenAPI 3.1."}}}
            },
            "/healthz": {"get": {"summary": "Liveness.", "responses": {"200": {"description": "Serving."}}}},
            "/metrics": {
                "get": {"summary": "Prometheus metrics.", "responses": {"200": {"description": "Metrics."}}}
            },
            "/v1/directory": {
                "get": {
                    "summary": "The node directory: a hash-chained log of node certificates, key statements "
                    "and revocations (docs/protocol.md).",
                    "parameters": [
                        {
                            "name": "since",
                            "in": "query",
                            "required": False,
                            "schema": {"type": "integer", "minimum": 0},
                        },
                    ],
                    "responses": {
                        "200": {"description": "Entries, head, authority key, placement hints."},
                        **_errors(400),
                    },
                }
            },
            "/v1/enroll": {
                "post": {
                    "summary": "A node redeems a one-time enrollment code (then waits for approval).",
                    "requestBody": {"required": True, "content": _json("EnrollRequest")},
                    "responses": {
                        "201": {"description": "Enrolled.", "content": _json("EnrollReply")},
                        **_errors(400, 403, 409),
                    },
                }
            },
            "/v1/nodes/heartbeat": {
                "post": {
                    "summary": "An approved node's status, signed with its identity key "
                    "(X-Hearth-* headers).",
                    "requestBody": {"required": True, "content": _json("NodeStatus")},
                    "responses": {
                        "200": {"description": "Accepted.", "content": _json("HeartbeatReply")},
                        **_errors(401, 403),
                    },
                }
            },
            **_admin_paths(),
        },
    }


def _json(name: str) -> dict[str, Any]:
    return {"application/json": {"schema": _ref(name)}}


def _admin_paths() -> dict[str, Any]:
    paths: dict[str, Any] = {}
    for method, path, summary in _ADMIN:
        op: dict[str, Any] = {
            "summary": summary,
            "security": [{"bearer": []}],
            "responses": {"200": {"description": "JSON."}, **_errors(400, 401, 403, 404)},
        }
        if "{node_id}" in path:
            op["parameters"] = [
                {"name": "node_id", "in": "path", "required": True, "schema": {"type": "string"}}
            ]
        paths.setdefault(path, {})[method] = op
    return paths
