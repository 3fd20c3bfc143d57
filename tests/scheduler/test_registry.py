"""The registry: a cached snapshot that changes exactly when a node or the scheduler's own work does."""

from __future__ import annotations

from scheduler.registry import Registry
from tests.scheduler.test_admission import COLD, READY, record, status


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def registry(clock: Clock) -> Registry:
    r = Registry(node_timeout=6, load_timeout=30, clock=clock)
    r.approve(record("n1"))
    r.approve(record("n2"))
    r.heartbeat("n1", status("n1", READY))
    r.heartbeat("n2", status("n2", COLD))
    return r


def test_the_snapshot_is_reused_until_something_changes() -> None:
    clock = Clock()
    r = registry(clock)
    first = r.snapshot()
    assert r.snapshot() is first
    ticket = r.begin("n1", "m", 30, 20)
    second = r.snapshot()
    assert second is not first
    assert second.nodes[1] is first.nodes[1], "an unchanged node's state is reused"
    model = second.nodes[0].model("m")
    assert model is not None and (model.active, model.reserved_tokens, model.outstanding_tokens) == (
        1,
        30,
        20,
    )
    r.end(ticket)
    model = r.snapshot().nodes[0].model("m")
    assert model is not None and (model.active, model.reserved_tokens) == (0, 0)


def test_a_silent_node_turns_unhealthy_by_the_clock_and_back_with_a_heartbeat() -> None:
    clock = Clock()
    r = registry(clock)
    assert all(n.healthy for n in r.snapshot().nodes)
    clock.now += 5.9
    assert all(n.healthy for n in r.snapshot().nodes)
    clock.now += 0.2
    assert not any(n.healthy for n in r.snapshot().nodes)
    r.heartbeat("n1", status("n1", READY))
    assert [n.healthy for n in r.snapshot().nodes] == [True, False]


def test_a_failed_relay_takes_a_node_out_until_its_next_heartbeat() -> None:
    clock = Clock()
    r = registry(clock)
    r.mark_failed("n1")
    assert not r.snapshot().nodes[0].healthy
    r.heartbeat("n1", status("n1", READY))
    assert r.snapshot().nodes[0].healthy


def test_a_requested_load_shows_as_loading_once_and_fails_after_the_load_timeout() -> None:
    clock = Clock()
    r = registry(clock)
    assert r.start_load("n2", "m") is True
    assert r.start_load("n2", "m") is False, "one load per model"
    model = r.snapshot().nodes[1].model("m")
    assert model is not None and model.phase == "loading"
    clock.now += 31
    r.heartbeat("n2", status("n2", COLD))  # still not loaded after the timeout
    model = r.snapshot().nodes[1].model("m")
    assert model is not None and model.phase == "failed"


def test_revoked_nodes_leave_the_snapshot() -> None:
    r = registry(Clock())
    r.remove("n1")
    assert [n.node_id for n in r.snapshot().nodes] == ["n2"]
