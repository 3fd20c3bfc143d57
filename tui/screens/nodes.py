"""Nodes: one row per node, stale rows dimmed, offline ones marked; Enter drills in; drain and revoke."""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar

from rich.text import Text
from textual.binding import Binding, BindingType
from textual.widgets import DataTable

from protocol.admin import Node, NodeList
from tui.format import STALE_AFTER_S, age, bar
from tui.messages import ActionRequested, OpenNode, Request
from tui.screens.confirm import ConfirmScreen
from tui.widgets.table_view import Cell, Row, TableView

# The columns an operator scans first come first: on an 80-column terminal the rest scroll into view.
COLUMNS = ("Name", "State", "VRAM", "Busy", "Jobs", "Tokens/s", "Heartbeat", "Tier", "GPUs", "Models")
STATE_WIDTH = 28  # a long yielding reason is cut here; the node's detail shows it whole
ACTIONS = {"drain", "revoke"}


def node_state(node: Node) -> str:
    """What the node is doing, in one word or two (yielding says why, in the node's words)."""
    if node.state == "revoked":
        return "revoked"
    if node.state == "pending":
        return "pending approval"
    if not node.healthy:
        return "offline"
    if node.drain or node.draining:
        return "draining"
    if node.yielding:
        return f"yielding: {node.yield_reason}" if node.yield_reason else "yielding"
    return "serving"


def _dim(cell: Cell) -> Text:
    text = Text(cell) if isinstance(cell, str) else cell.copy()
    text.stylize("dim")
    return text


def heartbeat(seconds: float | None) -> str:
    """How long ago the node was heard: "<5s" while it beats on time (a count that changes at every
    poll says nothing and redraws the row), its age once it is late."""
    if seconds is not None and seconds < STALE_AFTER_S:
        return f"<{STALE_AFTER_S:.0f}s"
    return age(seconds)


def busy(node: Node) -> str:
    """Utilisation as placement sees it: jobs running of the sequences its loaded models can run at once."""
    slots = sum(m.max_sequences for m in node.models if m.phase == "ready")
    jobs = sum(m.active for m in node.models)
    return f"{jobs}/{slots}" if slots else "-"


def node_row(node: Node, tokens_per_s: float = 0.0) -> Row:
    state = node_state(node)
    used = None
    if node.memory_total_bytes is not None and node.memory_free_bytes is not None:
        used = node.memory_total_bytes - node.memory_free_bytes
    shown = state if len(state) <= STATE_WIDTH else state[: STATE_WIDTH - 1] + "…"
    style = "bold red" if state == "offline" else "yellow" if state != "serving" else "green"
    cells: list[Cell] = [
        node.node_id,
        Text(shown, style=style),
        bar(used, node.memory_total_bytes),
        busy(node),
        str(sum(m.active for m in node.models)),
        f"{tokens_per_s:,.1f}",
        heartbeat(node.last_heartbeat_seconds),
        node.tier,
        node.gpus or "-",
        ", ".join(m.id for m in node.models if m.phase in ("ready", "loading")) or "-",
    ]
    beat = node.last_heartbeat_seconds
    if state == "offline" or (beat is not None and beat > STALE_AFTER_S):
        cells = [_dim(c) for c in cells]
    return node.node_id, cells


class NodesView(TableView):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("enter", "open", "Detail"),
        Binding("d", "drain", "Drain/undrain"),
        Binding("r", "revoke", "Revoke"),
    ]

    def __init__(self, *, read_only: bool) -> None:
        super().__init__(COLUMNS, id="nodes")
        self.read_only = read_only
        self.nodes: dict[str, Node] = {}

    def update(self, nodes: NodeList, rates: Mapping[str, float] | None = None) -> None:
        self.nodes = {n.node_id: n for n in nodes.nodes}
        rates = rates or {}
        self.set_rows([node_row(n, rates.get(n.node_id, 0.0)) for n in nodes.nodes])

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        return not (self.read_only and action in ACTIONS)

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        event.stop()
        self.action_open()

    def action_open(self) -> None:
        key = self.selected_key()
        if key is not None:
            self.post_message(OpenNode(key))

    def action_drain(self) -> None:
        key = self.selected_key()
        if key is None or key not in self.nodes:
            return
        node = self.nodes[key]
        self.post_message(ActionRequested(Request("undrain" if node.drain else "drain", key)))

    def action_revoke(self) -> None:
        key = self.selected_key()
        if key is None:
            return

        def answered(yes: bool | None) -> None:
            if yes:
                self.post_message(ActionRequested(Request("revoke_node", key)))

        self.app.push_screen(
            ConfirmScreen(f"Revoke node {key}? It is refused from now on, until it enrolls again."), answered
        )
