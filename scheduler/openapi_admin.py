"""The admin half of the OpenAPI document (scheduler.openapi): enrollment, nodes and models, the policy,
terms of use, tokens, usage and the audit log."""

from __future__ import annotations

from typing import Any

from protocol.accounts import MAX_AUDIT_ROWS, UsageDimension
from protocol.admin import EnrollmentState
from protocol.schemas import MAX_MODEL_ID_LENGTH
from scheduler.openapi_parts import (
    DECIDED,
    NODE_ID,
    admin_op,
    errors,
    get_operation,
    json_body,
    ok,
    ref,
)


def _admin_paths() -> dict[str, Any]:
    states: list[EnrollmentState] = ["pending", "approved", "rejected", "revoked"]
    body_errors = errors(400, 413)
    return {
        "/admin/enrollment-codes": {
            "post": admin_op(
                "Create a one-time enrollment code for a tier.",
                ok("EnrollmentCode", 201, "Created; the code is shown only now."),
                body="EnrollmentCodeRequest",
                errors=body_errors,
            )
        },
        "/admin/enrollments": {
            "get": admin_op(
                "Nodes that asked to join, and the operator's decisions.",
                ok("EnrollmentList"),
                errors=errors(400, e400="An unknown state."),
                parameters=[{"name": "state", "in": "query", "required": False, "schema": {"enum": states}}],
            )
        },
        "/admin/enrollments/{node_id}/approve": {
            "post": admin_op(
                "Approve a pending node with a certificate the authority signed.",
                ok("Enrollment"),
                body="ApproveRequest",
                node_id=True,
                errors={
                    **body_errors,
                    **DECIDED,
                    **errors(
                        403,
                        e403="Not an admin token, or a certificate another authority issued or whose "
                        "signature does not verify.",
                    ),
                },
            )
        },
        "/admin/enrollments/{node_id}/reject": {
            "post": admin_op("Refuse a pending node.", ok("Enrollment"), node_id=True, errors=DECIDED)
        },
        "/admin/nodes": {"get": admin_op("Approved nodes: health, memory, models, load.", ok("NodeList"))},
        "/admin/nodes/{node_id}/revoke": {
            "post": admin_op(
                "Take a pending or approved node out of the cluster now.",
                ok("Enrollment"),
                node_id=True,
                errors=DECIDED,
            )
        },
        "/admin/nodes/{node_id}/drain": {
            "post": admin_op(
                "Drain a node (or undo it with drain=false).",
                ok("Enrollment"),
                body="DrainRequest",
                body_required=False,  # no body: drain
                node_id=True,
                errors={**body_errors, **errors(404)},
            )
        },
        "/admin/models": {"get": admin_op("Where each model runs.", ok("ModelPlacements"))},
        "/admin/authority": {
            "get": admin_op("The authority key this scheduler trusts, and its own key.", ok("AuthorityKeys"))
        },
        "/admin/queue": {
            "get": admin_op(
                "Requests waiting in the fair queue and running on nodes, and each user's fair-share "
                "standing (metadata only, never a prompt).",
                ok("QueueState"),
            )
        },
    }


# A model id as one path segment ("/" in a Hugging Face id written %2F); one the node did not report is a 404.
_MODEL_ID = {
    "name": "model_id",
    "in": "path",
    "required": True,
    "description": "A model the node reported (GET /admin/nodes), percent-encoded as one segment.",
    "schema": {"type": "string", "minLength": 1, "maxLength": MAX_MODEL_ID_LENGTH},
}


def _model_paths() -> dict[str, Any]:
    """The operator loads or unloads a model on a node (scheduler.admin_models)."""
    node = {
        **errors(404, e404="No such node (not_found), or the node has no such model (model_not_found)."),
        **errors(502, e502="The node answered with something else than an answer or a refusal."),
    }
    return {
        "/admin/nodes/{node_id}/models/{model_id}/load": {
            "post": admin_op(
                "Load one of a node's models now, unloading idle ones first if its memory is short.",
                ok("ModelAction", description="The node took the load: the model's phase now (loading)."),
                body="ModelActionRequest",
                body_required=False,  # no body: no preference of what to evict
                parameters=[*NODE_ID, _MODEL_ID],
                errors={
                    **node,
                    **errors(
                        400,
                        409,
                        413,
                        503,
                        e400="Not a model id, or `evict` names a model the node does not have.",
                        e409="The node is not approved (wrong_state) or not heard from since the scheduler "
                        "started (node_not_heard), or cannot make room for the model (insufficient_memory: "
                        "its other models are busy).",
                        e503="The node is unhealthy or cannot be reached (node_unavailable, "
                        "node_unreachable), or yields to its owner (node_yielding).",
                    ),
                },
            )
        },
        "/admin/nodes/{node_id}/models/{model_id}/unload": {
            "post": admin_op(
                "Unload one of a node's models, freeing its memory.",
                ok("ModelAction", description="Unloaded: the model's phase now (available)."),
                parameters=[*NODE_ID, _MODEL_ID],
                errors={
                    **node,
                    **errors(
                        400,
                        409,
                        503,
                        e400="Not a model id.",
                        e409="The node is not approved (wrong_state) or not heard from (node_not_heard), "
                        "or the model is loading (model_loading) or has work running or waiting "
                        "(model_busy): drain the node first.",
                        e503="The node is unhealthy or cannot be reached (node_unavailable, "
                        "node_unreachable).",
                    ),
                },
            )
        },
    }


