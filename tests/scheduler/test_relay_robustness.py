"""The relay under stress and abuse: nodes that send garbage, more than 100 streams at once, accounting,
and clean shutdown without leaked threads."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from aiohttp import web

from node.settings import ModelSettings
from protocol import frames
from protocol.web import start_site
from tests.support import (
    LoopThread,
    Stack,
    attach_fake_node,
    start_scheduler,
    start_stack,
    stop_stack,
    wait_for,
)

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
GOOD_DATA = frames.encode(b'data: {"choices": []}\n\n')

# A node that misbehaves on purpose: each case is what it sends after a 200.
# fmt: off
BAD_STREAMS = [
    ("META is not an object", GOOD_DATA + frames.encode(b"[1]", frames.META | frames.FINAL)),
    ("token count is a string", GOOD_DATA + frames.encode(b'{"prompt_tokens": "abc", "completion_tokens": 1}', frames.META | frames.FINAL)),
    ("negative token count", GOOD_DATA + frames.encode(b'{"prompt_tokens": -5, "completion_tokens": 1}', frames.META | frames.FINAL)),
    ("huge token count", GOOD_DATA + frames.encode(b'{"prompt_tokens": 1e30, "completion_tokens": 1}', frames.META | frames.FINAL)),
    ("ERROR frame not an object", GOOD_DATA + frames.encode(b"[1]", frames.ERROR | frames.FINAL)),
    ("ERROR status not a number", GOOD_DATA + frames.encode(b'{"status": "x", "error": {}}', frames.ERROR | frames.FINAL)),
    ("unknown flags", GOOD_DATA + frames.HEADER.pack(1, 0x80) + b"x"),
    ("length over the limit", GOOD_DATA + frames.HEADER.pack(2**31, 0)),
    ("cut before the final frame", GOOD_DATA),
    ("not frames at all", b"HTTP/1.1 500 oops\r\n\r\n"),
]
# fmt: on


@pytest.fixture
def rogue(servers: LoopThread, tmp_path: Path) -> Iterator[tuple[Stack, dict[str, bytes]]]:
    script: dict[str, bytes] = {"body": b""}

    async def jobs(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": frames.MEDIA_TYPE})
        await resp.prepare(request)
        await resp.write(script["body"])
        await resp.write_eof()
        return resp

    async def start() -> Stack:
        app = web.Application()
        app.router.add_post("/jobs", jobs)
        node_runner, node_url = await start_site(app, "127.0.0.1", 0)
        stack = await start_scheduler(tmp_path)
        stack.runners.append(node_runner)
        model = {"id": "m", "phase": "ready", "context_length": 2048, "cache_tokens": 2048}
        await attach_fake_node(stack, "rogue", node_url, [model])
        return stack

    stack = servers.call(start())
    yield stack, script
    servers.call(stop_stack(stack))


@pytest.mark.parametrize(("name", "body"), BAD_STREAMS, ids=[c[0] for c in BAD_STREAMS])
def test_a_rogue_node_gets_the_client_a_clean_error(
    rogue: tuple[Stack, dict[str, bytes]], name: str, body: bytes
) -> None:
    stack, script = rogue
    script["body"] = body
    headers = {"Authorization": f"Bearer {stack.token}"}
    plain = httpx.post(stack.api + "/chat/completions", json=CHAT, headers=headers, timeout=10)
    assert plain.status_code in (500, 503)
    assert "error" in plain.json()
    # Streaming: the HTTP stream stays well-formed and ends with an error event.
    with httpx.stream(
        "POST", stack.api + "/chat/completions", json={**CHAT, "stream": True}, headers=headers, timeout=10
    ) as r:
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    if r.status_code == 200:
        assert "error" in json.loads(events[-1].removeprefix("data: "))
    else:
        assert r.status_code in (500, 503)


@pytest.fixture(scope="module")
def roomy(
    servers: LoopThread, demo_model: ModelSettings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    model = demo_model.model_copy(update={"max_queued": 500})
    # 150 streams share one loop with the node's heartbeats: on a busy machine a beat can come later than
    # the tests' usual 2 s timeout, and this test is about the relay, not about health.
    stack = servers.call(
        start_stack(tmp_path_factory.mktemp("roomy"), [model], scheduler={"node_timeout": 30.0})
    )
    yield stack
    servers.call(stop_stack(stack))


def test_150_concurrent_streams_are_all_served(roomy: Stack) -> None:
    async def main() -> list[int]:
        client = openai.AsyncOpenAI(base_url=roomy.api, api_key=roomy.token, max_retries=0, timeout=120)

        async def one(i: int) -> int:
            stream = await client.chat.completions.create(
                model="hearth-demo", messages=[{"role": "user", "content": f"n{i}"}], max_tokens=2,
                stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
            )  # fmt: skip
            chunks = [c async for c in stream]
            assert chunks[-1].usage is not None
            return chunks[-1].usage.completion_tokens

        try:
            return await asyncio.gather(*(one(i) for i in range(150)))
        finally:
            await client.close()

    assert asyncio.run(main()) == [2] * 150


def test_usage_rows_match_what_clients_were_told(roomy: Stack) -> None:
    client = openai.OpenAI(base_url=roomy.api, api_key=roomy.token, max_retries=0)
    r = client.chat.completions.create(
        model="hearth-demo", messages=[{"role": "user", "content": "count me"}], max_tokens=5,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert r.usage is not None
    request_id = r.id.removeprefix("chatcmpl-")

    async def recorded() -> bool:
        with sqlite3.connect(roomy.data_dir / "hearth.db") as db:
            return db.execute("select 1 from usage where request_id = ?", [request_id]).fetchone() is not None

    roomy_loop = LoopThread()
    try:
        roomy_loop.call(wait_for(recorded, within=10))
    finally:
        roomy_loop.close()
    with sqlite3.connect(roomy.data_dir / "hearth.db") as db:
        row = db.execute(
            "select status, prompt_tokens, completion_tokens, model, endpoint from usage where request_id = ?",
            [request_id],
        ).fetchone()
    assert row == ("ok", r.usage.prompt_tokens, 5, "hearth-demo", "chat")


def test_stopping_a_stack_leaves_no_threads(
    servers: LoopThread, demo_model: ModelSettings, tmp_path: Path
) -> None:
    def ours() -> set[threading.Thread]:
        return {t for t in threading.enumerate() if t.name.startswith("hearth-")}

    before = ours()
    stack = servers.call(start_stack(tmp_path, [demo_model]))
    httpx.post(stack.api + "/completions", json={"model": "hearth-demo", "prompt": "x", "max_tokens": 2},
               headers={"Authorization": f"Bearer {stack.token}"}, timeout=30)  # fmt: skip
    assert ours() - before, "the stack runs its generation and database threads"
    servers.call(stop_stack(stack))
    assert ours() == before
