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

Only the node sees prompt text: it validates the request, applies the job's rules (node.rules), renders
the chat template, fits the context (node.prepare), generates, and writes the client's bytes itself. A
sealed job (node.sealed) is opened here and its answer sealed here: the scheduler relays ciphertext.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from hardware.probe import NodeProbe
from hardware.probe import probe as probe_gpus
from node import tokenizer_jobs
from node.backends import load_backend
from node.backends.base import CacheScope
from node.choices import Batch, echoes
from node.keys import NodeKeys, ReplayMemory
from node.metrics import NodeMetrics
from node.openai_format import ResponseWriter
from node.owner import OwnerFirst
from node.plain import plain_job
from node.pool import BackendLoader, ModelPool
from node.prepare import prepare_choices
from node.receipts import Receipts
from node.resume import Resume
from node.sealed import SealedFrames, SealedJob, open_job
from node.settings import ModelSettings, NodeSettings
from node.tool_calls import response_writer
from node.trust import Enrollment, Trust
from protocol import frames
from protocol.directory import Directory
from protocol.envelope import SEALED_JOB
from protocol.errors import (
    AuthenticationFailed,
    HearthError,
    InvalidRequest,
    PermissionDenied,
    Unavailable,
)
from protocol.identity import RequestVerifier, b64d, b64e, fingerprint, verify_certificate, write_private
from protocol.rules import JobRules
from protocol.schemas import ChatCompletionRequest, Endpoint
from protocol.tokenizer import TOKENIZER_REQUESTS
from protocol.web import error_middleware, is_loopback, json_response, parse_json, read_body

log = logging.getLogger("hearth.node")

VERSION = "0.2.0"
KEEPALIVE_S = 10.0
PROGRESS_S = 1.0
INLINE_OPEN_BYTES = 64 * 1024


def load_transformers(model: ModelSettings, settings: NodeSettings) -> Any:
    """The reference backend, whatever the node's settings say (tests wrap it)."""
    from node.backends.transformers_backend import TransformersBackend

    assert model.path is not None, "the pool gives loaders a local path"
    return TransformersBackend.load(model.path, threads=settings.threads)


@dataclass
class NodeState:
    """What the node's handlers and background tasks share."""

    settings: NodeSettings
    trust: Trust
    pool: ModelPool
    verifier: RequestVerifier
    keys: NodeKeys
    replay: ReplayMemory
    url: str | None = None
    key_alarm: str | None = None  # the directory does not show this node's current key (see node.heartbeat)
    directory: Directory | None = None  # the scheduler's directory as this node last verified it
    draining: bool = False
    reply_interval: float | None = None  # the heartbeat interval the scheduler asked for
    offered_key: bytes | None = None  # the scheduler key a certificate being handed over names
    listening: asyncio.Event = field(default_factory=asyncio.Event)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    advert_changed: asyncio.Event = field(default_factory=asyncio.Event)
    receipts: Receipts = field(default_factory=Receipts)  # jobs run, for the next heartbeats
    owner: OwnerFirst | None = None  # owner-first yielding (node.owner)

    def __post_init__(self) -> None:
        # A certificate handed over at approval must come signed by the scheduler it names (and only once).
        self.cert_verifier = RequestVerifier(self.settings.node_id, self._offered)

    def _offered(self, fp: str) -> bytes | None:
        key = self.offered_key
        return key if key is not None and fingerprint(key) == fp else None

    def touch(self) -> None:
        self.changed.set()
        self.advert_changed.set()

    def refuse_if_yielding(self) -> None:
        owner = self.owner
        if owner is not None and owner.yielding:
            raise Unavailable(
                f"this node is yielding to its owner ({owner.reason}); it takes no new work until then",
                code="node_yielding",
                retry_after=max(5, int(owner.settings.resume_after)),
            )


SETTINGS = web.AppKey("settings", NodeSettings)
STATE = web.AppKey("state", NodeState)
METRICS = web.AppKey("metrics", NodeMetrics)
LOADER: web.AppKey[BackendLoader] = web.AppKey("loader")
PROBE: web.AppKey[Callable[[], NodeProbe]] = web.AppKey("probe")
TRUST = web.AppKey("trust", Trust)


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
    from node.heartbeat import advertise_ctx, check_directory, heartbeat_loop, memory_pool, rotate_keys

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


async def _authorize(request: web.Request, body: bytes = b"") -> NodeState:
    state = request.app[STATE]
    state.verifier.verify(request.method, request.path_qs, request.headers, body)
    return state


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
    await _authorize(request)
    return web.Response(body=request.app[METRICS].render(), content_type="text/plain", charset="utf-8")


async def status(request: web.Request) -> web.Response:
    from node.heartbeat import status_doc

    state = await _authorize(request)
    return json_response(status_doc(state))


