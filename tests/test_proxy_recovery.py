"""`hearth proxy` after the cluster changes under it, and the errors it answers with.

Real servers on 127.0.0.1 (scheduler, node, proxy) and the real `openai` client. The proxy reaches its
scheduler through a Tap, so the test counts the directory reads that cross the wire. Every proxy here keeps
its directory for an hour (``max_age``): whatever it learns sooner, it learns from a re-read after a miss.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import openai
import pytest
from aiohttp import web

from hearth.proxy import MISS_BACKOFF_MAX_S, MISS_BACKOFF_MIN_S, SealedClient, state_path
from hearth.proxy_server import serve
from node.app import load_transformers, start_node
from node.settings import ModelSettings, NodeSettings
from node.trust import Trust
from protocol.errors import HearthError, PermissionDenied
from scheduler.state import FEDERATION
from tests.support import (
    LoopThread,
    Stack,
    Tap,
    certify_node,
    port_of,
    start_scheduler,
    start_stack,
    stop_stack,
)

MODEL = "hearth-demo"
SCHEDULER_RETRY_S = 7  # the scheduler's Retry-After here, unlike anything the proxy says of its own
HOUR = 3600.0


@dataclass
class Proxied:
    stack: Stack
    tap: Tap
    client: SealedClient
    url: str  # the proxy's API base, .../v1
    runner: web.AppRunner

    def directory_reads(self) -> int:
        return bytes(self.tap.seen).count(b"GET /v1/directory")

    def model_reads(self) -> int:
        return bytes(self.tap.seen).count(b"GET /v1/models")

    def openai(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url, api_key="unused-locally", max_retries=0, timeout=120)


async def start_proxy(stack: Stack, data: Path, **options: Any) -> Proxied:
    """`hearth proxy` in this process, reading its directory once at start as the command does."""
    tap = Tap(port_of(stack.base_url))
    tapped = await tap.start()
    session = aiohttp.ClientSession()
    where = state_path(data / "user", tapped)
    client = SealedClient(tapped, stack.token, where, session, max_age=HOUR, **options)
    await client.refresh(force=True)
    runner, url = await serve(client, "127.0.0.1", 0)
    return Proxied(stack, tap, client, url + "/v1", runner)


async def stop_proxy(proxied: Proxied) -> None:
    await proxied.runner.cleanup()
    await proxied.client.session.close()
    await proxied.tap.close()


async def join_node(stack: Stack, model: ModelSettings, node_dir: Path, node_id: str) -> None:
    """Enroll, approve and start a node while the scheduler runs (a volunteer joining)."""
    await certify_node(stack, node_dir, node_id)
    trust = await asyncio.to_thread(Trust.open, node_dir)
    settings = NodeSettings(
        node_id=node_id, models=[model], advertise=False, heartbeat_interval=0.2, data_dir=node_dir,
        scheduler_url=stack.base_url,
    )  # fmt: skip
    runner, _, _ = await start_node(settings, trust=trust, loader=load_transformers)
    stack.runners.append(runner)


def in_directory(base_url: str, node_id: str) -> bool:
    """Whether the scheduler's directory (read directly, not through the proxy's tap) offers ``node_id``
    for the model: hinted, with a key statement logged."""
    doc = httpx.get(base_url + "/v1/directory", timeout=30).json()
    keyed = any(e["kind"] == "key" and e["doc"]["statement"]["node_id"] == node_id for e in doc["entries"])
    return keyed and node_id in doc["placement"].get(MODEL, [])


def ask(client: openai.OpenAI, model: str = MODEL) -> Any:
    return client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=2,
        extra_body={"ignore_eos": True},
    )  # fmt: skip


def test_a_node_that_joins_after_the_proxy_started_is_served_after_one_backoff_step(
    servers: LoopThread, demo_model: ModelSettings, tmp_path: Path
) -> None:
    stack = servers.call(start_scheduler(tmp_path, retry_after=SCHEDULER_RETRY_S))
    proxied = servers.call(start_proxy(stack, tmp_path))
    try:
        assert proxied.client.hints == {}  # it read the directory before any node was there
        client = proxied.openai()
        # Before the node: nobody has ever served the model, and the scheduler does not list it.
        with pytest.raises(openai.NotFoundError) as info:
            ask(client)
        assert (info.value.code, info.value.param) == ("model_not_found", "model")

        joining = asyncio.run_coroutine_threadsafe(
            join_node(stack, demo_model, tmp_path / "gpu", "gpu-1"), servers.loop
        )
        appeared: float | None = None  # when this test first saw the node in the scheduler's directory
        refusals: list[tuple[int, str | None, str | None, bool]] = []
        answer, deadline = None, time.monotonic() + 120
        while answer is None and not (refusals and refusals[-1][3]):
            assert time.monotonic() < deadline, f"the proxy never served the node; it answered {refusals}"
            started = time.monotonic()
            try:
                answer = ask(client)
            except openai.APIStatusError as exc:
                late = appeared is not None and started >= appeared + MISS_BACKOFF_MAX_S
                refusals.append((exc.status_code, exc.code, exc.response.headers.get("retry-after"), late))
            if appeared is None and in_directory(stack.base_url, "gpu-1"):
                appeared = time.monotonic()
            time.sleep(0.05)
        # A request that starts one backoff step after the node is in the directory finds it.
        assert answer is not None, f"refused {refusals[-1]} after the node was in the directory"
        assert answer.usage is not None and answer.usage.completion_tokens == 2
        joining.result(60)
        for status, code, retry_after, _ in refusals:
            # While the node joins: unknown (404) until some hint names the model, then retry (503).
            assert (status, code) in {(404, "model_not_found"), (503, "no_candidates")}
            assert status == 404 or retry_after == str(round(MISS_BACKOFF_MAX_S))
    finally:
        servers.call(stop_proxy(proxied))
        servers.call(stop_stack(stack))


def test_a_model_seen_served_whose_nodes_left_is_a_retry_never_a_404(
    servers: LoopThread, demo_model: ModelSettings, tmp_path: Path
) -> None:
    stack = servers.call(start_stack(tmp_path, [demo_model], scheduler={"retry_after": SCHEDULER_RETRY_S}))
    proxied = servers.call(start_proxy(stack, tmp_path))
    try:
        client = proxied.openai()
        ask(client)
        servers.call(stack.runners.pop().cleanup())  # the node goes away
        deadline = time.monotonic() + 60
        while in_directory(stack.base_url, stack.node_id):
            assert time.monotonic() < deadline, "the scheduler never noticed the node had gone"
            time.sleep(0.1)
        # The proxy still seals to the node it knows; the scheduler's 503 reaches the client as it was.
        with pytest.raises(openai.InternalServerError) as info:
            ask(client)
        assert info.value.status_code == 503
        assert info.value.response.headers["retry-after"] == str(SCHEDULER_RETRY_S)
        # Once its copy of the directory is read again (after 30 s, in use) it has nobody to seal to: its
        # own 503, since a node served the model a moment ago; never a 500, never a 404.
        servers.call(proxied.client.refresh(force=True))
        for stream in (False, True):
            with pytest.raises(openai.InternalServerError) as info:
                client.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2, stream=stream
                )
            assert (info.value.status_code, info.value.code) == (503, "no_candidates")
            assert info.value.response.headers["retry-after"] == str(round(MISS_BACKOFF_MAX_S))
    finally:
        servers.call(stop_proxy(proxied))
        servers.call(stop_stack(stack))


@pytest.fixture(scope="module")
def proxied(
    servers: LoopThread, demo_model: ModelSettings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Proxied]:
    data = tmp_path_factory.mktemp("proxied")
    stack = servers.call(start_stack(data, [demo_model], scheduler={"retry_after": SCHEDULER_RETRY_S}))
    proxied = servers.call(start_proxy(stack, data))
    yield proxied
    servers.call(stop_proxy(proxied))
    servers.call(stop_stack(stack))


def test_an_unknown_model_is_404_through_the_proxy_as_at_the_scheduler(proxied: Proxied) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        ask(proxied.openai(), "gpt-9")
    direct = httpx.post(
        proxied.stack.api + "/chat/completions",
        json={"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]},
        headers={"Authorization": f"Bearer {proxied.stack.token}"}, timeout=60,
    )  # fmt: skip
    assert direct.status_code == info.value.status_code == 404
    assert info.value.body == direct.json()["error"]  # the same message, type, param and code
    assert ask(proxied.openai()).usage.completion_tokens == 2  # a served model still answers
    assert MODEL in {m.id for m in proxied.openai().models.list()}


def test_a_503_from_the_scheduler_reaches_the_client_with_its_retry_after(proxied: Proxied) -> None:
    assert proxied.stack.scheduler_app is not None
    registry = proxied.stack.scheduler_app[FEDERATION].registry
    registry.set_drain(proxied.stack.node_id, True)
    try:
        for stream in (False, True):
            with pytest.raises(openai.InternalServerError) as info:
                proxied.openai().chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2, stream=stream
                )
            assert (info.value.status_code, info.value.code) == (503, "no_capacity")
            assert info.value.response.headers["retry-after"] == str(SCHEDULER_RETRY_S)
    finally:
        registry.set_drain(proxied.stack.node_id, False)


def test_a_burst_for_a_model_nobody_serves_reads_the_directory_a_bounded_number_of_times(
    proxied: Proxied,
) -> None:
    async def burst(concurrent: int, sequential: int) -> list[int]:
        async with openai.AsyncOpenAI(base_url=proxied.url, api_key="-", max_retries=0, timeout=120) as c:

            async def one() -> int:
                try:
                    await c.chat.completions.create(
                        model="no-such-model", messages=[{"role": "user", "content": "hi"}]
                    )
                except openai.APIStatusError as exc:
                    return exc.status_code
                return 200

            statuses = list(await asyncio.gather(*(one() for _ in range(concurrent))))
            for _ in range(sequential):
                statuses.append(await one())
            return statuses

    directory, models = proxied.directory_reads(), proxied.model_reads()
    started = time.monotonic()
    statuses = asyncio.run(burst(concurrent=20, sequential=30))
    elapsed = time.monotonic() - started
    assert statuses == [404] * 50
    # Re-reads after a miss start at least MISS_BACKOFF_MIN_S apart, and concurrent misses share one: the
    # count follows the time the burst took, not the number of requests in it.
    bound = 1 + int(elapsed / MISS_BACKOFF_MIN_S)
    assert 1 <= proxied.directory_reads() - directory <= bound
    assert proxied.model_reads() - models <= bound


def test_only_nodes_of_another_tier_is_403_tier_not_allowed(
    servers: LoopThread, proxied: Proxied, tmp_path: Path
) -> None:
    async def go() -> None:
        async with aiohttp.ClientSession() as session:
            client = SealedClient(
                proxied.client.scheduler_url, proxied.stack.token, tmp_path / "pin.json", session,
                tiers=frozenset({"community"}),
            )  # fmt: skip
            body = b'{"model": "%s", "messages": [{"role": "user", "content": "hi"}]}' % MODEL.encode()
            await client.send("chat", body)

    with pytest.raises(PermissionDenied) as info:
        servers.call(go())
    assert info.value.code == "tier_not_allowed"


def test_the_proxy_never_answers_500_for_a_scheduler_that_is_gone(
    servers: LoopThread, tmp_path: Path
) -> None:
    async def go() -> HearthError:
        async with aiohttp.ClientSession() as session:
            client = SealedClient("http://127.0.0.1:9", "t", tmp_path / "pin.json", session)
            try:
                await client.send("chat", b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}')
            except HearthError as exc:
                return exc
            raise AssertionError("no error")

    exc = servers.call(go())
    assert (exc.status, exc.code) == (503, "scheduler_unreachable")
    assert "Retry-After" in exc.headers()
