"""The console's screens as the snapshot tests and the docs' screenshots show them: the app over fixed
data (tests.tui.fixed), brought to each screen by its keys once the data is drawn."""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable

from textual.pilot import Pilot

from tests.tui.fixed import FixedClient, sample_events
from tui.app import HearthConsole, make_app
from tui.screens.events import EventsView

# (name, keys): the number keys pick the tabs; Enter on Nodes opens the first node's detail.
SCENES = (
    ("overview", ("1",)),
    ("nodes", ("2",)),
    ("node-detail", ("2", "enter")),
    ("approvals", ("3",)),
    ("models", ("4",)),
    ("queue", ("5",)),
    ("users", ("6",)),
    ("policy", ("7",)),
    ("events", ("8",)),
    ("keys", ("2", "question_mark")),
)
SIZES = ((80, 24), (160, 48))
POLLS = 12  # reads before the picture: the sparklines have a history


def utc() -> None:
    """Event times print in local time: the pictures fix it to UTC."""
    os.environ["TZ"] = "UTC"
    time.tzset()


def console(read_only: bool = False) -> HearthConsole:
    client = FixedClient(hold_first_read=True)
    return make_app(client, read_only=read_only, refresh_s=3600, clock=lambda: 1000.0)


def settle(app: HearthConsole, keys: tuple[str, ...]) -> Callable[[Pilot[None]], Awaitable[None]]:
    async def run(pilot: Pilot[None]) -> None:
        events = app.query_one(EventsView)

        async def until(done: Callable[[], bool]) -> None:
            for _ in range(500):
                if done():
                    return
                await pilot.pause(0.01)
            raise AssertionError("the console never drew the fixed data")

        await until(lambda: events.seen >= len(sample_events()))
        assert isinstance(app.client, FixedClient)
        app.client.answer.set()  # the first read, now that the events are in
        await until(lambda: app.loads >= 1)
        for _ in range(POLLS):  # one read at a time: each is one sample of the sparklines
            drawn = app.loads
            await app.refresh_documents()
            await until(lambda drawn=drawn: app.loads > drawn)
        for key in keys:
            await pilot.press(key)
        # Tables size their columns on the next refresh after their rows change: let every pending
        # refresh and animation run before the picture.
        for _ in range(3):
            await pilot.wait_for_scheduled_animations()
            await pilot.pause(0.05)

    return run
