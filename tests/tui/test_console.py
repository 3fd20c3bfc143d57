"""The console driven with Pilot against a real scheduler and a real node on 127.0.0.1 (the demo model).

The console runs in the test's own event loop, as `hearth tui` runs in its own process; the servers run in
the `servers` loop thread, and the two meet only over HTTP.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import openai
from textual.widgets import DataTable, Static, TabbedContent

from node.demo import DEMO_MODEL_ID
from protocol.identity import load_authority
from protocol.server import start_site
from scheduler.app import create_app as create_scheduler_app
from scheduler.settings import SchedulerSettings
from scheduler.state import EVENTS
from tests.support import FAST_SCHEDULER, LoopThread, Stack, port_of, start_scheduler, stop_stack
from tests.tui.pilot import SIZE, admin_call, until
from tui.app import HearthConsole, make_app
from tui.client import ConsoleClient
from tui.messages import ActionRequested, Request
from tui.screens.events import EventsView
from tui.screens.nodes import NodesView
from tui.screens.users import UsersView
from tui.widgets.table_view import TableView

CANARY = "quokka-canary-8c41f7"


async def _draining(stack: Stack) -> bool:
    (node,) = (await admin_call(stack, "GET", "/admin/nodes")).json()["nodes"]
    return bool(node["draining"])


async def _serving(stack: Stack) -> bool:
    return not await _draining(stack)


def _all_text(app: HearthConsole) -> str:
    """Everything the console holds to show: every table's rows, filtered or not, and every text block."""
    tables = "\n".join(view.all_text() for view in app.query(TableView))
    cells = "\n".join(
        str(c) for t in app.query(DataTable) for r in range(t.row_count) for c in t.get_row_at(r)
    )
    blocks = "\n".join(str(s.render()) for s in app.query(Static))
    return "\n".join([tables, cells, blocks])


async def test_the_nodes_screen_shows_the_real_node_and_drains_it(cluster: Stack) -> None:
    async with ConsoleClient(cluster.base_url, cluster.token) as client:
        app = make_app(client, refresh_s=0.2)
        async with app.run_test(size=SIZE) as pilot:
            nodes = app.query_one(NodesView)
            await until(pilot, lambda: cluster.node_id in nodes.nodes, "the node")
            assert cluster.node_id in nodes.all_text() and "serving" in nodes.all_text()
            await pilot.press("2")
            assert app.query_one(TabbedContent).active == "nodes"

            await pilot.press("d")
            await until(pilot, lambda: _draining(cluster), "the node draining at the scheduler")
            await until(pilot, lambda: "draining" in nodes.all_text(), "the node draining on screen")

            await pilot.press("d")  # and back: the module's node serves the other tests
            await until(pilot, lambda: _serving(cluster), "the node serving again")

            await pilot.press("enter")  # drill into the node: its models
            await until(pilot, lambda: DEMO_MODEL_ID in _all_text(app), "the node's models")
            await pilot.press("escape")


async def test_a_token_revoked_from_the_users_screen_stops_working(cluster: Stack) -> None:
    made = (await admin_call(cluster, "POST", "/admin/tokens", {"name": "to-revoke"})).json()
    token_id, secret = made["token"]["id"], made["secret"]

    async def answers(status: int) -> bool:
        async with httpx.AsyncClient() as http:
            got = await http.get(cluster.api + "/models", headers={"Authorization": f"Bearer {secret}"})
        return got.status_code == status

    assert await answers(200)
    async with ConsoleClient(cluster.base_url, cluster.token) as client:
        app = make_app(client, refresh_s=0.2)
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press("6")
            users = app.query_one(UsersView)
            await until(pilot, lambda: token_id in users.table.rows, "the token")
            users.table.move_cursor(row=users.table.get_row_index(token_id))
            await pilot.press("r")
            await pilot.press("y")  # the confirmation
            await until(pilot, lambda: answers(401), "the token refused")


