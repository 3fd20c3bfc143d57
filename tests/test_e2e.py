"""End-to-end encryption through real servers: the `openai` client → `hearth proxy` → scheduler → node.

Every byte between the proxy and the scheduler, and between the scheduler and the node, passes through a
recording tap; a canary in the prompt must never show up in any of it, nor in the scheduler's database or
logs, while the answers still arrive intact (streaming and not).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import httpx
import openai
import pytest

from hearth.proxy import SealedClient, serve, state_path
from node.settings import ModelSettings
from protocol.envelope import MEDIA_TYPE as ENVELOPE
from tests.support import LoopThread, Stack, start_stack, stop_stack, wait_for

CANARY = "zebra-canary-7f3a1c"


@dataclass
class Tap:
    """A TCP forwarder on 127.0.0.1 that keeps every byte it forwards, both ways."""

    target_port: int
    seen: bytearray = field(default_factory=bytearray)
    server: asyncio.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    self.seen += data
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                dst.close()
                with contextlib.suppress(ConnectionError):
                    await dst.wait_closed()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


@dataclass
class E2E:
    stack: Stack
    proxy_url: str
    scheduler_tap: Tap
    node_tap: Tap
    client: SealedClient


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/")[0])


@pytest.fixture(scope="module")
def e2e(
    servers: LoopThread, demo_model: ModelSettings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[E2E]:
    data = tmp_path_factory.mktemp("e2e")

    async def start() -> E2E:
        node_tap = Tap(0)
        node_public = await node_tap.start()
        stack = await start_stack(
            data, [demo_model], scheduler={"policy": {"require_e2e": True}},
            node={"public_url": node_public, "e2e_flush_interval": 0.0},
        )  # fmt: skip
        node_tap.target_port = _port(stack.node_url)
        sched_tap = Tap(_port(stack.base_url))
        sched_public = await sched_tap.start()
        session = aiohttp.ClientSession()
        client = SealedClient(sched_public, stack.token, state_path(data / "user", sched_public), session)

        async def has_key() -> bool:
            directory = await client.refresh(force=True)
            return stack.node_id in directory.usable(__import__("time").time())

        await wait_for(has_key, within=30, interval=0.2)
        runner, url = await serve(client, "127.0.0.1", 0)
        stack.runners.insert(0, runner)
        stack.tasks.append(asyncio.ensure_future(_close_later(session)))
        return E2E(stack, url + "/v1", sched_tap, node_tap, client)

    env = servers.call(start())
    yield env
    servers.call(stop_stack(env.stack))
    servers.call(env.scheduler_tap.close())
    servers.call(env.node_tap.close())


async def _close_later(session: aiohttp.ClientSession) -> None:
    try:
        await asyncio.Event().wait()
    finally:
        await session.close()


def _ask(env: E2E, *, stream: bool, max_tokens: int = 8) -> tuple[str, openai.types.CompletionUsage | None]:
    client = openai.OpenAI(base_url=env.proxy_url, api_key="unused-locally", max_retries=0)
    messages = [{"role": "user", "content": f"Please repeat {CANARY} back to me."}]
    if not stream:
        r = client.chat.completions.create(
            model="hearth-demo", messages=messages, max_tokens=max_tokens,  # type: ignore[arg-type]
            extra_body={"ignore_eos": True},
        )  # fmt: skip
        return r.choices[0].message.content or "", r.usage
    chunks = list(
        client.chat.completions.create(
            model="hearth-demo", messages=messages, max_tokens=max_tokens, stream=True,  # type: ignore[arg-type]
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
        )
    )  # fmt: skip
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks[-1].usage


def test_the_openai_client_works_through_the_proxy_and_the_canary_never_shows(
    e2e: E2E, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    text, usage = _ask(e2e, stream=False)
    assert text and usage is not None and usage.completion_tokens == 8
    text, usage = _ask(e2e, stream=True)
    assert text and usage is not None and usage.completion_tokens == 8
    # What crossed the wire, both hops, both ways: sealed.
    assert e2e.scheduler_tap.seen and e2e.node_tap.seen
    assert CANARY.encode() not in bytes(e2e.scheduler_tap.seen)
    assert CANARY.encode() not in bytes(e2e.node_tap.seen)
    assert ENVELOPE.encode() in bytes(e2e.scheduler_tap.seen)
    # What the scheduler stores and logs.
    for path in e2e.stack.data_dir.rglob("*"):
        if path.is_file():
            assert CANARY.encode() not in path.read_bytes(), path
    assert CANARY not in caplog.text


def test_plaintext_is_refused_when_e2e_is_required(e2e: E2E) -> None:
    r = httpx.post(
        e2e.stack.api + "/chat/completions",
        json={"model": "hearth-demo", "messages": [{"role": "user", "content": CANARY}]},
        headers={"Authorization": f"Bearer {e2e.stack.token}"},
    )
    assert r.status_code == 403
    assert r.json()["error"]["code"] == "e2e_required"
    assert "hearth proxy" in r.json()["error"]["message"]


def test_a_replayed_envelope_is_refused(e2e: E2E) -> None:
    # Capture one envelope as the scheduler receives it, then send it again.
    seen = bytes(e2e.scheduler_tap.seen)
    start = seen.rfind(b'{"suite": "hearth-e2e-v1"')
    assert start >= 0
    doc, _ = json.JSONDecoder().raw_decode(seen[start:].decode("latin-1"))
    endpoint = "/chat/completions"
    first = httpx.post(
        e2e.stack.api + endpoint, content=json.dumps(doc),
        headers={"Authorization": f"Bearer {e2e.stack.token}", "Content-Type": ENVELOPE}, timeout=30,
    )  # fmt: skip
    assert first.status_code == 400
    assert first.json()["error"]["code"] == "envelope_invalid"


def test_the_proxy_pins_the_authority_and_the_head(e2e: E2E, tmp_path: Path) -> None:
    pinned = json.loads(e2e.client.state_path.read_text())
    assert pinned["authority_key"]
    assert pinned["head"]["seq"] >= 2  # the node's certificate and its key statement
