"""`hearth proxy` passes the scheduler's rate-limit headers and request id to its client on answers, not only
on refusals, streaming or not: OpenAI clients read x-ratelimit-* to pace themselves and users quote
x-request-id when they ask for help.

The scheduler here is tests/test_proxy_cut.py's small aiohttp stand-in (it opens each sealed request as its
one node would) answering in full, with headers of its own choosing, so the test does not depend on which
headers the real scheduler sends today; tests/test_terms_proxy.py compares the real scheduler's headers.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from protocol import frames
from protocol.directory import key_id
from protocol.envelope import ResponseSealer, from_wire, open_request, public_key_bytes, response_secret
from protocol.identity import Identity
from tests.support import LoopThread
from tests.test_proxy_cut import FIRST_CHUNK, NODE, make_directory, proxied

# What the scheduler sends on a generation answer (issue 13), and one header the proxy must not pass on.
PASSED = {
    "x-ratelimit-limit-requests": "60",
    "x-ratelimit-remaining-requests": "59",
    "x-ratelimit-reset-requests": "1s",
    "x-ratelimit-limit-tokens": "100000",
    "x-ratelimit-remaining-tokens": "99990",
    "x-ratelimit-reset-tokens": "6ms",
    "x-request-id": "req_7f3a1c0b9e",
}
NOT_PASSED = {"x-hearth-node": "gpu-1"}
WHOLE = (
    b'{"id":"c1","object":"chat.completion","created":0,"model":"m","choices":[{"index":0,"message":'
    b'{"role":"assistant","content":"Hello"},"finish_reason":"stop"}],'
    b'"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}'
)


@dataclass
class Answering:
    node_key: X25519PrivateKey
    doc: dict[str, object]

    async def directory(self, request: web.Request) -> web.Response:
        since = int(request.query.get("since", "0"))
        entries = self.doc["entries"]
        assert isinstance(entries, list)
        return web.json_response(dict(self.doc, entries=entries[since:]))

    async def generate(self, request: web.Request) -> web.StreamResponse:
        sealed = from_wire(await request.json())
        raw = public_key_bytes(self.node_key.public_key())
        _, seed = open_request(sealed, node_id=NODE, keys={key_id(raw): self.node_key}, now=int(time.time()))
        rid = sealed.header.request_id
        sealer = ResponseSealer(response_secret(seed, NODE, rid), rid)
        answer = FIRST_CHUNK + b"data: [DONE]\n\n" if sealed.header.stream else WHOLE
        out = web.StreamResponse(headers={"Content-Type": frames.MEDIA_TYPE, **PASSED, **NOT_PASSED})
        await out.prepare(request)
        route = frames.encode_json({"node_id": NODE, "seq": 0}, frames.ROUTE)
        await out.write(route + frames.encode(sealer.seal(answer, final=True), frames.FINAL))
        await out.write_eof()
        return out


@pytest.fixture
def proxy_url(servers: LoopThread, tmp_path: Path) -> Iterator[str]:
    node_key = X25519PrivateKey.generate()
    scheduler = Answering(node_key, make_directory(Identity.generate(), node_key))
    with proxied(servers, scheduler.directory, scheduler.generate, tmp_path) as url:
        yield url + "/v1"


@pytest.mark.parametrize("stream", [False, True])
def test_an_answer_reaches_the_client_with_the_schedulers_rate_limit_headers(
    proxy_url: str, stream: bool
) -> None:
    with openai.OpenAI(base_url=proxy_url, api_key="-", max_retries=0, timeout=60) as client:
        raw = client.chat.completions.with_raw_response.create(
            model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=8, stream=stream
        )
        answer = raw.parse()
        if stream:
            assert [c.choices[0].delta.content for c in answer] == ["Hel"]  # type: ignore[union-attr]
        else:
            assert answer.choices[0].message.content == "Hello"  # type: ignore[union-attr]
    assert {name: raw.headers.get(name) for name in PASSED} == PASSED
    assert all(name not in raw.headers for name in NOT_PASSED)
