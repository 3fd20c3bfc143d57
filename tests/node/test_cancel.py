"""A client that goes away cancels its job: the backend is free again within a fraction of a second."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator, Sequence

import httpx
import pytest

from node.backends.base import SamplingParams
from node.settings import ModelSettings
from scheduler.state import ADMISSION
from tests.support import LoopThread, Stack, WrappedBackend, start_stack, stop_stack


class Paced(WrappedBackend):
    """The real demo backend, slowed to 5 ms a token so a job outlives the test's moves.

    The demo model writes 2,000 tokens in well under a second, faster than a client can give up on it.
    """

    def generate(
        self, prompt_ids: Sequence[int], params: SamplingParams, cancelled: threading.Event
    ) -> Iterator[int]:
        for token in super().generate(prompt_ids, params, cancelled):
            time.sleep(0.005)
            yield token


@pytest.fixture(scope="module")
def stack(
    servers: LoopThread, demo_model: ModelSettings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    s = servers.call(start_stack(tmp_path_factory.mktemp("paced"), [demo_model], loader=Paced.loader()))
    yield s
    servers.call(stop_stack(s))


LONG = {
    "model": "hearth-demo",
    "messages": [{"role": "user", "content": "tell me everything"}],
    "max_tokens": 2000,
    "ignore_eos": True,  # the random demo model may end early; these jobs must run ~10 s
    "stream": True,
}


def _model_status(stack: Stack) -> dict[str, int]:
    status = httpx.get(stack.node_url + "/status", headers=stack.node_headers("GET", "/status")).json()
    return status["models"][0]  # type: ignore[no-any-return]


def _node_busy(stack: Stack) -> int:
    model = _model_status(stack)
    return model["active"] + model["queued"]


def _wait_idle(stack: Stack, since: float, limit: float = 5.0) -> float:
    while _node_busy(stack) and time.monotonic() - since < limit:
        time.sleep(0.005)
    assert _node_busy(stack) == 0
    return time.monotonic() - since


def test_disconnect_mid_stream_frees_the_backend(stack: Stack) -> None:
    headers = {"Authorization": f"Bearer {stack.token}"}
    with httpx.Client(timeout=30) as client:
        with client.stream("POST", stack.api + "/chat/completions", json=LONG, headers=headers) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            seen = [next(lines) for _ in range(6)]
            assert any(line.startswith("data: ") for line in seen)
            assert _node_busy(stack) == 1
        closed = time.monotonic()
    freed_after = _wait_idle(stack, closed)
    assert freed_after < 0.5, f"backend still busy {freed_after:.3f} s after the client left"
    # And the next request is served at once.
    r = httpx.post(
        stack.api + "/chat/completions", json={**LONG, "stream": False, "max_tokens": 4}, headers=headers
    )
    assert r.status_code == 200, r.text


def test_abandoned_non_streaming_requests_free_the_backend(stack: Stack) -> None:
    """Non-streaming answers write nothing until the end, so only cancellation can stop them early."""
    headers = {"Authorization": f"Bearer {stack.token}"}
    for _ in range(5):
        with contextlib.suppress(httpx.ReadTimeout):
            httpx.post(
                stack.api + "/chat/completions", json={**LONG, "stream": False}, headers=headers, timeout=0.4
            )
        gave_up = time.monotonic()
        assert _wait_idle(stack, gave_up) < 0.5


def test_queued_job_of_a_departed_client_never_runs(stack: Stack) -> None:
    headers = {"Authorization": f"Bearer {stack.token}"}
    before = _model_status(stack)
    with (
        httpx.Client(timeout=30) as first,
        httpx.Client(timeout=30) as second,
        first.stream("POST", stack.api + "/chat/completions", json=LONG, headers=headers) as r1,
    ):
        lines = r1.iter_lines()  # keep the iterator: dropping it closes the response
        next(lines)
        # The second request waits behind the first in the scheduler's fair queue (the node runs one
        # sequence at a time, so it is sent nothing more); give up on it after a moment.
        with contextlib.suppress(httpx.ReadTimeout):
            second.post(stack.api + "/chat/completions", json=LONG, headers=headers, timeout=0.3)
        time.sleep(0.5)  # let the second client's departure reach the scheduler while the first job runs
    _wait_idle(stack, time.monotonic())
    after = _model_status(stack)
    assert after["started"] - before["started"] == 1, "only the first job touched the model"
    assert after["skipped"] - before["skipped"] == 0, "the second never reached the node"
    assert stack.scheduler_app is not None
    assert stack.scheduler_app[ADMISSION].queued == 0, "and it left the scheduler's queue"
