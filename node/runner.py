"""The job runner: one generation thread per loaded model, fed from a bounded queue.

The backend's loop never runs on the event loop. The thread turns token ids into text deltas (incremental
decoding, stop sequences) and hands them to the loop with ``call_soon_threadsafe``; a request handler reads
them from its job's asyncio queue. Cancelling a job (the client went away) sets an event the backend checks
before every step, so the backend is free again within one decoding step.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from node.backends.base import Backend, SamplingParams
from node.textstream import IncrementalDecoder, StopMatcher
from protocol.errors import Unavailable
from protocol.web import log_unexpected

log = logging.getLogger("hearth.node.runner")

FinishReason = Literal["stop", "length", "cancelled", "error"]


@dataclass(frozen=True, slots=True)
class Delta:
    """Text produced since the last event; ``finish_reason`` is set on the last one."""

    text: str
    completion_tokens: int
    finish_reason: FinishReason | None = None


class Job:
    def __init__(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        stops: Sequence[str],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.stops = tuple(stops)
        self.cancelled = threading.Event()
        self._loop = loop
        self._events: asyncio.Queue[Delta] = asyncio.Queue()

    def cancel(self) -> None:
        self.cancelled.set()

    def post(self, delta: Delta) -> None:
        """Called from the generation thread."""
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, delta)
        except RuntimeError:  # the loop is closed: the node is shutting down
            self.cancelled.set()

    async def next_deltas(self) -> list[Delta]:
        """Wait for at least one delta, then take every one already waiting (one write for a burst)."""
        deltas = [await self._events.get()]
        while not self._events.empty():
            deltas.append(self._events.get_nowait())
        return deltas


class JobRunner:
    def __init__(self, backend: Backend, *, max_queued: int = 64, name: str = "model") -> None:
        self.backend = backend
        self._max_queued = max_queued
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._work, name=f"hearth-gen-{name}", daemon=True)
        self._current: Job | None = None
        self._queued = 0
        self._lock = threading.Lock()
        self.started = 0
        self.skipped = 0

    @property
    def queued(self) -> int:
        return self._queued

    @property
    def active(self) -> int:
        return 1 if self._current is not None else 0

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel everything and join the thread (blocking: call it off the loop)."""
        with self._lock:
            if self._current is not None:
                self._current.cancel()
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.cancel()
        self._queue.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout)
        self.backend.close()

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams, stops: Sequence[str]) -> Job:
        with self._lock:
            if self._queued >= self._max_queued:
                raise Unavailable("this node's queue is full; try again shortly", retry_after=2)
            self._queued += 1
        job = Job(prompt_ids, params, stops, asyncio.get_running_loop())
        self._queue.put(job)
        return job

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            with self._lock:
                self._queued -= 1
                self._current = job
            try:
                if job.cancelled.is_set():
                    self.skipped += 1  # its client left while it waited: it never touches the model
                    job.post(Delta("", 0, "cancelled"))
                else:
                    self.started += 1
                    self._run(job)
            except Exception as exc:
                log_unexpected("generation", exc)
                job.post(Delta("", 0, "error"))
            finally:
                with self._lock:
                    self._current = None

    def _run(self, job: Job) -> None:
        decoder = IncrementalDecoder(self.backend.decode)
        stopper = StopMatcher(job.stops)
        produced = 0
        finish: FinishReason = "stop"
        for token in self.backend.generate(job.prompt_ids, job.params, job.cancelled):
            produced += 1
            text, stopped = stopper.push(decoder.push(token))
            if stopped:
                job.post(Delta(text, produced, "stop"))
                return
            if text:
                job.post(Delta(text, produced))
        if job.cancelled.is_set():
            job.post(Delta("", produced, "cancelled"))
            return
        if produced >= job.params.max_new_tokens:
            finish = "length"
        text, stopped = stopper.push(decoder.flush())
        tail = text if stopped else text + stopper.flush()
        job.post(Delta(tail, produced, "stop" if stopped else finish))
