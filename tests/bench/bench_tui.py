"""Benchmark: the console under a big, busy cluster (not a test: it prints figures).

The console (tui.app, the real app `hearth tui` runs) reads a scheduler's documents for 100 nodes and
1,000 tokens, and follows an event stream at 50 events per second. The documents come from the fixed-data
client of the snapshot tests (tests/tui/fixed.py) in this process, so what is measured is the console's own
work: parsing nothing (the documents are built once), joining and drawing them.

    .venv/bin/python -m tests.bench.bench_tui            # about a minute
    .venv/bin/python -m tests.bench.bench_tui --quick    # a smoke run

Printed:
- per screen (each of the eight tabs shown in turn, and a node's detail): the time one poll's documents
  take to reach the screen: the handler that updates every view, and the handler plus the repaint that
  follows (post → idle), median and worst of the polls; target < 50 ms;
- the event tail: the handler for one batch (events arrive at 50/s and repaint every 0.1 s);
- the console's CPU over a steady run at the default refresh (2 s) with events at 50/s: process CPU time
  over wall time, in % of one core; target < 20 %.
The terminal here is headless: Textual composes and renders every frame, and only the writing of escape
codes to a real terminal is left out.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any

from textual.screen import Screen

from tests.tui.fixed import FixedClient
from tui.app import EVENT_BATCH_S, TABS, HearthConsole
from tui.messages import ClusterLoaded, EventsArrived
from tui.screens.node_detail import NodeDetailScreen

FRAMES: list[float] = []  # seconds each screen update (layout + render of what changed) took


def _time_frames() -> None:
    """Time Textual's screen updates: a changed widget is laid out and rendered there (headless: the
    frame is composed in full, only writing it to a terminal is left out)."""
    original = Screen._on_timer_update

    def timed(self: Screen[Any]) -> None:
        start = time.perf_counter()
        original(self)
        FRAMES.append(time.perf_counter() - start)

    Screen._on_timer_update = timed  # type: ignore[method-assign]


NODES = 100
TOKENS = 1000
EVENTS_PER_S = 50.0
SIZE = (160, 48)


class TimedConsole(HearthConsole):
    """The console, timing its two hot handlers."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.cluster_s: list[float] = []
        self.events_s: list[float] = []

    def on_cluster_loaded(self, message: ClusterLoaded) -> None:
        start = time.perf_counter()
        super().on_cluster_loaded(message)
        self.cluster_s.append(time.perf_counter() - start)

    def on_events_arrived(self, message: EventsArrived) -> None:
        start = time.perf_counter()
        super().on_events_arrived(message)
        self.events_s.append(time.perf_counter() - start)


def _ms(values: list[float]) -> str:
    if not values:
        return "-"
    return f"median {statistics.median(values) * 1000:6.1f} ms   worst {max(values) * 1000:6.1f} ms"


async def per_screen(polls: int) -> None:
    client = FixedClient(nodes=NODES, tokens=TOKENS, event_rate=EVENTS_PER_S, churn=True)
    app = TimedConsole(client, read_only=False, refresh_s=3600, authority_dir=None, settle_gc=True)
    async with app.run_test(size=SIZE) as pilot:
        while app.loads < 1:
            await pilot.pause(0.05)
        clusters = [await app.read_cluster() for _ in range(10)]  # successive reads of a live cluster
        print(f"{NODES} nodes, {TOKENS} tokens, events at {EVENTS_PER_S:.0f}/s, terminal {SIZE[0]}x{SIZE[1]}")
        print(
            "one poll's documents reaching the screen (the handler; it and the frames after), target < 50 ms:"
        )
        screens: list[tuple[str, tuple[str, ...]]] = [(tab, (str(i),)) for i, (tab, _) in enumerate(TABS, 1)]
        screens.append(("node detail", ("2", "enter")))
        for name, keys in screens:
            for key in keys:
                await pilot.press(key)
            await pilot.pause()
            app.cluster_s.clear()
            total: list[float] = []
            for i in range(polls):
                drawn = app.loads
                FRAMES.clear()
                app.post_message(ClusterLoaded(clusters[i % len(clusters)]))
                while app.loads == drawn:
                    await pilot.pause()
                await pilot.pause(0.1)  # the frames that draw it (and any event batch in that time)
                total.append(app.cluster_s[-1] + sum(FRAMES))
            print(f"  {name:12} handler {_ms(app.cluster_s)}   handler + frames {_ms(total)}")
            if isinstance(app.screen, NodeDetailScreen):
                await pilot.press("escape")
        await pilot.press("8")
        await pilot.pause(1.0)
        app.events_s.clear()
        FRAMES.clear()
        await pilot.pause(5.0)
        print(f"  events tail  handler per batch of ~{EVENTS_PER_S * EVENT_BATCH_S:.0f}: {_ms(app.events_s)}")
        print(f"               frames while it scrolls: {_ms(FRAMES)}")


async def steady_cpu(seconds: float) -> None:
    client = FixedClient(nodes=NODES, tokens=TOKENS, event_rate=EVENTS_PER_S, churn=True)
    app = TimedConsole(client, read_only=False, refresh_s=2.0, authority_dir=None, settle_gc=True)
    async with app.run_test(size=SIZE) as pilot:
        while app.loads < 1:
            await pilot.pause(0.05)
        for tab in ("1", "2", "8"):  # Overview, Nodes, Events: the screens an operator leaves open
            await pilot.press(tab)
            await pilot.pause(1.0)
            cpu, wall = time.process_time(), time.perf_counter()
            await pilot.pause(seconds)
            share = (time.process_time() - cpu) / (time.perf_counter() - wall)
            shown = TABS[int(tab) - 1][1]
            print(f"  {shown:12} {share * 100:5.1f} % of a core over {seconds:.0f} s (target < 20 %)")


def main() -> None:
    _time_frames()
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer polls, shorter steady run")
    args = parser.parse_args()
    asyncio.run(per_screen(polls=5 if args.quick else 20))
    print("the console's CPU, polling every 2 s with events at 50/s:")
    asyncio.run(steady_cpu(seconds=5.0 if args.quick else 20.0))


if __name__ == "__main__":
    main()
