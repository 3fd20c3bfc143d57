"""A client that goes away cancels its job: the backend is free again within a fraction of a second."""

from __future__ import annotations

import contextlib
import time

import httpx

from tests.support import Stack

LONG = {
    "model": "hearth-demo",
    "messages": [{"role": "user", "content": "tell me everything"}],
    "max_tokens": 2000,
    "stream": True,
}


def _node_busy(stack: Stack) -> int:
    status = httpx.get(
        stack.node_url + "/status", headers={"Authorization": f"Bearer {stack.node_secret}"}
    ).json()
    return sum(m["active"] + m["queued"] for m in status["models"])


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
    while _node_busy(stack) and time.monotonic() - closed < 5:
        time.sleep(0.01)
    freed_after = time.monotonic() - closed
    assert _node_busy(stack) == 0
    assert freed_after < 0.5, f"backend still busy {freed_after:.3f} s after the client left"
    # And the next request is served at once.
    r = httpx.post(
        stack.api + "/chat/completions", json={**LONG, "stream": False, "max_tokens": 4}, headers=headers
    )
    assert r.status_code == 200


def test_queued_job_of_a_departed_client_never_runs(stack: Stack) -> None:
    headers = {"Authorization": f"Bearer {stack.token}"}
    with (
        httpx.Client(timeout=30) as first,
        httpx.Client(timeout=30) as second,
        first.stream("POST", stack.api + "/chat/completions", json=LONG, headers=headers) as r1,
    ):
        next(r1.iter_lines())
        # The second request waits behind the first; give up on it after a moment.
        with contextlib.suppress(httpx.ReadTimeout):
            second.post(stack.api + "/chat/completions", json=LONG, headers=headers, timeout=0.3)
    deadline = time.monotonic() + 5
    while _node_busy(stack) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _node_busy(stack) == 0
