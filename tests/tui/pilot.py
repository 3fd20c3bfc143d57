"""Bounded waits for driving the console with Pilot against real servers."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable

from textual.pilot import Pilot

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
