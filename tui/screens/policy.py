"""Policy: the policy in force (its file, digest, terms version, groups and text); `R` re-reads it."""

from __future__ import annotations

from typing import ClassVar

from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import VerticalScroll
from textual.widgets import DataTable, Static

from protocol.policy import PolicyState
from tui.messages import RefreshRequested


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

    def update(self, policy: PolicyState) -> None:
        self.query_one("#policy-head", Static).update(
            f"Source: {policy.source}\nDigest: {policy.digest}\nTerms version: {policy.terms_version or '-'}"
        )
        table = self.query_one(DataTable)
        table.clear()
        for g in policy.groups:
            table.add_row(
                g.name, ", ".join(g.models) if g.models is not None else "all", ", ".join(g.tiers),
                str(g.max_tokens or "-"), f"{g.weight:g}", "yes" if g.require_e2e else "no",
                str(g.each.tokens_per_day or "-"), key=g.name,
            )  # fmt: skip
        self.query_one("#policy-text", Static).update(policy.text or "(built-in policy)")

    def action_reload(self) -> None:
        # Reading is no action: a read-only console may re-read too.
        self.post_message(RefreshRequested())
