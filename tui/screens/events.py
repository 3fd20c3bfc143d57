"""Events: a live tail of the scheduler's event stream (metadata only), filterable with `/`."""

from __future__ import annotations

import time
from collections.abc import Sequence

from rich.text import Text

from protocol.policy import AdminEvent
from tui.widgets.table_view import Cell, Row, TableView

COLUMNS = ("Time", "Kind", "Node", "Group", "Model", "Detail")
KEEP = 2000  # the tail's length: enough for minutes of a busy cluster, bounded memory
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
    if event.outcome:
        parts.append(event.outcome)
    if event.count is not None:
        parts.append(f"{event.count} events lost")
    return ", ".join(parts)


def event_row(event: AdminEvent, n: int) -> Row:
    clock = time.strftime("%H:%M:%S", time.localtime(event.at))
    cells: list[Cell] = [
        clock, Text(event.kind, style=_STYLES.get(event.kind, "")), event.node_id or "",
        event.group or "", event.model or "", detail(event),
    ]  # fmt: skip
    # seq restarts with the scheduler, so the key is the console's own count.
    return f"e{n}", cells


class EventsView(TableView):
    def __init__(self) -> None:
        super().__init__(COLUMNS, id="events")
        self.seen = 0

    def add(self, events: Sequence[AdminEvent]) -> None:
        rows = []
        for event in events:
            self.seen += 1
            rows.append(event_row(event, self.seen))
        self.append_rows(rows, keep=KEEP)
