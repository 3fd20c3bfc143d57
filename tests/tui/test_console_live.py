"""The console's live screens against a real scheduler and real nodes: the Queue and a node's detail
while a request runs (and never its text), loading and unloading a model, reloading the policy, and a node
approved from the console then doing work. Jobs are held by the test (tests.held), not raced."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import openai
import pytest
from textual.widgets import DataTable, Static

from node.app import load_transformers, start_node
from node.enroll import enroll
from node.settings import ModelSettings, NodeSettings
from node.trust import Trust
from scheduler.state import RULES
from tests.held import GATE, HELD_TOKENS, Held
from tests.support import LoopThread, Stack, start_stack, stop_stack
from tests.tui.pilot import SIZE, admin_call, until
from tui.app import HearthConsole, make_app
from tui.client import ConsoleClient
from tui.screens.approvals import ApprovalsView
from tui.screens.node_detail import NodeDetailScreen
from tui.screens.nodes import NodesView
from tui.screens.policy import PolicyView
from tui.screens.queue import QueueView

CANARY = "quokka-canary-7e21"
T = TypeVar("T")


@pytest.fixture(scope="module")
def live(
    servers: LoopThread, demo_model: ModelSettings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    stack = servers.call(start_stack(tmp_path_factory.mktemp("live"), [demo_model], loader=Held.loader()))
    yield stack
    servers.call(stop_stack(stack))


@pytest.fixture(autouse=True)
def _gate() -> Iterator[None]:
    GATE.reset()
    yield
    GATE.open()  # whatever a test left held ends


async def on_servers(servers: LoopThread, coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on the servers' loop without blocking the console's."""
    return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, servers.loop))


def screen_text(app: HearthConsole) -> str:
    """Everything the console draws now, as the SVG a screenshot would save."""
    return app.export_screenshot()


async def _held_stream(stack: Stack, secret: str) -> None:
    ask = openai.AsyncOpenAI(base_url=stack.api, api_key=secret, max_retries=0, timeout=120)
    stream = await ask.chat.completions.create(
        model="hearth-demo", messages=[{"role": "user", "content": f"Say {CANARY}"}],
        max_tokens=HELD_TOKENS, stream=True, extra_body={"ignore_eos": True},
    )  # fmt: skip
    async for _ in stream:
        pass
    await ask.close()


def _state_of(nodes: NodesView, node_id: str) -> str | None:
    """The State column of a node's row (None while it has none)."""
    if node_id not in nodes.table.rows:
        return None
    return str(nodes.table.get_row(node_id)[1])


async def _phase(stack: Stack, model: str) -> str | None:
    nodes = (await admin_call(stack, "GET", "/admin/nodes")).json()["nodes"]
    for node in nodes:
        if node["node_id"] == stack.node_id:
            return next((m["phase"] for m in node["models"] if m["id"] == model), None)
    return None


async def test_the_queue_and_the_node_show_a_running_request_and_never_its_text(live: Stack) -> None:
    made = (await admin_call(live, "POST", "/admin/tokens", {"name": "queued-user"})).json()
    token_id = made["token"]["id"]
    async with ConsoleClient(live.base_url, live.token) as client:
        app = make_app(client, refresh_s=0.2)
        async with app.run_test(size=SIZE) as pilot:
            asking = asyncio.create_task(_held_stream(live, made["secret"]))
            await pilot.press("5")
            queue = app.query_one(QueueView)
            await until(pilot, lambda: "running" in queue.all_text(), "the request running")
            assert f"queued-user ({token_id})" in queue.all_text()
            assert live.node_id in queue.all_text()
            assert CANARY not in screen_text(app)
            await pilot.press("2")
            await until(pilot, lambda: live.node_id in app.query_one(NodesView).table.rows, "the node")
            await pilot.press("enter")
            await until(pilot, lambda: isinstance(app.screen, NodeDetailScreen), "the node's detail")
            jobs = app.screen.query_one("#node-jobs", DataTable)
            await until(pilot, lambda: jobs.row_count == 1, "the job on its node")
            assert token_id in " ".join(str(c) for c in jobs.get_row_at(0))
            assert CANARY not in screen_text(app)
            GATE.open()
            await asyncio.wait_for(asking, 60)
            await until(pilot, lambda: jobs.row_count == 0, "the job gone once it ended")
            await pilot.press("escape", "5")
            await until(pilot, lambda: "running" not in queue.all_text(), "the queue empty")
            assert CANARY not in screen_text(app)


