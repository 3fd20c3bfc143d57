"""Pieces of the OpenAPI document shared by its public and admin halves: error answers in OpenAI's shape,
references to the components, and an admin operation's common frame."""

from __future__ import annotations

from typing import Any

from protocol.federation import NODE_ID_PATTERN

STATUS = {
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
RETRY_AFTER = {
    "Retry-After": {"description": "Seconds to wait before trying again.", "schema": {"type": "integer"}}
}
RATE = {"type": "string"}
# What every generation answer carries, as OpenAI sends them (a limit the group does not set is not sent).
ANSWER_HEADERS = {
    "x-request-id": {"description": "The scheduler's id of this request (usage, audit).", "schema": RATE},
    **{
        f"x-ratelimit-{part}-{what}": {
            "description": f"The {part} of the token's {what} per minute.",
            "schema": RATE,
        }
        for what in ("requests", "tokens")
        for part in ("limit", "remaining", "reset")
    },
}


def ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def json_body(name: str) -> dict[str, Any]:
    return {"application/json": {"schema": ref(name)}}


def errors(*statuses: int, **say: str) -> dict[str, Any]:
    """Error answers in OpenAI's shape; ``say`` (``e409="…"``) words one status for this route."""
    out: dict[str, Any] = {}
    for status in statuses:
        out[str(status)] = {
            "description": say.get(f"e{status}", STATUS[status]),
            "content": json_body("ErrorResponse"),
            **({"headers": RETRY_AFTER} if status in (429, 503) else {}),
        }
    return out


def get_operation(summary: str, responses: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"get": {"summary": summary, "responses": responses, **extra}}


# What a node id is (protocol.federation.NodeId); any other is a 404, as an unknown one is.
NODE_ID = [
    {
        "name": "node_id",
        "in": "path",
        "required": True,
        "schema": {"type": "string", "pattern": NODE_ID_PATTERN},
    }
]
DECIDED = errors(
    401, 403, 404, 409, e409="The node is not in a state this decision applies to (wrong_state)."
)


def admin_op(
    summary: str, ok: dict[str, Any], *, body: str | None = None, body_required: bool = True, **more: Any
) -> dict[str, Any]:
    op: dict[str, Any] = {
        "summary": summary,
        "security": [{"bearer": []}],
        "responses": {**ok, **errors(401, 403), **more.pop("errors", {})},
    }
    if body is not None:
        op["requestBody"] = {"required": body_required, "content": json_body(body)}
    if more.pop("node_id", False):
        op["parameters"] = NODE_ID
    op.update(more)
    return op


def ok(name: str, status: int = 200, description: str = "OK.") -> dict[str, Any]:
    return {str(status): {"description": description, "content": json_body(name)}}
