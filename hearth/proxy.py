"""`hearth proxy` and `hearth chat`: the user's side of end-to-end encryption.

The proxy serves an OpenAI-compatible API on 127.0.0.1. Every request it receives is sealed here, on the
user's machine, to up to k candidate nodes taken from the scheduler's directory, and every answer is
opened here. It never sends a prompt any other way: when it cannot seal (no directory it trusts, no node
with a valid key), the client gets an error, not a plaintext fallback.

Trust: on first use the proxy pins the federation authority key the directory names (or the one given
with ``--authority``, by fingerprint) and keeps it with the last log head it verified in
``<data dir>/proxy/<scheduler>.json``. A directory signed by another authority, a log that does not continue
the kept head, a statement that does not verify: each is refused and the request fails closed.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
import random
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from protocol import frames
from protocol.directory import MAX_DIRECTORY_BYTES, Directory, Head
from protocol.envelope import (
    MAX_BODY_BYTES,
    Candidate,
    ResponseOpener,
    response_secret,
    seal_request,
    to_wire,
)
from protocol.envelope import MEDIA_TYPE as ENVELOPE
from protocol.errors import HearthError, InvalidRequest, ProtocolError, UpstreamFailed
from protocol.identity import KEY_BYTES, b64d, fingerprint, write_private
from protocol.schemas import Endpoint, parse_request
from protocol.web import error_middleware, json_response, parse_json, read_body, read_capped

log = logging.getLogger("hearth.proxy")

DEFAULT_CANDIDATES = 4
ENVELOPE_TTL_S = 120
MAX_RESEALS = 2
MAX_ERROR_BYTES = 64 * 1024
MAX_ANSWER_BYTES = 64 * 1024 * 1024
DIRECTORY_MAX_AGE_S = 30.0
INLINE_SEAL_BYTES = 64 * 1024


class TrustError(UpstreamFailed):
    """The scheduler showed something the proxy must not trust: the request fails closed."""

    default_code = "e2e_untrusted"


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
    directory: Directory | None = None
    hints: dict[str, list[str]] = field(default_factory=dict)
    fetched: float = 0.0
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    async def refresh(self, *, force: bool = False) -> Directory:
        async with self._lock:
            if (
                self.directory is not None
                and not force
                and time.monotonic() - self.fetched < DIRECTORY_MAX_AGE_S
            ):
                return self.directory
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
            hints = doc.get("placement")
            self.hints = hints if isinstance(hints, dict) else {}
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
                if resp.status != 200:
                    raise UpstreamFailed(f"the scheduler's directory answered {resp.status}")
        except (aiohttp.ClientError, TimeoutError):
            raise UpstreamFailed("the scheduler could not be reached") from None
        doc = await asyncio.to_thread(_loads, raw)
        if not isinstance(doc, dict):
            raise TrustError("the scheduler's directory is malformed")
        return doc

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
        usable = directory.usable(time.time())
        allowed = [n for n, (cert, _) in usable.items() if self.tiers is None or cert.tier in self.tiers]
        serving = set(prefer or self.hints.get(model, []))
        first = [n for n in allowed if n in serving]
        random.shuffle(first)
        chosen = first[: self.candidates]
        if not chosen:
            raise HearthError(
                f"no node this proxy trusts serves '{model}' now; try again shortly", code="no_candidates"
            )
        return [usable[node_id][1].candidate() for node_id in chosen]

    async def send(self, endpoint: Endpoint, body: bytes) -> tuple[bool, AsyncIterator[bytes]]:
        """Seal ``body`` and send it; (stream?, the answer's plaintext payloads as they open)."""
        if len(body) > MAX_BODY_BYTES // 2:
            raise InvalidRequest("the request body is too large to seal")
        req = parse_request(endpoint, parse_json(body))
        prefer: list[str] | None = None
        for attempt in range(MAX_RESEALS + 1):
            directory = await self.refresh(force=attempt > 0)
            chosen = self.choose(directory, req.model, prefer)
            request_id = secrets.token_hex(12)
            sealing = functools.partial(
                seal_request, body, endpoint=endpoint, model=req.model, max_tokens=req.requested_max_tokens,
                stream=req.stream, request_id=request_id, issued_at=int(time.time()), ttl_s=ENVELOPE_TTL_S,
                candidates=chosen,
            )  # fmt: skip
            # A chat-sized body seals in ~0.2 ms per candidate, less than a thread hop; a big one in a thread.
            sealed, seed = sealing() if len(body) <= INLINE_SEAL_BYTES else await asyncio.to_thread(sealing)
            wire = json.dumps(to_wire(sealed)).encode()
            path = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
            # Each candidate's response keys, derived while the request is on its way (the loop runs this
            # once the request is written), not after the answer's first frame has arrived.
            openers: dict[str, ResponseOpener] = {}
            asyncio.get_running_loop().call_soon(_derive, openers, seed, request_id, chosen)
            try:
                resp = await self.session.post(
                    self.scheduler_url + path, data=wire,
                    headers={**self.auth_headers(), "Content-Type": ENVELOPE},
                    timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=600),
                )  # fmt: skip
            except (aiohttp.ClientError, TimeoutError):
                raise UpstreamFailed("the scheduler could not be reached") from None
            if resp.status == 409:
                err = await _error_of(resp)
                fresh = err.get("candidates") if isinstance(err, dict) else None
                if isinstance(fresh, list) and attempt < MAX_RESEALS:
                    prefer = [n for n in fresh if isinstance(n, str)]
                    continue
            if resp.status != 200:
                body_ = await _error_body(resp)
                raise HearthError.from_body(resp.status, body_)
            names = {c.node_id for c in chosen}
            return req.stream, _open_stream(resp, seed, request_id, names, openers)
        raise HearthError("the scheduler kept asking to re-seal; try again", code="reseal_loop")


