"""Approving, creating tokens and filtering from the console, against a real scheduler and node."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
from textual.widgets import Static

from node.enroll import enroll
from tests.support import Stack
from tests.tui.pilot import SIZE, admin_call, until
from tui.app import make_app
from tui.client import ConsoleClient
from tui.screens.approvals import ApprovalsView
from tui.screens.secret import SecretScreen
from tui.screens.users import UsersView


async def _pending(stack: Stack, tmp_path: Path, node_id: str) -> None:
    """A machine enrolls with a code, as `hearth node enroll` does."""
    code = (await admin_call(stack, "POST", "/admin/enrollment-codes", {"tier": "club"})).json()["code"]
    await asyncio.to_thread(enroll, tmp_path / node_id, stack.base_url, code, node_id, None)


async def _state(stack: Stack, node_id: str) -> str:
    rows = (await admin_call(stack, "GET", "/admin/enrollments")).json()["enrollments"]
    return str(next(e["state"] for e in rows if e["node_id"] == node_id))


async def test_approve_from_the_console_signs_with_the_operators_key(cluster: Stack, tmp_path: Path) -> None:
    await _pending(cluster, tmp_path, "volunteer-tui")
    async with ConsoleClient(cluster.base_url, cluster.token) as client:
        app = make_app(client, refresh_s=0.2, authority_dir=cluster.data_dir / "authority")
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press("3")
            approvals = app.query_one(ApprovalsView)
            await until(pilot, lambda: "volunteer-tui" in approvals.table.rows, "the pending node")
            approvals.table.move_cursor(row=approvals.table.get_row_index("volunteer-tui"))
            await pilot.press("a")

            async def approved() -> bool:
                return await _state(cluster, "volunteer-tui") == "approved"

            await until(pilot, approved, "the node approved")
            await until(pilot, lambda: "volunteer-tui" not in approvals.table.rows, "the row gone")


async def test_without_the_authority_key_the_console_says_so_and_approves_nothing(
    cluster: Stack, tmp_path: Path
) -> None:
    await _pending(cluster, tmp_path, "volunteer-nokey")
    nowhere = tmp_path / "nowhere"
    async with ConsoleClient(cluster.base_url, cluster.token) as client:
        app = make_app(client, refresh_s=0.2, authority_dir=nowhere)
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press("3")
            approvals = app.query_one(ApprovalsView)
            note = app.query_one("#authority-note", Static)
            await until(pilot, lambda: "volunteer-nokey" in approvals.table.rows, "the pending node")
            assert f"no authority key in {nowhere}" in str(note.render())
            approvals.table.move_cursor(row=approvals.table.get_row_index("volunteer-nokey"))
            await pilot.press("a")
            seen = app.loads
            await until(pilot, lambda: app.loads >= seen + 3, "three fresh reads")
            assert await _state(cluster, "volunteer-nokey") == "pending"


async def test_a_token_created_in_the_console_shows_its_secret_once_and_works(cluster: Stack) -> None:
    async with ConsoleClient(cluster.base_url, cluster.token) as client:
        app = make_app(client, refresh_s=0.2)
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press("6")
            await pilot.press("n")
            await pilot.press(*"made-in-console")
            await pilot.press("enter")
            await until(pilot, lambda: isinstance(app.screen, SecretScreen), "the secret")
            assert isinstance(app.screen, SecretScreen)
            secret = app.screen.secret.secret
            async with httpx.AsyncClient() as http:
                got = await http.get(cluster.api + "/models", headers={"Authorization": f"Bearer {secret}"})
            assert got.status_code == 200
            await pilot.press("escape")
            users = app.query_one(UsersView)
            await until(pilot, lambda: "made-in-console" in users.all_text(), "the new token listed")
            assert secret not in users.all_text()  # shown once, in the modal only

            await pilot.press("slash", *"made-in")  # `/` filters the table
            await until(pilot, lambda: users.table.row_count == 1, "the table filtered to one row")
            await pilot.press("escape")
            await until(pilot, lambda: users.table.row_count > 1, "the filter cleared")
