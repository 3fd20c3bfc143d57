"""Sealed jobs: the node opens the envelope before doing anything else, and seals every byte of the answer.

A sealed job is ``{"envelope": …, "resume": null | [{"node_id", "frames"}, …], "job_id": …, "rules"?: …}``
(docs/protocol.md; the job id is the scheduler's, for usage receipts; the rules are the user's group's,
beside the envelope because the scheduler adds them, node.rules). The node opens the envelope with one
of its keys, refuses one it has opened before (across restarts too), parses the OpenAI request inside, and
checks that the visible header told the truth about it (model, max_tokens, stream): the scheduler placed
and billed the request by that header, so a mismatch is refused before any work. ``resume`` is blind
failover: another candidate's frames, which this node opens (every candidate holds the response seed) to
learn what the user has already received, and continues from there.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from typing import Any

from node.keys import NodeKeys, ReplayMemory
from node.resume import Resume, said
from node.rules import parse_rules
from protocol import frames
from protocol.envelope import (
    FRAME_CHUNK,
    MAX_CANDIDATES,
    EnvelopeError,
    ResponseOpener,
    ResponseSealer,
    from_wire,
    open_request,
    response_secret,
)
from protocol.errors import ProtocolError
from protocol.identity import b64d, valid_node_id
from protocol.rules import JobRules
from protocol.schemas import ChatCompletionRequest, CompletionRequest
from protocol.tokenizer import TOKENIZER_REQUESTS, TokenizerRequest, parse_job_request

MAX_RESUME_FRAMES = 100_000
_JOB_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_MEMBERS = {"envelope", "resume", "job_id"}


@dataclass(frozen=True)
class SealedJob:
    endpoint: str  # protocol.envelope.JOB_KINDS
    request_id: str
    request: ChatCompletionRequest | CompletionRequest | TokenizerRequest
    seed: bytes
    start_seq: int  # frames the user has received already (from the candidate this one replaces)
    resume: Resume  # what those frames said
    job_id: str  # the scheduler's id of this job (usage receipts)
    rules: JobRules | None = None  # the user's group's (node.rules)


def open_job(raw: bytes, *, node_id: str, keys: NodeKeys, replay: ReplayMemory) -> SealedJob:
    """Open a sealed job (blocking crypto and a replay-log write: call it in a thread)."""
    try:
        doc: Any = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise EnvelopeError() from None
    if (
        not isinstance(doc, dict)
        or not _MEMBERS <= set(doc) <= _MEMBERS | {"rules"}
        or not isinstance(doc["job_id"], str)
        or _JOB_ID.fullmatch(doc["job_id"]) is None
    ):
        raise EnvelopeError()
    # Before the envelope is opened: a job the node refuses leaves no trace in the replay memory.
    rules = parse_rules(doc.get("rules"))
    sealed = from_wire(doc["envelope"])
    header = sealed.header
    now = time.time()
    body, seed = open_request(sealed, node_id=node_id, keys=keys.private_keys(now), now=int(now))
    replay.remember(header.digest().hex(), header.expires_at, now)
    try:
        parsed: Any = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise EnvelopeError() from None
    req = parse_job_request(header.endpoint, parsed)
    # A tokenizer request generates nothing: its header names no max_tokens and no stream.
    max_tokens, stream, choices = (None, False, 1) if isinstance(req, TOKENIZER_REQUESTS) else (
        req.requested_max_tokens, req.stream, req.choices
    )  # fmt: skip
    if (
        req.model != header.model
        or max_tokens != header.max_tokens
        or stream != header.stream
        or choices != header.choices
    ):
        raise EnvelopeError()
    start, resume = 0, Resume()
    if doc["resume"] is not None:
        if isinstance(req, TOKENIZER_REQUESTS):
            raise EnvelopeError()  # nothing to resume: its answer is one frame
        start, resume = _resume(doc["resume"], seed, header.request_id, header.endpoint)
    return SealedJob(
        header.endpoint,
        header.request_id, req, seed, start, resume, doc["job_id"], rules,
    )  # fmt: skip


def _resume(doc: Any, seed: bytes, request_id: str, endpoint: str) -> tuple[int, Resume]:
    """Open what earlier candidates streamed: segments of frames, each sealed by the node named."""
    if not isinstance(doc, list) or not 1 <= len(doc) <= MAX_CANDIDATES:
        raise EnvelopeError()
    opener: ResponseOpener | None = None
    payload = bytearray()
    count = 0
    for segment in doc:
        if not isinstance(segment, dict) or set(segment) != {"node_id", "frames"}:
            raise EnvelopeError()
        node_id, sent = segment["node_id"], segment["frames"]
        if not isinstance(node_id, str) or not valid_node_id(node_id) or not isinstance(sent, list):
            raise EnvelopeError()
        count += len(sent)
        if count > MAX_RESUME_FRAMES:
            raise EnvelopeError()
        secret = response_secret(seed, node_id, request_id)
        if opener is None:
            opener = ResponseOpener(secret, request_id)
        else:
            opener.switch(secret, at=opener.seq)
        for frame in sent:
            try:
                payload += opener.open(b64d(frame), final=False)
            except ProtocolError:
                raise EnvelopeError() from None
    return count, said(bytes(payload), endpoint)


class SealedFrames:
    """Frames of a sealed answer: DATA sealed to the user, META (token counts) for the scheduler."""

    def __init__(self, job: SealedJob, node_id: str) -> None:
        secret = response_secret(job.seed, node_id, job.request_id)
        self._sealer = ResponseSealer(secret, job.request_id, start=job.start_seq)

    def data(self, payload: bytes, *, final: bool = False) -> bytes:
        if not payload and not final:
            return b""
        parts = [payload[i : i + FRAME_CHUNK] for i in range(0, len(payload), FRAME_CHUNK)] or [b""]
        out = []
        for i, part in enumerate(parts):
            last = final and i == len(parts) - 1
            out.append(
                frames.encode(self._sealer.seal(part, final=last), frames.FINAL if last else frames.DATA)
            )
        return b"".join(out)

    def keepalive(self, payload: bytes) -> bytes:
        return frames.encode(self._sealer.seal(payload), frames.DATA)

    def meta(self, meta: dict[str, object]) -> bytes:
        # Counts for the moment; the node's account of record is its signed heartbeat (node.receipts).
        return frames.encode_json(meta, frames.META)
