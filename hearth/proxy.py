"""`hearth proxy` and `hearth chat`: the user's side of end-to-end encryption.

The proxy serves an OpenAI-compatible API on 127.0.0.1. Every request it receives is sealed here, on the
user's machine, to up to k candidate nodes taken from the scheduler's directory, and every answer is
opened here. It never sends a prompt any other way: when it cannot seal (no directory it trusts, no node
with a valid key), the client gets an error, not a plaintext fallback.

Trust: on first use the proxy pins the federation authority key the directory names (or the one given
with ``--authority``, by fingerprint) and keeps it with the last log head it verified in
``<data dir>/proxy/<scheduler>.json``. A directory signed by another authority, a log that does not continue
the kept head, a statement that does not verify: each is refused and the request fails closed.

Freshness: the directory is read again when it is older than 30 s, and also, rate-limited, when a request
finds no candidate in it (the nodes may have come back since: a scheduler restart leaves it empty until the
nodes' next heartbeats). Errors the proxy makes itself have the scheduler's status and shape: a model that
no node serves and the scheduler does not list is 404 ``model_not_found``; nodes that serve it but none this
proxy can seal to now is 503 ``no_candidates`` with Retry-After; an unreachable scheduler is 503
``scheduler_unreachable``. The scheduler's own refusals pass through with their Retry-After, x-ratelimit-*
and x-request-id headers, and so do its answers.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
import math
import random
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from hearth.sealed_answer import Answer, derive_openers, open_stream
from protocol.directory import MAX_DIRECTORY_BYTES, Directory, Head
from protocol.envelope import (
    MAX_BODY_BYTES,
    Candidate,
    ResponseOpener,
    seal_request,
    to_wire,
)
from protocol.envelope import MEDIA_TYPE as ENVELOPE
from protocol.errors import (
    HearthError,
    InvalidRequest,
    ModelNotFound,
    PermissionDenied,
    ProtocolError,
    Unavailable,
    UpstreamFailed,
    come_back_headers,
)
from protocol.identity import KEY_BYTES, b64d, fingerprint, write_private
from protocol.schemas import Endpoint, parse_request
from protocol.tokenizer import PATHS as TOKENIZER_PATHS
from protocol.web import parse_json, read_capped

log = logging.getLogger("hearth.proxy")

DEFAULT_CANDIDATES = 4
ENVELOPE_TTL_S = 120
MAX_RESEALS = 2
MAX_ERROR_BYTES = 64 * 1024
MAX_ANSWER_BYTES = 64 * 1024 * 1024
DIRECTORY_MAX_AGE_S = 30.0
INLINE_SEAL_BYTES = 64 * 1024
# A request the cached directory has no candidate for reads it again first (its nodes may be back), at most
# once per step of a backoff that starts at MISS_BACKOFF_MIN_S, doubles while misses go on, stops at
# MISS_BACKOFF_MAX_S, and starts over once a request finds its nodes again. The cap keeps the promise that
# the proxy serves again within 2 s of its nodes' return; one small incremental fetch a second is nothing
# for the scheduler.
MISS_BACKOFF_MIN_S = 0.25
MISS_BACKOFF_MAX_S = 1.0
UNREACHABLE_RETRY_S = 2.0
_PATHS = {
    "chat": "/v1/chat/completions",
    "completion": "/v1/completions",
    **TOKENIZER_PATHS,
}  # a scheduler that is restarting is usually back within a couple of seconds


class TrustError(UpstreamFailed):
    """The scheduler showed something the proxy must not trust: the request fails closed."""

    default_code = "e2e_untrusted"


class NoCandidates(Unavailable):
    """Nodes serve the model, but none this proxy may seal to can take it now (503 + Retry-After)."""

    default_code = "no_candidates"


def unreachable() -> Unavailable:
    return Unavailable(
        "the scheduler could not be reached; try again shortly",
        code="scheduler_unreachable", retry_after=UNREACHABLE_RETRY_S,
    )  # fmt: skip


def scheduler_error(status: int, body: Any, headers: Mapping[str, str]) -> HearthError:
    """The scheduler's refusal as the proxy's own answer: its status, body and come-back headers."""
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict):
        refusal = HearthError.from_body(status, body, headers)
        refusal.relayed_headers.update(_request_id(headers))
        return refusal
    # Not the scheduler's own words: a gateway in front of it (a TLS proxy while the scheduler restarts).
    exc: HearthError = (
        unreachable() if status in (502, 503, 504)
        else UpstreamFailed(f"the scheduler answered {status} without an error Hearth can read",
                            code="scheduler_error")
    )  # fmt: skip
    exc.keep_headers(headers)
    return exc


def relayed_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The headers of the scheduler's answer that the proxy's client gets too, refusal or not: when to
    come back (Retry-After, x-ratelimit-*) and the scheduler's x-request-id, to quote when asking for help."""
    out = come_back_headers(headers)
    out.update(_request_id(headers))
    return out


