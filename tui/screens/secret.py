"""A new token's secret, shown once: the scheduler keeps only its hash, and so does the console."""

from __future__ import annotations

from typing import ClassVar

from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Label, Static

from protocol.accounts import TokenSecret


class SecretScreen(ModalScreen[None]):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "close", "Close"),
        Binding("enter", "close", "Close"),
    ]

    def __init__(self, secret: TokenSecret, verb: str) -> None:
        super().__init__()
        self.secret = secret
        self.verb = verb

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            said = f"{self.verb}. Copy the secret now: it is not shown again."
            yield Label(said, classes="question", markup=False)
            yield Static(self.secret.secret, id="secret", markup=False)
            yield Label("Enter or Escape closes.")

    def action_close(self) -> None:
        self.dismiss(None)