async def local_status(request: web.Request) -> web.Response:
    """The node's status for its own box: what `hearth node status` prints. Loopback only, no key needed
    (it holds nothing a local user could not read from the node's log)."""
    from node.heartbeat import status_doc

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
    state = await _authorize(request, raw)
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


class PlainFrames:
    """Frames of an answer the scheduler may read (a plaintext request)."""

    def data(self, payload: bytes, *, final: bool = False) -> bytes:
        return frames.encode_data(payload) if payload else b""

    def keepalive(self, payload: bytes) -> bytes:
        return frames.encode(payload)  # even empty: the scheduler's read timer restarts

    def meta(self, meta: dict[str, object]) -> bytes:
        return frames.encode_json(meta, frames.META)

    def end(self, data: bytes, meta: dict[str, object]) -> bytes:
        return frames.encode_data(data) + frames.encode_json(meta, frames.META | frames.FINAL)


class SealedOut(SealedFrames):
    def end(self, data: bytes, meta: dict[str, object]) -> bytes:
        # The META (token counts) first: the sealed final frame is the stream's last.
        return self.meta(meta) + self.data(data, final=True)


Out = PlainFrames | SealedOut


async def submit_job(request: web.Request) -> web.StreamResponse:
    raw = await read_body(request)
    state = await _authorize(request, raw)
    state.refuse_if_yielding()
    if state.draining:
        raise Unavailable(
            "this node is draining: it finishes running jobs and takes no new ones", retry_after=5
        )
    node_id = state.settings.node_id
    sealed: SealedJob | None = None
    # Sealed jobs share cached prompt pages with no other job: whoever relays them cannot vouch for who sent
    # them, and a scheduler naming two users alike could time one's prompt through the other's.
    scope: CacheScope | None = None
    out: Out | None = None  # a sealed job's is made below, while its prompt is prepared
    resume = Resume()
    rules: JobRules | None = None  # the user's group's (node.rules)
    if request.content_type == SEALED_JOB:
        # Opening a chat-sized envelope takes ~0.2 ms: a thread hop would cost as much, and more under load.
        # A big one (up to 4 MiB of ciphertext) goes to a thread.
        opening = functools.partial(open_job, raw, node_id=node_id, keys=state.keys, replay=state.replay)
        sealed = opening() if len(raw) <= INLINE_OPEN_BYTES else await asyncio.to_thread(opening)
        request_id, req, job_id = sealed.request_id, sealed.request, sealed.job_id
        resume, rules = sealed.resume, sealed.rules
        if sealed.start_seq:
            log.info("resuming a sealed answer another node began (%d frames sent)", sealed.start_seq)
    else:
        if not is_loopback(request.remote):
            # Prompts cross a network only sealed: a scheduler that can read a request seals it toward
            # its node itself (scheduler.seal_toward_nodes).
            raise PermissionDenied(
                "this node takes plaintext jobs over loopback only; from elsewhere they must be sealed",
                code="plaintext_refused",
            )
        # A job carrying an answer to resume (up to a few MiB) is parsed in a thread, as a big envelope is.
        parsing = functools.partial(plain_job, raw)
        plain = parsing() if len(raw) <= INLINE_OPEN_BYTES else await asyncio.to_thread(parsing)
        request_id, req, job_id = plain.request_id, plain.request, plain.job_id
        scope, resume, rules = plain.scope, plain.resume, plain.rules
        if resume.began:
            log.info("resuming an answer another node began")
        out = PlainFrames()
    if isinstance(req, TOKENIZER_REQUESTS):
        if out is None:
            assert sealed is not None  # a plaintext job's frames are made above
            out = SealedOut(sealed, node_id)
        return await tokenizer_jobs.serve(request, state.pool, state.receipts, req, out, job_id)
    endpoint: Endpoint = "chat" if isinstance(req, ChatCompletionRequest) else "completion"
    slot = state.pool.get(req.model)
    runner = slot.runner
    if slot.phase != "ready" or runner is None:
        raise Unavailable(f"the model '{req.model}' is not loaded here ({slot.phase})", retry_after=5)
    slot.last_used = time.monotonic()
    preparing = asyncio.get_running_loop().run_in_executor(
        None, functools.partial(prepare_choices, slot, runner, req, resume.text, rules)
    )
    if sealed is not None:
        out = SealedOut(sealed, node_id)  # its key derivation overlaps with the prompt's tokenizing
    try:
        prepared = await preparing
    except HearthError:
        raise
    except Exception:
        if runner.closed:  # the model was unloaded while the prompt was prepared (eviction, owner first)
            raise Unavailable(f"the model '{req.model}' was just unloaded here", retry_after=5) from None
        raise
    assert out is not None
    job = Batch.submit(runner, prepared, req.stop_sequences(), scope)
    writer = response_writer(
        endpoint, req, model=slot.id, request_id=request_id, stream=req.stream,
        include_usage=req.include_usage, created=resume.created, choices=len(prepared),
        logprobs=req.top_count is not None,
        echo=echoes(req, prepared, runner.backend.decode),
    )  # fmt: skip
    if resume.began:
        writer.resume(resume)
    response = web.StreamResponse(headers={"Content-Type": frames.MEDIA_TYPE})
    # Each prompt once, however many samples of it run (as OpenAI counts usage).
    prompt_tokens = sum(len(p.prompt_ids) for p in prepared[:: req.n]) - prepared[0].resumed_tokens
    outcome = "cancelled"
    tally = Tally(prepared[0].resumed_tokens)
    started = time.monotonic()
    flush = state.settings.e2e_flush_interval if sealed else 0.0
    try:
        await response.prepare(request)
        outcome = await _stream_job(
            response, job, writer, out, prompt_tokens, tally,
            resumed=resume.began, flush=flush,
        )  # fmt: skip
        await response.write_eof()
        slot.record_speed(tally.produced, time.monotonic() - started)
    except ConnectionResetError:
        pass  # the scheduler went away (its client left): the job is cancelled below
    finally:
        job.cancel()
        # What this job cost, as the node counted it: signed in its next heartbeat (node.receipts).
        state.receipts.add(job_id, prompt_tokens, tally.completion)
        produced = tally.produced
        slot.last_used = time.monotonic()
        # The scheduler counts its own jobs, so a job's end needs no heartbeat of its own; the LAN advert
        # (load, free memory) is refreshed, rate-limited.
        state.advert_changed.set()
        metrics = request.app[METRICS]
        metrics.jobs.labels(slot.id, outcome).inc()
        metrics.tokens.labels(slot.id, "prompt").inc(prompt_tokens)
        metrics.tokens.labels(slot.id, "completion").inc(produced)
    return response


