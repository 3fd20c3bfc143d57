"""The node agent's HTTP API (aiohttp).

    GET  /healthz   liveness, no auth
    GET  /status    models, their state and load (scheduler only)
    GET  /metrics   Prometheus metrics (scheduler only)
    POST /jobs      run one OpenAI request; the answer is a stream of frames (protocol.frames)

Only the node sees prompt text: it validates the request, renders the chat template, fits the context,
generates, and writes the client's bytes itself.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from aiohttp import web

from node.backends.base import Backend, SamplingParams
from node.context import fit_messages, fit_prompt
from node.metrics import NodeMetrics
from node.openai_format import ResponseWriter
from node.runner import Job, JobRunner
from node.settings import ModelSettings, NodeSettings
from node.templates import ChatTemplate, Message, resolve_template
from protocol import frames
from protocol.errors import (
    AuthenticationFailed,
    ContextLengthExceeded,
    HearthError,
    InvalidRequest,
    ModelNotFound,
    Unavailable,
)
from protocol.schemas import ChatCompletionRequest, CompletionRequest, Endpoint, parse_request
from protocol.web import error_middleware, in_daemon_thread, json_response, log_unexpected, read_json

log = logging.getLogger("hearth.node")

VERSION = "0.1.0"
KEEPALIVE_S = 10.0
PROGRESS_S = 1.0
_REQUEST_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

BackendLoader = Callable[[ModelSettings, NodeSettings], Backend]


def load_transformers(model: ModelSettings, settings: NodeSettings) -> Backend:
    from node.backends.transformers_backend import TransformersBackend

    return TransformersBackend.load(model.path, threads=settings.threads)


@dataclass
class ModelSlot:
    settings: ModelSettings
    state: Literal["loading", "ready", "failed"] = "loading"
    runner: JobRunner | None = None
    template: ChatTemplate | None = None

    @property
    def id(self) -> str:
        return self.settings.model_id

    def describe(self) -> dict[str, object]:
        runner = self.runner
        return {
            "id": self.id,
            "state": self.state,
            "context_length": runner.backend.context_length if runner else None,
            "active": runner.active if runner else 0,
            "queued": runner.queued if runner else 0,
            "started": runner.started if runner else 0,
            "skipped": runner.skipped if runner else 0,
            "template": self.template.name if self.template else None,
        }


SLOTS = web.AppKey("slots", dict[str, ModelSlot])
SETTINGS = web.AppKey("settings", NodeSettings)
METRICS = web.AppKey("metrics", NodeMetrics)


def create_app(settings: NodeSettings, *, loader: BackendLoader = load_transformers) -> web.Application:
    app = web.Application(middlewares=[error_middleware], client_max_size=settings.max_body_bytes)
    app[SETTINGS] = settings
    slots = {m.model_id: ModelSlot(m) for m in settings.models}
    app[SLOTS] = slots
    app[METRICS] = NodeMetrics(
        lambda: [(s.id, s.runner.active, s.runner.queued) for s in slots.values() if s.runner is not None]
    )
    app.cleanup_ctx.append(_models_ctx(loader))
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/status", status)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/jobs", submit_job)
    return app


def _models_ctx(loader: BackendLoader) -> Callable[[web.Application], AsyncIterator[None]]:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        settings = app[SETTINGS]
        loads = [asyncio.create_task(_load(slot, loader, settings)) for slot in app[SLOTS].values()]
        yield
        for task in loads:
            task.cancel()
        await asyncio.gather(*loads, return_exceptions=True)
        for slot in app[SLOTS].values():
            if slot.runner is not None:
                await asyncio.to_thread(slot.runner.stop)

    return ctx


async def _load(slot: ModelSlot, loader: BackendLoader, settings: NodeSettings) -> None:
    try:
        backend = await in_daemon_thread(lambda: loader(slot.settings, settings), f"hearth-load-{slot.id}")
        slot.template = resolve_template(
            slot.settings.chat_template,
            backend.chat_template,
            bos_token=backend.bos_token,
            eos_token=backend.eos_token,
        )
    except HearthError as exc:
        slot.state = "failed"
        log.error("model %s failed to load: %s", slot.id, exc.message)
        return
    except Exception as exc:
        slot.state = "failed"
        log_unexpected(f"loading model {slot.id}", exc)
        return
    slot.runner = JobRunner(backend, max_queued=slot.settings.max_queued, name=slot.id)
    slot.runner.start()
    slot.state = "ready"
    log.info("model %s ready (context %d tokens)", slot.id, backend.context_length)


def _authorize(request: web.Request) -> None:
    secret = request.app[SETTINGS].secret.get_secret_value()
    presented = request.headers.get("Authorization", "").removeprefix("Bearer ")
    if not secret or not hmac.compare_digest(presented.encode(), secret.encode()):
        raise AuthenticationFailed("this node accepts calls only from its scheduler")


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def metrics(request: web.Request) -> web.Response:
    _authorize(request)
    return web.Response(body=request.app[METRICS].render(), content_type="text/plain", charset="utf-8")


async def status(request: web.Request) -> web.Response:
    _authorize(request)
    settings = request.app[SETTINGS]
    return json_response(
        {
            "node_id": settings.node_id,
            "version": VERSION,
            "models": [slot.describe() for slot in request.app[SLOTS].values()],
        }
    )


@dataclass(frozen=True)
class Prepared:
    prompt_ids: list[int]
    params: SamplingParams


def _prepare(slot: ModelSlot, req: ChatCompletionRequest | CompletionRequest) -> Prepared:
    """Render, tokenize and fit the prompt (CPU work: runs in a thread)."""
    assert slot.runner is not None and slot.template is not None
    backend = slot.runner.backend
    context = backend.context_length
    requested = req.requested_max_tokens
    if requested is not None and requested >= context:
        raise ContextLengthExceeded(
            f"max_tokens is {requested} but the model's context is {context} tokens, prompt included",
            param="max_tokens",
        )
    budget = context - (requested if requested is not None else 1)
    if isinstance(req, ChatCompletionRequest):
        template = slot.template
        messages: list[Message] = [
            {"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})}
            for m in req.messages
        ]
        # Fitting counts candidate conversations; keep each one's ids so the winner is not encoded twice.
        encoded: dict[tuple[int, ...], list[int]] = {}

        def count(candidate: Sequence[Message]) -> int:
            ids = backend.encode(template.render(candidate), add_special_tokens=False)
            encoded[tuple(map(id, candidate))] = ids
            return len(ids)

        truncate = (req.truncation or slot.settings.truncation) == "auto"
        fitted = fit_messages(messages, count_tokens=count, budget=budget, truncate=truncate)
        key = tuple(map(id, fitted.messages))
        prompt_ids = (
            encoded[key]
            if key in encoded
            else backend.encode(template.render(fitted.messages), add_special_tokens=False)
        )
        default = slot.settings.default_max_tokens
    else:
        prompt_ids = backend.encode(req.prompt_text(), add_special_tokens=True)
        fit_prompt(len(prompt_ids), budget=budget)
        default = 16
    if not prompt_ids:
        raise InvalidRequest("the prompt is empty", param="prompt")
    room = context - len(prompt_ids)
    max_new = min(requested if requested is not None else default, room)
    params = SamplingParams(
        max_new_tokens=max_new,
        temperature=req.temperature,
        top_p=req.top_p,
        seed=req.seed,
        presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty,
        ignore_eos=req.ignore_eos,
    )
    return Prepared(prompt_ids, params)


async def submit_job(request: web.Request) -> web.StreamResponse:
    _authorize(request)
    body = await read_json(request)
    if not isinstance(body, dict) or body.get("endpoint") not in ("chat", "completion"):
        raise InvalidRequest("a job needs an endpoint ('chat' or 'completion') and a request")
    endpoint: Endpoint = body["endpoint"]
    request_id = str(body.get("request_id", ""))
    if not _REQUEST_ID.match(request_id):
        raise InvalidRequest("a job needs a request_id of 1-64 letters, digits, '-' or '_'")
    req = parse_request(endpoint, body.get("request"))
    slot = request.app[SLOTS].get(req.model)
    if slot is None:
        raise ModelNotFound(f"this node does not serve the model '{req.model}'", param="model")
    if slot.state != "ready" or slot.runner is None:
        raise Unavailable(f"the model '{req.model}' is {slot.state}", retry_after=5)
    prepared = await asyncio.to_thread(_prepare, slot, req)
    job = slot.runner.submit(prepared.prompt_ids, prepared.params, req.stop_sequences())
    writer = ResponseWriter(
        endpoint, model=slot.id, request_id=request_id, stream=req.stream, include_usage=req.include_usage
    )
    response = web.StreamResponse(headers={"Content-Type": frames.MEDIA_TYPE})
    prompt_tokens = len(prepared.prompt_ids)
    produced, outcome = 0, "cancelled"
    try:
        await response.prepare(request)
        outcome, produced = await _stream_job(response, job, writer, prompt_tokens)
        await response.write_eof()
    except ConnectionResetError:
        pass  # the scheduler went away (its client left): the job is cancelled below
    finally:
        job.cancel()
        metrics = request.app[METRICS]
        metrics.jobs.labels(slot.id, outcome).inc()
        metrics.tokens.labels(slot.id, "prompt").inc(prompt_tokens)
        metrics.tokens.labels(slot.id, "completion").inc(produced)
    return response


async def _stream_job(
    response: web.StreamResponse, job: Job, writer: ResponseWriter, prompt_tokens: int
) -> tuple[str, int]:
    """Write the job's frames until its end; return (finish reason, completion tokens)."""
    loop = asyncio.get_running_loop()
    pending = writer.start()
    last_progress = loop.time()
    while True:
        try:
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow the handler's cancellation
            # when a delta lands in the same loop turn, and then a departed client's job runs on.
            async with asyncio.timeout(KEEPALIVE_S):
                deltas = await job.next_deltas()
        except TimeoutError:
            # Nothing to say yet (a long prefill, or a non-streaming answer still growing): tell the
            # scheduler, and any proxy on the way, that this node is alive.
            await response.write(frames.encode(writer.keepalive()))
            continue
        last = deltas[-1]
        data = pending + b"".join(writer.delta(d.text) for d in deltas)
        pending = b""
        if last.finish_reason is None:
            out = frames.encode_data(data) if data else b""
            if loop.time() - last_progress >= PROGRESS_S:
                # Running token counts, so a stream the client abandons is still accounted for.
                last_progress = loop.time()
                out += frames.encode_json(
                    _usage_meta(None, prompt_tokens, last.completion_tokens), frames.META
                )
            if out:
                await response.write(out)
            continue
        if last.finish_reason in ("error", "cancelled"):
            err = HearthError("the node failed while generating", code="generation_failed")
            body = {"status": err.status, **err.to_body()}
            await response.write(
                frames.encode_data(data) + frames.encode_json(body, frames.ERROR | frames.FINAL)
            )
            return last.finish_reason, last.completion_tokens
        data += writer.finish(last.finish_reason, prompt_tokens, last.completion_tokens)
        meta = _usage_meta(last.finish_reason, prompt_tokens, last.completion_tokens)
        await response.write(frames.encode_data(data) + frames.encode_json(meta, frames.META | frames.FINAL))
        return last.finish_reason, last.completion_tokens


def _usage_meta(finish_reason: str | None, prompt_tokens: int, completion_tokens: int) -> dict[str, object]:
    return {
        "finish_reason": finish_reason,
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
    }
