"""The console's live figures (tui.rates): tokens per second counted once whether an answer streams or
not, time to first token, refusals per minute, over a sliding window on a clock the test moves."""

from __future__ import annotations

from protocol.admin import QueueJob, QueueState
from protocol.policy import AdminEvent
from tui.rates import WINDOW_S, Rates


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def running(request_id: str, node: str, streamed: int, age: float = 1.0) -> QueueJob:
    return QueueJob(
        request_id=request_id, token_id="tok", group="default", model="m", sealed=False, state="running",
        node_id=node, age_seconds=age, waited_seconds=0.0, streamed=streamed, attempts=1,
    )  # fmt: skip


def queue(*jobs: QueueJob) -> QueueState:
    return QueueState(waiting=[], running=list(jobs), users=[], max_queued=10)


def finished(request_id: str, node: str, tokens: int, ttft: float | None = None) -> AdminEvent:
    return AdminEvent(
        seq=1, at=0.0, kind="finished", node_id=node, completion_tokens=tokens, ttft_ms=ttft,
        request_id=request_id,
    )  # fmt: skip


def test_a_streamed_answer_counts_its_tokens_once_while_it_streams_and_when_it_ends() -> None:
    clock = Clock()
    rates = Rates(clock)
    clock.now += WINDOW_S  # the console has run a whole window
    rates.queue(queue(running("r1", "gpu-1", 30)))
    rates.queue(queue(running("r1", "gpu-1", 50)))
    rates.events([finished("r1", "gpu-1", 80)])  # 30 more than the queue saw
    assert rates.tokens_per_s() == 80 / WINDOW_S
    assert rates.per_node() == {"gpu-1": 80 / WINDOW_S}
    assert rates.tokens_per_s("gpu-2") == 0


def test_an_answer_that_did_not_stream_counts_when_it_ends_and_old_tokens_leave_the_window() -> None:
    clock = Clock()
    rates = Rates(clock)
    clock.now += WINDOW_S
    rates.events([finished("r2", "gpu-2", 100)])
    assert rates.tokens_per_s() == 100 / WINDOW_S
    clock.now += WINDOW_S + 1
    assert rates.tokens_per_s() == 0


def test_a_job_first_seen_long_after_it_began_does_not_count_what_it_streamed_before() -> None:
    clock = Clock()
    rates = Rates(clock)
    clock.now += WINDOW_S
    rates.queue(queue(running("old", "gpu-1", 500, age=600.0)))
    assert rates.tokens_per_s() == 0
    rates.queue(queue(running("old", "gpu-1", 520, age=602.0)))
    assert rates.tokens_per_s() == 20 / WINDOW_S


def test_time_to_first_token_is_the_median_and_refusals_are_counted_by_kind() -> None:
    clock = Clock()
    rates = Rates(clock)
    assert rates.ttft_ms() is None
    rates.events([finished(f"r{i}", "gpu-1", 1, ttft=float(ms)) for i, ms in enumerate((100, 300, 200))])
    assert rates.ttft_ms() == 200.0
    refused = [
        AdminEvent(seq=i, at=0.0, kind="refused", refusal=kind, status=429)
        for i, kind in enumerate(("tokens_per_day", "tokens_per_day", "requests_per_minute"))
    ]
    rates.events(refused)
    assert rates.refusals_per_min() == {"tokens_per_day": 2, "requests_per_minute": 1}
    clock.now += 61
    assert rates.refusals_per_min() == {}
    assert rates.ttft_ms() is None
