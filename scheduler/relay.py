"""Relay one job to a node and its answer back to the client, frame by frame, without buffering.

DATA frames hold the client's bytes already (node-built SSE events or a JSON body), so relaying is a copy:
nothing here parses, logs or keeps what the model wrote. META frames give token counts for accounting.
Nodes are not trusted to be well-behaved (volunteers run them), so every META and ERROR frame is checked,
and a broken node ends the client's stream with an error event rather than with corrupt HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import aiohttp
from aiohttp import web

from protocol import frames
from protocol.directory import KeyStatement
from protocol.envelope import (
    FRAME_CHUNK,
    SEALED_JOB,
    EnvelopeError,
    ResponseOpener,
    ResponseSealer,
    response_secret,
    seal_request,
    to_wire,
)
from protocol.errors import HearthError, ProtocolError, Unavailable
from protocol.identity import b64e
from protocol.web import read_capped
from scheduler.store import UsageRecord
from scheduler.streams import (
    Failover,
    MidStream,
    PlainStream,
    SealedStream,
    Stream,
    failed,
)

T = TypeVar("T")
MAX_ERROR_BYTES = 64 * 1024
MAX_BODY_BYTES = 64 * 1024 * 1024  # a non-streaming answer, collected before it is sent
MAX_COUNT = 2**31 - 1
# Past this much unsent data a write may block on the client, so it gets a timeout.
STALL_BUFFER_BYTES = 32 * 1024


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
    group: str = "default"  # the token's group (policies), for the usage row
    rules: bytes = b""  # the group's rules for the node (protocol.rules.JobRules as JSON), b"" for none

    def attempt(
        self, body: bytes | None = None, *, cache_scope: str | None = None, resume: bytes = b""
    ) -> RelayJob:
        """This job for one node: a fresh job id, spliced into the body sent (``body``, else this one's),
        and for a plaintext job the user's prefix-cache scope on that node (node.runner) and what the
        client already has of the answer (``resume``, node.plain). The group's rules for the node ride
        beside the request in every kind of job, sealed or not (node.rules)."""
        job_id = secrets.token_hex(8)
        sent = body if body is not None else self.body
        head = b'{"job_id":"%s",' % job_id.encode()
        if self.rules:
            head += b'"rules":%s,' % self.rules
        if cache_scope is not None:
            head += b'"cache_scope":"%s",' % cache_scope.encode()
        if resume:
            # A node's events are UTF-8; a node that broke that cannot make the next node's job malformed.
            head += b'"resume":%s,' % json.dumps(resume.decode(errors="replace")).encode()
        return replace(self, job_id=job_id, body=head + sent[1:])


@dataclass(frozen=True, slots=True)
class Target:
    """Where a job goes: the node, its address, and the signed headers for this one job."""

    node_id: str
    url: str
    headers: dict[str, str]


SEALED_TTL_S = 60  # an envelope the scheduler seals is sent at once; nodes remember it this long (+ skew)


class Unsealer:
    """A plaintext request that the scheduler sealed toward its node (so that the network between them
    reads nothing): the scheduler keeps the response seed and opens the node's frames as `hearth proxy`
    would."""

    def __init__(self, seed: bytes, node_id: str, request_id: str, *, start: int = 0) -> None:
        self._opener = ResponseOpener(response_secret(seed, node_id, request_id), request_id, start=start)

    def data(self, frame: frames.Frame) -> bytes:
        try:
            return self._opener.open(frame.payload, final=frame.final)
        except EnvelopeError:
            raise ProtocolError("a node's sealed frame does not open") from None

    def finish(self) -> None:
        if not self._opener.finished:
            raise ProtocolError("a node's sealed answer ended before its final frame")


def seal_toward(
    job: RelayJob, request: bytes, max_tokens: int | None, key: KeyStatement, sent: bytes
) -> tuple[RelayJob, Unsealer]:
    """One attempt of ``job`` with its OpenAI ``request`` sealed to the node's current ``key``, and what
    opens the answer. The client's part of an answer another node began (``sent``) is handed over sealed
    under this envelope's response seed, as `hearth proxy` hands over frames, and the node continues the
    numbering. Each attempt has a seed of its own: no node learns the secret of another's answer."""
    sealed, seed = seal_request(
        request, endpoint=job.endpoint, model=job.model, max_tokens=max_tokens, stream=job.stream,
        request_id=job.request_id, issued_at=int(time.time()), ttl_s=SEALED_TTL_S,
        candidates=[key.candidate()],
    )  # fmt: skip
    segments, count = None, 0
    if sent:
        segments, count = _sealed_resume(sent, seed, job.request_id, key.node_id)
    body = json.dumps({"envelope": to_wire(sealed), "resume": segments}, separators=(",", ":")).encode()
    return job.attempt(body), Unsealer(seed, key.node_id, job.request_id, start=count)


def _sealed_resume(
    sent: bytes, seed: bytes, request_id: str, node_id: str
) -> tuple[list[dict[str, Any]], int]:
    """The client's part of the answer as one segment of frames sealed under the response secret of the
    node they go to (the scheduler holds the seed, as a proxy does), and how many frames it holds: the
    node numbers its own frames after them."""
    sealer = ResponseSealer(response_secret(seed, node_id, request_id), request_id)
    parts = [sent[i : i + FRAME_CHUNK] for i in range(0, len(sent), FRAME_CHUNK)]
    return [{"node_id": node_id, "frames": [b64e(sealer.seal(p)) for p in parts]}], len(parts)


# Refusals that say nothing about the request itself, only about that node: another node may take it.
FAILOVER_STATUSES = frozenset({401, 403, 404, 408, 429, 500, 502, 503, 504})
QUOTA_EXCEEDED = "quota_exceeded"


class _ClientStalled(Exception):
    """The client stopped reading: writing to it timed out."""


class ClientLeft(ConnectionResetError):
    """The client went away while its answer was written.

    aiohttp says so with ``ClientConnectionResetError``, which is also an ``aiohttp.ClientConnectionError``:
    let through, it would read as the node's connection failing, and a healthy node would be marked failed
    for a client's leaving. Callers that stop on ``ConnectionResetError`` stop on this too.
    """


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
        stream: Stream,
        unsealer: Unsealer | None = None,
        on_data: Callable[[int], None] = lambda chunks: None,
    ) -> None:
        """Relay one node's part of ``job``'s answer into ``stream``; ``usage`` receives the token counts.
        A plaintext job may be sealed toward its node (``unsealer`` opens the answer). ``on_data`` is told
        how many DATA frames each write sent the client (a count: it never sees them). Raises Failover when
        the node failed before sending the client anything, MidStream when it failed after."""
        if isinstance(stream, SealedStream):
            content_type = SEALED_JOB
        else:
            content_type = "application/json" if unsealer is None else SEALED_JOB

        async def pump(resp: aiohttp.ClientResponse) -> str:
            if isinstance(stream, SealedStream):
                return await _pump_sealed(self, request, resp, usage, stream, target.node_id, on_data)
            return await self._pump(request, resp, job, usage, target.node_id, stream, unsealer, on_data)

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
                    # A prompt larger than the quota reserved for it (node.rules) is too large anywhere.
                    if (resp.status in FAILOVER_STATUSES and err.code != QUOTA_EXCEEDED) or (
                        content_type == SEALED_JOB and err.code == EnvelopeError.default_code
                    ):
                        raise Failover(err)
                    raise err
                try:
                    status = await pump(resp)
                except (Failover, MidStream):
                    status = "node_failed"
                    raise
                except HearthError:
                    status = "node_error"  # the node refused it in an ERROR frame
                    raise
            finally:
                resp.close()
        finally:
            first = stream.first_answer
            self._on_done(
                job.job_id,
                UsageRecord(
                    job.request_id, job.token_id, job.model, job.endpoint, node_id, status,
                    usage["prompt_tokens"], usage["completion_tokens"], job.started, time.time(),
                    job.group, None if first is None else round((first - job.started) * 1000, 1),
                )
            )  # fmt: skip

    async def _pump(
        self,
        request: web.Request,
        resp: aiohttp.ClientResponse,
        job: RelayJob,
        usage: dict[str, int],
        node_id: str,
        stream: PlainStream,
        unsealer: Unsealer | None,
        on_data: Callable[[int], None],
    ) -> str:
        decoder = frames.FrameDecoder()
        collected: list[bytes] = []
        size = 0
        start = stream.size  # what the client had before this node
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
                        if stream.first_answer is None and payload and not payload.startswith(b":"):
                            stream.first_answer = time.time()  # an SSE comment is a keepalive
                        if not job.stream:
                            size += len(payload)
                            if size > MAX_BODY_BYTES:
                                raise ProtocolError("the node's answer is over the size limit")
                            collected.append(payload)
                        elif payload:
                            relay_now.append(payload)
                    elif frame.kind == frames.META:
                        usage.update(_usage(frame))
                    else:
                        err = _error(frame)
                        await self._relay_plain(request, stream, relay_now, on_data)
                        raise failed(stream.size > start, err, FAILOVER_STATUSES)
                # One write for everything one read brought: a burst of tokens costs one syscall.
                await self._relay_plain(request, stream, relay_now, on_data)
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
            raise failed(stream.size > start, err, FAILOVER_STATUSES) from None
        except _ClientStalled:
            if request.transport is not None:
                request.transport.close()
            return "client_stalled"
        if not job.stream:
            stream.body = web.Response(body=b"".join(collected), content_type="application/json")
            return "ok"
        if stream.out is None:
            await stream.send(self._write, request, b"")
        assert stream.out is not None
        await stream.out.write_eof()
        return "ok"

    async def _relay_plain(
        self, request: web.Request, stream: PlainStream, payloads: list[bytes], on_data: Callable[[int], None]
    ) -> None:
        if payloads:
            data = b"".join(payloads)
            await self._send(request, stream, data)
            stream.relayed(data)
            on_data(len(payloads))

    async def _send(self, request: web.Request, stream: Stream, data: bytes) -> None:
        """Write to the client; its leaving is ClientLeft, never an error of the node being read."""
        try:
            await stream.send(self._write, request, data)
        except ConnectionResetError as exc:
            raise ClientLeft(str(exc)) from None

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

    async def end_with_error(self, request: web.Request, stream: Stream, err: HearthError) -> None:
        """End a stream the client has begun receiving, and no node can finish, with an error."""
        with contextlib.suppress(_ClientStalled, ConnectionResetError):
            await stream.fail(self._write, request, err)


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


async def _pump_sealed(
    relay: Relay,
    request: web.Request,
    resp: aiohttp.ClientResponse,
    usage: dict[str, int],
    stream: SealedStream,
    node_id: str,
    on_data: Callable[[int], None],
) -> str:
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
            data = 0  # DATA frames among relay_now (a ROUTE frame may lead them)
            for frame in decoder.feed(chunk):
                if frame.kind == frames.DATA:
                    data += 1
                    if stream.first_answer is None:
                        # Sealed: the first frame may be a keepalive, sent only after seconds of prefill.
                        stream.first_answer = time.time()
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
                        await relay._send(request, stream, b"".join(relay_now))
                        on_data(data)
                    raise failed(stream.seq > start, err, FAILOVER_STATUSES)
            if relay_now:
                await relay._send(request, stream, b"".join(relay_now))
                on_data(data)
        decoder.close()
    except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, TimeoutError, ProtocolError):
        relay._on_node_failed(node_id)
        raise failed(
            stream.seq > start, Unavailable("the node failed while answering; try again", code="node_failed",
                              retry_after=relay._retry_after), FAILOVER_STATUSES,
        ) from None  # fmt: skip
    stream.finished = True
    return "ok"
