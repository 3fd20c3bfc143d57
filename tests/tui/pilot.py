"""Bounded waits for driving the console with Pilot against real servers."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable

import httpx
from textual.pilot import Pilot

from tests.support import Stack

SIZE = (160, 48)  # the terminal the console is driven in
STEP_S = 0.05
# A minute of steps: generous on a loaded 2-core machine; a bound on waiting, never a timing assertion.
STEPS = 1200


async def until(pilot: Pilot[None], condition: Callable[[], bool | Awaitable[bool]], what: str) -> None:
    """Let the console run (its workers talk to the servers over HTTP) until ``condition`` holds."""
    for _ in range(STEPS):
        seen = condition()
        if inspect.isawaitable(seen):
            seen = await seen
        if seen:
            return
        await pilot.pause(STEP_S)
    raise AssertionError(f"the console never showed {what}")


async def admin_call(stack: Stack, method: str, path: str, doc: object = None) -> httpx.Response:
    """The admin API as anyone would call it, apart from the console."""
    async with httpx.AsyncClient(base_url=stack.base_url) as http:
        headers = {"Authorization": f"Bearer {stack.token}"}
        return await http.request(method, path, json=doc, headers=headers)
