"""Relay one job to a node and its answer back to the client, frame by frame, without buffering.

DATA frames hold the client's bytes already (node-built SSE events or a JSON body), so relaying is a copy:
nothing here parses, logs or keeps what the model wrote. META frames give token counts for accounting.
Nodes are not trusted to be well-behaved (volunteers run them), so every META and ERROR frame is checked,
and a broken node ends the client's stream with an error event rather than with corrupt HTTP.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import aiohttp
from aiohttp import web

from protocol import frames
from protocol.directory import KeyStatement
from protocol.envelope import (
    SEALED_JOB,
    EnvelopeError,
    ResponseOpener,
    response_secret,
    seal_request,
    to_wire,
)
from protocol.errors import HearthError, ProtocolError, Unavailable
from protocol.identity import b64e
from protocol.web import log_unexpected, read_capped
from scheduler.store import UsageRecord

T = TypeVar("T")
MAX_ERROR_BYTES = 64 * 1024
MAX_BODY_BYTES = 64 * 1024 * 1024  # a non-streaming answer, collected before it is sent
MAX_COUNT = 2**31 - 1
# Past this much unsent data a write may block on the client, so it gets a timeout.
STALL_BUFFER_BYTES = 32 * 1024
SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}


@dataclass(frozen=True, slots=True)
class RelayJob:
    request_id: str
    token_id: str
    endpoint: str
    model: str
    stream: bool
    body: bytes  # a JSON object, without its job id
    started: float
    job_id: str = ""  # one attempt's id, for the node's usage receipt (scheduler.ledger)

    def attempt(self, body: bytes | None = None, *, cache_scope: str | None = None) -> RelayJob:
        """This job for one node: a fresh job id, spliced into the body sent (``body``, else this one's),
        and for a plaintext job the user's prefix-cache scope on that node (node.runner)."""
        job_id = secrets.token_hex(8)
        sent = body if body is not None else self.body
        head = b'{"job_id":"%s",' % job_id.encode()
        if cache_scope is not None:
            head += b'"cache_scope":"%s",' % cache_scope.encode()
        return replace(self, job_id=job_id, body=head + sent[1:])


@dataclass(frozen=True, slots=True)
class Target:
    """Where a job goes: the node, its address, and the signed headers for this one job."""

    node_id: str
    url: str
    headers: dict[str, str]


class Failover(Exception):
    """The node failed or refused before the client saw a byte: the job may go to another node.

    ``error`` is what the client gets when no other node is left to try.
    """

    def __init__(self, error: HearthError) -> None:
        super().__init__(error.message)
        self.error = error


SEALED_TTL_S = 60  # an envelope the scheduler seals is sent at once; nodes remember it this long (+ skew)


class Unsealer:
    """A plaintext request that the scheduler sealed toward its node (so that the network between them
    reads nothing): the scheduler keeps the response seed and opens the node's frames as `hearth proxy`
    would."""

    def __init__(self, seed: bytes, node_id: str, request_id: str) -> None:
        self._opener = ResponseOpener(response_secret(seed, node_id, request_id), request_id)

    def data(self, frame: frames.Frame) -> bytes:
        try:
            return self._opener.open(frame.payload, final=frame.final)
        except EnvelopeError:
            raise ProtocolError("a node's sealed frame does not open") from None

    def finish(self) -> None:
        if not self._opener.finished:
            raise ProtocolError("a node's sealed answer ended before its final frame")


def seal_toward(
    job: RelayJob, request: bytes, max_tokens: int | None, key: KeyStatement
) -> tuple[RelayJob, Unsealer]:
    """One attempt of ``job`` with its OpenAI ``request`` sealed to the node's current ``key``, and what
    opens the answer."""
    sealed, seed = seal_request(
        request, endpoint=job.endpoint, model=job.model, max_tokens=max_tokens, stream=job.stream,
        request_id=job.request_id, issued_at=int(time.time()), ttl_s=SEALED_TTL_S,
        candidates=[key.candidate()],
    )  # fmt: skip
    body = json.dumps({"envelope": to_wire(sealed), "resume": None}, separators=(",", ":")).encode()
    return job.attempt(body), Unsealer(seed, key.node_id, job.request_id)


# Refusals that say nothing about the request itself, only about that node: another node may take it.
_FAILOVER_STATUSES = frozenset({401, 403, 404, 408, 429, 500, 502, 503, 504})


class _ClientStalled(Exception):
    """The client stopped reading: writing to it timed out."""


class Relay:
    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        idle_timeout: float,
        retry_after: float,
        on_done: Callable[[str, UsageRecord], None],
        on_node_failed: Callable[[str], None],
        on_first_frame: Callable[[float], None] = lambda seconds: None,
        on_dispatch: Callable[[str, str], None] = lambda node_id, job_id: None,
    ) -> None:
        self._session = session
        self._timeout = aiohttp.ClientTimeout(total=None, connect=5.0, sock_read=idle_timeout)
        self._write_timeout = idle_timeout
        self._retry_after = retry_after
        self._on_done = on_done
        self._on_node_failed = on_node_failed
        self._on_first_frame = on_first_frame
        self._on_dispatch = on_dispatch

    async def run(
        self,
        request: web.Request,
        target: Target,
        job: RelayJob,
        usage: dict[str, int],
        unsealer: Unsealer | None = None,
    ) -> web.StreamResponse:
        """Relay ``job`` to ``target``; ``usage`` receives the token counts. With an ``unsealer`` the job
        is sealed (seal_toward) and so is the answer. Raises Failover when the node failed before the
        client saw anything."""
        return await self._exchange(
            target, job, usage, "application/json" if unsealer is None else SEALED_JOB,
            lambda resp: self._pump(request, resp, job, usage, target.node_id, unsealer),
        )  # fmt: skip

    async def run_sealed(
        self,
        request: web.Request,
        target: Target,
        job: RelayJob,
        usage: dict[str, int],
        stream: SealedStream,
    ) -> None:
        """Relay one node's part of a sealed answer into ``stream``. Raises Failover when the node failed
        before sending a DATA frame, MidStream when it failed after."""
        await self._exchange(
            target, job, usage, SEALED_JOB,
            lambda resp: _pump_sealed(self, request, resp, usage, stream, target.node_id),
        )  # fmt: skip

    async def _exchange(
        self,
        target: Target,
        job: RelayJob,
        usage: dict[str, int],
        content_type: str,
        pump: Callable[[aiohttp.ClientResponse], Awaitable[tuple[T, str]]],
    ) -> T:
        """Send ``job`` to the node, hand its answer to ``pump``, and record usage however it ends."""
        node_id = target.node_id
        status = "cancelled"
        self._on_dispatch(node_id, job.job_id)
        try:
            try:
                resp = await self._session.post(
                    target.url.rstrip("/") + "/jobs",
                    data=job.body,
                    headers={**target.headers, "Content-Type": content_type},
                    timeout=self._timeout,
                )
            except (aiohttp.ClientError, TimeoutError):
                self._on_node_failed(node_id)
                status = "node_unreachable"
                raise Failover(
                    Unavailable(
                        "the node serving this model could not be reached", retry_after=self._retry_after
                    )
                ) from None
            try:
                if resp.status != 200:
                    status = f"refused_{resp.status}"
                    err = await _node_error(resp, self._retry_after)
                    # A node's 400 is final (another node would refuse the same request), except an
                    # envelope this node cannot open: it may have lost its key, or opened this one before
                    # (a replay), and another candidate may open it. Neither learns which check failed.
                    if resp.status in _FAILOVER_STATUSES or (
                        content_type == SEALED_JOB and err.code == EnvelopeError.default_code
                    ):
                        raise Failover(err)
                    raise err
                result, status = await pump(resp)
                return result
            finally:
                resp.close()
        finally:
            self._on_done(
                job.job_id,
                UsageRecord(
                    job.request_id, job.token_id, job.model, job.endpoint, node_id, status,
                    usage["prompt_tokens"], usage["completion_tokens"], job.started, time.time(),
                )
            )  # fmt: skip

    async def _pump(
        self,
        request: web.Request,
        resp: aiohttp.ClientResponse,
        job: RelayJob,
        usage: dict[str, int],
        node_id: str,
        unsealer: Unsealer | None,
    ) -> tuple[web.StreamResponse, str]:
        decoder = frames.FrameDecoder()
        out: web.StreamResponse | None = None
        collected: list[bytes] = []
        size = 0
        first = True
        try:
            async for chunk in resp.content.iter_any():
                if first:
                    first = False
                    self._on_first_frame(time.time() - job.started)
                relay_now: list[bytes] = []
                for frame in decoder.feed(chunk):
                    if frame.kind == frames.DATA:
                        payload = frame.payload if unsealer is None else unsealer.data(frame)
                        if not job.stream:
                            size += len(payload)
                            if size > MAX_BODY_BYTES:
                                raise ProtocolError("the node's answer is over the size limit")
                            collected.append(payload)
                        else:
                            relay_now.append(payload)
                    elif frame.kind == frames.META:
                        usage.update(_usage(frame))
                    else:
                        err = _error(frame)
                        if out is None:
                            raise Failover(err) if err.status in _FAILOVER_STATUSES else err
                        if relay_now:
                            await self._write(request, out, b"".join(relay_now))
                        await self._end_with_error(request, out, err)
                        return out, "node_error"
                if relay_now:
                    # One write for everything one read brought: a burst of tokens costs one syscall.
                    if out is None:
                        out = web.StreamResponse(headers=SSE_HEADERS)
                        await out.prepare(request)
                    await self._write(request, out, b"".join(relay_now))
            decoder.close()
            if unsealer is not None:
                unsealer.finish()
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, TimeoutError, ProtocolError):
            self._on_node_failed(node_id)
            err = Unavailable(
                "the node failed while answering; try again",
                code="node_failed",
                retry_after=self._retry_after,
            )
            if out is None:
                raise Failover(err) from None
            await self._end_with_error(request, out, err)
            return out, "node_failed"
        except _ClientStalled:
            if request.transport is not None:
                request.transport.close()
            assert out is not None
            return out, "client_stalled"
        except (HearthError, Failover, ConnectionResetError, asyncio.CancelledError):
            raise
        except Exception as exc:
            if out is None:
                raise
            # The response has started: a new one cannot be sent, so end this one with an error event.
            log_unexpected("relaying a stream", exc)
            await self._end_with_error(request, out, HearthError("internal error while relaying"))
            return out, "error"
        if job.stream:
            if out is None:
                out = web.StreamResponse(headers=SSE_HEADERS)
                await out.prepare(request)
            await out.write_eof()
            return out, "ok"
        return web.Response(body=b"".join(collected), content_type="application/json"), "ok"

    async def _write(self, request: web.Request, out: web.StreamResponse, payload: bytes) -> None:
        transport = request.transport
        if transport is None or transport.get_write_buffer_size() < STALL_BUFFER_BYTES:
            # The common case: the client keeps up, the write cannot block, and a timer per token
            # would cost more than the copy.
            await out.write(payload)
            return
        try:
            async with asyncio.timeout(self._write_timeout):
                await out.write(payload)
        except TimeoutError:
            raise _ClientStalled from None

    async def _end_with_error(self, request: web.Request, out: web.StreamResponse, err: HearthError) -> None:
        try:
            await self._write(request, out, b"data: " + json.dumps(err.to_body()).encode() + b"\n\n")
            await out.write_eof()
        except (_ClientStalled, ConnectionResetError):
            pass


