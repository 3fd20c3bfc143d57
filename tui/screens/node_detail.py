"""One node in detail: its hardware and each model's state and cache (Escape goes back)."""

from __future__ import annotations

from typing import ClassVar

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Static

from protocol.admin import Node
from tui.format import age, gib
from tui.screens.nodes import node_state


class NodeDetailScreen(Screen[None]):
    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "app.pop_screen", "Back")]

    def __init__(self, node: Node) -> None:
        super().__init__()
        self.node = node

    def compose(self) -> ComposeResult:
        yield Static(id="node-summary")
        table: DataTable[str] = DataTable(cursor_type="row", id="node-models")
        table.add_columns("Model", "State", "Jobs", "Context", "Cache tokens", "Page", "Max sequences")
        yield table
        yield Footer()

    def on_mount(self) -> None:
        self.update(self.node)

    def update(self, node: Node) -> None:
        self.node = node
        # Text, not markup: a node names itself and its alarm, and "[" in either must print as written.
        summary = Text.assemble(
            (node.node_id, "bold"),
            f"  tier {node.tier}  {node_state(node)}\n",
            f"GPUs: {node.gpus or '-'}   VRAM free {gib(node.memory_free_bytes)} of "
            f"{gib(node.memory_total_bytes)} GiB   heartbeat {age(node.last_heartbeat_seconds)} ago\n",
            f"address {node.url or '-'}   key {node.fingerprint}",
        )
        if node.alarm:
            summary.append(f"\nalarm: {node.alarm}", style="red")
        self.query_one("#node-summary", Static).update(summary)
        table = self.query_one(DataTable)
        table.clear()
        for m in node.models:
            table.add_row(
                m.id, m.phase, str(m.active), str(m.context_length or "-"), str(m.cache_tokens),
                str(m.page_tokens), str(m.max_sequences), key=m.id,
            )  # fmt: skip