async def test_the_events_screen_shows_a_request_finish_and_never_its_prompt(cluster: Stack) -> None:
    made = (await admin_call(cluster, "POST", "/admin/tokens", {"name": "asker"})).json()
    assert cluster.scheduler_app is not None
    bus = cluster.scheduler_app[EVENTS]
    async with ConsoleClient(cluster.base_url, cluster.token) as client:
        app = make_app(client, refresh_s=0.2)
        before = bus.watchers
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press("8")
            await until(pilot, lambda: bus.watchers > before, "the event stream connected")
            ask = openai.AsyncOpenAI(base_url=cluster.api, api_key=made["secret"], max_retries=0)
            answer = await ask.chat.completions.create(
                model=DEMO_MODEL_ID, messages=[{"role": "user", "content": f"Repeat {CANARY}"}], max_tokens=8
            )
            await ask.close()
            assert answer.choices
            events = app.query_one(EventsView)
            await until(pilot, lambda: "finished" in events.all_text(), "a finished event")
            assert DEMO_MODEL_ID in events.all_text()
            for key in "1234567":  # every screen, as drawn and as held
                await pilot.press(key)
                await pilot.pause()
                assert CANARY not in app.export_screenshot()
            assert CANARY not in _all_text(app)
            completion = answer.choices[0].message.content or ""
            assert not completion.strip() or completion not in events.all_text()


async def test_read_only_hides_and_refuses_every_action(cluster: Stack) -> None:
    async with ConsoleClient(cluster.base_url, cluster.token) as client:
        app = make_app(client, read_only=True, refresh_s=0.2)
        async with app.run_test(size=SIZE) as pilot:
            nodes = app.query_one(NodesView)
            await until(pilot, lambda: cluster.node_id in nodes.nodes, "the node")
            assert nodes.check_action("drain", ()) is False and nodes.check_action("revoke", ()) is False
            assert app.query_one(UsersView).check_action("revoke", ()) is False
            await pilot.press("d")
            app.post_message(ActionRequested(Request("drain", cluster.node_id)))  # as if a key got through
            seen = app.loads
            await until(pilot, lambda: app.loads >= seen + 3, "three fresh reads")
            assert not await _draining(cluster)
            assert "read-only" in app.sub_title


async def _scheduler_on(data_dir: Path, port: int) -> Stack:
    """A scheduler again on ``port``, over the same data (its tokens and approvals), as after a restart."""
    authority = await asyncio.to_thread(load_authority, data_dir / "authority")
    settings = SchedulerSettings(
        port=port, data_dir=data_dir, authority_key=authority.public_b64, **FAST_SCHEDULER
    )
    stack = Stack(data_dir)
    stack.scheduler_app = create_scheduler_app(settings)
    runner, stack.base_url = await start_site(stack.scheduler_app, "127.0.0.1", port)
    stack.runners.append(runner)
    return stack


async def test_the_banner_shows_while_the_scheduler_is_away_and_clears_when_it_returns(
    servers: LoopThread, tmp_path: Path
) -> None:
    first = servers.call(start_scheduler(tmp_path))
    port = port_of(first.base_url)
    second: Stack | None = None
    stopped = False
    try:
        async with ConsoleClient(first.base_url, first.token) as client:
            app = make_app(client, refresh_s=0.2)
            async with app.run_test(size=SIZE) as pilot:
                banner = app.query_one("#banner", Static)
                await until(pilot, lambda: app.reachable is True, "the scheduler reached")
                assert not banner.has_class("-shown")

                await asyncio.to_thread(servers.call, stop_stack(first))
                stopped = True
                await until(pilot, lambda: banner.has_class("-shown"), "the unreachable banner")
                assert "Cannot reach the scheduler" in str(banner.render())
                assert f":{port}" in app.export_screenshot()

                second = await asyncio.to_thread(servers.call, _scheduler_on(tmp_path, port))
                await until(pilot, lambda: not banner.has_class("-shown"), "the banner cleared")
                assert app.reachable is True
                bus = second.scheduler_app[EVENTS] if second.scheduler_app is not None else None
                assert bus is not None
                await until(pilot, lambda: bus.watchers > 0, "the event stream reconnected")
    finally:
        if not stopped:
            servers.call(stop_stack(first))
        if second is not None:
            servers.call(stop_stack(second))
