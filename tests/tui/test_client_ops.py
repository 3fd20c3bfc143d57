"""The console client's operations on a real scheduler and node on 127.0.0.1: a model loaded and unloaded
on the node, the policy reloaded (and refused), and the time to first token of a finished request.

The node serves the demo model twice: under its own id, loaded at start, and under an id with a "/" (as a
Hugging Face id has), loaded only when asked. The client runs in its own event loop, as the console does.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from typing import TypeVar

import openai
import pytest

from node.demo import DEMO_MODEL_ID
from node.settings import ModelSettings
from protocol.accounts import TokenCreateRequest
from protocol.admin import ModelAction
from protocol.errors import InvalidRequest, NotFound, PermissionDenied
from protocol.policy import AdminEvent, PolicyState
from scheduler.state import EVENTS
from tests.support import LoopThread, Stack, start_stack, stop_stack, wait_for
from tui.client import ConsoleClient

T = TypeVar("T")

SPARE = "club/spare-demo"
POLICY = '[groups.students]\nmodels = ["hearth-*", "club/*"]\ntokens_per_day = 20000\n'


@pytest.fixture(scope="module")
def cluster(
    servers: LoopThread, demo_model: ModelSettings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    data = tmp_path_factory.mktemp("console-ops")
    (data / "policies.toml").write_text(POLICY, encoding="utf-8")
    spare = demo_model.model_copy(update={"id": SPARE, "preload": False})
    stack = servers.call(start_stack(data, [demo_model, spare], wait_ready=False))

    async def demo_ready() -> bool:
        nodes = stack.snapshot().nodes
        return any(m.id == DEMO_MODEL_ID and m.phase == "ready" for n in nodes for m in n.models)

    servers.call(wait_for(demo_ready, within=60))
    yield stack
    servers.call(stop_stack(stack))


def with_client(stack: Stack, fn: Callable[[ConsoleClient], Awaitable[T]], token: str | None = None) -> T:
    async def go() -> T:
        async with ConsoleClient(stack.base_url, token or stack.token) as client:
            return await fn(client)

    return asyncio.run(go())


async def _phase(c: ConsoleClient, node_id: str, model: str) -> str | None:
    for node in (await c.nodes()).nodes:
        if node.node_id == node_id:
            return next((m.phase for m in node.models if m.id == model), None)
    return None


async def _until_phase(c: ConsoleClient, node_id: str, model: str, phase: str) -> None:
    async def there() -> bool:
        return await _phase(c, node_id, model) == phase

    await wait_for(there, within=60, interval=0.1)


def test_the_console_loads_and_unloads_a_model(cluster: Stack) -> None:
    async def go(c: ConsoleClient) -> tuple[ModelAction, ModelAction]:
        await c.unload_model(cluster.node_id, SPARE)  # whatever an earlier test left
        loaded = await c.load_model(cluster.node_id, SPARE, evict=[])
        await _until_phase(c, cluster.node_id, SPARE, "ready")
        unloaded = await c.unload_model(cluster.node_id, SPARE)
        assert await _phase(c, cluster.node_id, SPARE) == "available"
        return loaded, unloaded

    loaded, unloaded = with_client(cluster, go)
    assert (loaded.node_id, loaded.model, loaded.phase) in [
        (cluster.node_id, SPARE, "loading"),
        (cluster.node_id, SPARE, "ready"),
    ]
    assert (unloaded.node_id, unloaded.model, unloaded.phase) == (cluster.node_id, SPARE, "available")


def test_the_console_is_told_why_a_model_action_is_refused(cluster: Stack) -> None:
    async def unknown_node(c: ConsoleClient) -> object:
        return await c.load_model("ghost", SPARE)

    with pytest.raises(NotFound) as no_node:
        with_client(cluster, unknown_node)
    assert no_node.value.code == "not_found" and "ghost" in no_node.value.message

    async def unknown_model(c: ConsoleClient) -> object:
        return await c.unload_model(cluster.node_id, "club/absent")

    with pytest.raises(NotFound) as no_model:
        with_client(cluster, unknown_model)
    assert no_model.value.code == "model_not_found" and "club/absent" in no_model.value.message

    async def bad_evict(c: ConsoleClient) -> object:
        return await c.load_model(cluster.node_id, SPARE, evict=["club/absent"])

    with pytest.raises(InvalidRequest) as evict:
        with_client(cluster, bad_evict)
    assert evict.value.param == "evict"


def test_the_console_reloads_the_policy_and_sees_a_refusal(cluster: Stack) -> None:
    path = cluster.data_dir / "policies.toml"
    path.write_text(POLICY, encoding="utf-8")
    before = with_client(cluster, lambda c: c.reload_policy())
    assert before.loaded_at is not None and before.last_error is None
    path.write_text(POLICY.replace("20000", '"many"'), encoding="utf-8")

    with pytest.raises(InvalidRequest) as refused:
        with_client(cluster, lambda c: c.reload_policy())
    assert refused.value.code == "invalid_policy"
    assert "line 3, groups.students.tokens_per_day" in refused.value.message
    shown: PolicyState = with_client(cluster, lambda c: c.policy())
    assert shown.last_error is not None and "line 3" in shown.last_error
    assert shown.digest == before.digest  # the old policy stays

    path.write_text(POLICY.replace("20000", "40000"), encoding="utf-8")
    after = with_client(cluster, lambda c: c.reload_policy())
    assert after.last_error is None and after.digest != before.digest
    assert after.loaded_at is not None and after.loaded_at > before.loaded_at
    path.write_text(POLICY, encoding="utf-8")
    with_client(cluster, lambda c: c.reload_policy())


def test_finished_events_carry_the_time_to_first_token(cluster: Stack) -> None:
    bus = cluster.scheduler_app[EVENTS] if cluster.scheduler_app is not None else None
    assert bus is not None

    async def watch(c: ConsoleClient) -> AdminEvent:
        before = bus.watchers
        finished: asyncio.Future[AdminEvent] = asyncio.get_running_loop().create_future()

        async def collect() -> None:
            async for event in c.events():
                if event.kind == "finished":
                    finished.set_result(event)
                    return

        task = asyncio.create_task(collect())

        async def subscribed() -> bool:
            return bus.watchers > before

        await wait_for(subscribed, within=60)
        ask = openai.AsyncOpenAI(base_url=cluster.api, api_key=cluster.token, max_retries=0)
        answer = await ask.chat.completions.create(
            model=DEMO_MODEL_ID, messages=[{"role": "user", "content": "hi"}], max_tokens=4
        )
        await ask.close()
        assert answer.choices
        await asyncio.wait_for(task, 60)
        return finished.result()

    event = with_client(cluster, watch)
    assert event.model == DEMO_MODEL_ID and event.status == "ok"
    assert event.ttft_ms is not None and event.ttft_ms > 0


def test_only_an_operator_loads_models_or_reloads_the_policy(cluster: Stack) -> None:
    async def user_secret(c: ConsoleClient) -> str:
        return (await c.create_token(TokenCreateRequest(name="a-user"))).secret

    user = with_client(cluster, user_secret)
    calls: list[Callable[[ConsoleClient], Awaitable[object]]] = [
        lambda c: c.load_model(cluster.node_id, SPARE),
        lambda c: c.unload_model(cluster.node_id, SPARE),
        lambda c: c.reload_policy(),
    ]
    for call in calls:
        with pytest.raises(PermissionDenied) as refused:
            with_client(cluster, call, token=user)
        assert refused.value.status == 403
