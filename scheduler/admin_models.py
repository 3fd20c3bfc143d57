"""The operator loads and unloads models on a node (admin tokens only; the console's Models keys).

    POST /admin/nodes/{node_id}/models/{model_id}/load     {evict?}: load one of the node's models now
    POST /admin/nodes/{node_id}/models/{model_id}/unload   free its memory (refused while it has work)

A load goes the way a cold load goes (scheduler.federation.Federation.ask_load): the registry is told
first, so admission knows a load is under way and waits for it rather than asking again, and a refusal
ends it there. The scheduler calls only a model the node itself reported, as one path segment of the
signed call. Each change the node accepted is written to the audit log.
"""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from protocol.admin import ModelAction, ModelActionRequest
from protocol.errors import (
    ConflictError,
    HearthError,
    InvalidRequest,
    ModelNotFound,
    NotFound,
    Unavailable,
    UpstreamFailed,
)
from protocol.federation import NodeStatus
from protocol.schemas import MAX_MODEL_ID_LENGTH
from scheduler.admin_http import admin_token, body, origin, reply
from scheduler.federation import Federation, answered_phase
from scheduler.state import FEDERATION, SETTINGS, STORE

MAX_NODE_MESSAGE = 300  # of a node's own error message, passed on to the operator


def add_routes(app: web.Application) -> None:
    app.router.add_post("/admin/nodes/{node_id}/models/{model_id}/load", load)
    app.router.add_post("/admin/nodes/{node_id}/models/{model_id}/unload", unload)


async def load(request: web.Request) -> web.Response:
    token = await admin_token(request)
    node_id, model, status = _target(request)
    evict = tuple((await body(request, ModelActionRequest)).evict)
    offered = {m.id for m in status.models}
    unknown = [e for e in evict if e not in offered]
    if unknown:
        raise InvalidRequest(f"{node_id} has no model called {unknown[0]!r} to evict", param="evict")
    fed = request.app[FEDERATION]
    if not fed.registry.start_load(node_id, model):
        return reply(ModelAction(node_id=node_id, model=model, phase="loading"))  # already under way
    code, doc = await fed.ask_load(node_id, model, evict)
    if code not in (200, 202):
        raise _refusal(request, "load", code, doc)
    detail = model + (f" (evict {', '.join(evict)})" if evict else "")
    await _audit(request, "model_load", node_id, detail, token.id)
    return reply(ModelAction(node_id=node_id, model=model, phase=answered_phase(doc)))


async def unload(request: web.Request) -> web.Response:
    token = await admin_token(request)
    node_id, model, _ = _target(request)
    fed = request.app[FEDERATION]
    mine = fed.registry.nodes[node_id].inflight.get(model)
    if mine is not None and mine.active > 0:  # sent there, and perhaps not arrived yet
        raise _busy(node_id, model)
    node = next((n for n in fed.registry.snapshot().nodes if n.node_id == node_id), None)
    seen = node.model(model) if node is not None else None
    if seen is not None and seen.phase == "loading":
        # A node cannot stop a load half way (its thread runs on), and the model would be ready after all.
        raise ConflictError(
            f"{model} is still loading on {node_id}: unload it once it is ready", code="model_loading"
        )
    code, doc = await fed.ask_unload(node_id, model)
    if code != 200:
        raise _refusal(request, "unload", code, doc)
    await _audit(request, "model_unload", node_id, model, token.id)
    return reply(ModelAction(node_id=node_id, model=model, phase=answered_phase(doc)))


