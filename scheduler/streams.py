"""One request's answer as its client receives it, across every node that works on it.

A node may fail before its first byte (``Failover``: another node starts afresh) or mid-answer
(``MidStream``: another node continues from what the client already has). Both kinds of request keep what
a replacement needs:

- ``PlainStream``, a request the scheduler may read: the SSE bytes relayed so far. A node reached over
  loopback gets them as they are; one the scheduler seals toward gets them sealed under the request's
  response seed (scheduler.relay.seal_toward), as `hearth proxy` hands over frames.
- ``SealedStream``, a request the scheduler cannot read: each node's sealed frames, handed to the next
  candidate, which opens them (it holds the response seed) and continues (blind failover).

Past MAX_RESUME_BYTES nothing is kept and the answer cannot be continued: its client gets an error event.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from protocol import frames
from protocol.errors import HearthError
from protocol.identity import b64e

MAX_RESUME_BYTES = 4 * 1024 * 1024  # kept for a replacement node; past it, no failover mid-answer
# A plaintext answer is handed over inside a job with its request (up to 1 MiB, padded, base64 when sealed):
# kept smaller, so the whole job stays within a node's default 8 MiB body limit.
MAX_PLAIN_RESUME_BYTES = 2 * 1024 * 1024
SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}

Write = Callable[[web.Request, web.StreamResponse, bytes], Awaitable[None]]


class Failover(Exception):
    """The node failed or refused before the client saw a byte of it: the job may go to another node.

    ``error`` is what the client gets when no other node is left to try.
    """

    def __init__(self, error: HearthError) -> None:
        super().__init__(error.message)
        self.error = error


class MidStream(Exception):
    """The node failed after the client had received some of its answer: another node may continue it."""

    def __init__(self, error: HearthError) -> None:
        super().__init__(error.message)
        self.error = error


def failed(sent: bool, err: HearthError, failover_statuses: frozenset[int]) -> Exception:
    """Failover when the node sent the client nothing yet (or ``err`` is a final refusal), MidStream when
    it had."""
    if not sent:
        return Failover(err) if err.status in failover_statuses else err
    return MidStream(err)


@dataclass
class PlainStream:
    """A plaintext request's answer: SSE events relayed as they come, or one JSON body at the end."""

    stream: bool
    out: web.StreamResponse | None = None
    body: web.Response | None = None
    size: int = 0
    sent: bytearray = field(default_factory=bytearray)  # the SSE bytes relayed, for a replacement node
    first_answer: float | None = None  # when a node sent the answer's first bytes (time to first token)

    def relayed(self, payload: bytes) -> None:
        self.size += len(payload)
        if self.size <= MAX_PLAIN_RESUME_BYTES:
            self.sent += payload
        else:
            self.sent.clear()

    @property
    def resumable(self) -> bool:
        return self.size <= MAX_PLAIN_RESUME_BYTES

    async def send(self, write: Write, request: web.Request, payload: bytes) -> None:
        if self.out is None:
            self.out = web.StreamResponse(headers=SSE_HEADERS)
            await self.out.prepare(request)
        await write(request, self.out, payload)

    async def fail(self, write: Write, request: web.Request, err: HearthError) -> None:
        """End a stream that no node can finish with an error event, as OpenAI's clients expect."""
        assert self.out is not None
        await write(request, self.out, b"data: " + json.dumps(err.to_body()).encode() + b"\n\n")
        await self.out.write_eof()

    def response(self) -> web.StreamResponse | None:
        return self.out if self.out is not None else self.body


@dataclass
class SealedStream:
    """A sealed request's answer as the proxy receives it: ROUTE and DATA frames the scheduler cannot read.

    ``segments`` holds each node's DATA frames (ciphertext) so that a replacement can be handed what the
    user already has, up to MAX_RESUME_BYTES; ``seq`` counts the frames relayed."""

    out: web.StreamResponse | None = None
    segments: list[tuple[str, list[bytes]]] = field(default_factory=list)
    size: int = 0
    seq: int = 0
    finished: bool = False
    first_answer: float | None = None  # when the first frame of the answer came from a node

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

    async def send(self, write: Write, request: web.Request, data: bytes) -> None:
        if self.out is None:
            self.out = web.StreamResponse(
                headers={"Content-Type": frames.MEDIA_TYPE, "Cache-Control": "no-cache"}
            )
            await self.out.prepare(request)
        await write(request, self.out, data)

    async def fail(self, write: Write, request: web.Request, err: HearthError) -> None:
        """End a stream that no node can finish with an error frame (plaintext: it says nothing)."""
        assert self.out is not None
        body = {"status": err.status, **err.to_body()}
        await write(request, self.out, frames.encode_json(body, frames.ERROR | frames.FINAL))
        await self.out.write_eof()

    def response(self) -> web.StreamResponse | None:
        return self.out


Stream = PlainStream | SealedStream