def _request_id(headers: Mapping[str, str]) -> dict[str, str]:
    return {name: value for name, value in headers.items() if name.lower() == "x-request-id"}


@dataclass
class SealedClient:
    """Seals requests for one scheduler and opens the answers (the proxy server and `hearth chat`)."""

    scheduler_url: str
    token: str
    state_path: Path
    session: aiohttp.ClientSession
    candidates: int = DEFAULT_CANDIDATES
    tiers: frozenset[str] | None = None
    authority: str | None = None  # a fingerprint the user was told to expect
    max_age: float = DIRECTORY_MAX_AGE_S  # a directory older than this is read again before use
    directory: Directory | None = None
    hints: dict[str, list[str]] = field(default_factory=dict)
    fetched: float = 0.0
    served: set[str] = field(default_factory=set)  # every model a hint has named since this proxy started
    listed: frozenset[str] | None = None  # the scheduler's /v1/models, as read after the last miss
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _miss_next: float = -math.inf  # the earliest time of the next re-read after a miss
    _miss_done: float = -math.inf  # when the last re-read after a miss ended
    _miss_backoff: float = MISS_BACKOFF_MIN_S

    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def _fresh(self) -> Directory | None:
        if self.directory is not None and time.monotonic() - self.fetched < self.max_age:
            return self.directory
        return None

    async def refresh(self, *, force: bool = False) -> Directory:
        if not force and (directory := self._fresh()) is not None:
            return directory  # the usual case, without queueing behind a fetch for another request
        async with self._lock:
            if not force and (directory := self._fresh()) is not None:
                return directory
            return await self._fetch()

    async def _fetch(self) -> Directory:
        """Read the directory (from the head this proxy holds on), verify it and keep it; under the lock."""
        pinned = await asyncio.to_thread(self._read_state)
        # A copy: a directory refused half-way leaves the last verified one as it was.
        directory = self.directory.copy() if self.directory is not None else None
        while True:
            doc = await self._get_directory(directory.head.seq if directory is not None else 0)
            if directory is None:
                directory = Directory(self._authority(doc, pinned))
            elif doc.get("authority_key") != directory.authority_key:
                raise TrustError("the directory is signed by another authority than the one pinned")
            try:
                kept = Head.parse(pinned["head"]) if "head" in pinned else None
                if not directory.apply_page(doc, kept):
                    break
            except ProtocolError as exc:
                raise TrustError(f"refusing the scheduler's directory: {exc.message}") from None
        self.hints = _hints(doc.get("placement"))
        self.served.update(model for model, nodes in self.hints.items() if nodes)
        pinned = {"authority_key": directory.authority_key, "head": directory.head.to_json()}
        await asyncio.to_thread(self._write_state, pinned)
        self.directory, self.fetched = directory, time.monotonic()
        return directory

    def _authority(self, doc: dict[str, Any], pinned: dict[str, Any]) -> str:
        """The authority key to verify against: the pinned one, or (first use) the served one."""
        authority = doc.get("authority_key")
        if not isinstance(authority, str):
            raise TrustError("the scheduler's directory names no federation authority")
        expected = pinned.get("authority_key")
        if expected is not None:
            if authority != expected:
                raise TrustError("the directory is signed by another authority than the one pinned")
            return authority
        try:
            fp = fingerprint(b64d(authority, length=KEY_BYTES))
        except ProtocolError:
            raise TrustError("the directory's authority key is malformed") from None
        if self.authority is not None and fp != self.authority:
            raise TrustError(f"the directory is signed by authority {fp}, not {self.authority} as expected")
        log.info("pinned the federation authority %s (compare it with the club's)", fp)
        return authority

    async def _get_directory(self, since: int) -> dict[str, Any]:
        try:
            async with self.session.get(
                f"{self.scheduler_url}/v1/directory?since={since}", headers=self.auth_headers(),
                timeout=aiohttp.ClientTimeout(total=30),
            ) as resp:  # fmt: skip
                raw = await read_capped(resp, MAX_DIRECTORY_BYTES)
                if resp.status in (502, 503, 504):
                    raise scheduler_error(resp.status, _loads(raw), resp.headers)
                if resp.status != 200:
                    raise UpstreamFailed(f"the scheduler's directory answered {resp.status}")
        except (aiohttp.ClientError, TimeoutError):
            raise unreachable() from None
        except ValueError:
            raise UpstreamFailed("the scheduler's directory is over the size limit") from None
        doc = await asyncio.to_thread(_loads, raw)
        if not isinstance(doc, dict):
            raise TrustError("the scheduler's directory is malformed")
        return doc

    async def models_document(self) -> tuple[bytes, dict[str, str]]:
        """The scheduler's ``/v1/models`` as it answered (its body, and the headers to pass on); its refusal
        as the error to answer with."""
        try:
            async with self.session.get(
                self.scheduler_url + "/v1/models", headers=self.auth_headers(),
                timeout=aiohttp.ClientTimeout(total=30),
            ) as resp:  # fmt: skip
                raw = await read_capped(resp, MAX_DIRECTORY_BYTES)
                if resp.status != 200:
                    raise scheduler_error(resp.status, _loads(raw), resp.headers)
                return raw, relayed_headers(resp.headers)
        except (aiohttp.ClientError, TimeoutError):
            raise unreachable() from None
        except ValueError:
            raise UpstreamFailed("the scheduler's model list is over the size limit") from None

    async def _get_models(self) -> frozenset[str]:
        """The models the scheduler lists (a model it lists but no node serves now is coming back)."""
        raw, _ = await self.models_document()
        doc = _loads(raw) if len(raw) <= INLINE_SEAL_BYTES else await asyncio.to_thread(_loads, raw)
        data = doc.get("data") if isinstance(doc, dict) else None
        if not isinstance(data, list):
            raise UpstreamFailed("the scheduler's model list is malformed")
        return frozenset(m["id"] for m in data if isinstance(m, dict) and isinstance(m.get("id"), str))

    def _read_state(self) -> dict[str, Any]:
        try:
            doc = json.loads(self.state_path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError):
            raise TrustError(f"cannot read the pinned keys in {self.state_path}") from None
        return doc if isinstance(doc, dict) else {}

    def _write_state(self, doc: dict[str, Any]) -> None:
        write_private(self.state_path, json.dumps(doc).encode(), replace=True)

    def choose(self, directory: Directory, model: str, prefer: list[str] | None = None) -> list[Candidate]:
        """Up to k nodes to seal to: serving ``model`` (by the hint, or ``prefer``), in the verified
        directory with a valid key, of an allowed tier. NoCandidates when there are none."""
        usable = directory.usable(time.time())
        allowed = [n for n, (cert, _) in usable.items() if self.tiers is None or cert.tier in self.tiers]
        serving = set(prefer or self.hints.get(model, []))
        first = [n for n in allowed if n in serving]
        random.shuffle(first)
        chosen = first[: self.candidates]
        if not chosen:
            raise NoCandidates(
                f"no node this proxy trusts serves '{model}' now; try again shortly",
                retry_after=MISS_BACKOFF_MAX_S,
            )
        return [usable[node_id][1].candidate() for node_id in chosen]

    async def find_candidates(self, model: str, prefer: list[str] | None = None) -> list[Candidate]:
        """Candidates for ``model`` from the cached directory, else from the directory read again after
        the miss (shared with concurrent requests, and rate-limited), else the reason there are none:
        404 for a model nobody serves, 403 for one only nodes of excluded tiers serve, 503 otherwise."""
        directory = await self.refresh(force=prefer is not None)  # a re-seal names nodes: read it anew
        try:
            return self.choose(directory, model, prefer)
        except NoCandidates as exc:
            if prefer is not None:
                raise self._why_none(directory, model, exc) from None
        directory = await self._read_after_miss(time.monotonic(), model)
        try:
            chosen = self.choose(directory, model)
        except NoCandidates as exc:
            raise self._why_none(directory, model, exc) from None
        self._miss_backoff = MISS_BACKOFF_MIN_S
        return chosen

    async def _read_after_miss(self, missed: float, model: str) -> Directory:
        async with self._lock:
            assert self.directory is not None  # refresh() returned one
            now = time.monotonic()
            if self._miss_done >= missed or now < self._miss_next:
                return self.directory  # read since this request missed, or too soon to read again
            self._miss_next = now + self._miss_backoff
            self._miss_backoff = min(2 * self._miss_backoff, MISS_BACKOFF_MAX_S)
            try:
                directory = await self._fetch()
                if model not in self.hints and model not in self.served:
                    self.listed = await self._get_models()
            finally:
                self._miss_done = time.monotonic()
            return directory

    def _why_none(self, directory: Directory, model: str, none: NoCandidates) -> HearthError:
        hinted = self.hints.get(model, [])
        if hinted:
            usable = directory.usable(time.time())
            tiers = {usable[n][0].tier for n in hinted if n in usable}
            if tiers and self.tiers is not None and not tiers & self.tiers:
                return PermissionDenied(
                    f"only nodes of tiers this proxy does not seal to (--tier) serve '{model}' now",
                    code="tier_not_allowed",
                )
            return none
        if model in self.served or self.listed is None or model in self.listed:
            return none
        # As the scheduler words it: the proxy answers for it when it has no node to seal the question to.
        return ModelNotFound(
            f"the model '{model}' does not exist here; see /v1/models", param="model", code="model_not_found"
        )

    async def send(self, endpoint: Endpoint, body: bytes) -> Answer:
        """Seal ``body`` and send it; the answer, its plaintext payloads opened as they come."""
        if len(body) > MAX_BODY_BYTES // 2:
            raise InvalidRequest("the request body is too large to seal")
        req = parse_request(endpoint, parse_json(body))
        return await self.send_sealed(
            endpoint, body, model=req.model, max_tokens=req.requested_max_tokens, stream=req.stream,
            choices=req.choices,
        )  # fmt: skip

    async def send_sealed(
        self, kind: str, body: bytes, *, model: str, max_tokens: int | None, stream: bool, choices: int = 1
    ) -> Answer:
        """Seal a validated request of ``kind`` (protocol.envelope.JOB_KINDS) with the header given, and
        send it to its path; the answer, its plaintext payloads opened as they come."""
        if len(body) > MAX_BODY_BYTES // 2:
            raise InvalidRequest("the request body is too large to seal")
        prefer: list[str] | None = None
        for _ in range(MAX_RESEALS + 1):
            chosen = await self.find_candidates(model, prefer)
            request_id = secrets.token_hex(12)
            sealing = functools.partial(
                seal_request, body, endpoint=kind, model=model, max_tokens=max_tokens, stream=stream,
                request_id=request_id, issued_at=int(time.time()), ttl_s=ENVELOPE_TTL_S, candidates=chosen,
                choices=choices,
            )  # fmt: skip
            # A chat-sized body seals in ~0.2 ms per candidate, less than a thread hop; a big one in a thread.
            sealed, seed = sealing() if len(body) <= INLINE_SEAL_BYTES else await asyncio.to_thread(sealing)
            wire = json.dumps(to_wire(sealed)).encode()
            path = _PATHS[kind]
            # Each candidate's response keys, derived while the request is on its way (the loop runs this
            # once the request is written), not after the answer's first frame has arrived.
            openers: dict[str, ResponseOpener] = {}
            asyncio.get_running_loop().call_soon(derive_openers, openers, seed, request_id, chosen)
            try:
                resp = await self.session.post(
                    self.scheduler_url + path, data=wire,
                    headers={**self.auth_headers(), "Content-Type": ENVELOPE},
                    timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=600),
                )  # fmt: skip
            except (aiohttp.ClientError, TimeoutError):
                raise unreachable() from None
            if resp.status != 200:
                refusal = await _error_body(resp)
                err = refusal.get("error") if isinstance(refusal, dict) else None
                fresh = err.get("candidates") if isinstance(err, dict) else None
                if resp.status == 409 and isinstance(fresh, list):
                    prefer = [n for n in fresh if isinstance(n, str)]
                    continue
                raise scheduler_error(resp.status, refusal, resp.headers)
            names = {c.node_id for c in chosen}
            payloads = open_stream(resp, seed, request_id, names, openers)
            return Answer(stream, payloads, relayed_headers(resp.headers))
        raise Unavailable(
            "the scheduler kept asking to re-seal; try again",
            code="reseal_loop",
            retry_after=MISS_BACKOFF_MAX_S,
        )


def _hints(raw: Any) -> dict[str, list[str]]:
    """The directory's placement hint (model → node ids), unsigned: whatever is not of that shape goes."""
    if not isinstance(raw, dict):
        return {}
    return {
        model: [n for n in nodes if isinstance(n, str)]
        for model, nodes in raw.items()
        if isinstance(model, str) and isinstance(nodes, list)
    }


def _loads(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None


async def _error_body(resp: aiohttp.ClientResponse) -> Any:
    """An error answer's JSON; None when it is not JSON, too long, or cut (the status speaks alone then)."""
    try:
        return _loads(await read_capped(resp, MAX_ERROR_BYTES))
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return None
    finally:
        resp.close()


def state_path(data_dir: Path, scheduler_url: str) -> Path:
    name = hashlib.sha256(scheduler_url.encode()).hexdigest()[:16]
    return data_dir / "proxy" / f"{name}.json"