def _usage(frame: frames.Frame) -> dict[str, int]:
    """A META frame's token counts (for the moment: the node's signed receipt follows, scheduler.ledger)."""
    meta = frame.json()
    if not isinstance(meta, dict):
        raise ProtocolError("a node's META frame is not an object")
    counts = {k: meta.get(k) for k in ("prompt_tokens", "completion_tokens")}
    for value in counts.values():
        if type(value) is not int or not 0 <= value <= MAX_COUNT:
            raise ProtocolError("a node's token counts are malformed")
    return counts  # type: ignore[return-value]


def _error(frame: frames.Frame) -> HearthError:
    body: Any = frame.json()
    status = body.get("status") if isinstance(body, dict) else None
    if type(status) is not int or not 400 <= status <= 599 or not isinstance(body.get("error"), dict):
        raise ProtocolError("a node's ERROR frame is malformed")
    return HearthError.from_body(status, body)


async def _node_error(resp: aiohttp.ClientResponse, retry_after: float) -> HearthError:
    """The node refused before answering: pass its error on (it names the field, never the text)."""
    try:
        body = json.loads(await read_capped(resp, MAX_ERROR_BYTES))
    except (ValueError, aiohttp.ClientError, TimeoutError):
        body = None
    if resp.status in (401, 403):
        # The node does not recognise its scheduler: an operator problem, not the client's.
        return Unavailable(
            "this model's node refused the scheduler; the operator must check its keys",
            retry_after=retry_after,
        )
    err = HearthError.from_body(resp.status, body)
    if err.status in (429, 503):
        try:
            err.retry_after = float(resp.headers.get("Retry-After", ""))
        except ValueError:
            err.retry_after = retry_after
    return err


