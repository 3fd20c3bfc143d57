"""The node agent's HTTP API (aiohttp).

    GET  /healthz                 liveness, no auth
    GET  /identity                this node's public keys, self-signed (for LAN discovery), no auth
    GET  /status                  models, their state and load                     (scheduler only)
    GET  /metrics                 Prometheus metrics                               (scheduler only)
    GET  /local/status            what the node does and why, for `hearth node status` (this machine only)
    POST /jobs                    run one OpenAI request (plaintext over loopback only); answered as frames
                                                                                   (scheduler only)
    POST /models/{id}/load        load a model now, unloading idle ones if needed  (scheduler only)
    POST /models/{id}/unload      free a model's memory                           (scheduler only)
    POST /drain                   {"drain": bool}: finish running jobs, take none  (scheduler only)
    POST /certificate             a LAN node's certificate after approval          (its scheduler only)

"Scheduler only" means signed by the scheduler key this node pinned at enrollment, addressed to this node,
fresh and never seen before (protocol.identity); anything else gets 401 and changes nothing.

Only the node sees prompt text: POST /jobs (node.jobs) validates the request, applies the job's rules
(node.rules), renders the chat template, fits the context (node.prepare), generates, and writes the
client's bytes itself. A sealed job (node.sealed) is opened there and its answer sealed there: the
scheduler relays ciphertext. This module wires the parts; what they share is node.state.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from hardware.probe import NodeProbe
from hardware.probe import probe as probe_gpus
from node.backends import load_backend
from node.heartbeat import (
    advertise_ctx,
    check_directory,
    heartbeat_loop,
    memory_pool,
    rotate_keys,
    status_doc,
)
from node.jobs import submit_job
from node.keys import NodeKeys, ReplayMemory
from node.metrics import NodeMetrics
from node.owner import OwnerFirst
from node.pool import BackendLoader, ModelPool
from node.settings import ModelSettings, NodeSettings
from node.state import LOADER, METRICS, PROBE, SETTINGS, STATE, TRUST, NodeState, authorize
from node.trust import Enrollment, Trust
from protocol.errors import (
    AuthenticationFailed,
    HearthError,
    InvalidRequest,
    PermissionDenied,
    Unavailable,
)
from protocol.identity import b64d, b64e, verify_certificate, write_private
from protocol.web import error_middleware, is_loopback, json_response, parse_json, read_body

log = logging.getLogger("hearth.node")


def load_transformers(model: ModelSettings, settings: NodeSettings) -> Any:
    """The reference backend, whatever the node's settings say (tests wrap it)."""
    from node.backends.transformers_backend import TransformersBackend

    assert model.path is not None, "the pool gives loaders a local path"
    return TransformersBackend.load(model.path, threads=settings.threads)


def create_app(
    settings: NodeSettings,
    *,
    trust: Trust | None = None,
    loader: BackendLoader = load_backend,
    probe: Callable[[], NodeProbe] = probe_gpus,
) -> web.Application:
    """``probe`` reads the GPUs for owner-first yielding (tests hand in recorded probes)."""
    app = web.Application(middlewares=[error_middleware], client_max_size=settings.max_body_bytes)
    app[SETTINGS] = settings
    app[LOADER] = loader
    app[PROBE] = probe
    if trust is not None:
        app[TRUST] = trust
    app[METRICS] = NodeMetrics(lambda: _load_figures(app))
    app.cleanup_ctx.append(_node_ctx)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/identity", identity)
    app.router.add_get("/status", status)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/local/status", local_status)
    app.router.add_post("/jobs", submit_job)
    app.router.add_post("/models/{model_id}/load", load_model)
    app.router.add_post("/models/{model_id}/unload", unload_model)
    app.router.add_post("/drain", drain)
    app.router.add_post("/certificate", certificate)
    return app


def _load_figures(app: web.Application) -> list[tuple[str, int, int]]:
    state = app.get(STATE)
    if state is None:
        return []
    return [(s.id, s.runner.active, s.runner.queued) for s in state.pool.slots.values() if s.runner]


