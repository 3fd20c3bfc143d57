"""The scheduler's application factory and its OpenAI-compatible API.

GET  /v1/models              models the cluster serves
GET  /v1/models/{model_id}   one of them (the id may contain "/")
GET  /v1/directory           the node directory: certificates and key statements (scheduler.directory)
POST /v1/chat/completions    chat, streaming (SSE) or not               (scheduler.generation)
POST /v1/completions         plain completions, streaming or not      (scheduler.generation)
GET  /openapi.json           this API, described
GET  /healthz                liveness
GET  /metrics                Prometheus metrics
POST /v1/enroll              a node joins with a one-time code        (scheduler.federation)
POST /v1/nodes/heartbeat     an approved node's signed status        (scheduler.federation)
     /admin/...              the operator's API                       (scheduler.admin)
GET  /v1/terms, POST /v1/terms/accept, GET /admin/terms            (scheduler.terms_api)
POST /tokenize, POST /detokenize, GET|POST /tokenizer_info            (scheduler.tokenizer_api)

This module wires the long-lived parts together (store, registry, federation, admission, relay, the
usage writer); the request path lives in scheduler.generation.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from aiohttp import web

from policies import Refused
from protocol.errors import ModelNotFound
from protocol.identity import load_or_create_identity
from protocol.web import (
    error_middleware,
    json_response,
    log_unexpected,
    parse_json,
    read_body,
)
from scheduler import admin, admin_policy, generation, terms_api, tokenizer_api
from scheduler.admission import Admission
from scheduler.directory import DirectoryLog
from scheduler.directory import serve as serve_directory
from scheduler.enforce import Enforcer
from scheduler.events import EventBus, NodeWatch
from scheduler.federation import Federation
from scheduler.jobs import JobBoard
from scheduler.ledger import Correction, Ledger
from scheduler.metrics import Metrics
from scheduler.openapi import openapi_document
from scheduler.registry import Registry
from scheduler.relay import (
    Relay,
)
from scheduler.retention import keep_usage
from scheduler.rules import Rules
from scheduler.settings import SchedulerSettings
from scheduler.state import (
    ADMISSION,
    ANSWER_HEADERS,
    ENFORCER,
    EVENTS,
    FEDERATION,
    IN_FLIGHT,
    JOBS,
    METRICS,
    RELAY,
    RULES,
    SCOPE_KEY,
    SETTINGS,
    STARTED,
    STOPPING,
    STORE,
    TERMS,
    authenticate,
)
from scheduler.store import AsyncStore, UsageRecord
from scheduler.terms import TermsBook

log = logging.getLogger("hearth.scheduler")

USAGE_BATCH = 256
RECEIPT_HEARTBEATS = 5  # a job's usage receipt is due within this many heartbeat intervals …
RECEIPT_GRACE_S = 10.0  # … plus this (a busy node, a slow network)


def create_app(settings: SchedulerSettings) -> web.Application:
    app = web.Application(middlewares=[error_middleware], client_max_size=settings.max_body_bytes)
    app[SETTINGS] = settings
    app[METRICS] = Metrics()
    app[STARTED] = int(time.time())
    app[SCOPE_KEY] = secrets.token_bytes(32)
    app[IN_FLIGHT] = set()
    app[JOBS] = JobBoard()
    app[STOPPING] = asyncio.Event()
    app[EVENTS] = EventBus()
    app[RULES] = Rules(path=settings.policy_path)
    app[ENFORCER] = Enforcer(app[RULES], settings.policy, on_refused=functools.partial(_refused, app[EVENTS]))
    app.on_response_prepare.append(_answer_headers)
    app.on_shutdown.append(generation.drain)
    app.cleanup_ctx.append(_store_ctx)
    app.cleanup_ctx.append(_terms_ctx)
    app.cleanup_ctx.append(_rules_ctx)
    app.cleanup_ctx.append(_cluster_ctx)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/openapi.json", openapi)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model_id:.+}", get_model)
    app.router.add_get("/v1/directory", directory)
    app.router.add_post("/v1/chat/completions", generation.chat_completions)
    app.router.add_post("/v1/completions", generation.completions)
    app.router.add_post("/v1/enroll", enroll)
    app.router.add_post("/v1/nodes/heartbeat", heartbeat)
    admin.add_routes(app)
    admin_policy.add_routes(app)
    terms_api.add_routes(app)
    tokenizer_api.add_routes(app)
    return app


async def _store_ctx(app: web.Application) -> AsyncIterator[None]:
    store = AsyncStore(app[SETTINGS].db_path)
    await store.open()
    app[STORE] = store
    yield
    await store.close()


async def _terms_ctx(app: web.Application) -> AsyncIterator[None]:
    """Who accepted which terms, read once at start: the request path checks it without the database."""
    app[TERMS] = await TermsBook.open(app[STORE])
    app[ENFORCER].terms_accepted = app[TERMS].accepted
    yield


async def _rules_ctx(app: web.Application) -> AsyncIterator[None]:
    """The policy file, loaded at start (a bad one stops the start: nothing would be enforced), then
    watched: a change is applied, or refused with the old policy kept; both go to the audit log."""
    rules, store, events = app[RULES], app[STORE], app[EVENTS]
    await asyncio.to_thread(rules.load)
    enforcer = app[ENFORCER]
    await enforcer.start(store)
    persist = asyncio.create_task(enforcer.persist(store), name="hearth-reservations")

    def reported(outcome: str, detail: str) -> None:
        events.publish("policy_reloaded", outcome=outcome)
        subject = str(rules.path)
        action = "policy_" + outcome
        writes.append(asyncio.ensure_future(store.write(lambda db: db.audit(action, subject, detail))))
        writes[:] = [w for w in writes if not w.done()]

    writes: list[asyncio.Future[None]] = []
    rules.on_reload = reported
    watcher = asyncio.create_task(rules.watch(), name="hearth-policy")
    yield
    watcher.cancel()
    persist.cancel()
    await asyncio.gather(watcher, persist, *writes, return_exceptions=True)


def _refused(events: EventBus, group: str, refused: Refused) -> None:
    events.publish("refused", group=group, refusal=refused.kind, status=refused.status)


async def _answer_headers(request: web.Request, response: web.StreamResponse) -> None:
    headers = request.get(ANSWER_HEADERS)
    if headers:
        response.headers.update(headers)


async def _cluster_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    usage: asyncio.Queue[UsageRecord | Correction | None] = asyncio.Queue()
    identity = await asyncio.to_thread(load_or_create_identity, settings.key_path)
    # Relays get their own unlimited pool: a pool shared with control calls (aiohttp's default caps it
    # at 100) would make a busy node look dead. Concurrency is bounded by admission, not by sockets.
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=16)) as control_session,
    ):
        registry = Registry(node_timeout=settings.node_timeout, load_timeout=settings.load_timeout)
        # A node's receipts ride on its heartbeats, the next one after a job ends, or a few later when it
        # ran many jobs at once.
        ledger = Ledger(
            functools.partial(_usage_written, app, usage),
            confirm_within=RECEIPT_HEARTBEATS * settings.heartbeat_interval + RECEIPT_GRACE_S,
            on_outcome=lambda outcome: app[METRICS].receipts.labels(outcome).inc(),
        )
        federation = Federation(
            identity=identity,
            store=app[STORE],
            registry=registry,
            session=control_session,
            heartbeat_interval=settings.heartbeat_interval,
            authority_key=settings.authority_key,
            directory=DirectoryLog(app[STORE]),
            on_receipts=ledger.receipts,
        )
        admission = Admission(
            registry,
            max_wait=settings.max_queue_wait,
            max_queued=settings.max_queued,
            retry_after=settings.retry_after,
            start_load=federation.load_model,
            warm_up=settings.node_timeout,
        )
        registry.on_change = admission.wake
        await federation.load()
        app[FEDERATION] = federation
        app[ADMISSION] = admission
        app[RELAY] = Relay(
            session,
            idle_timeout=settings.stream_idle_timeout,
            retry_after=settings.retry_after,
            on_done=ledger.recorded,
            on_node_failed=registry.mark_failed,
            on_first_frame=app[METRICS].ttfb.observe,
            on_dispatch=ledger.dispatched,
        )
        writer = asyncio.create_task(_write_usage(app, usage), name="hearth-usage")
        retention = asyncio.create_task(keep_usage(app[STORE], app[RULES]), name="hearth-retention")
        health = asyncio.create_task(_watch_health(app, ledger), name="hearth-health")
        discovery = await _start_discovery(settings, federation)
        yield
        if discovery is not None:
            await discovery.close()
        health.cancel()
        retention.cancel()
        await asyncio.gather(health, retention, return_exceptions=True)
        await federation.close()
        # The writer is told to finish rather than cancelled: a batch it holds is written, never dropped.
        usage.put_nowait(None)
        await writer


def _usage_written(
    app: web.Application,
    usage: asyncio.Queue[UsageRecord | Correction | None],
    item: UsageRecord | Correction,
) -> None:
    """A usage row (or a node's correction of one) is on its way to the database: the quota counters count
    it now, so they and the usage table always agree."""
    usage.put_nowait(item)
    if isinstance(item, Correction):
        record, tokens, delta = item.record, item.prompt_delta + item.completion_delta, True
    else:
        record, tokens, delta = item, item.prompt_tokens + item.completion_tokens, False
        app[EVENTS].publish(
            "finished", model=record.model, node_id=record.node_id, status=record.status,
            prompt_tokens=record.prompt_tokens, completion_tokens=record.completion_tokens,
            ttft_ms=record.ttft_ms, request_id=record.request_id,
        )  # fmt: skip
    app[ENFORCER].charged(
        record.request_id, record.token_id, record.group, record.started, tokens, delta=delta
    )


async def _start_discovery(settings: SchedulerSettings, federation: Federation) -> Any:
    if not settings.discovery:
        return None
    from protocol.advert import unknown_addresses
    from scheduler.discovery import Discovery

    discovery = Discovery(
        federation.discovered, lambda node_id: None, interfaces=settings.zeroconf_interfaces
    )
    missing = unknown_addresses(settings.zeroconf_interfaces)
    if missing:
        log.warning("LAN discovery is off: no interface here has the address %s", ", ".join(missing))
        return None
    try:
        await discovery.start()
    except OSError as exc:  # no multicast-capable interface
        log.warning("LAN discovery is off: zeroconf could not start (%s)", exc.strerror or type(exc).__name__)
        return None
    return discovery


async def _watch_health(app: web.Application, ledger: Ledger) -> None:
    """A node that stops sending heartbeats turns unhealthy by the clock alone: look now and then, so
    requests waiting for it learn of it (and so they fail over or give up without waiting for a change).
    Jobs whose node never confirmed their usage are counted on the same beat."""
    interval = min(1.0, app[SETTINGS].node_timeout / 4)
    nodes = NodeWatch(app[EVENTS])
    registry = app[FEDERATION].registry
    while True:
        await asyncio.sleep(interval)
        app[ADMISSION].wake()
        ledger.sweep()
        app[ENFORCER].meters.forget_periods()
        if app[EVENTS].watchers:
            nodes.look([(n.node_id, n.healthy, n.yielding) for n in registry.snapshot().nodes])


async def _write_usage(app: web.Application, usage: asyncio.Queue[UsageRecord | Correction | None]) -> None:
    """One writer for usage rows, in batches, so a request never waits on the database. ``None`` in the
    queue (shutdown) ends it once every row before it is written."""
    done = False
    while not done:
        batch: list[UsageRecord | Correction] = []
        item = await usage.get()
        while True:
            if item is None:
                done = True
            else:
                batch.append(item)
            if done or usage.empty() or len(batch) >= USAGE_BATCH:
                break
            item = usage.get_nowait()
        if batch:
            await _store_usage(app, batch)


async def _store_usage(app: web.Application, batch: list[UsageRecord | Correction]) -> None:
    metrics = app[METRICS]
    rows = []
    try:
        for item in batch:
            if isinstance(item, Correction):
                # Counters only grow: a correction downward stays in the row, not in the metric.
                metrics.tokens.labels("prompt").inc(max(0, item.prompt_delta))
                metrics.tokens.labels("completion").inc(max(0, item.completion_delta))
                rows.append(item.record)
                continue
            metrics.requests.labels(item.endpoint, item.status).inc()
            metrics.tokens.labels("prompt").inc(item.prompt_tokens)
            metrics.tokens.labels("completion").inc(item.completion_tokens)
            rows.append(item)
        await app[STORE].record_usage(rows)
    except Exception as exc:  # accounting must never take the API down
        log_unexpected("recording usage", exc)


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def metrics(request: web.Request) -> web.Response:
    return web.Response(body=request.app[METRICS].render(), content_type="text/plain", charset="utf-8")


async def openapi(request: web.Request) -> web.Response:
    return json_response(openapi_document())


async def list_models(request: web.Request) -> web.Response:
    await authenticate(request)
    cards = _model_cards(request.app)
    return json_response({"object": "list", "data": [cards[k] for k in sorted(cards)]})


async def get_model(request: web.Request) -> web.Response:
    """One model of the list, as OpenAI's ``GET /v1/models/{model}`` answers; 404 for one not served."""
    await authenticate(request)
    model_id = request.match_info["model_id"]
    card = _model_cards(request.app).get(model_id)
    if card is None:
        message = f"the model '{model_id}' does not exist here; see /v1/models"
        raise ModelNotFound(message, param="model", code="model_not_found")
    return json_response(card)


def _model_cards(app: web.Application) -> dict[str, dict[str, Any]]:
    """Every model an approved node serves or can load (failed loads left out), once each."""
    snapshot = app[FEDERATION].registry.snapshot()
    created = app[STARTED]
    cards: dict[str, dict[str, Any]] = {}
    for node in snapshot.nodes:
        for model in node.models:
            if model.phase == "failed":
                continue
            card = cards.setdefault(
                model.id,
                {"id": model.id, "object": "model", "created": created, "owned_by": "hearth",
                 "context_length": model.context_length},
            )  # fmt: skip
            if card["context_length"] is None:
                card["context_length"] = model.context_length
    return cards


async def directory(request: web.Request) -> web.Response:
    """The node directory (public: keys, certificates and tiers, nothing about users)."""
    federation = request.app[FEDERATION]
    hints: dict[str, list[str]] = {}
    for node in federation.registry.snapshot().nodes:
        if node.healthy:
            for model in node.models:
                if model.phase != "failed":
                    hints.setdefault(model.id, []).append(node.node_id)
    return await serve_directory(request, federation.directory, request.app[SETTINGS].authority_key, hints)


async def enroll(request: web.Request) -> web.Response:
    reply = await request.app[FEDERATION].enroll(parse_json(await read_body(request)))
    return json_response(reply.model_dump(), status=201)


async def heartbeat(request: web.Request) -> web.Response:
    body = await read_body(request)
    reply = await request.app[FEDERATION].heartbeat(request.method, request.path_qs, request.headers, body)
    return json_response(reply.model_dump())
