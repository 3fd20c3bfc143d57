"""Models: where each model runs and its state there."""

from __future__ import annotations

from rich.text import Text

from protocol.admin import ModelPlacements
from tui.widgets.table_view import Cell, Row, TableView

COLUMNS = ("Model", "Node", "State", "Jobs", "Node health")


class ModelsView(TableView):
    def __init__(self) -> None:
        super().__init__(COLUMNS, id="models-view")

    def update(self, models: ModelPlacements) -> None:
        rows: list[Row] = []
        for model in models.models:
            if not model.nodes:
                rows.append((model.id, [model.id, "-", Text("nowhere", style="red"), "0", "-"]))
            for host in model.nodes:
                cells: list[Cell] = [
                    model.id, host.node_id, host.phase, str(host.active),
                    "healthy" if host.healthy else Text("offline", style="red"),
                ]  # fmt: skip
                rows.append((f"{model.id}@{host.node_id}", cells))
        self.set_rows(rows)