# Sealed requests: the scheduler relays frames it cannot read, and fails over blindly.

MAX_RESUME_BYTES = 4 * 1024 * 1024  # ciphertext kept for a replacement node; past it, no blind failover


@dataclass
class SealedStream:
    """One sealed request's answer as the proxy receives it, across every node that worked on it.

    ``segments`` holds each node's DATA frames (ciphertext) so that a replacement can be handed what the
    user already has, up to MAX_RESUME_BYTES (past that they are dropped: no blind failover for this
    answer); ``seq`` counts the frames relayed."""

    out: web.StreamResponse | None = None
    segments: list[tuple[str, list[bytes]]] = field(default_factory=list)
    size: int = 0
    seq: int = 0
    finished: bool = False

    def relayed(self, frames_: list[bytes], payload: bytes) -> None:
        self.seq += 1
        self.size += len(payload)
        if self.size <= MAX_RESUME_BYTES:
            frames_.append(payload)
        elif self.size - len(payload) <= MAX_RESUME_BYTES:
            for _, kept in self.segments:
                kept.clear()  # too long to resume: keep no copy of it

    def resume(self) -> list[dict[str, Any]] | None:
        done = [{"node_id": n, "frames": [b64e(f) for f in fs]} for n, fs in self.segments if fs]
        return done or None

    def resume_json(self) -> bytes:
        """``resume()`` as JSON (``null`` on a first attempt, the usual case, without encoding anything)."""
        done = self.resume()
        return b"null" if done is None else json.dumps(done).encode()

    @property
    def resumable(self) -> bool:
        return self.size <= MAX_RESUME_BYTES


