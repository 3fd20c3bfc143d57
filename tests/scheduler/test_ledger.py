"""The ledger: usage rows as the relay counted them, confirmed or corrected by the nodes' signed receipts."""

from __future__ import annotations

import logging

import pytest

from node.receipts import Receipts
from protocol.federation import MAX_RECEIPTS, UsageReceipt
from scheduler.ledger import Correction, Ledger
from scheduler.store import UsageRecord


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _record(
    request_id: str = "r1", node: str = "n1", status: str = "ok", prompt: int = 10, completion: int = 5
) -> UsageRecord:
    return UsageRecord(request_id, "tok", "m", "chat", node, status, prompt, completion, 0.0, 1.0)


def _receipt(job: str, prompt: int = 10, completion: int = 5) -> UsageReceipt:
    return UsageReceipt(job_id=job, prompt_tokens=prompt, completion_tokens=completion)


@pytest.fixture
def book() -> tuple[Ledger, list[UsageRecord | Correction], list[str], Clock]:
    written: list[UsageRecord | Correction] = []
    outcomes: list[str] = []
    clock = Clock()
    ledger = Ledger(written.append, confirm_within=10.0, on_outcome=outcomes.append, clock=clock)
    return ledger, written, outcomes, clock


Book = tuple[Ledger, list[UsageRecord | Correction], list[str], Clock]


def test_the_same_counts_confirm_the_row(book: Book) -> None:
    ledger, written, outcomes, _ = book
    ledger.recorded("j1", _record())
    ledger.receipts("n1", [_receipt("j1")])
    assert written == [_record()] and outcomes == ["confirmed"] and ledger.waiting == 0


def test_other_counts_for_a_finished_job_are_corrected_and_logged(
    book: Book, caplog: pytest.LogCaptureFixture
) -> None:
    ledger, written, outcomes, _ = book
    ledger.recorded("j1", _record(completion=1))
    with caplog.at_level(logging.WARNING):
        ledger.receipts("n1", [_receipt("j1", completion=7)])
    assert written[-1] == Correction(_record(completion=7), 0, 6)
    assert outcomes == ["corrected"]
    assert "changed them" in caplog.text


def test_an_abandoned_job_is_corrected_quietly(book: Book, caplog: pytest.LogCaptureFixture) -> None:
    ledger, written, outcomes, _ = book
    ledger.recorded("j1", _record(status="cancelled", completion=0))
    with caplog.at_level(logging.WARNING):
        ledger.receipts("n1", [_receipt("j1", completion=12)])
    assert written[-1] == Correction(_record(status="cancelled", completion=12), 0, 12)
    assert outcomes == ["corrected"] and caplog.text == ""


def test_a_receipt_from_another_node_confirms_nothing(book: Book) -> None:
    ledger, written, outcomes, clock = book
    ledger.recorded("j1", _record(completion=1))
    ledger.receipts("n2", [_receipt("j1", completion=900)])  # not the node that ran it
    assert written == [_record(completion=1)] and outcomes == [] and ledger.waiting == 1
    clock.now = 11
    ledger.sweep()
    assert outcomes == ["unconfirmed"] and ledger.waiting == 0


def test_no_receipt_in_time_counts_as_unconfirmed(book: Book, caplog: pytest.LogCaptureFixture) -> None:
    ledger, _, outcomes, clock = book
    ledger.recorded("j1", _record())
    clock.now = 9.9
    ledger.sweep()
    assert outcomes == []
    clock.now = 10.1
    with caplog.at_level(logging.WARNING):
        ledger.sweep()
    assert outcomes == ["unconfirmed"] and "never confirmed" in caplog.text
    ledger.receipts("n1", [_receipt("j1", completion=99)])  # too late: nothing to settle
    assert outcomes == ["unconfirmed"]


def test_a_receipt_that_overtakes_the_stream_still_settles_it(book: Book) -> None:
    ledger, written, outcomes, _ = book
    ledger.dispatched("n1", "j1")
    ledger.receipts("n1", [_receipt("j1", completion=6)])
    ledger.recorded("j1", _record(completion=5))
    assert written[-1] == Correction(_record(completion=6), 0, 1) and outcomes == ["corrected"]


def test_an_attempt_that_failed_over_is_not_corrected_over_its_successor(book: Book) -> None:
    ledger, written, outcomes, _ = book
    ledger.recorded("j1", _record(node="n1", status="node_failed", completion=3))
    ledger.recorded("j2", _record(node="n2", completion=8))  # the same request, finished elsewhere
    ledger.receipts("n1", [_receipt("j1", completion=4)])  # the failed node's own count
    ledger.receipts("n2", [_receipt("j2", completion=8)])
    assert written == [
        _record(node="n1", status="node_failed", completion=3),
        _record(node="n2", completion=8),
    ]
    assert outcomes == ["confirmed"]


def test_pending_jobs_are_bounded() -> None:
    outcomes: list[str] = []
    ledger = Ledger(lambda _: None, confirm_within=10.0, on_outcome=outcomes.append, limit=3)
    for i in range(5):
        ledger.recorded(f"j{i}", _record(request_id=f"r{i}"))
    assert ledger.waiting == 3 and outcomes == ["unconfirmed", "unconfirmed"]


def test_a_node_keeps_receipts_until_a_heartbeat_carried_them() -> None:
    receipts = Receipts(limit=MAX_RECEIPTS + 10)
    for i in range(MAX_RECEIPTS + 5):
        receipts.add(f"j{i}", 1, i)
    mark, first = receipts.batch()
    assert len(first) == MAX_RECEIPTS and first[0] == {
        "job_id": "j0",
        "prompt_tokens": 1,
        "completion_tokens": 0,
    }
    receipts.add("late", 1, 1)  # a job ending while the heartbeat is on its way
    receipts.sent(mark)
    mark, rest = receipts.batch()
    assert [r["job_id"] for r in rest] == [f"j{i}" for i in range(MAX_RECEIPTS, MAX_RECEIPTS + 5)] + ["late"]
    receipts.sent(mark)
    assert len(receipts) == 0 and receipts.batch() == (0, [])


def test_a_node_that_cannot_reach_its_scheduler_drops_the_oldest() -> None:
    receipts = Receipts(limit=3)
    for i in range(5):
        receipts.add(f"j{i}", 1, 1)
    assert receipts.dropped == 2 and [r["job_id"] for r in receipts.batch()[1]] == ["j2", "j3", "j4"]


def test_receipts_for_jobs_not_running_there_are_ignored(book: Book) -> None:
    ledger, written, outcomes, _ = book
    ledger.dispatched("n1", "j1")
    ledger.receipts("n2", [_receipt("j1", completion=900)])  # another node's word on n1's job
    ledger.receipts("n1", [_receipt(f"made-up-{i}") for i in range(1000)])  # jobs nobody sent it
    ledger.recorded("j1", _record(completion=5))
    assert written == [_record(completion=5)] and outcomes == [] and ledger.waiting == 1


def test_a_job_the_node_refused_or_never_got_waits_for_no_receipt(book: Book) -> None:
    ledger, written, outcomes, clock = book
    ledger.recorded("j1", _record(status="refused_503", prompt=0, completion=0))
    ledger.recorded("j2", _record(request_id="r2", status="node_unreachable", prompt=0, completion=0))
    clock.now = 100
    ledger.sweep()
    assert ledger.waiting == 0 and outcomes == [] and len(written) == 2
