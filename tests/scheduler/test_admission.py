"""The admission queue: fairness between users, one cold load for many waiters, and every way out of the
queue (placed, refused, timed out, queue full, client gone). A real Registry and the real placement run
under it; only the heartbeats are written by hand."""

from __future__ import annotations

import asyncio

import pytest

from protocol.errors import ContextLengthExceeded, ModelNotFound, Unavailable
from protocol.federation import ModelStatus, NodeStatus
from scheduler.admission import Admission
from scheduler.placement import PlacementRequest
from scheduler.registry import Registry, Ticket
from scheduler.store import NodeRecord

KEY = "A" * 43


def record(node_id: str) -> NodeRecord:
    return NodeRecord(node_id, "approved", "code", "club", KEY, KEY, node_id.ljust(20, "0"), None, None,
                      False, 0.0, 0.0)  # fmt: skip


def status(node_id: str, *models: ModelStatus) -> NodeStatus:
    return NodeStatus(
        node_id=node_id, version="t", url="http://127.0.0.1:9", tier="club",
        memory_total_bytes=1000, memory_free_bytes=1000, models=list(models),
    )  # fmt: skip


READY = ModelStatus(id="m", phase="ready", context_length=2048, footprint_bytes=100, cache_tokens=2048)
COLD = ModelStatus(id="m", phase="available", context_length=2048, footprint_bytes=100)


class Harness:
    def __init__(self, max_wait: float = 5.0, max_queued: int = 100) -> None:
        self.loads: list[tuple[str, str, tuple[str, ...]]] = []
        self.registry = Registry(node_timeout=60, load_timeout=60)
        self.admission = Admission(
            self.registry, max_wait=max_wait, max_queued=max_queued, retry_after=1,
            start_load=lambda n, m, e: self.loads.append((n, m, e)),
        )  # fmt: skip
        self.registry.on_change = self.admission.wake

    def node(self, node_id: str, *models: ModelStatus) -> None:
        self.registry.approve(record(node_id))
        self.registry.heartbeat(node_id, status(node_id, *models))


def req(max_tokens: int = 10, model: str = "m") -> PlacementRequest:
    return PlacementRequest(model, max_tokens, prompt_tokens=5)


async def test_a_light_user_is_served_before_a_heavy_users_backlog() -> None:
    h = Harness()
    h.node("n1", READY)
    running = await h.admission.acquire("heavy", req())  # the node runs one sequence: it is now full
    order: list[str] = []

    async def ask(user: str) -> None:
        ticket = await h.admission.acquire(user, req(100))
        order.append(user)
        await asyncio.sleep(0)
        h.admission.release(ticket, 5, 100)

    heavy = [asyncio.create_task(ask("heavy")) for _ in range(5)]
    await asyncio.sleep(0)
    light = asyncio.create_task(ask("light"))
    await asyncio.sleep(0)
    assert h.admission.queued == 6
    h.admission.release(running, 5, 10)
    await asyncio.gather(*heavy, light)
    # In arrival order light would be sixth; by tokens it is at most second.
    assert order.index("light") <= 1, order


async def test_many_requests_for_a_cold_model_make_one_load() -> None:
    h = Harness()
    h.node("n1", COLD)
    waiters = [asyncio.create_task(h.admission.acquire("u", req())) for _ in range(4)]
    await asyncio.sleep(0.01)
    assert h.loads == [("n1", "m", ())]
    assert not any(w.done() for w in waiters)
    h.registry.heartbeat("n1", status("n1", READY))  # the load finished
    first = await asyncio.wait_for(asyncio.shield(waiters[0]), 1)
    assert first.node_id == "n1"
    for w in waiters:
        w.cancel()
    await asyncio.gather(*waiters, return_exceptions=True)


async def test_waiting_too_long_is_503_naming_why() -> None:
    h = Harness(max_wait=0.2)
    h.node("n1", READY)
    held = await h.admission.acquire("a", req())
    with pytest.raises(Unavailable, match=r"within 0 s: m on n1 runs 1 of 1 sequences") as info:
        await h.admission.acquire("b", req())
    assert info.value.retry_after == 1 and info.value.code == "queue_timeout"
    assert h.admission.queued == 0
    h.admission.release(held, 5, 10)


async def test_a_full_queue_refuses_at_once() -> None:
    h = Harness(max_queued=1)
    h.node("n1", READY)
    held = await h.admission.acquire("a", req())
    waiting = asyncio.create_task(h.admission.acquire("b", req()))
    await asyncio.sleep(0)
    with pytest.raises(Unavailable) as info:
        await h.admission.acquire("c", req())
    assert info.value.code == "queue_full"
    h.admission.release(held, 5, 10)
    h.admission.release(await waiting, 5, 10)


@pytest.mark.parametrize(
    ("request_", "error"),
    [
        (req(model="other"), ModelNotFound),  # nobody serves it: 404
        (req(max_tokens=4096), ContextLengthExceeded),  # can never fit the context: 400
    ],
)
async def test_requests_that_can_never_run_are_refused_at_once(
    request_: PlacementRequest, error: type[Exception]
) -> None:
    h = Harness()
    h.node("n1", READY)
    with pytest.raises(error):
        await h.admission.acquire("u", request_)


async def test_a_client_that_leaves_the_queue_takes_nothing_with_it() -> None:
    h = Harness()
    h.node("n1", READY)
    held = await h.admission.acquire("a", req())
    gone = asyncio.create_task(h.admission.acquire("b", req()))
    await asyncio.sleep(0)
    gone.cancel()
    await asyncio.gather(gone, return_exceptions=True)
    assert h.admission.queued == 0
    h.admission.release(held, 5, 10)
    ticket: Ticket = await h.admission.acquire("c", req())
    assert ticket.node_id == "n1"
    assert h.registry.snapshot().nodes[0].models[0].active == 1
    h.admission.release(ticket, 5, 10)
    assert h.registry.snapshot().nodes[0].models[0].active == 0