class MidStream(Exception):
    """The node failed after the proxy had received some of its frames: the stream may go on elsewhere."""

    def __init__(self, error: HearthError) -> None:
        super().__init__(error.message)
        self.error = error


async def _pump_sealed(
    relay: Relay,
    request: web.Request,
    resp: aiohttp.ClientResponse,
    usage: dict[str, int],
    stream: SealedStream,
    node_id: str,
) -> tuple[None, str]:
    decoder = frames.FrameDecoder()
    mine: list[bytes] = []
    stream.segments.append((node_id, mine))
    start = stream.seq
    # Whose frames follow, sent with the first of them (the client has every candidate's keys ready). Node
    # ids are lower-case letters, digits and '-' (protocol.federation), so the JSON needs no escaping.
    route: bytes | None = frames.encode(
        b'{"node_id":"%s","seq":%d}' % (node_id.encode(), start), frames.ROUTE
    )
    try:
        async for chunk in resp.content.iter_any():
            relay_now: list[bytes] = []
            for frame in decoder.feed(chunk):
                if frame.kind == frames.DATA:
                    if route is not None:
                        relay_now.append(route)
                        route = None
                    stream.relayed(mine, frame.payload)
                    relay_now.append(frames.encode(frame.payload, frame.flags))
                elif frame.kind == frames.META:
                    usage.update(_usage(frame))
                else:
                    err = _error(frame) if frame.kind == frames.ERROR else ProtocolError("unexpected frame")
                    if relay_now:
                        await _send(relay, request, stream, b"".join(relay_now))
                    raise _failed(stream.seq > start, err)
            if relay_now:
                await _send(relay, request, stream, b"".join(relay_now))
        decoder.close()
    except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, TimeoutError, ProtocolError):
        relay._on_node_failed(node_id)
        raise _failed(
            stream.seq > start, Unavailable("the node failed while answering; try again", code="node_failed",
                              retry_after=relay._retry_after)
        ) from None  # fmt: skip
    stream.finished = True
    return None, "ok"


def _failed(sent: bool, err: HearthError) -> Exception:
    """Failover when the node sent the client nothing yet (or a final refusal), MidStream when it had."""
    if not sent:
        return Failover(err) if err.status in _FAILOVER_STATUSES else err
    return MidStream(err)


async def _send(relay: Relay, request: web.Request, stream: SealedStream, data: bytes) -> None:
    if stream.out is None:
        stream.out = web.StreamResponse(
            headers={"Content-Type": frames.MEDIA_TYPE, "Cache-Control": "no-cache"}
        )
        await stream.out.prepare(request)
    await relay._write(request, stream.out, data)


async def end_sealed(relay: Relay, request: web.Request, stream: SealedStream, err: HearthError) -> None:
    """End a sealed stream that no node can finish with an error frame (plaintext: it says nothing)."""
    assert stream.out is not None
    try:
        await relay._write(request, stream.out, frames.encode_json({"status": err.status, **err.to_body()},
                                                                   frames.ERROR | frames.FINAL))  # fmt: skip
        await stream.out.write_eof()
    except (_ClientStalled, ConnectionResetError):
        pass
