"""The form for a new token: name, group, scope (Enter submits, Escape cancels)."""

from __future__ import annotations

from typing import ClassVar

from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Input, Label


class TokenForm(ModalScreen[dict[str, str] | None]):
    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "cancel", "Cancel")]

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label("New token (Enter to create, Escape to cancel)", classes="question")
            yield Input(placeholder="name (who holds it)", id="name")
            yield Input(placeholder="group (default)", id="group")
            yield Input(placeholder="scope: user or admin (user)", id="scope")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self.dismiss({box.id or "": box.value.strip() for box in self.query(Input)})

    def action_cancel(self) -> None:
        self.dismiss(None)
