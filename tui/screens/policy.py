"""Policy: the policy in force (its file, digest, terms version, when it was put in force, the error of a
reload that was refused, its groups and text); `R` reloads the file now."""

from __future__ import annotations

import time
from typing import ClassVar

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import VerticalScroll
from textual.widgets import DataTable, Static

from protocol.policy import PolicyState
from tui.messages import ActionRequested, Request
from tui.widgets.table_view import plain


def head(policy: PolicyState) -> Text:
    loaded = "-"
    if policy.loaded_at is not None:
        loaded = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(policy.loaded_at))
    out = Text.assemble(
        f"Source: {policy.source}\nDigest: {policy.digest}\n",
        f"Terms version: {policy.terms_version or '-'}   in force since {loaded}",
    )
    if policy.last_error:
        refused = f"\nThe last reload was refused (the policy above stays in force): {policy.last_error}"
        out.append(refused, "red")
    return out


class PolicyView(VerticalScroll):
    BINDINGS: ClassVar[list[BindingType]] = [Binding("R", "reload", "Reload")]

    def __init__(self, *, read_only: bool) -> None:
        super().__init__(id="policy-view")
        self.read_only = read_only

    def compose(self) -> ComposeResult:
        yield Static("waiting for the scheduler…", id="policy-head", markup=False)
        table: DataTable[str] = DataTable(cursor_type="row", id="groups")
        table.add_columns("Group", "Models", "Tiers", "Max tokens", "Weight", "E2E", "Each: tokens/day")
        yield table
        yield Static("", id="policy-text", markup=False)

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        return not (self.read_only and action == "reload")

    def update(self, policy: PolicyState) -> None:
        self.query_one("#policy-head", Static).update(head(policy))
        table = self.query_one(DataTable)
        table.clear()
        for g in policy.groups:
            table.add_row(
                *plain([g.name, ", ".join(g.models) if g.models is not None else "all", ", ".join(g.tiers),
                str(g.max_tokens or "-"), f"{g.weight:g}", "yes" if g.require_e2e else "no",
                str(g.each.tokens_per_day or "-")]), key=g.name,
            )  # fmt: skip
        self.query_one("#policy-text", Static).update(policy.text or "(built-in policy)")

    def action_reload(self) -> None:
        self.post_message(ActionRequested(Request("reload_policy")))
