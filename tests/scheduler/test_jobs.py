"""The job board's bookkeeping, on a clock the test moves: states, waits across failovers, chunks relayed,
the order the operator reads, and that an ended request leaves nothing behind. (The board in a running
scheduler: tests/scheduler/test_admin_queue.py.)"""

from __future__ import annotations

import pytest

from scheduler.fairness import Standing
from scheduler.jobs import JobBoard


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _nobody(token_id: str) -> Standing | None:
    return None


def test_a_job_waits_runs_fails_over_and_ends() -> None:
    clock = Clock()
    board = JobBoard(clock)
    job = board.add("r1", "tok_a", "students", "m", sealed=True, weight=1.0)
    clock.now += 2.0
    (doc,) = board.state(_nobody, 10).waiting
    assert (doc.state, doc.node_id, doc.attempts, doc.waited_seconds, doc.age_seconds) == (
        "waiting", None, 0, 2.0, 2.0,
    )  # fmt: skip
    board.running(job, "gpu-1")
    job.relayed(3)
    clock.now += 5.0
    (doc,) = board.state(_nobody, 10).running
    assert (doc.node_id, doc.attempts, doc.waited_seconds, doc.age_seconds, doc.streamed) == (
        "gpu-1", 1, 2.0, 7.0, 3,
    )  # fmt: skip
    # The node fails: the request waits again, its earlier wait kept, the chunks the client has kept too.
    board.waiting(job)
    clock.now += 1.0
    (doc,) = board.state(_nobody, 10).waiting
    assert (doc.node_id, doc.attempts, doc.waited_seconds, doc.streamed) == (None, 1, 3.0, 3)
    board.running(job, "gpu-2")
    job.relayed(2)
    (doc,) = board.state(_nobody, 10).running
    assert (doc.node_id, doc.attempts, doc.waited_seconds, doc.streamed, doc.sealed) == (
        "gpu-2",
        2,
        3.0,
        5,
        True,
    )
    board.remove(job)
    board.remove(job)  # a second end changes nothing
    assert len(board) == 0
    state = board.state(_nobody, 10)
    assert (state.waiting, state.running, state.users, state.max_queued) == ([], [], [], 10)


def test_lists_are_oldest_first() -> None:
    clock = Clock()
    board = JobBoard(clock)
    jobs = []
    for n in range(4):
        jobs.append(board.add(f"r{n}", f"tok_{n}", "g", "m", sealed=False, weight=1.0))
        clock.now += 1.0
    board.running(jobs[2], "gpu")  # started before an older one: still listed by age
    board.running(jobs[0], "gpu")
    state = board.state(_nobody, 10)
    assert [j.request_id for j in state.waiting] == ["r1", "r3"]
    assert [j.request_id for j in state.running] == ["r0", "r2"]


STANDINGS = {
    "tok_heavy": Standing(counter=500.0, weight=1.0, waiting=0, ahead=300.0),
    "tok_light": Standing(counter=200.0, weight=2.0, waiting=1, ahead=0.0),
    "tok_even": Standing(counter=200.0, weight=1.0, waiting=0, ahead=0.0),
}


@pytest.mark.parametrize(
    ("users", "expected"),
    [
        # the fewest tokens ahead is next in line
        (["tok_heavy", "tok_light"], ["tok_light", "tok_heavy"]),
        # a tie: one who waits goes before one who only runs
        (["tok_even", "tok_light"], ["tok_light", "tok_even"]),
        # a user the fair queue forgot (idle, at the floor) counts as next in line; then the older one
        (["tok_heavy", "tok_forgotten", "tok_even"], ["tok_forgotten", "tok_even", "tok_heavy"]),
    ],
)
def test_users_are_listed_next_in_line_first(users: list[str], expected: list[str]) -> None:
    clock = Clock()
    board = JobBoard(clock)
    for n, token_id in enumerate(users):
        job = board.add(f"r{n}", token_id, "g", "m", sealed=False, weight=1.5)
        clock.now += 1.0
        if STANDINGS.get(token_id, Standing(0.0, 1.5, 0, 0.0)).waiting == 0:
            board.running(job, "gpu")
    listed = board.state(STANDINGS.get, 10).users
    assert [u.token_id for u in listed] == expected
    weights = {u.token_id: u.weight for u in listed}
    # The fair queue's weight where it knows the user; the one their request was admitted with otherwise.
    assert all(weights[t] == (STANDINGS[t].weight if t in STANDINGS else 1.5) for t in users)


def test_a_user_with_several_requests_is_one_row() -> None:
    board = JobBoard(Clock())
    running = board.add("r0", "tok_a", "g", "m", sealed=False, weight=1.0)
    board.add("r1", "tok_a", "g", "m", sealed=False, weight=1.0)
    board.add("r2", "tok_a", "g", "m", sealed=True, weight=1.0)
    board.running(running, "gpu")
    (row,) = board.state(_nobody, 10).users
    assert (row.token_id, row.group, row.waiting, row.running, row.ahead_tokens) == ("tok_a", "g", 2, 1, 0.0)
