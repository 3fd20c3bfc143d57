"""The generation routes: one path for every request, whether the scheduler may read it or not.

POST /v1/chat/completions    chat, streaming (SSE) or not
POST /v1/completions         plain completions, streaming or not

A request is admitted (authenticated, validated and checked against policy), waits in the fair queue until
placement finds it a node (scheduler.admission), and is relayed (scheduler.relay). A node that fails before
its first byte is replaced by another, invisibly; one that fails mid-answer is continued by another from
what the client already has, for both kinds of request:

- sealed (``application/x-hearth-envelope``, from `hearth proxy`): placed among the envelope's candidates by
  its visible header; frames are relayed unread, and a replacement is handed the earlier frames (blind
  failover). When none of the candidates can take it, 409 offers fresh ones to re-seal to.
- plaintext (where policy allows): sent to a loopback node as it is, or sealed toward a remote node by the
  scheduler itself; a replacement is handed the events the client has, as they are or sealed to it
  (scheduler.relay.seal_toward).
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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from urllib.parse import urlsplit

from aiohttp import web

from policies import Visible
from protocol.envelope import MEDIA_TYPE as ENVELOPE
from protocol.envelope import EnvelopeError, peek
from protocol.errors import HearthError, Reseal, Unavailable
from protocol.schemas import CompletionRequest, parse_request
from protocol.tokenizer import TOKENIZER_KINDS
from protocol.web import error_response, is_loopback, log_unexpected, parse_json, read_body
from scheduler.admission import exclude
from scheduler.enforce import Grant
from scheduler.federation import Federation
from scheduler.jobs import Job
from scheduler.placement import Placement, PlacementRequest, place
from scheduler.relay import RelayJob, Target, Unsealer, seal_toward
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
    SCOPE_KEY,
    SETTINGS,
    STOPPING,
    authenticate,
)
from scheduler.streams import Failover, MidStream, PlainStream, SealedStream, Stream

log = logging.getLogger("hearth.scheduler")

# The scheduler cannot count tokens it may not read; a prompt's visible length over 4 is a fair guess
# (about 4 bytes per token in English, and JSON framing only adds bytes). Placement uses it for cache
# admission and scoring, never to refuse a request: the node counts exactly.
BYTES_PER_TOKEN_GUESS = 4
DEFAULT_CANDIDATES = 4  # fresh candidates a 409 offers for re-sealing
INLINE_SEAL_BYTES = 64 * 1024
SHUTDOWN_DRAIN_S = 2.0  # on shutdown, requests in flight get this long to finish before they are ended
RETRY_NO_KEY_S = 30.0  # a node's key statement comes with its next heartbeat, or it needs its operator
TOKENIZER_PLACEMENT_TOKENS = 1  # a tokenizer request holds no cache; placement wants a figure all the same


@dataclass(frozen=True)
class Admitted:
    """A request past authentication and policy, ready to queue."""

    user: str  # the token's id: the fair queue's user
    preq: PlacementRequest
    job: RelayJob
    sealed: bool
    grant: Grant  # what the policy allowed (scheduler.enforce); released when the answer ends
    raw: bytes = b""  # a plaintext request's OpenAI body (to seal toward a node)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, "chat")


async def completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, "completion")


async def drain(app: web.Application) -> None:
    """On shutdown (aiohttp's on_shutdown, once the listening socket is closed): let the requests in flight
    finish for a moment, then end the rest with an error the client can act on: 503 + Retry-After before
    their answers began, an error event (or frame) after. A stream is never cut silently."""
    in_flight = app[IN_FLIGHT]
    if in_flight:
        await asyncio.wait(set(in_flight), timeout=SHUTDOWN_DRAIN_S)
    app[STOPPING].set()
    left = set(in_flight)
    for task in left:
        task.cancel()
    if left:
        await asyncio.wait(left, timeout=SHUTDOWN_DRAIN_S)


Admit = Callable[[web.Request, str], Awaitable[Admitted]]


async def serve_kind(request: web.Request, kind: str, admit_plain: Admit) -> web.StreamResponse:
    """A request of another kind than generation (the tokenizer endpoints, scheduler.tokenizer_api) on
    this same path: admitted by ``admit_plain`` in plaintext, as any sealed request when sealed."""
    return await _generate(request, kind, admit_plain)


async def _generate(
    request: web.Request, endpoint: str, admit_plain: Admit | None = None
) -> web.StreamResponse:
    app = request.app
    task = asyncio.current_task()
    assert task is not None
    app[IN_FLIGHT].add(task)
    stream: Stream | None = None
    admitted: Admitted | None = None
    job: Job | None = None
    try:
        if request.content_type == ENVELOPE:
            admitted = await _admit_sealed(request, endpoint)
        else:
            admitted = await (admit_plain or _admit)(request, endpoint)
        # The answer carries the request's id and the x-ratelimit-* figures, whatever it turns out to be.
        request[ANSWER_HEADERS] = admitted.grant.headers
        app[EVENTS].publish("admitted", group=admitted.grant.group, model=admitted.job.model)
        grant = admitted.grant
        job = app[JOBS].add(
            grant.request_id, admitted.user, grant.group, admitted.job.model, sealed=admitted.sealed,
            weight=grant.weight,
        )  # fmt: skip
        stream = SealedStream() if admitted.sealed else PlainStream(admitted.job.stream)
        return await _serve(request, endpoint, admitted, stream, job)
    except HearthError as exc:
        if stream is None:
            app[METRICS].requests.labels(endpoint, f"refused_{exc.status}").inc()
        raise
    except asyncio.CancelledError:
        if not app[STOPPING].is_set():
            raise  # the client left
        task.uncancel()  # the drain's cancellation, answered here
        err = Unavailable(
            "the scheduler is restarting; try again in a moment", code="shutting_down",
            retry_after=app[SETTINGS].retry_after,
        )  # fmt: skip
        if stream is None or stream.out is None:
            return error_response(err)
        await app[RELAY].end_with_error(request, stream, err)
        return stream.out
    finally:
        app[IN_FLIGHT].discard(task)
        if job is not None:
            app[JOBS].remove(job)
        if admitted is not None:
            app[ENFORCER].release(admitted.grant.request_id)


async def _serve(
    request: web.Request, endpoint: str, admitted: Admitted, stream: Stream, job: Job
) -> web.StreamResponse:
    """Queue, place and relay one admitted request, failing over until a node finishes it; ``job`` is
    its entry on the operator's board (scheduler.jobs)."""
    app = request.app
    federation, admission, relay, jobs = app[FEDERATION], app[ADMISSION], app[RELAY], app[JOBS]
    preq = admitted.preq
    failed: Failover | MidStream | None = None
    unopened = False  # a candidate could not open it: no 409 then (every failure to open answers alike)
    for _ in range(app[SETTINGS].failover_attempts):
        try:
            try:
                jobs.waiting(job)
                ticket = await admission.acquire(admitted.user, preq, admitted.grant.weight)
            except HearthError:
                if admitted.sealed and stream.out is None and not unopened:
                    # Refused before the client got anything: if other nodes could take it, say so (409).
                    _reseal_if_others_can(federation, preq)
                raise
        except HearthError as exc:
            # Refused by the scheduler itself; relayed requests are counted with their usage rows.
            app[METRICS].requests.labels(endpoint, f"refused_{exc.status}").inc()
            if failed is None or isinstance(exc, Reseal):
                raise
            break  # no other node to go on with: say what went wrong on the last one
        usage = {"prompt_tokens": 0, "completion_tokens": 0}
        node_id = ticket.node_id
        jobs.running(job, node_id)
        try:
            target, sent, unsealer = await _attempt(request, admitted, node_id, stream)
            with contextlib.suppress(ConnectionResetError):  # the client left while we were writing
                await relay.run(request, target, sent, usage, stream, unsealer, job.relayed)
            return stream.response() or web.Response(status=499)
        except (Failover, MidStream) as exc:
            log.info("node %s failed a request; trying another", node_id)
            failed = exc
            unopened = unopened or exc.error.code == EnvelopeError.default_code
            preq = exclude(preq, node_id)
            if isinstance(exc, MidStream) and not stream.resumable:
                break
        except HearthError as exc:  # a final refusal from the node
            if stream.out is None:
                raise
            await relay.end_with_error(request, stream, exc)  # the client has part of the answer already
            return stream.out
        except Exception as exc:
            if stream.out is None:
                raise  # the error middleware answers 500
            # The answer has begun: a new response cannot be sent, so this one ends with an error event.
            log_unexpected("relaying an answer", exc)
            await relay.end_with_error(request, stream, HearthError("internal error while relaying"))
            return stream.out
        finally:
            admission.release(ticket, usage["prompt_tokens"], usage["completion_tokens"])
    assert failed is not None
    error = failed.error
    if not admitted.sealed and error.code == EnvelopeError.default_code:
        # What the scheduler sealed did not open there (the node's keys or clock): not the client's doing,
        # whose request was plaintext.
        error = Unavailable(
            "the node could not open what the scheduler sealed to it; the operator must check its keys "
            "and clock", code="node_failed", retry_after=app[SETTINGS].retry_after,
        )  # fmt: skip
    if stream.out is None:
        raise error
    await relay.end_with_error(request, stream, error)
    return stream.out


async def _attempt(
    request: web.Request, admitted: Admitted, node_id: str, stream: Stream
) -> tuple[Target, RelayJob, Unsealer | None]:
    """The job one node is sent: the envelope with what earlier candidates sent (sealed), or the plaintext
    request as it is (a loopback node) or sealed toward the node, with what the client already has."""
    app = request.app
    federation = app[FEDERATION]
    runtime = federation.registry.nodes.get(node_id)
    if runtime is None or runtime.url is None:
        raise Failover(HearthError("the chosen node left the cluster"))
    job, unsealer = admitted.job, None
    if isinstance(stream, SealedStream):
        # The envelope was just parsed as JSON: it is spliced in as received, not serialized again.
        sent = job.attempt(b'{"envelope":%s,"resume":%s}' % (job.body, stream.resume_json()))
    elif app[SETTINGS].seal_toward_nodes == "always" or not is_loopback(urlsplit(runtime.url).hostname):
        sealing = functools.partial(_seal_toward, federation, node_id, admitted, stream)
        # A chat-sized body seals in a fraction of a millisecond; a large one in a thread.
        small = len(admitted.raw) + stream.size <= INLINE_SEAL_BYTES
        sent, unsealer = sealing() if small else await asyncio.to_thread(sealing)
    else:
        # A node reading the request may let this user's earlier prompts speed it up, never another's.
        sent = job.attempt(
            cache_scope=_cache_scope(app[SCOPE_KEY], node_id, admitted.user), resume=bytes(stream.sent)
        )
    headers = federation.signed_headers(node_id, "POST", "/jobs", sent.body)
    return Target(node_id, runtime.url, headers), sent, unsealer


def _seal_toward(
    federation: Federation, node_id: str, admitted: Admitted, stream: PlainStream
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
    job, max_tokens = admitted.job, admitted.preq.max_tokens
    if job.endpoint in TOKENIZER_KINDS:
        max_tokens = None  # what its sealed header says (node.sealed checks it); placement's figure aside
    return seal_toward(job, admitted.raw, max_tokens, key, bytes(stream.sent))


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


async def _admit_sealed(request: web.Request, endpoint: str) -> Admitted:
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
    # The usage row gets an id of the scheduler's own: the envelope's request id is the client's choice.
    request_id = secrets.token_hex(12)
    tokens_only = endpoint in TOKENIZER_KINDS  # generates nothing: no tokens to count, no cache to hold
    prompt_tokens = 0 if tokens_only else header.bucket // BYTES_PER_TOKEN_GUESS
    visible = Visible(
        header.model, header.max_tokens, sealed=True, prompt_tokens=prompt_tokens, prompt_bound=header.bucket,
        generates=not tokens_only, choices=header.choices,
    )  # fmt: skip
    grant = request.app[ENFORCER].admit(token, visible, request_id)
    preq = PlacementRequest(
        model=header.model, max_tokens=TOKENIZER_PLACEMENT_TOKENS if tokens_only else header.max_tokens,
        tiers=grant.tiers, prompt_tokens=prompt_tokens, candidates=frozenset(candidates),
    )  # fmt: skip
    job = RelayJob(
        request_id, token.id, endpoint, header.model, True, raw, started, rules=grant.rules, group=grant.group
    )
    return Admitted(token.id, preq, job, sealed=True, grant=grant)


async def _admit(request: web.Request, endpoint: str) -> Admitted:
    """Authenticate, validate and apply policy: everything before the request joins the queue."""
    token = await authenticate(request)
    started = time.time()
    raw = await read_body(request)
    req = parse_request(endpoint, parse_json(raw))
    max_tokens = req.requested_max_tokens
    default = None
    if isinstance(req, CompletionRequest) and "max_tokens" not in req.model_fields_set:
        # OpenAI's default of 16 is the endpoint's, not the client's: under a smaller cap, the cap holds.
        max_tokens, default = None, max_tokens
    request_id = secrets.token_hex(12)
    prompt_tokens = len(raw) // BYTES_PER_TOKEN_GUESS
    visible = Visible(
        req.model, max_tokens, sealed=False, prompt_tokens=prompt_tokens, prompt_bound=len(raw),
        default_max_tokens=default, choices=req.choices,
    )  # fmt: skip
    grant = request.app[ENFORCER].admit(token, visible, request_id)
    preq = PlacementRequest(
        model=req.model, max_tokens=req.requested_max_tokens, prompt_tokens=prompt_tokens, tiers=grant.tiers
    )
    # The body was just parsed as JSON, so it can be spliced in as is instead of serialized again.
    body = b'{"endpoint":"%s","request_id":"%s","request":%s}' % (endpoint.encode(), request_id.encode(), raw)
    job = RelayJob(
        request_id,
        token.id,
        endpoint,
        req.model,
        req.stream,
        body,
        started,
        rules=grant.rules,
        group=grant.group,
    )
    return Admitted(token.id, preq, job, sealed=False, grant=grant, raw=raw)


@functools.lru_cache(maxsize=4096)
def _cache_scope(key: bytes, node_id: str, token_id: str) -> str:
    """A user's prefix-cache scope on one node: the same for all of that user's plaintext requests there,
    different per node, so no node learns a user id it could match with another's."""
    return hmac.new(key, f"{node_id}\0{token_id}".encode(), hashlib.sha256).hexdigest()[:32]
