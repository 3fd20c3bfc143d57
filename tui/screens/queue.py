"""Queue: the requests waiting and running (metadata only: who, which model, where, how long, how far) and
each user's fair-share standing: who is served next, and how far ahead of the least-served the others are."""

from __future__ import annotations

from collections.abc import Mapping

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Label, Static

from protocol.admin import QueueJob, QueueState
from tui.format import age
from tui.widgets.table_view import Cell, Row, TableView

USER_COLUMNS = ("Token", "Group", "Weight", "Waiting", "Running", "Ahead by (tokens)")
JOB_COLUMNS = ("Request", "State", "Token", "Group", "Model", "Node", "Age", "Waited", "Streamed", "E2E")


def _who(token_id: str, names: Mapping[str, str]) -> str:
    name = names.get(token_id)
    return f"{name} ({token_id})" if name else token_id


def job_row(job: QueueJob, names: Mapping[str, str]) -> Row:
    state = Text(job.state, style="yellow" if job.state == "waiting" else "green")
    node = job.node_id or "-"
    if job.attempts > 1:
        node += f" (try {job.attempts})"
    cells: list[Cell] = [
        job.request_id, state, _who(job.token_id, names), job.group or "-", job.model, node,
        age(job.age_seconds), age(job.waited_seconds), f"{job.streamed:,}", "yes" if job.sealed else "no",
    ]  # fmt: skip
    return job.request_id, cells


def headline(queue: QueueState) -> str:
    return (
        f"waiting {len(queue.waiting)} (at most {queue.max_queued:,})   running {len(queue.running)}   "
        f"users {len(queue.users)}"
    )


class QueueView(Vertical):
    def __init__(self) -> None:
        super().__init__(id="queue-view")

    def compose(self) -> ComposeResult:
        yield Static("waiting for the scheduler…", id="queue-head", markup=False)
        yield Label("Fair share: next in line first")
        yield TableView(USER_COLUMNS, id="queue-users")
        yield Label("Requests: waiting, then running")
        yield TableView(JOB_COLUMNS, id="queue-jobs")

    def update(self, queue: QueueState, names: Mapping[str, str]) -> None:
        self.query_one("#queue-head", Static).update(headline(queue))
        users: list[Row] = []
        for u in queue.users:
            ahead: Cell = Text("next", style="green") if u.ahead_tokens <= 0 else f"{u.ahead_tokens:,.0f}"
            cells: list[Cell] = [
                _who(u.token_id, names), u.group or "-", f"{u.weight:g}", str(u.waiting), str(u.running),
                ahead,
            ]  # fmt: skip
            users.append((u.token_id, cells))
        self.query_one("#queue-users", TableView).set_rows(users)
        jobs = [job_row(j, names) for j in (*queue.waiting, *queue.running)]
        self.query_one("#queue-jobs", TableView).set_rows(jobs)

    def all_text(self) -> str:
        return "\n".join(t.all_text() for t in self.query(TableView))
