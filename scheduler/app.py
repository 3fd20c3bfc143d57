"""The scheduler's application factory and its OpenAI-compatible API.

GET  /v1/models              models the cluster serves
POST /v1/chat/completions    chat, streaming (SSE) or not
POST /v1/completions         plain completions, streaming or not
GET  /openapi.json           this API, described
GET  /healthz                liveness
GET  /metrics                Prometheus metrics
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from policies import Visible, check
from protocol.errors import (
    AuthenticationFailed,
    ContextLengthExceeded,
    HearthError,
    ModelNotFound,
    Unavailable,
)
from protocol.schemas import Endpoint, parse_request
from protocol.web import error_middleware, json_response, log_unexpected, parse_json, read_body
from scheduler.metrics import Metrics
from scheduler.openapi import openapi_document
from scheduler.placement import Placement, PlacementRequest, place
from scheduler.registry import NodeEntry, Registry
from scheduler.relay import Relay, RelayJob
from scheduler.settings import SchedulerSettings
from scheduler.store import AsyncStore, TokenRecord, UsageRecord

log = logging.getLogger("hearth.scheduler")

SETTINGS = web.AppKey("settings", SchedulerSettings)
STORE = web.AppKey("store", AsyncStore)
REGISTRY = web.AppKey("registry", Registry)
RELAY = web.AppKey("relay", Relay)
METRICS = web.AppKey("metrics", Metrics)
STARTED = web.AppKey("started", int)

USAGE_BATCH = 256


def create_app(settings: SchedulerSettings) -> web.Application:
    app = web.Application(middlewares=[error_middleware], client_max_size=settings.max_body_bytes)
    app[SETTINGS] = settings
    app[METRICS] = Metrics()
    app[STARTED] = int(time.time())
    app.cleanup_ctx.append(_store_ctx)
    app.cleanup_ctx.append(_cluster_ctx)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/openapi.json", openapi)
    app.router.add_get("/v1/models", list_models)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    return app


async def _store_ctx(app: web.Application) -> AsyncIterator[None]:
    store = AsyncStore(app[SETTINGS].db_path)
    await store.open()
    app[STORE] = store
    yield
    await store.close()


async def _cluster_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    usage: asyncio.Queue[UsageRecord] = asyncio.Queue()
    # Relays get their own unlimited pool: a pool shared with status polls (aiohttp's default caps it at
    # 100) would make a busy node look dead. Concurrency is bounded by admission, not by sockets.
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=16)) as poll_session,
    ):
        registry = Registry(settings, poll_session)
        app[REGISTRY] = registry
        app[RELAY] = Relay(
            session,
            idle_timeout=settings.stream_idle_timeout,
            retry_after=settings.retry_after,
            on_done=usage.put_nowait,
            on_node_failed=registry.mark_failed,
            on_first_frame=app[METRICS].ttfb.observe,
        )
        tasks = [
            asyncio.create_task(registry.run(), name="hearth-registry"),
            asyncio.create_task(_write_usage(app, usage), name="hearth-usage"),
        ]
        yield
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await _flush_usage(app, usage)


async def _write_usage(app: web.Application, usage: asyncio.Queue[UsageRecord]) -> None:
    """One writer for usage rows, in batches, so a request never waits on the database."""
    while True:
        batch = [await usage.get()]
        while not usage.empty() and len(batch) < USAGE_BATCH:
            batch.append(usage.get_nowait())
        await _store_usage(app, batch)


async def _flush_usage(app: web.Application, usage: asyncio.Queue[UsageRecord]) -> None:
    batch = []
    while not usage.empty():
        batch.append(usage.get_nowait())
    if batch:
        await _store_usage(app, batch)


async def _store_usage(app: web.Application, batch: list[UsageRecord]) -> None:
    metrics = app[METRICS]
    try:
        for record in batch:
            metrics.requests.labels(record.endpoint, record.status).inc()
            metrics.tokens.labels("prompt").inc(record.prompt_tokens)
            metrics.tokens.labels("completion").inc(record.completion_tokens)
        await app[STORE].record_usage(batch)
    except Exception as exc:  # accounting must never take the API down
        log_unexpected("recording usage", exc)


async def authenticate(request: web.Request) -> TokenRecord:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthenticationFailed("missing API token: send 'Authorization: Bearer <token>'")
    record = await request.app[STORE].verify_token(token.strip())
    if record is None:
        raise AuthenticationFailed("invalid or revoked API token")
    return record


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def metrics(request: web.Request) -> web.Response:
    return web.Response(body=request.app[METRICS].render(), content_type="text/plain", charset="utf-8")


async def openapi(request: web.Request) -> web.Response:
    return json_response(openapi_document())


async def list_models(request: web.Request) -> web.Response:
    await authenticate(request)
    snapshot = request.app[REGISTRY].snapshot()
    created = request.app[STARTED]
    cards = {}
    for node in snapshot.nodes:
        for model in node.models:
            if model.context_length is not None:
                cards[model.id] = {
                    "id": model.id,
                    "object": "model",
                    "created": created,
                    "owned_by": "hearth",
                    "context_length": model.context_length,
                }
    return json_response({"object": "list", "data": [cards[k] for k in sorted(cards)]})


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, "chat")


async def completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, "completion")


async def _generate(request: web.Request, endpoint: Endpoint) -> web.StreamResponse:
    try:
        node, job = await _admit(request, endpoint)
    except HearthError as exc:
        # Refused by the scheduler itself; relayed requests are counted with their usage rows.
        request.app[METRICS].requests.labels(endpoint, f"refused_{exc.status}").inc()
        raise
    with contextlib.suppress(ConnectionResetError):  # the client left while we were writing
        return await request.app[RELAY].run(request, node, job)
    return web.Response(status=499)


async def _admit(request: web.Request, endpoint: Endpoint) -> tuple[NodeEntry, RelayJob]:
    """Authenticate, validate, apply policy and place: everything before the first byte goes to a node."""
    token = await authenticate(request)
    started = time.time()
    raw = await read_body(request)
    req = parse_request(endpoint, parse_json(raw))
    settings = request.app[SETTINGS]
    max_tokens = req.requested_max_tokens
    check(settings.policy, Visible(req.model, max_tokens, sealed=False))
    registry = request.app[REGISTRY]
    decision = place(PlacementRequest(req.model, max_tokens), registry.snapshot())
    if not isinstance(decision, Placement):
        if decision.kind == "unknown_model":
            raise ModelNotFound(f"the model '{req.model}' does not exist here; see /v1/models", param="model")
        if decision.kind == "never":
            raise ContextLengthExceeded(decision.reason, param="max_tokens")
        raise Unavailable(
            f"no node can take this request now: {decision.reason}", retry_after=settings.retry_after
        )
    request_id = secrets.token_hex(12)
    # The body was just parsed as JSON, so it can be spliced in as is instead of serialized again.
    job = b'{"endpoint":"%s","request_id":"%s","request":%s}' % (endpoint.encode(), request_id.encode(), raw)
    return registry.nodes[decision.node_id], RelayJob(
        request_id, token.id, endpoint, req.model, req.stream, job, started
    )
