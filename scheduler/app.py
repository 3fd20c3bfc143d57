"""The scheduler's application factory and its OpenAI-compatible API.

GET  /v1/models              models the cluster serves
GET  /v1/directory           the node directory: certificates and key statements (scheduler.directory)
POST /v1/chat/completions    chat, streaming (SSE) or not
POST /v1/completions         plain completions, streaming or not
GET  /openapi.json           this API, described
GET  /healthz                liveness
GET  /metrics                Prometheus metrics
POST /v1/enroll              a node joins with a one-time code        (scheduler.federation)
POST /v1/nodes/heartbeat     an approved node's signed status        (scheduler.federation)
     /admin/...              the operator's API                       (scheduler.admin)

A request is authenticated, validated and checked against policy here, waits in the fair queue until
placement finds it a node (scheduler.admission), and is relayed (scheduler.relay); a node that fails
before the first token is replaced by another, invisibly to the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import hmac
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web

from policies import Visible, check
from protocol.envelope import MEDIA_TYPE as ENVELOPE
from protocol.envelope import EnvelopeError, peek
from protocol.errors import HearthError, PermissionDenied, Reseal, Unavailable
from protocol.identity import load_or_create_identity
from protocol.schemas import Endpoint, parse_request
from protocol.web import (
    error_middleware,
    is_loopback,
    json_response,
    log_unexpected,
    parse_json,
    read_body,
)
from scheduler import admin
from scheduler.admission import Admission, exclude
from scheduler.directory import DirectoryLog
from scheduler.directory import serve as serve_directory
from scheduler.federation import Federation
from scheduler.ledger import Correction, Ledger
from scheduler.metrics import Metrics
from scheduler.openapi import openapi_document
from scheduler.placement import Placement, PlacementRequest, place
from scheduler.registry import Registry
from scheduler.relay import (
    Failover,
    MidStream,
    Relay,
    RelayJob,
    SealedStream,
    Target,
    Unsealer,
    end_sealed,
    seal_toward,
)
from scheduler.settings import SchedulerSettings
from scheduler.state import (
    ADMISSION,
    FEDERATION,
    METRICS,
    RELAY,
    SCOPE_KEY,
    SETTINGS,
    STARTED,
    STORE,
    authenticate,
)
from scheduler.store import AsyncStore, TokenRecord, UsageRecord

log = logging.getLogger("hearth.scheduler")

USAGE_BATCH = 256
# The scheduler cannot count tokens it may not read; a prompt's visible length over 4 is a fair guess
# (about 4 bytes per token in English, and JSON framing only adds bytes). Placement uses it for cache
# admission and scoring, never to refuse a request: the node counts exactly.
BYTES_PER_TOKEN_GUESS = 4
DEFAULT_CANDIDATES = 4  # fresh candidates a 409 offers for re-sealing
INLINE_SEAL_BYTES = 64 * 1024
RETRY_NO_KEY_S = 30.0  # a node's key statement comes with its next heartbeat, or it needs its operator
RECEIPT_HEARTBEATS = 5  # a job's usage receipt is due within this many heartbeat intervals …
RECEIPT_GRACE_S = 10.0  # … plus this (a busy node, a slow network)


def create_app(settings: SchedulerSettings) -> web.Application:
    app = web.Application(middlewares=[error_middleware], client_max_size=settings.max_body_bytes)
    app[SETTINGS] = settings
    app[METRICS] = Metrics()
    app[STARTED] = int(time.time())
    app[SCOPE_KEY] = secrets.token_bytes(32)
    app.cleanup_ctx.append(_store_ctx)
    app.cleanup_ctx.append(_cluster_ctx)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/openapi.json", openapi)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/directory", directory)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/enroll", enroll)
    app.router.add_post("/v1/nodes/heartbeat", heartbeat)
    admin.add_routes(app)
    return app


async def _store_ctx(app: web.Application) -> AsyncIterator[None]:
    store = AsyncStore(app[SETTINGS].db_path)
    await store.open()
    app[STORE] = store
    yield
    await store.close()


async def _cluster_ctx(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS]
    usage: asyncio.Queue[UsageRecord | Correction] = asyncio.Queue()
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
            usage.put_nowait,
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
        tasks = [
            asyncio.create_task(_write_usage(app, usage), name="hearth-usage"),
            asyncio.create_task(_watch_health(app, ledger), name="hearth-health"),
        ]
        discovery = await _start_discovery(settings, federation)
        yield
        if discovery is not None:
            await discovery.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await federation.close()
        await _flush_usage(app, usage)


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
    while True:
        await asyncio.sleep(interval)
        app[ADMISSION].wake()
        ledger.sweep()


async def _write_usage(app: web.Application, usage: asyncio.Queue[UsageRecord | Correction]) -> None:
    """One writer for usage rows, in batches, so a request never waits on the database."""
    while True:
        batch = [await usage.get()]
        while not usage.empty() and len(batch) < USAGE_BATCH:
            batch.append(usage.get_nowait())
        await _store_usage(app, batch)


async def _flush_usage(app: web.Application, usage: asyncio.Queue[UsageRecord | Correction]) -> None:
    batch = []
    while not usage.empty():
        batch.append(usage.get_nowait())
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
    snapshot = request.app[FEDERATION].registry.snapshot()
    created = request.app[STARTED]
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
    return json_response({"object": "list", "data": [cards[k] for k in sorted(cards)]})


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


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, "chat")


async def completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, "completion")


async def _generate(request: web.Request, endpoint: Endpoint) -> web.StreamResponse:
    if request.content_type == ENVELOPE:
        return await _generate_sealed(request, endpoint)
    app = request.app
    try:
        user, preq, job, raw = await _admit(request, endpoint)
    except HearthError as exc:
        app[METRICS].requests.labels(endpoint, f"refused_{exc.status}").inc()
        raise
    federation, admission = app[FEDERATION], app[ADMISSION]
    attempts = app[SETTINGS].failover_attempts
    seal_always = app[SETTINGS].seal_toward_nodes == "always"
    failed: Failover | None = None
    for attempt in range(attempts):
        try:
            ticket = await admission.acquire(user, preq)
        except HearthError as exc:
            # Refused by the scheduler itself; relayed requests are counted with their usage rows.
            app[METRICS].requests.labels(endpoint, f"refused_{exc.status}").inc()
            if failed is not None:  # no other node to fail over to: say what went wrong on the last one
                raise failed.error from None
            raise
        usage = {"prompt_tokens": 0, "completion_tokens": 0}
        runtime = federation.registry.nodes.get(ticket.node_id)
        try:
            if runtime is None or runtime.url is None:
                raise Failover(HearthError("the chosen node left the cluster"))
            # A node reading the request may let this user's earlier prompts speed it up, never another's.
            sent, unsealer = job.attempt(cache_scope=_cache_scope(app, ticket.node_id, user)), None
            if seal_always or not is_loopback(urlsplit(runtime.url).hostname):
                sealing = functools.partial(
                    _seal_toward, federation, ticket.node_id, job, raw, preq.max_tokens
                )
                # A chat-sized body seals in a fraction of a millisecond; a large one in a thread.
                sent, unsealer = (
                    sealing() if len(raw) <= INLINE_SEAL_BYTES else await asyncio.to_thread(sealing)
                )
            target = Target(
                ticket.node_id,
                runtime.url,
                federation.signed_headers(ticket.node_id, "POST", "/jobs", sent.body),
            )
            with contextlib.suppress(ConnectionResetError):  # the client left while we were writing
                return await app[RELAY].run(request, target, sent, usage, unsealer)
            return web.Response(status=499)
        except Failover as exc:
            log.info("node %s failed before the first token; trying another", ticket.node_id)
            if exc.error.code == EnvelopeError.default_code:
                # What the scheduler sealed did not open there (the node's keys or clock): not the client's
                # doing, whose request was plaintext.
                exc = Failover(
                    Unavailable(
                        "the node could not open what the scheduler sealed to it; the operator must check "
                        "its keys and clock", code="node_failed", retry_after=app[SETTINGS].retry_after,
                    )
                )  # fmt: skip
            if attempt == attempts - 1:
                raise exc.error from None
            failed = exc
            preq = exclude(preq, ticket.node_id)
        finally:
            admission.release(ticket, usage["prompt_tokens"], usage["completion_tokens"])
    raise AssertionError("unreachable")


def _seal_toward(
    federation: Federation, node_id: str, job: RelayJob, raw: bytes, max_tokens: int | None
) -> tuple[RelayJob, Unsealer]:
    """Seal a plaintext request toward its node with the node's key from the directory."""
    key = federation.directory.keys.get(node_id)
    if key is None or not key.valid_at(time.time()):
        log.warning("node %s has no current encryption key in the directory: plaintext skips it", node_id)
        raise Failover(
            Unavailable(
                "the node serving this model has no current encryption key; the operator must check it",
                retry_after=RETRY_NO_KEY_S,
            )
        )
    return seal_toward(job, raw, max_tokens, key)


