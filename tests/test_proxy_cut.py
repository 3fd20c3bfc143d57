"""`hearth proxy` when the scheduler goes away in the middle of an answer: its client gets an error in
OpenAI's shape (an SSE error event once the stream has begun, a 502 JSON body otherwise), never a silent cut.
And a refusal the real scheduler does not make yet (429 with rate-limit headers) reaches the client whole.

The scheduler here is a small aiohttp app on 127.0.0.1 that serves a directory the test made (with a node
key the test holds), opens each sealed request as that node would, relays the first sealed piece of an
answer, and then breaks off: a scheduler failing on purpose, which no user runs.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import aiohttp
import openai
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from hearth.proxy import SealedClient
from hearth.proxy_server import serve
from protocol import frames
from protocol.directory import GENESIS, Head, entry_hash, key_id, make_entry, make_key_statement
from protocol.envelope import ResponseSealer, from_wire, open_request, public_key_bytes, response_secret
from protocol.identity import Identity, b64e, issue_certificate
from protocol.web import start_site
from tests.support import LoopThread

NODE = "gpu-1"
FIRST_CHUNK = (
    b'data: {"id":"c1","object":"chat.completion.chunk","created":0,"model":"m",'
    b'"choices":[{"index":0,"delta":{"role":"assistant","content":"Hel"},"finish_reason":null}]}\n\n'
)
RATE_LIMITED = {"error": {"message": "20 requests a minute", "type": "rate_limit_error", "param": None,
                           "code": "rate_limit_exceeded"}}  # fmt: skip
RATE_HEADERS = {
    "Retry-After": "20",
    "x-ratelimit-limit-requests": "20",
    "x-ratelimit-remaining-requests": "0",
}
FIRST_BYTES = b'{"id":"c1","object":"chat.completion","created":0,"model":"m","choices":['  # of a JSON answer


@dataclass
class Breaking:
    node_key: X25519PrivateKey
    doc: dict[str, Any]
    # The connection drops, the body ends before the final frame, or the request is refused (429).
    how: Literal["cut", "end", "refuse"] = "cut"

    async def directory(self, request: web.Request) -> web.Response:
        since = int(request.query.get("since", "0"))
        return web.json_response(dict(self.doc, entries=self.doc["entries"][since:]))

    async def generate(self, request: web.Request) -> web.StreamResponse:
        if self.how == "refuse":
            return web.json_response(RATE_LIMITED, status=429, headers=RATE_HEADERS)
        sealed = from_wire(await request.json())
        raw = public_key_bytes(self.node_key.public_key())
        _, seed = open_request(sealed, node_id=NODE, keys={key_id(raw): self.node_key}, now=int(time.time()))
        rid = sealed.header.request_id
        sealer = ResponseSealer(response_secret(seed, NODE, rid), rid)
        first = FIRST_CHUNK if sealed.header.stream else FIRST_BYTES
        out = web.StreamResponse(headers={"Content-Type": frames.MEDIA_TYPE})
        await out.prepare(request)
        route = frames.encode_json({"node_id": NODE, "seq": 0}, frames.ROUTE)
        await out.write(route + frames.encode(sealer.seal(first)))
        if self.how == "cut":
            assert request.transport is not None
            request.transport.close()  # what is written goes out; the chunked body never ends
        return out


def make_directory(authority: Identity, node_key: X25519PrivateKey) -> dict[str, Any]:
    ident = Identity.generate()
    raw = public_key_bytes(node_key.public_key())
    cert = issue_certificate(
        authority, node_id=NODE, tier="club", identity_key=ident.public_b64, encryption_key=b64e(raw),
        scheduler_key=Identity.generate().public_b64,
    )  # fmt: skip
    now = int(time.time())
    statement = make_key_statement(
        ident, node_id=NODE, public_raw=raw, not_before=now - 60, not_after=now + 3600
    )
    entries, prev = [], GENESIS
    for seq, (kind, doc) in enumerate([("certificate", cert), ("key", statement)]):
        entry = make_entry(seq, prev, kind, doc, now)  # type: ignore[arg-type]
        entries.append(entry)
        prev = entry_hash(entry)
    return {"authority_key": authority.public_b64, "head": Head(len(entries), prev).to_json(),
            "entries": entries, "more": False, "placement": {"m": [NODE]}}  # fmt: skip


@dataclass
class Setup:
    scheduler: Breaking
    proxy_url: str


@contextlib.contextmanager
def proxied(
    servers: LoopThread,
    directory: Callable[[web.Request], Awaitable[web.StreamResponse]],
    generate: Callable[[web.Request], Awaitable[web.StreamResponse]],
    tmp_path: Path,
) -> Iterator[str]:
    """A stand-in scheduler (its directory and chat routes) with the real `hearth proxy` in front of it:
    the proxy's URL, until the block ends."""
    app = web.Application()
    app.router.add_get("/v1/directory", directory)
    app.router.add_post("/v1/chat/completions", generate)

    async def start() -> tuple[web.AppRunner, web.AppRunner, aiohttp.ClientSession, str]:
        runner, url = await start_site(app, "127.0.0.1", 0)
        session = aiohttp.ClientSession()
        client = SealedClient(url, "t", tmp_path / "pin.json", session)
        await client.refresh(force=True)
        proxy, proxy_url = await serve(client, "127.0.0.1", 0)
        return runner, proxy, session, proxy_url

    runner, proxy, session, proxy_url = servers.call(start())
    try:
        yield proxy_url
    finally:
        servers.call(proxy.cleanup())
        servers.call(session.close())
        servers.call(runner.cleanup())


