"""Approvals: nodes waiting to join, with what each claims and its key fingerprint; approve `a` (signs with
the operator's authority key, where this machine holds it) or reject `x`."""

from __future__ import annotations

from typing import ClassVar

from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.widgets import Static

from protocol.admin import EnrollmentList
from tui.format import gib, since
from tui.messages import ActionRequested, Request
from tui.screens.confirm import ConfirmScreen
from tui.widgets.table_view import Row, TableView

COLUMNS = ("Node", "Tier asked", "Fingerprint", "Hardware", "VRAM GiB", "Address", "Source", "Waiting")


class ApprovalsView(TableView):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("a", "approve", "Approve"),
        Binding("x", "reject", "Reject"),
    ]

    def __init__(self, *, read_only: bool) -> None:
        super().__init__(COLUMNS, id="approvals-view")
        self.read_only = read_only

    def compose(self) -> ComposeResult:
        yield Static("", id="authority-note", markup=False)
        yield from super().compose()

    def update(self, enrollments: EnrollmentList, why_not: str | None) -> None:
        note = self.query_one("#authority-note", Static)
        note.update(why_not or "")
        note.set_class(why_not is not None, "-shown")
        rows: list[Row] = []
        for e in enrollments.enrollments:
            if e.state == "pending":
                cells = [
                    e.node_id, e.tier, e.fingerprint, e.gpus or "-", gib(e.memory_total_bytes),
                    e.url or "-", e.source, since(e.created),
                ]  # fmt: skip
                rows.append((e.node_id, cells))
        self.set_rows(rows)

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        return not (self.read_only and action in ("approve", "reject"))

    def action_approve(self) -> None:
        key = self.selected_key()
        if key is not None:
            self.post_message(ActionRequested(Request("approve", key)))

    def action_reject(self) -> None:
        key = self.selected_key()
        if key is None:
            return

        def answered(yes: bool | None) -> None:
            if yes:
                self.post_message(ActionRequested(Request("reject", key)))

        self.app.push_screen(ConfirmScreen(f"Reject node {key}?"), answered)
