"""Events: a live tail of the scheduler's event stream (metadata only), filterable with `/`.

A log, not a table: each batch appends its lines and only those are drawn (a table would redraw every
visible cell at each batch, which at 50 events a second costs the console most of its CPU). The filter
redraws the kept lines that match.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence

from rich.text import Text
from textual.app import ComposeResult
from textual.widget import Widget
from textual.widgets import Input, RichLog, Static

from protocol.policy import AdminEvent
from tui.widgets.filtered import Filtered

KEEP = 2000  # the tail's length: enough for minutes of a busy cluster, bounded memory
WIDTHS = (8, 15, 20, 12, 24)  # time, kind, node, group, model; the detail takes the rest
HEADER = ("Time", "Kind", "Node", "Group", "Model", "Detail")
_STYLES = {
    "refused": "yellow", "node_left": "red", "node_unhealthy": "red", "node_yielding": "yellow",
    "dropped": "red", "finished": "green", "node_joined": "green", "node_healthy": "green",
}  # fmt: skip


def detail(event: AdminEvent) -> str:
    parts: list[str] = []
    if event.status is not None:
        parts.append(f"status {event.status}")
    if event.refusal:
        parts.append(f"limit {event.refusal}")
    if event.prompt_tokens is not None or event.completion_tokens is not None:
        parts.append(f"{event.prompt_tokens or 0} in, {event.completion_tokens or 0} out")
    if event.ttft_ms is not None:
        parts.append(f"first token {event.ttft_ms:,.0f} ms")
    if event.outcome:
        parts.append(event.outcome)
    if event.count is not None:
        parts.append(f"{event.count} events lost")
    return ", ".join(parts)


def _cell(value: str, width: int) -> str:
    """``value`` in ``width`` characters (cut with … when longer), then the gap to the next column."""
    return (value if len(value) <= width else value[: width - 1] + "…").ljust(width) + " "


def event_line(event: AdminEvent) -> Text:
    clock = time.strftime("%H:%M:%S", time.localtime(event.at))
    fields = (clock, event.kind, event.node_id or "", event.group or "", event.model or "")
    line = Text()
    for i, (value, width) in enumerate(zip(fields, WIDTHS, strict=True)):
        line.append(_cell(value, width), style=_STYLES.get(event.kind, "") if i == 1 else "")
    line.append(detail(event))
    return line


def header_line() -> Text:
    line = Text(style="bold")
    for value, width in zip(HEADER, WIDTHS, strict=False):
        line.append(_cell(value, width))
    line.append(HEADER[-1])
    return line


class EventsView(Filtered):
    DEFAULT_CSS = """
    EventsView > RichLog { height: 1fr; }
    """

    def __init__(self) -> None:
        super().__init__(id="events")
        self.seen = 0
        self._lines: deque[Text] = deque(maxlen=KEEP)

    def compose(self) -> ComposeResult:
        yield Input(placeholder="filter (Escape clears)", classes="filter")
        yield Static(header_line(), id="events-header")
        yield RichLog(max_lines=KEEP, wrap=False, markup=False, auto_scroll=True)

    def on_mount(self) -> None:
        self.refilter()  # what arrived before the log was there

    def add(self, events: Sequence[AdminEvent]) -> None:
        lines = [event_line(e) for e in events]
        self.seen += len(lines)
        self._lines.extend(lines)
        needle = self.needle
        log = self.query_one(RichLog)
        for line in lines:
            if not needle or needle in line.plain.lower():
                log.write(line)

    def all_text(self) -> str:
        """Every line this view keeps, shown or filtered out (tests read what the console could show)."""
        return "\n".join(line.plain for line in self._lines)

    def refilter(self) -> None:
        log = self.query_one(RichLog)
        log.clear()
        needle = self.needle
        for line in self._lines:
            if not needle or needle in line.plain.lower():
                log.write(line)

    def body(self) -> Widget:
        return self.query_one(RichLog)
