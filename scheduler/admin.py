"""The admin API (admin-scope tokens only): enrollment codes, approvals, nodes and models.

    POST /admin/enrollment-codes               {tier, ttl_seconds?, note?} → {code, tier, expires}
    GET  /admin/enrollments                    nodes waiting for approval (and those decided)
    POST /admin/enrollments/{node_id}/approve  {certificate}: signed by the operator's authority key
    POST /admin/enrollments/{node_id}/reject
    GET  /admin/nodes                          approved nodes with health, memory, models and load
    POST /admin/nodes/{node_id}/revoke         no more work from now; the node is told at its heartbeat
    POST /admin/nodes/{node_id}/drain          {drain: true|false}: finish running jobs, take no new ones
    GET  /admin/models                         where each model runs
    GET  /admin/authority                      the authority key this scheduler trusts, and its own key
    GET  /admin/queue                          requests waiting and running, fair shares (admin_queue)
         /admin/nodes/{node_id}/models/{model_id}/load, …/unload   (scheduler.admin_models)
         /admin/tokens, /admin/usage, /admin/audit  accounts (scheduler.admin_accounts)

The scheduler cannot approve a node by itself: approval needs a certificate signed by the federation
authority, whose private key stays with the operator (`hearth enroll approve` signs it on their machine).
"""

from __future__ import annotations

import time
from typing import Any, get_args

from aiohttp import web

from protocol.admin import (
    ApproveRequest,
    AuthorityKeys,
    DrainRequest,
    Enrollment,
    EnrollmentCode,
    EnrollmentCodeRequest,
    EnrollmentList,
    EnrollmentState,
    ModelHost,
    ModelPlacement,
    ModelPlacements,
    Node,
    NodeList,
    NodeModel,
)
from protocol.errors import InvalidRequest, NotFound, ProtocolError
from protocol.identity import verify_certificate
from scheduler import admin_accounts, admin_models, admin_queue
from scheduler.admin_http import admin_token as _admin
from scheduler.admin_http import body as _body
from scheduler.admin_http import origin
from scheduler.admin_http import reply as _reply
from scheduler.state import ADMISSION, FEDERATION, SETTINGS, STORE


def add_routes(app: web.Application) -> None:
    app.router.add_post("/admin/enrollment-codes", create_code)
    app.router.add_get("/admin/enrollments", list_enrollments)
    app.router.add_post("/admin/enrollments/{node_id}/approve", approve)
    app.router.add_post("/admin/enrollments/{node_id}/reject", reject)
    app.router.add_get("/admin/nodes", list_nodes)
    app.router.add_post("/admin/nodes/{node_id}/revoke", revoke)
    app.router.add_post("/admin/nodes/{node_id}/drain", drain)
    app.router.add_get("/admin/models", list_models)
    app.router.add_get("/admin/authority", authority)
    admin_accounts.add_routes(app)
    admin_queue.add_routes(app)
    admin_models.add_routes(app)


async def create_code(request: web.Request) -> web.Response:
    token = await _admin(request)
    body = await _body(request, EnrollmentCodeRequest)
    ttl = body.ttl_seconds if body.ttl_seconds is not None else request.app[SETTINGS].enrollment_code_ttl
    store = request.app[STORE]
    code, expires = await store.write(
        lambda db: db.create_code(body.tier, ttl, body.note, actor=token.id, origin=origin(request))
    )
    return _reply(EnrollmentCode(code=code, tier=body.tier, expires=expires), status=201)


def _record_fields(request: web.Request, node_id: str) -> dict[str, Any]:
    fed = request.app[FEDERATION]
    record = fed.records[node_id]
    doc: dict[str, Any] = {
        "node_id": record.node_id,
        "state": record.state,
        "source": record.source,
        "tier": record.tier,
        "fingerprint": record.fingerprint,
        "identity_key": record.identity_key,
        "encryption_key": record.encryption_key,
        "url": record.url,
        "drain": record.drain,
        "created": record.created,
        "updated": record.updated,
    }
    status = fed.pending_status.get(node_id)
    runtime = fed.registry.nodes.get(node_id)
    if runtime is not None and runtime.status is not None:
        status = runtime.status
    if status is not None:
        doc["gpus"] = status.gpus
        doc["memory_total_bytes"] = status.memory_total_bytes
        doc["memory_free_bytes"] = status.memory_free_bytes
        doc["models"] = [m.id for m in status.models]
    return doc


def _enrollment(request: web.Request, node_id: str) -> Enrollment:
    return Enrollment(**_record_fields(request, node_id))


async def list_enrollments(request: web.Request) -> web.Response:
    await _admin(request)
    state = request.query.get("state")
    if state is not None and state not in get_args(EnrollmentState):
        raise InvalidRequest(f"state must be one of {', '.join(get_args(EnrollmentState))}", param="state")
    records = request.app[FEDERATION].records.values()
    docs = [_enrollment(request, r.node_id) for r in records if state in (None, r.state)]
    return _reply(EnrollmentList(enrollments=sorted(docs, key=lambda d: d.created)))