async def _generate_sealed(request: web.Request, endpoint: Endpoint) -> web.StreamResponse:
    """A request the scheduler cannot read: placed among its candidates by its visible header, relayed as
    frames, and continued on another candidate if its node fails mid-stream (blind failover)."""
    app = request.app
    try:
        token, preq, job = await _admit_sealed(request, endpoint)
        federation, admission, relay = app[FEDERATION], app[ADMISSION], app[RELAY]
    except HearthError as exc:
        app[METRICS].requests.labels(endpoint, f"refused_{exc.status}").inc()
        raise
    stream = SealedStream()
    failed: Failover | MidStream | None = None
    unopened = False  # a candidate could not open it: no 409 then (every failure to open answers alike)
    for _ in range(app[SETTINGS].failover_attempts):
        try:
            try:
                ticket = await admission.acquire(token, preq)
            except HearthError:
                if stream.out is None and not unopened:
                    # Refused before the client got anything: if other nodes could take it, say so (409).
                    _reseal_if_others_can(federation, preq)
                raise
        except HearthError as exc:
            app[METRICS].requests.labels(endpoint, f"refused_{exc.status}").inc()
            if failed is None or isinstance(exc, Reseal):
                raise
            break
        usage = {"prompt_tokens": 0, "completion_tokens": 0}
        node_id = ticket.node_id
        try:
            runtime = federation.registry.nodes.get(node_id)
            if runtime is None or runtime.url is None:
                raise Failover(HearthError("the chosen node left the cluster"))
            # The envelope was just parsed as JSON: it is spliced in as received, not serialized again.
            sent = job.attempt(b'{"envelope":%s,"resume":%s}' % (job.body, stream.resume_json()))
            headers = federation.signed_headers(node_id, "POST", "/jobs", sent.body)
            target = Target(node_id, runtime.url, headers)
            with contextlib.suppress(ConnectionResetError):  # the client left while we were writing
                await relay.run_sealed(request, target, sent, usage, stream)
            return stream.out if stream.out is not None else web.Response(status=499)
        except (Failover, MidStream) as exc:
            log.info("node %s failed a sealed request; trying another candidate", node_id)
            failed = exc
            unopened = unopened or exc.error.code == EnvelopeError.default_code
            preq = exclude(preq, node_id)
            if isinstance(exc, MidStream) and not stream.resumable:
                break
        except HearthError as exc:  # a final refusal from the node
            if stream.out is None:
                raise
            await end_sealed(relay, request, stream, exc)  # the client has the route already
            return stream.out
        finally:
            admission.release(ticket, usage["prompt_tokens"], usage["completion_tokens"])
    assert failed is not None
    if stream.out is None:
        raise failed.error
    await end_sealed(relay, request, stream, failed.error)
    return stream.out


