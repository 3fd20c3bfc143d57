"""Usage as the relay counted it, until the node's signed heartbeat confirms it.

A node streams token counts with each answer (META frames): they arrive with the answer, and fairness, metrics
and the usage row need them when the job ends. Those frames are not signed; a node's account of record is
the list of usage receipts in its next heartbeat, which it signs (node.receipts, protocol.federation), so one
signature verification covers every job of a few seconds instead of one per request. Here each job's row
waits for its receipt:

- the same counts: confirmed;
- other counts: the row is corrected to what the node signed. A job whose client left mid-answer is the
  usual case (the node counted every token it made; the stream's last progress count was up to a second
  old); a finished job whose counts differ means something between the node and the scheduler changed
  them, and is logged as such;
- no receipt within ``confirm_within`` seconds: counted as unconfirmed (metric and log), the row stays as
  the stream said.

Jobs are keyed by (node id, the scheduler's job id for that attempt): a request that failed over has one job
per node it tried, and only the last one's counts are its row (a superseded attempt is not corrected).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

from protocol.federation import UsageReceipt
from scheduler.store import UsageRecord

log = logging.getLogger("hearth.scheduler")

MAX_PENDING = 200_000  # jobs awaiting receipts; past it the oldest count as unconfirmed


@dataclass(frozen=True, slots=True)
class Correction:
    """A usage row rewritten to the counts its node signed."""

    record: UsageRecord
    prompt_delta: int
    completion_delta: int


@dataclass(slots=True)
class _Waiting:
    job: tuple[str, str]  # (node id, job id)
    record: UsageRecord
    deadline: float


class Ledger:
    def __init__(
        self,
        write: Callable[[UsageRecord | Correction], None],
        *,
        confirm_within: float,
        on_outcome: Callable[[str], None] = lambda outcome: None,
        clock: Callable[[], float] = time.monotonic,
        limit: int = MAX_PENDING,
    ) -> None:
        self._write = write
        self._confirm_within = confirm_within
        self._on_outcome = on_outcome
        self._clock = clock
        self._limit = limit
        self._waiting: dict[tuple[str, str], _Waiting] = {}  # insertion order = deadline order
        self._latest: dict[str, tuple[str, str]] = {}  # request id → its last attempt's job
        self._running: set[tuple[str, str]] = set()  # jobs sent to a node that have not ended here yet
        self._early: dict[tuple[str, str], tuple[int, int]] = {}  # receipts that overtook their job

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def dispatched(self, node_id: str, job_id: str) -> None:
        """A job is on its way to a node: a receipt for it may come from now on."""
        self._running.add((node_id, job_id))

    def recorded(self, job_id: str, record: UsageRecord) -> None:
        """A job ended (the relay's count): write its row now, and wait for the node's receipt."""
        self._write(record)
        job = (record.node_id, job_id)
        self._running.discard(job)
        earlier = self._latest.pop(record.request_id, None)
        if earlier is not None:
            self._waiting.pop(earlier, None)  # an attempt this one replaced: its row is gone
        if record.status.startswith("refused_") or record.status == "node_unreachable":
            self._early.pop(job, None)
            return  # the node ran nothing: no receipt is due
        early = self._early.pop(job, None)
        if early is not None:
            self._settle(record, early[0], early[1])
            return
        self._waiting[job] = _Waiting(job, record, self._clock() + self._confirm_within)
        self._latest[record.request_id] = job
        if len(self._waiting) > self._limit:
            self._expire(next(iter(self._waiting.values())))

    def receipts(self, node_id: str, receipts: Iterable[UsageReceipt]) -> None:
        """A node's signed heartbeat listed these jobs."""
        for receipt in receipts:
            job = (node_id, receipt.job_id)
            waiting = self._waiting.pop(job, None)
            if waiting is None:
                if job in self._running:  # the heartbeat overtook the end of the job's stream
                    self._early[job] = (receipt.prompt_tokens, receipt.completion_tokens)
                continue  # not a job of this node's that waits: nothing to settle
            if self._latest.get(waiting.record.request_id) == job:
                del self._latest[waiting.record.request_id]
            self._settle(waiting.record, receipt.prompt_tokens, receipt.completion_tokens)

    def sweep(self) -> None:
        """Count jobs whose receipt did not come in time (call now and then)."""
        now = self._clock()
        while self._waiting:
            first = next(iter(self._waiting.values()))
            if first.deadline > now:
                break
            self._expire(first)

    def _expire(self, waiting: _Waiting) -> None:
        del self._waiting[waiting.job]
        if self._latest.get(waiting.record.request_id) == waiting.job:
            del self._latest[waiting.record.request_id]
        record = waiting.record
        if record.prompt_tokens or record.completion_tokens:
            log.warning(
                "node %s never confirmed the usage of job %s in a signed heartbeat; its row stays as the "
                "stream counted it", record.node_id, waiting.job[1],
            )  # fmt: skip
        self._on_outcome("unconfirmed")

    def _settle(self, record: UsageRecord, prompt_tokens: int, completion_tokens: int) -> None:
        if (prompt_tokens, completion_tokens) == (record.prompt_tokens, record.completion_tokens):
            self._on_outcome("confirmed")
            return
        if record.status == "ok":
            log.warning(
                "node %s signed other token counts for request %s (%d prompt + %d completion) than its "
                "answer carried (%d + %d): corrected; something between node and scheduler changed them",
                record.node_id, record.request_id, prompt_tokens, completion_tokens,
                record.prompt_tokens, record.completion_tokens,
            )  # fmt: skip
        corrected = replace(record, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)
        self._write(
            Correction(
                corrected,
                prompt_tokens - record.prompt_tokens,
                completion_tokens - record.completion_tokens,
            )
        )
        self._on_outcome("corrected")
