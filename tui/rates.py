"""Live figures the console derives from what it is sent: tokens per second (cluster and per node), time to
first token and refusals per minute. Pure bookkeeping over a sliding window, no Textual and no I/O.

The scheduler's documents are snapshots; rates need history. Two sources feed the window:
- `finished` events carry each answer's completion tokens and time to first token;
- the queue's running jobs carry how many chunks were streamed so far, so a long answer counts while it
  streams, not only when it ends (its tokens at the end are then only the part not yet counted).
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Callable, Iterable

from protocol.admin import QueueState
from protocol.policy import AdminEvent

WINDOW_S = 10.0  # tokens per second: over the last ten seconds
REFUSAL_WINDOW_S = 60.0
FORGET_S = 60.0  # a job gone from the queue whose finished event never came (a dropped event)
MAX_SAMPLES = 50_000  # bounded memory, whatever the event rate


class Rates:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._tokens: deque[tuple[float, str, int]] = deque(maxlen=MAX_SAMPLES)  # (at, node, tokens)
        self._ttft: deque[tuple[float, float]] = deque(maxlen=MAX_SAMPLES)  # (at, milliseconds)
        self._refusals: deque[tuple[float, str]] = deque(maxlen=MAX_SAMPLES)  # (at, kind)
        # request id → (node, chunks counted so far, when last seen running): kept a while after the job
        # leaves the queue, until its finished event says how many tokens it had in all.
        self._streamed: dict[str, tuple[str, int, float]] = {}
        self._started = clock()

    def events(self, events: Iterable[AdminEvent], now: float | None = None) -> None:
        at = self._clock() if now is None else now
        for event in events:
            if event.kind == "finished":
                node = event.node_id or ""
                tokens = event.completion_tokens or 0
                # What the queue already counted while it streamed is not counted twice.
                counted = self._streamed.pop(event.request_id or "", (node, 0, at))[1]
                if tokens > counted:
                    self._tokens.append((at, node, tokens - counted))
                if event.ttft_ms is not None:
                    self._ttft.append((at, event.ttft_ms))
            elif event.kind == "refused":
                self._refusals.append((at, event.refusal or str(event.status or "refused")))

    def queue(self, queue: QueueState, now: float | None = None) -> None:
        at = self._clock() if now is None else now
        for job in queue.running:
            node = job.node_id or ""
            if job.request_id in self._streamed:
                before = self._streamed[job.request_id][1]
            else:  # first seen: what it streamed counts if it streamed it within the window
                before = 0 if job.age_seconds <= WINDOW_S else job.streamed
            if job.streamed > before:
                self._tokens.append((at, node, job.streamed - before))
            self._streamed[job.request_id] = (node, max(before, job.streamed), at)
        for request_id in [k for k, (_, _, seen) in self._streamed.items() if at - seen > FORGET_S]:
            del self._streamed[request_id]

    def tokens_per_s(self, node_id: str | None = None, now: float | None = None) -> float:
        at = self._clock() if now is None else now
        self._trim(at)
        total = sum(n for _, node, n in self._tokens if node_id is None or node == node_id)
        return total / min(WINDOW_S, max(at - self._started, 1.0))

    def per_node(self, now: float | None = None) -> dict[str, float]:
        """Every node's tokens per second at once (a node with none is absent)."""
        at = self._clock() if now is None else now
        self._trim(at)
        totals: dict[str, int] = {}
        for _, node, n in self._tokens:
            totals[node] = totals.get(node, 0) + n
        span = min(WINDOW_S, max(at - self._started, 1.0))
        return {node: n / span for node, n in totals.items()}

    def ttft_ms(self, now: float | None = None) -> float | None:
        """The median time to first token of the answers that finished in the window, or None."""
        at = self._clock() if now is None else now
        self._trim(at)
        values = sorted(ms for t, ms in self._ttft if at - t <= REFUSAL_WINDOW_S)
        return values[len(values) // 2] if values else None

    def refusals_per_min(self, now: float | None = None) -> dict[str, int]:
        at = self._clock() if now is None else now
        self._trim(at)
        return dict(Counter(kind for _, kind in self._refusals).most_common())

    def _trim(self, now: float) -> None:
        while self._tokens and now - self._tokens[0][0] > WINDOW_S:
            self._tokens.popleft()
        while self._ttft and now - self._ttft[0][0] > REFUSAL_WINDOW_S:
            self._ttft.popleft()
        while self._refusals and now - self._refusals[0][0] > REFUSAL_WINDOW_S:
            self._refusals.popleft()