async def test_a_model_unloaded_and_loaded_again_from_the_nodes_detail(live: Stack) -> None:
    model = "hearth-demo"
    async with ConsoleClient(live.base_url, live.token) as client:
        app = make_app(client, refresh_s=0.2)
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press("2")
            await until(pilot, lambda: live.node_id in app.query_one(NodesView).table.rows, "the node")
            await pilot.press("enter")
            await until(pilot, lambda: isinstance(app.screen, NodeDetailScreen), "the node's detail")
            models = app.screen.query_one("#node-models", DataTable)
            await until(pilot, lambda: model in models.rows, "the model")
            models.move_cursor(row=models.get_row_index(model))
            await pilot.press("u", "y")  # unload, confirmed

            async def phase_is(phase: str) -> bool:
                return await _phase(live, model) == phase

            await until(pilot, lambda: phase_is("available"), "the model unloaded")
            await pilot.press("l")
            await until(pilot, lambda: phase_is("ready"), "the model loaded again")


async def test_a_policy_reload_from_the_console_shows_a_refused_file_then_the_fix(live: Stack) -> None:
    assert live.scheduler_app is not None
    path = live.scheduler_app[RULES].path
    assert path is not None
    good = '[groups.default]\nmodels = ["*"]\n'
    await asyncio.to_thread(path.write_text, good, "utf-8")
    try:
        async with ConsoleClient(live.base_url, live.token) as client:
            app = make_app(client, refresh_s=0.2)
            async with app.run_test(size=SIZE) as pilot:
                await pilot.press("7")
                head = app.query_one("#policy-head", Static)
                await pilot.press("R")
                await until(pilot, lambda: "(built in)" not in str(head.render()), "the file in force")
                await asyncio.to_thread(path.write_text, '[groups.default]\nweight = "heavy"\n', "utf-8")
                await pilot.press("R")
                await until(pilot, lambda: "was refused" in str(head.render()), "the refused reload")
                assert "weight" in str(head.render())
                await asyncio.to_thread(path.write_text, good, "utf-8")
                await pilot.press("R")
                await until(pilot, lambda: "was refused" not in str(head.render()), "the error cleared")
                assert app.query_one(PolicyView).read_only is False
    finally:
        await asyncio.to_thread(path.unlink)
        await admin_call(live, "POST", "/admin/policy/reload")


async def test_a_node_approved_in_the_console_then_gets_work(
    live: Stack, servers: LoopThread, demo_model: ModelSettings, tmp_path: Path
) -> None:
    node_id, node_dir = "volunteer-live", tmp_path / "volunteer"
    code = (await admin_call(live, "POST", "/admin/enrollment-codes", {"tier": "club"})).json()["code"]
    await asyncio.to_thread(enroll, node_dir, live.base_url, code, node_id, None)
    settings = NodeSettings(
        node_id=node_id, models=[demo_model], advertise=False, heartbeat_interval=0.2, data_dir=node_dir,
        scheduler_url=live.base_url,
    )  # fmt: skip
    trust = await asyncio.to_thread(Trust.open, node_dir)
    runner, _, _ = await on_servers(servers, start_node(settings, trust=trust, loader=load_transformers))
    made = (await admin_call(live, "POST", "/admin/tokens", {"name": "after-approval"})).json()
    try:
        async with ConsoleClient(live.base_url, live.token) as client:
            app = make_app(client, refresh_s=0.2, authority_dir=live.data_dir / "authority")
            async with app.run_test(size=SIZE) as pilot:
                await pilot.press("3")
                approvals = app.query_one(ApprovalsView).table
                await until(pilot, lambda: node_id in approvals.rows, "the pending node")
                approvals.move_cursor(row=approvals.get_row_index(node_id))
                await pilot.press("a")
                await pilot.press("2")
                nodes = app.query_one(NodesView)
                await until(
                    pilot, lambda: _state_of(nodes, node_id) == "serving", "the approved node serving"
                )
                nodes.table.move_cursor(row=nodes.table.get_row_index(live.node_id))
                await pilot.press("d")  # the first node drains: the work can only go to the new one
                await until(pilot, lambda: _state_of(nodes, live.node_id) == "draining", "the drain")
                ask = openai.AsyncOpenAI(base_url=live.api, api_key=made["secret"], max_retries=0)
                answer = await ask.chat.completions.create(
                    model="hearth-demo", messages=[{"role": "user", "content": "hello"}], max_tokens=4
                )
                await ask.close()
                assert answer.choices

                async def served_by_it() -> bool:
                    usage = (await admin_call(live, "GET", "/admin/usage?by=node&since=1h")).json()["rows"]
                    return node_id in {row["key"] for row in usage}

                await until(pilot, served_by_it, "the request counted on the new node")
                await pilot.press("d")  # and takes work again
                await until(pilot, lambda: _state_of(nodes, live.node_id) == "serving", "undrained")
    finally:
        await admin_call(live, "POST", f"/admin/nodes/{node_id}/revoke")
        await on_servers(servers, runner.cleanup())