@pytest.fixture
def setup(servers: LoopThread, tmp_path: Path) -> Iterator[Setup]:
    node_key = X25519PrivateKey.generate()
    scheduler = Breaking(node_key, make_directory(Identity.generate(), node_key))
    with proxied(servers, scheduler.directory, scheduler.generate, tmp_path) as proxy_url:
        yield Setup(scheduler, proxy_url + "/v1")


@pytest.mark.parametrize("how", ["cut", "end"])
def test_a_stream_the_scheduler_breaks_off_ends_with_an_error_event(setup: Setup, how: Any) -> None:
    setup.scheduler.how = how
    client = openai.OpenAI(base_url=setup.proxy_url, api_key="-", max_retries=0, timeout=60)
    stream = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=8, stream=True
    )
    got: list[str | None] = []

    def read() -> None:
        for chunk in stream:
            got.append(chunk.choices[0].delta.content)

    with pytest.raises(openai.APIError) as info:
        read()
    assert got == ["Hel"]  # what arrived before the break reached the client
    assert info.value.code == "scheduler_disconnected"
    assert "broke mid-answer" in info.value.message


@pytest.mark.parametrize("how", ["cut", "end"])
def test_an_answer_the_scheduler_breaks_off_is_a_502_json_error(setup: Setup, how: Any) -> None:
    setup.scheduler.how = how
    client = openai.OpenAI(base_url=setup.proxy_url, api_key="-", max_retries=0, timeout=60)
    with pytest.raises(openai.InternalServerError) as info:
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=8)
    assert (info.value.status_code, info.value.code) == (502, "scheduler_disconnected")
    assert info.value.response.json()["error"]["type"] == "server_error"


def test_a_429_reaches_the_client_with_retry_after_and_rate_limit_headers(setup: Setup) -> None:
    setup.scheduler.how = "refuse"
    client = openai.OpenAI(base_url=setup.proxy_url, api_key="-", max_retries=0, timeout=60)
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], stream=True)
    assert info.value.body == RATE_LIMITED["error"]
    headers = info.value.response.headers
    assert {name: headers.get(name) for name in RATE_HEADERS} == RATE_HEADERS