def _reseal_if_others_can(federation: Federation, preq: PlacementRequest) -> None:
    """None of the request's candidates could take it (they went away, never served the model, or
    failed it): 409 with fresh candidates when other nodes could. Admission has already waited for busy
    ones as usual."""
    snapshot = federation.registry.snapshot()
    fresh: list[str] = []
    anywhere = replace(preq, candidates=None, exclude=frozenset(preq.candidates or ()) | preq.exclude)
    while len(fresh) < DEFAULT_CANDIDATES:
        found = place(anywhere, snapshot)
        if not isinstance(found, Placement):
            break
        if found.node_id in federation.directory.keys:
            fresh.append(found.node_id)
        anywhere = exclude(anywhere, found.node_id)
    if fresh:
        raise Reseal("none of the nodes this request was sealed to can take it now; seal it again", fresh)


async def _admit_sealed(request: web.Request, endpoint: Endpoint) -> tuple[str, PlacementRequest, RelayJob]:
    token = await authenticate(request)
    started = time.time()
    raw = await read_body(request)
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise EnvelopeError() from None
    header, candidates = peek(doc)  # the node decodes the rest, and refuses it alike
    if header.endpoint != endpoint:
        raise EnvelopeError()
    settings = request.app[SETTINGS]
    check(settings.policy, Visible(header.model, header.max_tokens, sealed=True))
    preq = PlacementRequest(
        model=header.model, max_tokens=header.max_tokens, tiers=_tiers(settings, token),
        prompt_tokens=header.bucket // BYTES_PER_TOKEN_GUESS,
        candidates=frozenset(candidates),
    )  # fmt: skip
    # The usage row gets an id of the scheduler's own: the envelope's request id is the client's choice.
    job = RelayJob(secrets.token_hex(12), token.id, endpoint, header.model, True, raw, started)
    return token.id, preq, job


