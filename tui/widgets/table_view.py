"""A DataTable with a filter line: `/` opens it, typing narrows the rows, Escape clears and closes it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Self

from rich.style import Style
from rich.text import Text
from textual.app import ComposeResult
from textual.coordinate import Coordinate
from textual.widget import Widget
from textual.widgets import DataTable, Input
from textual.widgets.data_table import RowKey

from tui.widgets.filtered import Filtered

Cell = str | Text
Row = tuple[str, Sequence[Cell]]  # (row key, cells)


def plain(cells: Sequence[Cell]) -> list[Text]:
    """Cells as Text, never as markup: DataTable reads a str cell as Rich markup, and what nodes and
    operators name things ("[/]" in a GPU summary, "[red]" in a token's name) must print as written, not
    restyle the table or raise. Text is also cheaper for it to draw."""
    return [Text(c) if isinstance(c, str) else c for c in cells]


class CachedTable(DataTable[Cell]):
    """A DataTable that redraws only the cells whose value changed.

    DataTable keeps its drawn cells keyed by a counter that every ``update_cell`` moves on, so one
    changed cell redraws every visible cell (for 100 nodes on a big terminal, about 45 ms of Rich
    rendering on a small machine, at every poll). The views here give a changed cell a new Text object and
    an unchanged one the same object, so a cell drawn before is drawn again only when its value, place or
    style changed. (This overrides DataTable's private ``_render_cell``: Textual is bounded to the
    series it was written for, and the snapshot tests would show a change.)"""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._drawn_cells: dict[tuple[object, object], tuple[object, tuple[object, ...], Any]] = {}

    def _render_cell(
        self, row_index: int, column_index: int, base_style: Style, width: int, cursor: bool = False,
        hover: bool = False,
    ) -> Any:  # fmt: skip
        if row_index < 0 or column_index < 0:  # the header and row labels: as DataTable draws them
            return super()._render_cell(row_index, column_index, base_style, width, cursor, hover)
        cell = self.coordinate_to_cell_key(Coordinate(row_index, column_index))
        value = self.get_cell(cell.row_key, cell.column_key)
        how = (
            row_index, base_style, width, cursor, hover, self.show_cursor, self.cursor_type,
            self._show_hover_cursor, self._pseudo_class_state,
        )  # fmt: skip
        drawn = self._drawn_cells.get(cell)
        if drawn is not None and drawn[0] is value and drawn[1] == how:
            return drawn[2]
        lines = super()._render_cell(row_index, column_index, base_style, width, cursor, hover)
        self._drawn_cells[cell] = (value, how, lines)
        return lines

    def clear(self, columns: bool = False) -> Self:
        self._drawn_cells.clear()
        return super().clear(columns)

    def remove_row(self, row_key: RowKey | str) -> None:
        key = row_key.value if isinstance(row_key, RowKey) else row_key
        for cell in [c for c in self._drawn_cells if getattr(c, "row_key", None) == key]:
            del self._drawn_cells[cell]
        super().remove_row(row_key)


class TableView(Filtered):
    """The rows it is given, those matching the filter shown; the cursor stays on the same key."""

    def __init__(self, columns: Sequence[str], *, id: str | None = None) -> None:
        super().__init__(id=id)
        self._columns = list(columns)
        self._rows: list[Row] = []
        self._drawn: dict[str, Sequence[Cell]] = {}  # what the table shows now, by row key
        self._given: dict[str, tuple[Sequence[Cell], Sequence[Cell]]] = {}  # key → (cells given, as Text)

    def compose(self) -> ComposeResult:
        yield Input(placeholder="filter (Escape clears)", classes="filter")
        table = CachedTable(cursor_type="row", zebra_stripes=True)
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
        """The rows to show, in order. A view that hands back the very same cells object for a row that
        did not change (a row cache) spares the conversion and the comparison."""
        given = self._given
        self._given = {}
        converted: list[Row] = []
        for key, cells in rows:
            seen = given.get(key)
            row = seen[1] if seen is not None and seen[0] is cells else plain(cells)
            self._given[key] = (cells, row)
            converted.append((key, row))
        self._rows = converted
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
        needle = self.needle
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

    @staticmethod
    def _matches(cells: Sequence[Cell], needle: str) -> bool:
        return not needle or any(needle in str(cell).lower() for cell in cells)

    def _render_rows(self) -> None:
        table = self._shown()
        if table is None:
            return
        needle = self.needle
        wanted = [(key, cells) for key, cells in self._rows if self._matches(cells, needle)]
        drawn = self._drawn
        if len(wanted) == table.row_count and [key for key, _ in wanted] == [k.value for k in table.rows]:
            # The same rows in the same order (a poll where little changed): only changed cells repaint.
            columns = list(table.columns)
            for key, cells in wanted:
                before = drawn.get(key, ())
                if before is cells:
                    continue
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

    def refilter(self) -> None:
        self._render_rows()

    def body(self) -> Widget:
        return self.table
