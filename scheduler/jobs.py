"""The job board: what the scheduler is doing for whom right now, for the operator (GET /admin/queue).

Each admitted generation request is on the board from admission to its end, however it ends (finished,
refused, its client gone, the scheduler stopping): the request path adds it, marks it waiting in the fair
queue or running on a node, counts the answer's chunks as they are relayed, and takes it off in a
``finally``. So the board holds only live requests, and its size is bounded by what admission lets in.

Metadata only: ids, the model, times and counts. Nothing here ever sees a prompt or an answer.

Pure bookkeeping (no I/O); ages come from a monotonic clock, which the tests may replace.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from protocol.admin import JobState, QueueJob, QueueState, QueueUser
from scheduler.fairness import Standing

Clock = Callable[[], float]


@dataclass(eq=False, slots=True)
class Job:
    """One admitted request, as the board tracks it (the request path holds it and reports on it)."""

    request_id: str  # the id the answer's x-request-id header carries
    token_id: str  # the fair queue's user
    group: str
    model: str
    sealed: bool
    weight: float  # the group's fair-queue weight when it was admitted
    admitted: float  # the board's clock
    state: JobState = "waiting"
    node_id: str | None = None
    attempts: int = 0  # nodes tried, counting the one it runs on
    streamed: int = 0  # answer chunks (DATA frames) relayed toward the client so far
    waited: float = 0.0  # seconds in the fair queue before the current spell
    since: float = 0.0  # when the current spell (waiting or running) began

    def relayed(self, chunks: int) -> None:
        """The relay sent the client ``chunks`` more of the answer (scheduler.relay calls this)."""
        self.streamed += chunks

    def document(self, now: float) -> QueueJob:
        waited = self.waited + (now - self.since if self.state == "waiting" else 0.0)
        return QueueJob(
            request_id=self.request_id, token_id=self.token_id, group=self.group, model=self.model,
            sealed=self.sealed, state=self.state, node_id=self.node_id,
            age_seconds=round(now - self.admitted, 3), waited_seconds=round(waited, 3),
            streamed=self.streamed, attempts=self.attempts,
        )  # fmt: skip


class JobBoard:
    def __init__(self, clock: Clock = time.monotonic) -> None:
        self._clock = clock
        self._jobs: dict[str, Job] = {}

    def __len__(self) -> int:
        return len(self._jobs)

    def add(
        self, request_id: str, token_id: str, group: str, model: str, *, sealed: bool, weight: float
    ) -> Job:
        """An admitted request, before it joins the queue."""
        now = self._clock()
        job = Job(request_id, token_id, group, model, sealed, weight, admitted=now, since=now)
        self._jobs[request_id] = job
        return job

    def waiting(self, job: Job) -> None:
        """``job`` (re)joins the fair queue: first, or after a node failed it (failover)."""
        if job.state == "waiting":
            return
        job.state, job.node_id, job.since = "waiting", None, self._clock()

    def running(self, job: Job, node_id: str) -> None:
        """Admission gave ``job`` a node: it is sent there now."""
        now = self._clock()
        if job.state == "waiting":
            job.waited += now - job.since
        job.state, job.node_id, job.since = "running", node_id, now
        job.attempts += 1

    def remove(self, job: Job) -> None:
        """The request ended, whatever way."""
        if self._jobs.get(job.request_id) is job:
            del self._jobs[job.request_id]

    def state(self, standing: Callable[[str], Standing | None], max_queued: int) -> QueueState:
        """The board as the operator reads it, with each user's ``standing`` in the fair queue
        (scheduler.admission)."""
        now = self._clock()
        jobs = sorted(self._jobs.values(), key=lambda j: j.admitted)
        return QueueState(
            waiting=[j.document(now) for j in jobs if j.state == "waiting"],
            running=[j.document(now) for j in jobs if j.state == "running"],
            users=_users(jobs, standing),
            max_queued=max_queued,
        )


def _users(jobs: Iterable[Job], standing: Callable[[str], Standing | None]) -> list[QueueUser]:
    """Users with work on the board, next in line first: the fewest tokens ahead, then one who waits,
    then the longest there."""
    mine: dict[str, list[Job]] = {}
    for job in jobs:  # oldest first, so each user's list is too
        mine.setdefault(job.token_id, []).append(job)
    rows: list[tuple[tuple[float, bool, float], QueueUser]] = []
    for token_id, theirs in mine.items():
        found = standing(token_id)
        # A user the fair queue does not know (forgotten while idle) would be lifted to the floor: next.
        ahead = found.ahead if found is not None else 0.0
        waiting = sum(j.state == "waiting" for j in theirs)
        user = QueueUser(
            token_id=token_id, group=theirs[-1].group,
            weight=found.weight if found is not None else theirs[-1].weight,
            waiting=waiting, running=len(theirs) - waiting, ahead_tokens=round(ahead, 1),
        )  # fmt: skip
        rows.append(((ahead, waiting == 0, theirs[0].admitted), user))
    return [user for _, user in sorted(rows, key=lambda row: row[0])]