def _policy_paths() -> dict[str, Any]:
    return {
        "/v1/policy": get_operation(
            "The rules that apply to the caller: group, limits, course prompt, counters, terms.",
            {**ok("CallerPolicy"), **errors(401, 403)},
            security=[{"bearer": []}],
        ),
        "/admin/policy": {
            "get": admin_op("The policy in force, each group's rules as they apply.", ok("PolicyState")),
            "put": admin_op(
                "Replace the policy file: validated, written and applied at once (audited).",
                ok("PolicyState"),
                body="PolicyUpdate",
                errors={
                    **errors(400, 413, e400="Not a valid policy: the message names the line and field."),
                    **errors(409, e409="The policy changed since `digest` (policy_changed)."),
                },
            ),
        },
        "/admin/policy/reload": {
            "post": admin_op(
                "Read the policy file now, as the watcher would, and apply it if it is good (audited).",
                ok("PolicyState", description="The policy in force after the reload."),
                errors=errors(
                    400,
                    409,
                    e400="The file is not a valid policy (invalid_policy): the message names the line and "
                    "field, and the policy in force stays.",
                    e409="This scheduler has no policy file (no_policy_file).",
                ),
            )
        },
        "/admin/events": {
            "get": admin_op(
                "Live events (server-sent events, metadata only): nodes joining, leaving and yielding, "
                "requests admitted, refused and finished, policy reloads.",
                {
                    "200": {
                        "description": "An endless stream; each event's `data` is an AdminEvent.",
                        "content": {"text/event-stream": {"schema": {"type": "object", "properties": {
                            "data": {"type": "string", "contentMediaType": "application/json",
                                     "contentSchema": ref("AdminEvent")}}}}},
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
                "responses": {**ok("TermsDocument"), **errors(401)},
            }
        },
        "/v1/terms/accept": {
            "post": {
                "summary": "Accept the terms of use in force (accepting them again changes nothing).",
                "security": [{"bearer": []}],
                "requestBody": {"required": True, "content": json_body("TermsAcceptRequest")},
                "responses": {
                    **ok("TermsDocument", description="Accepted: the terms, as GET /v1/terms shows them."),
                    **errors(
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
            "get": admin_op("Which version of the terms each token accepted.", ok("TermsStatusList"))
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
    body_errors = errors(400, 413)
    dimensions: list[UsageDimension] = ["user", "group", "model", "node", "day"]
    return {
        "/admin/tokens": {
            "post": admin_op(
                "Create an API token in a policy group.",
                ok("TokenSecret", 201, "Created; the secret is shown only now."),
                body="TokenCreateRequest",
                errors=errors(400, 413, e400="A field is invalid, or the group is not in the policy."),
            ),
            "get": admin_op(
                "Every token: scope, group, state, expiry, last use, tokens used this month.",
                ok("TokenList"),
            ),
        },
        "/admin/tokens/{token_id}/revoke": {
            "post": admin_op(
                "Revoke a token: refused from its next request on.",
                ok("Token"),
                parameters=_TOKEN_ID,
                errors=errors(404),
            )
        },
        "/admin/tokens/{token_id}/rotate": {
            "post": admin_op(
                "Give a token a new secret (same id, group and usage); the old one stops now or after a "
                "grace period.",
                ok("TokenSecret", description="The new secret, shown only now."),
                body="TokenRotateRequest",
                body_required=False,  # no body: no grace
                parameters=_TOKEN_ID,
                errors={
                    **body_errors,
                    **errors(404, 409, e409="The token is revoked (wrong_state)."),
                },
            )
        },
        "/admin/usage": {
            "get": admin_op(
                "Usage totals by user (token), group, model, node or day (metadata only).",
                ok("UsageReport"),
                errors=errors(400, e400="An unknown dimension (by) or a malformed duration (since)."),
                parameters=[
                    {"name": "by", "in": "query", "required": False, "schema": {"enum": dimensions}},
                    _SINCE,
                ],
            )
        },
        "/admin/audit": {
            "get": admin_op(
                "The audit log: who changed what, when and from where (oldest first).",
                ok("AuditLog"),
                errors=errors(400, e400="A malformed duration (since) or limit."),
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
