"""One node in detail: its hardware, each model's state and cache, and the jobs it runs (metadata only);
`l` loads the selected model, `u` unloads it (confirmed), Escape goes back."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Label, Static

from protocol.admin import Node, QueueJob
from tui.format import age, bar
from tui.messages import ActionRequested, Request
from tui.screens.confirm import ConfirmScreen
from tui.screens.nodes import busy, node_state
from tui.widgets.table_view import plain

ACTIONS = {"load", "unload"}


class NodeDetailScreen(Screen[None]):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "app.pop_screen", "Back"),
        Binding("l", "load", "Load model"),
        Binding("u", "unload", "Unload model"),
    ]

    def __init__(
        self, node: Node, jobs: Sequence[QueueJob] = (), *, tokens_per_s: float = 0.0, read_only: bool = False
    ) -> None:
        super().__init__()
        self.node = node
        self.jobs = list(jobs)
        self.tokens_per_s = tokens_per_s
        self.read_only = read_only

    def compose(self) -> ComposeResult:
        yield Static(id="node-summary")
        yield Label("Models")
        models: DataTable[Text] = DataTable(cursor_type="row", id="node-models")
        models.add_columns("Model", "State", "Jobs", "Context", "Cache tokens", "Page", "Max sequences")
        yield models
        yield Label("Jobs running here (no prompt or answer text, ever)")
        jobs: DataTable[Text] = DataTable(cursor_type="row", id="node-jobs")
        jobs.add_columns("Request", "Token", "Group", "Model", "Streamed", "Age", "E2E")
        yield jobs
        yield Footer()

    def on_mount(self) -> None:
        self.update(self.node, self.jobs, tokens_per_s=self.tokens_per_s)
        self.query_one("#node-models", DataTable).focus()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        return not (self.read_only and action in ACTIONS)

    def update(
        self, node: Node, jobs: Sequence[QueueJob] | None = None, *, tokens_per_s: float = 0.0
    ) -> None:
        self.node, self.tokens_per_s = node, tokens_per_s
        if jobs is not None:
            self.jobs = list(jobs)
        used = None
        if node.memory_total_bytes is not None and node.memory_free_bytes is not None:
            used = node.memory_total_bytes - node.memory_free_bytes
        # Text, not markup: a node names itself and its alarm, and "[" in either must print as written.
        summary = Text.assemble(
            (node.node_id, "bold"),
            f"  tier {node.tier}  {node_state(node)}   heartbeat {age(node.last_heartbeat_seconds)} ago\n",
            f"GPUs: {node.gpus or '-'}   VRAM ",
            bar(used, node.memory_total_bytes),
            f"   busy {busy(node)}   {tokens_per_s:,.1f} tokens/s\n",
            f"address {node.url or '-'}   key {node.fingerprint}",
        )
        if node.alarm:
            summary.append(f"\nalarm: {node.alarm}", style="red")
        self.query_one("#node-summary", Static).update(summary)
        table: DataTable[Text] = self.query_one("#node-models", DataTable)
        keep = table.cursor_row
        table.clear()
        for m in node.models:
            cells = [
                m.id, m.phase, str(m.active), str(m.context_length or "-"), f"{m.cache_tokens:,}",
                str(m.page_tokens), str(m.max_sequences),
            ]  # fmt: skip
            table.add_row(*plain(cells), key=m.id)
        if table.row_count:
            table.move_cursor(row=min(keep, table.row_count - 1))
        running: DataTable[Text] = self.query_one("#node-jobs", DataTable)
        running.clear()
        for j in self.jobs:
            cells = [
                j.request_id, j.token_id, j.group or "-", j.model, f"{j.streamed:,}", age(j.age_seconds),
                "yes" if j.sealed else "no",
            ]  # fmt: skip
            running.add_row(*plain(cells), key=j.request_id)

    def _selected_model(self) -> str | None:
        table: DataTable[Text] = self.query_one("#node-models", DataTable)
        if table.row_count == 0:
            return None
        key = table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
        return None if key is None else str(key)

    def action_load(self) -> None:
        model = self._selected_model()
        if model is not None:
            self.post_message(ActionRequested(Request("load_model", self.node.node_id, (("model", model),))))

    def action_unload(self) -> None:
        model = self._selected_model()
        if model is None:
            return
        node_id = self.node.node_id

        def answered(yes: bool | None) -> None:
            if yes:
                self.post_message(ActionRequested(Request("unload_model", node_id, (("model", model),))))

        self.app.push_screen(
            ConfirmScreen(f"Unload {model} from {node_id}? Its memory is freed; its requests go elsewhere."),
            answered,
        )
