"""Users: tokens with group, state, expiry, last use and usage this month; create `n` (the secret is shown
once), revoke `r` and rotate `o` (both confirmed)."""

from __future__ import annotations

from typing import ClassVar

from rich.text import Text
from textual.binding import Binding, BindingType

from protocol.accounts import TokenList
from tui.format import since, until
from tui.messages import ActionRequested, Request
from tui.screens.confirm import ConfirmScreen
from tui.screens.token_form import TokenForm
from tui.widgets.table_view import Cell, Row, TableView

COLUMNS = ("Id", "Name", "Scope", "Group", "State", "Expires", "Last used", "Tokens this month")
ACTIONS = {"create", "revoke", "rotate"}


class UsersView(TableView):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("n", "create", "New token"),
        Binding("r", "revoke", "Revoke"),
        Binding("o", "rotate", "Rotate"),
    ]

    def __init__(self, *, read_only: bool) -> None:
        super().__init__(COLUMNS, id="users-view")
        self.read_only = read_only

    def update(self, tokens: TokenList) -> None:
        rows: list[Row] = []
        for t in tokens.tokens:
            state: Cell = t.state if t.state == "active" else Text(t.state, style="dim")
            cells: list[Cell] = [
                t.id, t.name, t.scope, t.group, state, until(t.expires),
                since(t.last_used), f"{t.tokens_this_month:,}",
            ]  # fmt: skip
            rows.append((t.id, cells))
        self.set_rows(rows)

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        return not (self.read_only and action in ACTIONS)

    def action_create(self) -> None:
        def filled(fields: dict[str, str] | None) -> None:
            if fields:
                self.post_message(ActionRequested(Request("create_token", fields=tuple(fields.items()))))

        self.app.push_screen(TokenForm(), filled)

    def _confirmed(self, kind: str, question: str) -> None:
        key = self.selected_key()
        if key is None:
            return

        def answered(yes: bool | None) -> None:
            if yes:
                self.post_message(ActionRequested(Request(kind, key)))

        self.app.push_screen(ConfirmScreen(question.format(key)), answered)

    def action_revoke(self) -> None:
        self._confirmed("revoke_token", "Revoke token {}? Its holder is refused from now on.")

    def action_rotate(self) -> None:
        self._confirmed("rotate_token", "Rotate token {}? The old secret stops working now.")