async def _node_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    trust = app.get(TRUST)
    if trust is None:
        trust = await asyncio.to_thread(Trust.open, _data_dir(settings))
    if trust.enrollment is not None and trust.enrollment.node_id != settings.node_id:
        # The name the node enrolled under is the one its certificate and heartbeats carry.
        settings = settings.model_copy(update={"node_id": trust.enrollment.node_id})
    total, gpus = await asyncio.to_thread(memory_pool, settings)
    pool = await asyncio.to_thread(ModelPool, settings, app[LOADER], total, gpus)
    data_dir = _data_dir(settings)
    keys = await asyncio.to_thread(
        NodeKeys, data_dir, trust.identity, settings.node_id, rotation_s=settings.key_rotation
    )
    replay = await asyncio.to_thread(ReplayMemory, data_dir / "e2e" / "replay.log")
    state = NodeState(settings, trust, pool, trust.verifier(settings.node_id), keys, replay)
    pool.on_change = state.touch
    app[STATE] = state
    tier = trust.enrollment.tier if trust.enrollment else settings.tier
    state.owner = OwnerFirst(settings.owner_first, tier=tier, own_pids={os.getpid()}, probe=app[PROBE])
    await state.owner.look(state)  # a node started while its owner needs the machine loads nothing yet
    if state.owner.yielding:
        state.owner.hold_at_start([s.id for s in pool.slots.values() if s.settings.preload])
    else:
        pool.start()
    tasks = [
        asyncio.create_task(heartbeat_loop(state), name="hearth-heartbeat"),
        asyncio.create_task(state.owner.run(state), name="hearth-owner-first"),
        asyncio.create_task(rotate_keys(state), name="hearth-key-rotation"),
        asyncio.create_task(check_directory(state), name="hearth-directory-check"),
    ]
    async with advertise_ctx(state):
        yield
    with contextlib.suppress(OSError):
        _run_file(settings).unlink()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await pool.close()
    replay.close()


def _data_dir(settings: NodeSettings) -> Path:
    if settings.data_dir is None:
        raise HearthError("the node has no data dir (set node.data_dir)")
    return settings.data_dir


def _run_file(settings: NodeSettings) -> Path:
    return _data_dir(settings) / "run.json"


async def start_node(
    settings: NodeSettings,
    *,
    trust: Trust | None = None,
    loader: BackendLoader = load_backend,
    probe: Callable[[], NodeProbe] = probe_gpus,
) -> tuple[web.AppRunner, str, web.Application]:
    """Serve a node; its heartbeats and adverts start once its address is known."""
    from protocol.web import start_site

    app = create_app(settings, trust=trust, loader=loader, probe=probe)
    runner, url = await start_site(app, settings.host, settings.port, settings.http)
    state = app[STATE]
    state.url = settings.public_url or url
    state.listening.set()
    # Where `hearth node status` on this box finds the running node.
    run = {"url": url, "pid": os.getpid(), "node_id": state.settings.node_id}
    await asyncio.to_thread(write_private, _run_file(state.settings), json.dumps(run).encode(), replace=True)
    return runner, url, app


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def identity(request: web.Request) -> web.Response:
    state = request.app[STATE]
    trust = state.trust
    node_id = state.settings.node_id
    ident, enc = trust.identity.public_b64, trust.encryption_public
    signed = f"hearth-identity-v1\n{node_id}\n{ident}\n{enc}".encode()
    return json_response(
        {
            "node_id": node_id,
            "tier": state.settings.tier,
            "identity_key": ident,
            "encryption_key": enc,
            "fingerprint": trust.identity.fingerprint,
            "signature": b64e(trust.identity.sign(signed)),
        }
    )


async def metrics(request: web.Request) -> web.Response:
    await authorize(request)
    return web.Response(body=request.app[METRICS].render(), content_type="text/plain", charset="utf-8")


