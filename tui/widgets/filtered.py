"""A view with a filter line: `/` opens it, typing narrows what the view shows, Enter goes back to the
view, Escape clears and closes it. The tables and the event tail share it."""

from __future__ import annotations

from typing import ClassVar

from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.widget import Widget
from textual.widgets import Input


class Filtered(Vertical):
    """Subclasses compose an ``Input(classes="filter")`` and say what to redraw and what to focus."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("slash", "filter", "Filter", key_display="/")]
    DEFAULT_CSS = """
    Filtered > Input.filter { display: none; }
    Filtered > Input.filter.-open { display: block; }
    """

    @property
    def needle(self) -> str:
        """The filter, lower-cased ("" while there is none or the view is not composed yet)."""
        boxes = list(self.query(Input))
        return boxes[0].value.strip().lower() if boxes else ""

    def refilter(self) -> None:
        """Show what matches ``needle`` now."""
        raise NotImplementedError

    def body(self) -> Widget:
        """What has the focus when the filter line closes."""
        raise NotImplementedError

    def action_filter(self) -> None:
        box = self.query_one(Input)
        box.add_class("-open")
        box.focus()

    def on_input_changed(self, event: Input.Changed) -> None:
        event.stop()
        self.refilter()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.body().focus()

    def key_escape(self) -> None:
        box = self.query_one(Input)
        if box.has_class("-open"):
            box.value = ""
            box.remove_class("-open")
            self.body().focus()
