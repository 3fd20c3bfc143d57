"""Users: tokens with group, state, expiry, terms accepted, usage today and this month against their
group's quota, and last use; create `n` (the secret is shown once), revoke `r` and rotate `o` (confirmed)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

from rich.text import Text
from textual.binding import Binding, BindingType

from protocol.accounts import Token, TokenList
from protocol.policy import GroupView
from protocol.terms import TermsStatus, TermsStatusList
from tui.format import since, until
from tui.messages import ActionRequested, Request
from tui.screens.confirm import ConfirmScreen
from tui.screens.token_form import TokenForm
from tui.widgets.table_view import Cell, Row, TableView

COLUMNS = ("Id", "Name", "Scope", "Group", "State", "Expires", "Terms", "Today", "This month", "Last used")
ACTIONS = {"create", "revoke", "rotate"}


@dataclass(frozen=True)
class Accounts:
    """What the Users screen joins: the tokens, and beside them what the scheduler knows of each."""

    tokens: TokenList
    terms: TermsStatusList | None = None
    today: Mapping[str, int] = field(default_factory=dict)  # token id → tokens since midnight UTC
    groups: Mapping[str, GroupView] = field(default_factory=dict)


def against(used: int, quota: int | None) -> Cell:
    """ "1,234 / 50,000" (red at the quota, yellow past 80 %), or the count alone when there is no quota."""
    if not quota:
        return f"{used:,}"
    share = used / quota
    style = "red" if share >= 1 else "yellow" if share >= 0.8 else ""
    return Text(f"{used:,} / {quota:,}", style=style)


def terms_cell(token: Token, terms: TermsStatusList | None, status: TermsStatus | None) -> Cell:
    if terms is None or terms.version is None:
        return "-"
    if status is not None and status.current:
        return Text(f"accepted {terms.version}", style="green")
    if status is not None and status.accepted_version:
        return Text(f"old ({status.accepted_version})", style="yellow")
    return Text("not yet", style="yellow")


def token_row(token: Token, accounts: Accounts, status: TermsStatus | None = None) -> Row:
    group = accounts.groups.get(token.group)
    day = group.each.tokens_per_day if group is not None else None
    month = group.each.tokens_per_month if group is not None else None
    state: Cell = token.state if token.state == "active" else Text(token.state, style="dim")
    cells: list[Cell] = [
        token.id, token.name, token.scope, token.group, state, until(token.expires),
        terms_cell(token, accounts.terms, status), against(accounts.today.get(token.id, 0), day),
        against(token.tokens_this_month, month), since(token.last_used),
    ]  # fmt: skip
    return token.id, cells


class UsersView(TableView):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("n", "create", "New token"),
        Binding("r", "revoke", "Revoke"),
        Binding("o", "rotate", "Rotate"),
    ]

    def __init__(self, *, read_only: bool) -> None:
        super().__init__(COLUMNS, id="users-view")
        self.read_only = read_only
        self._cache: dict[str, tuple[tuple[object, ...], Row]] = {}

    def update(self, accounts: Accounts) -> None:
        statuses = {s.token_id: s for s in accounts.terms.tokens} if accounts.terms is not None else {}
        now = time.time()
        cache, self._cache = self._cache, {}
        rows: list[Row] = []
        for t in accounts.tokens.tokens:
            # A row is rebuilt only when what it shows changed (a thousand tokens, most idle, every poll).
            group = accounts.groups.get(t.group)
            inputs = (
                t, statuses.get(t.id), accounts.today.get(t.id, 0), group, accounts.terms is None,
                accounts.terms.version if accounts.terms is not None else None,
                since(t.last_used, now), until(t.expires, now),
            )  # fmt: skip
            kept = cache.get(t.id)
            fresh = kept is None or kept[0] != inputs
            row = token_row(t, accounts, statuses.get(t.id)) if fresh or kept is None else kept[1]
            self._cache[t.id] = (inputs, row)
            rows.append(row)
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