def _target(request: web.Request) -> tuple[str, str, NodeStatus]:
    """The node and model a call names, once the node can be called about it: its last status."""
    model = request.match_info["model_id"]
    # aiohttp decodes the segment ("%2F" is "/"); the id goes to the node as one segment again.
    if len(model) > MAX_MODEL_ID_LENGTH or not model.isprintable() or model in (".", ".."):
        raise InvalidRequest(
            f"not a model id: at most {MAX_MODEL_ID_LENGTH} printable characters", param="model_id"
        )
    node_id = request.match_info["node_id"]
    fed = request.app[FEDERATION]
    record = fed.records.get(node_id)
    if record is None:
        raise NotFound(f"no node or enrollment called {node_id} (see `hearth enroll list`)")
    if record.state != "approved":
        raise ConflictError(
            f"the node {node_id} is {record.state}: only an approved node loads models", code="wrong_state"
        )
    status = _heard(fed, node_id, request.app[SETTINGS].retry_after)
    if not any(m.id == model for m in status.models):
        have = ", ".join(sorted(m.id for m in status.models)) or "none"
        raise ModelNotFound(
            f"the node {node_id} has no model called {model!r} (it has: {have})",
            param="model_id",
            code="model_not_found",
        )
    return node_id, model, status


def _heard(fed: Federation, node_id: str, retry_after: float) -> NodeStatus:
    runtime = fed.registry.nodes.get(node_id)
    if runtime is None or runtime.status is None or runtime.url is None:
        # Nothing failed (a node approved but not started, or not heard since the scheduler started): what
        # it serves is unknown until its first heartbeat, a second after it runs.
        raise ConflictError(
            f"the node {node_id} has not been heard from since the scheduler started: start it "
            "(`hearth node start`), or try again once it sends its first heartbeat",
            code="node_not_heard",
        )
    if not fed.registry.healthy(node_id):
        silent = time.monotonic() - runtime.last_seen
        raise Unavailable(
            f"the node {node_id} is not healthy (last heard from {silent:.0f} s ago, or its last call "
            "failed); try again once it is back",
            code="node_unavailable",
            retry_after=retry_after,
        )
    return runtime.status


def _refusal(request: web.Request, action: str, code: int, doc: Any) -> HearthError:
    """The operator's error for a node's refusal, in the scheduler's words with the node's reason."""
    node_id, model = request.match_info["node_id"], request.match_info["model_id"]
    said, why = _node_says(doc)
    if code == 503 and action == "unload" and said in ("model_busy", "no_capacity"):
        return _busy(node_id, model)  # a node of an earlier version says no_capacity
    if code == 404:
        return ModelNotFound(f"the node {node_id} says it has no model {model!r}", param="model_id")
    if code == 409:
        return ConflictError(f"the node {node_id} cannot {action} {model}: {why}", code=said or "conflict")
    if code == 503:
        return Unavailable(
            f"the node {node_id} cannot {action} {model} now: {why}",
            code=said or "node_unavailable",
            retry_after=request.app[SETTINGS].retry_after,
        )
    return UpstreamFailed(f"the node {node_id} answered the {action} of {model} with {code}: {why}")


def _busy(node_id: str, model: str) -> ConflictError:
    """Unloading a model with jobs running or waiting would fail them: the operator drains first."""
    return ConflictError(
        f"{model} has work running on {node_id}: drain the node first "
        f"(POST /admin/nodes/{node_id}/drain) and unload it once its jobs have ended",
        code="model_busy",
    )


def _node_says(doc: Any) -> tuple[str | None, str]:
    """A node's error (code, message), bounded: a volunteer's node is not trusted to be brief."""
    err = doc.get("error") if isinstance(doc, dict) else None
    if not isinstance(err, dict):
        return None, "no reason given"
    message = str(err.get("message") or "no reason given")
    message = "".join(c for c in message if c.isprintable())[:MAX_NODE_MESSAGE]
    code = err.get("code")
    ok = isinstance(code, str) and code.isascii() and code.isidentifier() and len(code) <= 64
    return (code if ok else None), message


async def _audit(request: web.Request, action: str, node_id: str, detail: str, actor: str) -> None:
    where = origin(request)
    await request.app[STORE].write(lambda db: db.audit(action, node_id, detail, actor=actor, origin=where))
