"""A DataTable with a filter line: `/` opens it, typing narrows the rows, Escape clears and closes it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.widgets import DataTable, Input

Cell = str | Text
Row = tuple[str, Sequence[Cell]]  # (row key, cells)


def plain(cells: Sequence[Cell]) -> list[Text]:
    """Cells as Text, never as markup: DataTable reads a str cell as Rich markup, and what nodes and
    operators name things ("[/]" in a GPU summary, "[red]" in a token's name) must print as written, not
    restyle the table or raise. Text is also cheaper for it to draw."""
    return [Text(c) if isinstance(c, str) else c for c in cells]


class TableView(Vertical):
    """The rows it is given, those matching the filter shown; the cursor stays on the same key."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("slash", "filter", "Filter", key_display="/")]
    DEFAULT_CSS = """
    TableView > Input.filter { display: none; }
    TableView > Input.filter.-open { display: block; }
    """

    def __init__(self, columns: Sequence[str], *, id: str | None = None) -> None:
        super().__init__(id=id)
        self._columns = list(columns)
        self._rows: list[Row] = []
        self._drawn: dict[str, Sequence[Cell]] = {}  # what the table shows now, by row key

    def compose(self) -> ComposeResult:
        yield Input(placeholder="filter (Escape clears)", classes="filter")
        table: DataTable[Cell] = DataTable(cursor_type="row", zebra_stripes=True)
        table.add_columns(*self._columns)
        yield table

    @property
    def table(self) -> DataTable[Cell]:
        return self.query_one(DataTable)

    @property
    def filter_text(self) -> str:
        return self.query_one(Input).value.strip().lower()

    def selected_key(self) -> str | None:
        table = self.table
        if table.row_count == 0:
            return None
        key = table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
        return None if key is None else str(key)

    def _shown(self) -> DataTable[Cell] | None:
        """The table, or None while it is not there (rows that arrive before the view is composed, or as
        the app closes, are kept and drawn when it is)."""
        found = list(self.query(DataTable))
        return found[0] if found else None

    def on_mount(self) -> None:
        self._render_rows()

    def set_rows(self, rows: Sequence[Row]) -> None:
        self._rows = [(key, plain(cells)) for key, cells in rows]
        self._render_rows()

    def append_rows(self, rows: Sequence[Row], *, keep: int) -> None:
        """Add rows at the end (a live tail), dropping the oldest beyond ``keep``; follows the end when the
        cursor was on the last row."""
        table = self._shown()
        rows = [(key, plain(cells)) for key, cells in rows]
        self._rows.extend(rows)
        if table is None:
            del self._rows[: max(0, len(self._rows) - keep)]
            return
        following = table.row_count == 0 or table.cursor_row >= table.row_count - 1
        needle = self._needle()
        for key, cells in rows:
            if self._matches(cells, needle):
                table.add_row(*cells, key=key)
                self._drawn[key] = cells
        while len(self._rows) > keep:
            old, _ = self._rows.pop(0)
            if old in table.rows:
                table.remove_row(old)
                self._drawn.pop(old, None)
        if following and table.row_count:
            table.move_cursor(row=table.row_count - 1)

    def all_text(self) -> str:
        """Every cell this view holds, shown or filtered out (tests read what the console could show)."""
        return "\n".join(" ".join(str(cell) for cell in cells) for _, cells in self._rows)

    def _needle(self) -> str:
        boxes = list(self.query(Input))
        return boxes[0].value.strip().lower() if boxes else ""

    @staticmethod
    def _matches(cells: Sequence[Cell], needle: str) -> bool:
        return not needle or any(needle in str(cell).lower() for cell in cells)

    def _render_rows(self) -> None:
        table = self._shown()
        if table is None:
            return
        needle = self._needle()
        wanted = [(key, cells) for key, cells in self._rows if self._matches(cells, needle)]
        drawn = self._drawn
        if len(wanted) == table.row_count and [key for key, _ in wanted] == [k.value for k in table.rows]:
            # The same rows in the same order (a poll where little changed): only changed cells repaint.
            columns = list(table.columns)
            for key, cells in wanted:
                before = drawn.get(key, ())
                for i, cell in enumerate(cells):
                    if i >= len(before) or before[i] != cell:
                        table.update_cell(key, columns[i], cell)
                drawn[key] = cells
            return
        keep = self.selected_key()
        table.clear()
        for key, cells in wanted:
            table.add_row(*cells, key=key)
        self._drawn = dict(wanted)
        if keep is not None and keep in table.rows:
            table.move_cursor(row=table.get_row_index(keep))

    def action_filter(self) -> None:
        box = self.query_one(Input)
        box.add_class("-open")
        box.focus()

    def on_input_changed(self, event: Input.Changed) -> None:
        event.stop()
        self._render_rows()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.table.focus()

    def key_escape(self) -> None:
        box = self.query_one(Input)
        if box.has_class("-open"):
            box.value = ""
            box.remove_class("-open")
            self.table.focus()