def _known(request: web.Request) -> str:
    node_id = request.match_info["node_id"]
    if node_id not in request.app[FEDERATION].records:
        raise NotFound(f"no node or enrollment called {node_id} (see `hearth enroll list`)")
    return node_id


async def approve(request: web.Request) -> web.Response:
    token = await _admin(request)
    node_id = _known(request)
    fed = request.app[FEDERATION]
    if fed.authority_key is None:
        raise InvalidRequest(
            "this scheduler trusts no authority yet: set scheduler.authority_key to the key printed by "
            "`hearth authority init`, then restart it",
            code="no_authority",
        )
    body = await _body(request, ApproveRequest)
    try:
        cert = verify_certificate(body.certificate, fed.authority_key)
    except ProtocolError as exc:  # the operator's document, not a peer's: their mistake to fix
        raise InvalidRequest(f"malformed certificate: {exc.message}", param="certificate") from None
    record = fed.records[node_id]
    if (cert.node_id, cert.identity_key, cert.encryption_key, cert.tier) != (
        record.node_id, record.identity_key, record.encryption_key, record.tier,
    ) or cert.scheduler_key != fed.identity.public_b64:  # fmt: skip
        raise InvalidRequest("the certificate does not match this enrollment", param="certificate")
    store = request.app[STORE]
    record = await store.write(
        lambda db: db.set_node_state(
            node_id,
            "approved",
            certificate=body.certificate,
            allowed_from=("pending",),
            actor=token.id,
            origin=origin(request),
        )
    )
    fed.remember(record)
    if record.source == "discovered":
        fed.push_certificate(node_id, _public_url(request))
    return _reply(_enrollment(request, node_id))


def _public_url(request: web.Request) -> str:
    return f"{request.scheme}://{request.host}"


async def _set_state(
    request: web.Request, state: EnrollmentState, allowed_from: tuple[EnrollmentState, ...]
) -> web.Response:
    token = await _admin(request)
    node_id = _known(request)
    fed = request.app[FEDERATION]
    store = request.app[STORE]
    record = await store.write(
        lambda db: db.set_node_state(
            node_id, state, allowed_from=allowed_from, actor=token.id, origin=origin(request)
        )
    )
    fed.remember(record)
    if state == "revoked":
        await fed.directory.revoked(node_id)  # proxies stop sealing to it at their next fetch
    request.app[ADMISSION].wake()
    return _reply(_enrollment(request, node_id))


async def reject(request: web.Request) -> web.Response:
    return await _set_state(request, "rejected", ("pending",))


async def revoke(request: web.Request) -> web.Response:
    return await _set_state(request, "revoked", ("approved", "pending"))


async def drain(request: web.Request) -> web.Response:
    token = await _admin(request)
    node_id = _known(request)
    flag = (await _body(request, DrainRequest)).drain
    store = request.app[STORE]
    fed = request.app[FEDERATION]
    record = await store.write(
        lambda db: db.set_node_drain(node_id, flag, actor=token.id, origin=origin(request))
    )
    fed.remember(record)
    fed.registry.set_drain(node_id, flag)
    return _reply(_enrollment(request, node_id))


async def list_nodes(request: web.Request) -> web.Response:
    await _admin(request)
    fed = request.app[FEDERATION]
    snapshot = fed.registry.snapshot()
    now = time.monotonic()
    nodes = []
    for state in snapshot.nodes:
        runtime = fed.registry.nodes[state.node_id]
        key = fed.directory.keys.get(state.node_id)
        fields = _record_fields(request, state.node_id)
        fields.pop("models", None)  # here: each model's state, not only its id
        nodes.append(
            Node(
                **fields,
                healthy=state.healthy,
                draining=state.draining,
                yielding=state.yielding,
                yield_reason=state.yield_reason,
                last_heartbeat_seconds=None if runtime.status is None else round(now - runtime.last_seen, 1),
                # The node's own alarm: the directory does not show its current encryption key.
                alarm=runtime.status.alarm if runtime.status is not None else None,
                key_id=key.key_id if key is not None else None,
                models=[NodeModel.model_validate(m, from_attributes=True) for m in state.models],
            )
        )
    return _reply(NodeList(nodes=nodes, queued=request.app[ADMISSION].queued))


async def list_models(request: web.Request) -> web.Response:
    await _admin(request)
    where: dict[str, list[ModelHost]] = {}
    for node in request.app[FEDERATION].registry.snapshot().nodes:
        for m in node.models:
            where.setdefault(m.id, []).append(
                ModelHost(node_id=node.node_id, phase=m.phase, active=m.active, healthy=node.healthy)
            )
    return _reply(ModelPlacements(models=[ModelPlacement(id=k, nodes=where[k]) for k in sorted(where)]))


async def authority(request: web.Request) -> web.Response:
    await _admin(request)
    fed = request.app[FEDERATION]
    return _reply(AuthorityKeys(authority_key=fed.authority_key, scheduler_key=fed.identity.public_b64))
