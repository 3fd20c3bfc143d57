"""GET /admin/queue against a real scheduler and node: requests show as waiting or running, with their
node, user, group and the chunks relayed so far, users with their fair-share standing; every request
leaves the board when it ends, however it ends; no prompt text is ever in the reply.

The node's backend is the real demo model with held jobs (tests.held): the test decides when a job moves on
and when it ends, instead of racing a fast model.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import openai
import pytest

from hearth.proxy import SealedClient, state_path
from hearth.proxy_server import serve
from node.settings import ModelSettings
from protocol.admin import QueueState
from scheduler.state import ADMISSION, JOBS
from tests.held import GATE, HELD_TOKENS, Gate, Held
from tests.support import LoopThread, Stack, port_of, start_stack, stop_stack

MODEL = "hearth-demo"
CANARY = "ocelot-canary-51d9e2"
MAX_QUEUED = 1  # so that a third request is refused while one runs and one waits
WITHIN_S = 60.0  # a bound on waiting for the servers, never a timing assertion


@pytest.fixture(scope="module")
def stack(
    servers: LoopThread, demo_model: ModelSettings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    s = servers.call(
        start_stack(
            tmp_path_factory.mktemp("queue"), [demo_model], loader=Held.loader(),
            scheduler={"max_queued": MAX_QUEUED},
        )
    )  # fmt: skip
    yield s
    servers.call(stop_stack(s))


@pytest.fixture(autouse=True)
def gate(stack: Stack) -> Iterator[Gate]:
    """A closed gate for each test; afterwards every held job is let go and must leave the board."""
    GATE.reset()
    yield GATE
    GATE.open()
    until(lambda: _empty(stack), "the board is empty after the test")


def until(predicate: Callable[[], Any], what: str) -> Any:
    deadline = time.monotonic() + WITHIN_S
    while not (seen := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        time.sleep(0.02)
    return seen


def admin_get(stack: Stack, path: str, token: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token or stack.token}"} if token != "" else {}
    return httpx.get(stack.base_url + path, headers=headers, timeout=30)


def queue(stack: Stack) -> QueueState:
    r = admin_get(stack, "/admin/queue")
    assert r.status_code == 200, r.text
    return QueueState.model_validate(r.json())


def _empty(stack: Stack) -> bool:
    state = queue(stack)
    assert stack.scheduler_app is not None
    return not state.waiting and not state.running and not state.users and not stack.scheduler_app[JOBS]


def user(stack: Stack, name: str) -> tuple[str, str]:
    """A new user token: (its id, its secret)."""
    r = httpx.post(
        stack.base_url + "/admin/tokens", json={"name": name},
        headers={"Authorization": f"Bearer {stack.token}"}, timeout=30,
    )  # fmt: skip
    assert r.status_code == 201, r.text
    return r.json()["token"]["id"], r.json()["secret"]


def body(max_tokens: int = HELD_TOKENS, **extra: Any) -> dict[str, Any]:
    return {
        "model": MODEL, "messages": [{"role": "user", "content": f"tell me about {CANARY}"}],
        "max_tokens": max_tokens, "ignore_eos": True, "stream": True, **extra,
    }  # fmt: skip


def running_of(stack: Stack, token_id: str) -> Any:
    return next((j for j in queue(stack).running if j.token_id == token_id), None)


@contextlib.contextmanager
def streaming(stack: Stack, secret: str) -> Iterator[httpx.Response]:
    """A held streaming request, open until the block ends (then its client is gone)."""
    headers = {"Authorization": f"Bearer {secret}"}
    with (
        httpx.Client(timeout=60) as client,
        client.stream("POST", stack.api + "/chat/completions", json=body(), headers=headers) as r,
    ):
        assert r.status_code == 200
        yield r


def test_a_held_stream_runs_on_its_node_and_its_chunks_are_counted(stack: Stack, gate: Gate) -> None:
    alice, secret = user(stack, "alice")
    with streaming(stack, secret) as r:
        job = until(lambda: running_of(stack, alice), "alice's request runs")
        assert (job.request_id, job.group, job.model) == (r.headers["x-request-id"], "default", MODEL)
        assert (job.sealed, job.state, job.node_id, job.attempts) == (False, "running", stack.node_id, 1)
        assert job.age_seconds >= job.waited_seconds >= 0
        # Each token the gate lets through is relayed as it comes.
        for _ in range(2):
            before = running_of(stack, alice).streamed
            gate.allow(3)
            until(lambda b=before: running_of(stack, alice).streamed > b, "more chunks are relayed")
        raw = admin_get(stack, "/admin/queue").text
        assert CANARY not in raw and "tell me" not in raw
        state = queue(stack)
        assert state.waiting == [] and state.max_queued == MAX_QUEUED
        assert [(u.token_id, u.waiting, u.running) for u in state.users] == [(alice, 0, 1)]
        gate.open()
        answer = r.read()
    assert b"[DONE]" in answer
    until(lambda: _empty(stack), "the finished request leaves the board")


def test_a_waiting_request_and_the_heavier_user_ahead_of_it(stack: Stack, gate: Gate) -> None:
    heavy, heavy_secret = user(stack, "heavy")
    light, light_secret = user(stack, "light")
    light_auth = {"Authorization": f"Bearer {light_secret}"}
    with streaming(stack, heavy_secret) as held, ThreadPoolExecutor(1) as pool:
        until(lambda: running_of(stack, heavy), "the heavy user's request runs")
        # The node runs one sequence at a time: the light user's request waits in the scheduler.
        waiting: Future[httpx.Response] = pool.submit(
            httpx.post, stack.api + "/chat/completions", json=body(4, stream=False), headers=light_auth,
            timeout=60,
        )  # fmt: skip
        state = until(lambda: (s := queue(stack)).waiting and s, "the light user's request waits")
        job = state.waiting[0]
        assert (job.token_id, job.state, job.node_id, job.attempts, job.streamed) == (
            light, "waiting", None, 0, 0,
        )  # fmt: skip
        until(lambda: queue(stack).waiting[0].waited_seconds > job.waited_seconds, "its wait grows")
        # The light user is next in line; the heavy one has been charged its request's reservation.
        users = {u.token_id: u for u in state.users}
        assert [u.token_id for u in state.users] == [light, heavy]
        assert (users[light].waiting, users[light].running, users[light].ahead_tokens) == (1, 0, 0.0)
        assert (users[heavy].waiting, users[heavy].running) == (0, 1)
        assert users[heavy].ahead_tokens >= 2 * HELD_TOKENS  # a generated token counts 2
        assert users[heavy].weight == users[light].weight == 1.0
        # A third request finds the queue full: refused, and not left on the board.
        third = httpx.post(
            stack.api + "/chat/completions", json=body(4, stream=False), headers=light_auth, timeout=60
        )
        assert third.status_code == 503 and third.json()["error"]["code"] == "queue_full"
        state = queue(stack)
        assert [j.token_id for j in state.waiting] == [light]
        assert [j.token_id for j in state.running] == [heavy]
        gate.open()
        held.read()
        assert waiting.result(WITHIN_S).status_code == 200
    until(lambda: _empty(stack), "both requests leave the board")


def test_a_client_that_leaves_mid_stream_leaves_no_entry(stack: Stack, gate: Gate) -> None:
    alice, secret = user(stack, "leaves-mid-stream")
    with streaming(stack, secret):
        until(lambda: running_of(stack, alice), "the request runs")
        gate.allow(2)
        until(lambda: running_of(stack, alice).streamed > 0, "chunks are relayed")
    # The client has gone while the node still holds the job (the gate is still closed).
    until(lambda: _empty(stack), "the abandoned request leaves the board")
    assert stack.scheduler_app is not None and stack.scheduler_app[ADMISSION].queued == 0


def test_a_client_that_leaves_while_waiting_leaves_no_entry(stack: Stack, gate: Gate) -> None:
    alice, secret = user(stack, "holds")
    bob, bob_secret = user(stack, "gives-up")
    with streaming(stack, secret):
        until(lambda: running_of(stack, alice), "alice's request runs")
        # Bob's client sends its request on a socket of its own, and goes away while it waits.
        with _raw_post(stack, "/v1/chat/completions", body(4), bob_secret):
            until(lambda: [j.token_id for j in queue(stack).waiting] == [bob], "bob's request waits")
        until(lambda: queue(stack).waiting == [], "bob's request leaves the board")
        state = queue(stack)
        assert [j.token_id for j in state.running] == [alice]
        assert [u.token_id for u in state.users] == [alice]
        gate.open()


def _raw_post(stack: Stack, path: str, doc: dict[str, Any], token: str) -> socket.socket:
    """A request on a bare socket, which the caller closes when its client should be gone."""
    payload = json.dumps(doc).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    )
    sock = socket.create_connection(("127.0.0.1", port_of(stack.base_url)), timeout=30)
    sock.sendall(head.encode() + payload)
    return sock


def test_a_request_refused_by_placement_leaves_no_entry(stack: Stack, gate: Gate) -> None:
    _, secret = user(stack, "asks-too-much")
    # Past the admission checks (the policy allows it), but no node's context can hold it.
    r = httpx.post(
        stack.api + "/chat/completions", json=body(4096, stream=False),
        headers={"Authorization": f"Bearer {secret}"}, timeout=60,
    )  # fmt: skip
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "context_length_exceeded"
    assert _empty(stack)


def test_the_queue_needs_an_admin_token(stack: Stack) -> None:
    assert admin_get(stack, "/admin/queue", token="").status_code == 401
    _, secret = user(stack, "not-an-admin")
    r = admin_get(stack, "/admin/queue", token=secret)
    assert r.status_code == 403
    assert "admin token" in r.json()["error"]["message"]


# ----- sealed requests, through `hearth proxy` -----


async def _start_proxy(stack: Stack, data: Path, token: str) -> tuple[Any, str, aiohttp.ClientSession]:
    session = aiohttp.ClientSession()
    client = SealedClient(stack.base_url, token, state_path(data / "user", stack.base_url), session)
    deadline = time.monotonic() + WITHIN_S
    # The node's key statement reaches the directory with one of its heartbeats.
    while stack.node_id not in (await client.refresh(force=True)).usable(time.time()):
        if time.monotonic() > deadline:
            raise AssertionError("the node's key never reached the directory")
        await asyncio.sleep(0.1)
    runner, url = await serve(client, "127.0.0.1", 0)
    return runner, url + "/v1", session


async def _stop_proxy(runner: Any, session: aiohttp.ClientSession) -> None:
    await runner.cleanup()
    await session.close()


def test_a_sealed_request_shows_as_sealed(
    stack: Stack, gate: Gate, servers: LoopThread, tmp_path: Path
) -> None:
    carol, secret = user(stack, "carol")
    runner, url, session = servers.call(_start_proxy(stack, tmp_path, secret))
    try:
        client = openai.OpenAI(base_url=url, api_key="unused-locally", max_retries=0, timeout=60)
        stream = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"tell me about {CANARY}"}],
            max_tokens=HELD_TOKENS, stream=True, extra_body={"ignore_eos": True},
        )  # fmt: skip
        job = until(lambda: running_of(stack, carol), "carol's sealed request runs")
        assert (job.sealed, job.node_id, job.model, job.group) == (True, stack.node_id, MODEL, "default")
        gate.allow(3)
        until(lambda: running_of(stack, carol).streamed > job.streamed, "sealed frames are relayed")
        assert CANARY not in admin_get(stack, "/admin/queue").text
        gate.open()
        assert sum(1 for _ in stream) > 0
        until(lambda: _empty(stack), "the sealed request leaves the board")
    finally:
        servers.call(_stop_proxy(runner, session))