def _derive(
    openers: dict[str, ResponseOpener], seed: bytes, request_id: str, chosen: list[Candidate]
) -> None:
    for c in chosen:
        openers.setdefault(
            c.node_id, ResponseOpener(response_secret(seed, c.node_id, request_id), request_id)
        )


async def _open_stream(
    resp: aiohttp.ClientResponse,
    seed: bytes,
    request_id: str,
    candidates: set[str],
    openers: dict[str, ResponseOpener],
) -> AsyncIterator[bytes]:
    decoder = frames.FrameDecoder(max_payload=1024 * 1024)
    opener: ResponseOpener | None = None
    try:
        async for chunk in resp.content.iter_any():
            for frame in decoder.feed(chunk):
                if frame.kind == frames.ROUTE:
                    route = frame.json()
                    node_id = route.get("node_id") if isinstance(route, dict) else None
                    seq = route.get("seq") if isinstance(route, dict) else None
                    if node_id not in candidates or type(seq) is not int:
                        raise ProtocolError("the scheduler routed the answer to a node it was not sealed to")
                    if opener is None:
                        if seq != 0:
                            raise ProtocolError("the answer does not start at its beginning")
                        opener = openers.get(node_id) or ResponseOpener(
                            response_secret(seed, node_id, request_id), request_id
                        )
                    else:
                        opener.switch(response_secret(seed, node_id, request_id), at=seq)
                elif frame.kind == frames.ERROR:
                    err = frame.json()
                    raise HearthError.from_body(
                        int(err.get("status", 502)) if isinstance(err, dict) else 502, err
                    )
                elif frame.kind == frames.DATA:
                    if opener is None:
                        raise ProtocolError("an answer frame came before its route")
                    yield opener.open(frame.payload, final=frame.final)
                else:
                    raise ProtocolError("an unexpected frame in a sealed answer")
        decoder.close()
        if opener is None:
            raise ProtocolError("the answer is empty")
        opener.finish()
    except (aiohttp.ClientError, TimeoutError):
        raise UpstreamFailed("the connection to the scheduler broke mid-answer") from None
    finally:
        resp.close()


def _loads(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None


async def _error_body(resp: aiohttp.ClientResponse) -> Any:
    try:
        return _loads(await read_capped(resp, MAX_ERROR_BYTES))
    finally:
        resp.close()


async def _error_of(resp: aiohttp.ClientResponse) -> Any:
    body = await _error_body(resp)
    return body.get("error") if isinstance(body, dict) else None


def state_path(data_dir: Path, scheduler_url: str) -> Path:
    name = hashlib.sha256(scheduler_url.encode()).hexdigest()[:16]
    return data_dir / "proxy" / f"{name}.json"


# ----- the local OpenAI-compatible server -----

CLIENT = web.AppKey("client", SealedClient)


def create_app(client: SealedClient) -> web.Application:
    app = web.Application(middlewares=[error_middleware], client_max_size=MAX_BODY_BYTES // 2)
    app[CLIENT] = client
    app.router.add_post("/v1/chat/completions", _chat)
    app.router.add_post("/v1/completions", _completion)
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/healthz", _healthz)
    return app


async def _healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def _chat(request: web.Request) -> web.StreamResponse:
    return await _relay(request, "chat")


async def _completion(request: web.Request) -> web.StreamResponse:
    return await _relay(request, "completion")


async def _models(request: web.Request) -> web.Response:
    client = request.app[CLIENT]
    try:
        async with client.session.get(
            client.scheduler_url + "/v1/models", headers=client.auth_headers(),
            timeout=aiohttp.ClientTimeout(total=30),
        ) as resp:  # fmt: skip
            raw = await read_capped(resp, MAX_DIRECTORY_BYTES)
            return web.Response(status=resp.status, body=raw, content_type="application/json")
    except (aiohttp.ClientError, TimeoutError):
        raise UpstreamFailed("the scheduler could not be reached") from None


async def _relay(request: web.Request, endpoint: Endpoint) -> web.StreamResponse:
    client = request.app[CLIENT]
    stream, payloads = await client.send(endpoint, await read_body(request))
    if not stream:
        parts, size = [], 0
        async for payload in payloads:
            size += len(payload)
            if size > MAX_ANSWER_BYTES:
                raise UpstreamFailed("the answer is over the size limit")
            parts.append(payload)
        return web.Response(body=b"".join(parts), content_type="application/json")
    out = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await out.prepare(request)
    try:
        async for payload in payloads:
            if payload:
                await out.write(payload)
    except HearthError as exc:
        # Headers are out: end the stream with an error event, as OpenAI's clients expect.
        await out.write(b"data: " + json.dumps(exc.to_body()).encode() + b"\n\n")
    await out.write_eof()
    return out


async def serve(client: SealedClient, host: str, port: int) -> tuple[web.AppRunner, str]:
    from protocol.web import start_site

    return await start_site(create_app(client), host, port)
