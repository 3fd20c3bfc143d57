"""Models: where each model runs and its state there, the requests waiting for it, and cold loads in
progress (a host whose copy is loading)."""

from __future__ import annotations

from collections.abc import Mapping

from rich.text import Text

from protocol.admin import ModelPlacements
from tui.widgets.table_view import Cell, Row, TableView

COLUMNS = ("Model", "Node", "State", "Jobs", "Queued", "Node health")


class ModelsView(TableView):
    def __init__(self) -> None:
        super().__init__(COLUMNS, id="models-view")

    def update(self, models: ModelPlacements, queued: Mapping[str, int] | None = None) -> None:
        queued = queued or {}
        rows: list[Row] = []
        for model in models.models:
            waiting = str(queued.get(model.id, 0))
            if not model.nodes:
                rows.append((model.id, [model.id, "-", Text("nowhere", style="red"), "0", waiting, "-"]))
            for host in model.nodes:
                phase: Cell = host.phase
                if host.phase == "loading":
                    phase = Text("loading (cold load)", style="yellow")
                elif host.phase == "failed":
                    phase = Text("failed", style="red")
                cells: list[Cell] = [
                    model.id, host.node_id, phase, str(host.active), waiting,
                    "healthy" if host.healthy else Text("offline", style="red"),
                ]  # fmt: skip
                rows.append((f"{model.id}@{host.node_id}", cells))
        # A model waited for that no node has at all (a typo, or its node left): its queue shows too.
        for model_id in sorted(set(queued) - {m.id for m in models.models}):
            cells = [model_id, "-", Text("nowhere", style="red"), "0", str(queued[model_id]), "-"]
            rows.append((model_id, cells))
        self.set_rows(rows)