async def status(request: web.Request) -> web.Response:
    state = await authorize(request)
    return json_response(status_doc(state))


async def local_status(request: web.Request) -> web.Response:
    """The node's status for its own box: what `hearth node status` prints. Loopback only, no key needed
    (it holds nothing a local user could not read from the node's log)."""
    # From this machine: over loopback, or to the node's own address from that same address (a node bound to
    # its LAN address is reached so; the kernel keeps such a connection on the machine).
    own = request.transport.get_extra_info("sockname") if request.transport else None
    if not is_loopback(request.remote) and not (own and request.remote == own[0]):
        raise PermissionDenied("this status is for the node's own machine only")
    state = request.app[STATE]
    doc = status_doc(state)
    doc.pop("key_statement", None)
    doc.pop("usage", None)
    doc["backend"] = state.pool.backend
    doc["enrolled_with"] = state.trust.enrollment.scheduler_url if state.trust.enrollment else None
    doc["owner_first"] = state.owner.doc() if state.owner else None
    return json_response(doc)


async def _object(request: web.Request) -> tuple[NodeState, dict[str, Any]]:
    raw = await read_body(request)
    state = await authorize(request, raw)
    body = parse_json(raw) if raw else {}
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    return state, body


async def load_model(request: web.Request) -> web.Response:
    state, body = await _object(request)
    state.refuse_if_yielding()
    evict = body.get("evict", [])
    if not isinstance(evict, list) or not all(isinstance(e, str) for e in evict):
        raise InvalidRequest("evict must be a list of model ids", param="evict")
    phase = state.pool.request_load(request.match_info["model_id"], tuple(evict))
    return json_response({"phase": phase}, status=202)


async def unload_model(request: web.Request) -> web.Response:
    state, _ = await _object(request)
    slot = state.pool.get(request.match_info["model_id"])
    if slot.busy:
        raise Unavailable(f"{slot.id} has work running; drain first", code="model_busy", retry_after=5)
    state.pool.unload(slot.id)
    return json_response({"phase": slot.phase})


async def drain(request: web.Request) -> web.Response:
    state, body = await _object(request)
    flag = body.get("drain", True)
    if not isinstance(flag, bool):
        raise InvalidRequest("drain must be true or false", param="drain")
    state.draining = flag
    state.touch()
    return json_response({"draining": flag})


async def certificate(request: web.Request) -> web.Response:
    """A LAN node approved without a code learns its scheduler here, from a certificate its pinned
    authority signed; the call must be signed by the scheduler that certificate names."""
    state = request.app[STATE]
    settings = state.settings
    raw = await read_body(request)
    authority = settings.authority_key
    if authority is None:
        raise PermissionDenied("this node pins no authority key; enroll it with `hearth node enroll`")
    try:
        doc = json.loads(raw)
        cert = verify_certificate(doc.get("certificate"), authority)
        scheduler_url = str(doc["scheduler_url"])
    except (ValueError, AttributeError, KeyError, TypeError):
        raise AuthenticationFailed("malformed certificate") from None
    except HearthError:
        raise AuthenticationFailed("the certificate is not signed by this node's authority") from None
    state.offered_key = b64d(cert.scheduler_key, length=32)
    state.cert_verifier.verify(request.method, request.path_qs, request.headers, raw)
    if cert.node_id != settings.node_id:
        raise AuthenticationFailed("the certificate names another node")
    trust = state.trust
    enrollment = Enrollment(scheduler_url, cert.scheduler_key, authority, cert.node_id, cert.tier)
    await asyncio.to_thread(trust.enroll, enrollment)
    await asyncio.to_thread(trust.accept_certificate, doc["certificate"], authority)
    state.verifier = trust.verifier(settings.node_id)
    state.touch()
    log.info("approved by the operator; serving the scheduler at %s", scheduler_url)
    return json_response({"node_id": cert.node_id, "tier": cert.tier})
