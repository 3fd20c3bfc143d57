"""POST /jobs: one OpenAI request run on this node, its answer written as frames (protocol.frames).

A job comes sealed (node.sealed: opened here, its answer sealed here) or, over loopback only, in plaintext
(node.plain); a tokenizer job is answered from the model's tokenizer (node.tokenizer_jobs). A generation
job is prepared (node.prepare: template, rules, context), runs as one runner job per choice (node.choices),
and its deltas are written by the response writer (node.openai_format, node.tool_calls) as they come, with
keepalives while there is nothing to say and running token counts for the scheduler. A job that continues
an answer another node began (node.resume) goes on from what the client has.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from dataclasses import dataclass

from aiohttp import web

from node import tokenizer_jobs
from node.backends.base import CacheScope
from node.choices import Batch, echoes
from node.openai_format import ResponseWriter
from node.plain import plain_job
from node.prepare import prepare_choices
from node.resume import Resume
from node.sealed import SealedFrames, SealedJob, open_job
from node.state import METRICS, authorize
from node.tool_calls import response_writer
from protocol import frames
from protocol.envelope import SEALED_JOB
from protocol.errors import HearthError, PermissionDenied, Unavailable
from protocol.rules import JobRules
from protocol.schemas import ChatCompletionRequest, Endpoint
from protocol.tokenizer import TOKENIZER_REQUESTS
from protocol.web import is_loopback, read_body

log = logging.getLogger("hearth.node")

KEEPALIVE_S = 10.0
PROGRESS_S = 1.0
INLINE_OPEN_BYTES = 64 * 1024


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
    state = await authorize(request, raw)
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