def _cache_scope(app: web.Application, node_id: str, token_id: str) -> str:
    """A user's prefix-cache scope on one node: the same for all of that user's plaintext requests there,
    different per node, so no node learns a user id it could match with another's."""
    return _scope_of(app[SCOPE_KEY], node_id, token_id)


@functools.lru_cache(maxsize=4096)
def _scope_of(key: bytes, node_id: str, token_id: str) -> str:
    return hmac.new(key, f"{node_id}\0{token_id}".encode(), hashlib.sha256).hexdigest()[:32]


def _tiers(settings: SchedulerSettings, token: TokenRecord) -> frozenset[str]:
    tiers = frozenset(settings.policy.tiers)
    if token.tiers is not None:
        tiers &= frozenset(token.tiers)
        if not tiers:
            raise PermissionDenied(
                f"this token may use only {', '.join(token.tiers)} nodes, and this scheduler allows none of "
                "those tiers",
                code="tier_not_allowed",
            )
    return tiers


async def _admit(request: web.Request, endpoint: Endpoint) -> tuple[str, PlacementRequest, RelayJob, bytes]:
    """Authenticate, validate and apply policy: everything before the request joins the queue. Returns
    the job for a node that may read it, and the OpenAI request itself (to seal toward a node)."""
    token = await authenticate(request)
    started = time.time()
    raw = await read_body(request)
    req = parse_request(endpoint, parse_json(raw))
    settings = request.app[SETTINGS]
    max_tokens = req.requested_max_tokens
    check(settings.policy, Visible(req.model, max_tokens, sealed=False))
    tiers = _tiers(settings, token)
    preq = PlacementRequest(
        model=req.model, max_tokens=max_tokens, prompt_tokens=len(raw) // BYTES_PER_TOKEN_GUESS, tiers=tiers
    )
    request_id = secrets.token_hex(12)
    # The body was just parsed as JSON, so it can be spliced in as is instead of serialized again.
    job = b'{"endpoint":"%s","request_id":"%s","request":%s}' % (endpoint.encode(), request_id.encode(), raw)
    return token.id, preq, RelayJob(request_id, token.id, endpoint, req.model, req.stream, job, started), raw