@dataclass
class Tally:
    """A job's completion tokens so far: ``already`` from a node this one replaces, ``produced`` here."""

    already: int = 0
    produced: int = 0

    @property
    def completion(self) -> int:
        return self.already + self.produced


async def _stream_job(
    response: web.StreamResponse, job: Batch, writer: ResponseWriter, out: Out, prompt_tokens: int,
    tally: Tally, *, resumed: bool = False, flush: float = 0.0,
) -> str:  # fmt: skip
    """Write the job's frames until its end, counting in ``tally``; return the finish reason.

    ``resumed``: this node replaces one that sent the stream's first event already. ``flush`` > 0 holds
    frames at least that far apart, so a sealed stream's frame times say less about its tokens (what was
    generated meanwhile goes out together in the next frame)."""
    loop = asyncio.get_running_loop()
    pending = b"" if resumed else writer.start()
    last_progress = loop.time()
    reasons: list[str | None] = [None] * len(job.jobs)
    while True:
        try:
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow the handler's cancellation
            # when a delta lands in the same loop turn, and then a departed client's job runs on.
            async with asyncio.timeout(KEEPALIVE_S):
                deltas = await job.next_deltas()
        except TimeoutError:
            # Nothing to say yet (a long prefill, or a non-streaming answer still growing): tell the
            # scheduler, and any proxy on the way, that this node is alive.
            await response.write(out.keepalive(writer.keepalive()))
            continue
        data, pending = pending, b""
        failed: str | None = None
        for index, delta in deltas:
            data += writer.delta(delta.text, index, delta.logprobs, delta.prompt)
            if delta.finish_reason in ("error", "cancelled"):
                failed = failed or delta.finish_reason
            elif delta.finish_reason is not None:
                data += writer.finish_choice(index, delta.finish_reason)
                reasons[index] = delta.finish_reason
        tally.produced = job.completion
        completion = tally.completion
        if failed is None and None in reasons:
            chunk = out.data(data)
            if loop.time() - last_progress >= PROGRESS_S:
                # Running token counts, so a stream the client abandons is still accounted for.
                last_progress = loop.time()
                chunk += out.meta(_usage_meta(None, prompt_tokens, completion))
            if chunk:
                await response.write(chunk)
                if flush:
                    await asyncio.sleep(flush)
            continue
        if failed is not None:
            err = HearthError("the node failed while generating", code="generation_failed")
            body = {"status": err.status, **err.to_body()}
            await response.write(out.data(data) + frames.encode_json(body, frames.ERROR | frames.FINAL))
            return failed
        data += writer.end(prompt_tokens, completion)
        finish = reasons[0] or "stop"
        await response.write(out.end(data, _usage_meta(finish, prompt_tokens, completion)))
        return finish


def _usage_meta(finish_reason: str | None, prompt_tokens: int, completion_tokens: int) -> dict[str, object]:
    return {
        "finish_reason": finish_reason,
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
    }
