"""The job runner: one generation thread per loaded model, running every admitted job at once.

The backend's loop never runs on the event loop. The thread admits waiting jobs while the backend's cache
has room (first come, first served), advances every running one by a step, turns token ids into text deltas
(incremental decoding, stop sequences) and hands them to the loop with ``call_soon_threadsafe``; a request
handler reads them from its job's asyncio queue. A job whose client went away is cancelled before the next
step, which frees its cache pages at once.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from node.backends.base import (
    Backend,
    BatchBackend,
    CacheScope,
    NeverFits,
    SamplingParams,
    Scores,
    Sequential,
)
from node.constrain import token_bytes
from node.textstream import IncrementalDecoder, StopMatcher
from protocol.errors import Unavailable
from protocol.web import log_unexpected

log = logging.getLogger("hearth.node.runner")

FinishReason = Literal["stop", "length", "cancelled", "error"]


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """A token as text, its log probability (None: the prompt's first) and the most likely ones there."""

    token: str
    logprob: float | None
    top: tuple[tuple[str, float], ...] = ()
    # The tokens' own bytes, where the tokenizer says them (a token that is part of a character decodes to
    # U+FFFD alone; its bytes let a client join it with the next): ``raw`` the token's, ``top_raw`` those
    # of ``top``, in order.
    raw: bytes | None = None
    top_raw: tuple[bytes, ...] | None = None


@dataclass(frozen=True, slots=True)
class Delta:
    """Text produced since the last event; ``finish_reason`` is set on the last one. With logprobs, the
    tokens consumed since the last event (``logprobs``), and once, first, the prompt's (``prompt``: echo)."""

    text: str
    completion_tokens: int
    finish_reason: FinishReason | None = None
    logprobs: tuple[TokenLogprob, ...] = ()
    prompt: tuple[TokenLogprob, ...] | None = None


class Job:
    def __init__(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        stops: Sequence[str],
        loop: asyncio.AbstractEventLoop,
        scope: CacheScope | None = None,
        notify: asyncio.Event | None = None,
    ) -> None:
        self.prompt_ids = list(prompt_ids)
        self.notify = notify  # set at each delta (several jobs read as one answer: node.choices)
        self.params = params
        self.stops = tuple(stops)
        self.scope = scope or CacheScope.private()
        self.cancelled = threading.Event()
        self._loop = loop
        self._events: asyncio.Queue[Delta] = asyncio.Queue()

    def cancel(self) -> None:
        self.cancelled.set()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def deliver(self, delta: Delta) -> None:
        """On the event loop: a delta for the handler reading this job."""
        self._events.put_nowait(delta)
        if self.notify is not None:
            self.notify.set()

    def ready(self) -> list[Delta]:
        """The deltas waiting now (none: an empty list)."""
        deltas = []
        while not self._events.empty():
            deltas.append(self._events.get_nowait())
        return deltas

    async def next_deltas(self) -> list[Delta]:
        """Wait for at least one delta, then take every one already waiting (one write for a burst)."""
        deltas = [await self._events.get()]
        while not self._events.empty():
            deltas.append(self._events.get_nowait())
        return deltas


class _Wake:
    """Put in the inbox to wake the runner thread (cancel_all)."""


_WAKE = _Wake()


def _deliver(out: list[tuple[Job, Delta]]) -> None:
    for job, delta in out:
        job.deliver(delta)


@dataclass(slots=True)
class _Running:
    job: Job
    decoder: IncrementalDecoder
    stopper: StopMatcher
    produced: int = 0


def as_batch(backend: Backend | BatchBackend) -> BatchBackend:
    return backend if isinstance(backend, BatchBackend) else Sequential(backend)


class JobRunner:
    def __init__(self, backend: Backend | BatchBackend, *, max_queued: int = 64, name: str = "model") -> None:
        self.backend = as_batch(backend)
        self._max_queued = max_queued
        self._inbox: queue.Queue[Job | _Wake | None] = queue.Queue()
        self._thread = threading.Thread(target=self._work, name=f"hearth-gen-{name}", daemon=True)
        self._waiting: collections.deque[Job] = collections.deque()  # taken from the inbox, not admitted
        self._running: dict[int, _Running] = {}
        self._queued = 0
        self._active = 0
        self._lock = threading.Lock()
        self._stopping = False  # the runner thread saw the end of its inbox
        self._closed = False  # stop() was called (or the loop failed): no new jobs
        self._outbox: list[tuple[Job, Delta]] = []  # deltas of this iteration, handed over together
        self.started = 0
        self.skipped = 0
        self._raw: Callable[[int], bytes] | Literal[False] | None = False  # not looked up yet

    @property
    def queued(self) -> int:
        return self._queued

    @property
    def active(self) -> int:
        return self._active

    @property
    def load(self) -> int:
        """Jobs running or waiting, read together (a job moving from one to the other counts once)."""
        with self._lock:
            return self._active + self._queued

    @property
    def closed(self) -> bool:
        return self._closed

    def start(self) -> None:
        self._thread.start()

    def cancel_all(self) -> None:
        """Cancel every job submitted so far, running or waiting (the node yields its GPU to the owner).
        The runner thread applies it when it reads the marker this puts in the inbox: every job submitted
        before is in its queues by then."""
        self._inbox.put_nowait(_WAKE)

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel everything, end the thread, which releases the model (blocking: call it off the loop)."""
        with self._lock:  # after this, no job can follow the end marker into the inbox
            self._closed = True
            self.cancel_all()
            self._inbox.put(None)
        if not self._thread.is_alive() and self._thread.ident is None:
            self.backend.close()  # never started: nothing else will
            return
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning(
                "the generation thread is still in a step after %.0f s; it frees the model when done", timeout
            )

    def submit(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        stops: Sequence[str],
        scope: CacheScope | None = None,
        notify: asyncio.Event | None = None,
    ) -> Job:
        with self._lock:
            if self._closed:
                raise Unavailable("this model is being unloaded; try again shortly", retry_after=5)
            if self._queued >= self._max_queued:
                raise Unavailable("this node's queue is full; try again shortly", retry_after=2)
            self._queued += 1
            job = Job(prompt_ids, params, stops, asyncio.get_running_loop(), scope, notify)
            self._inbox.put(job)
        return job

    def _work(self) -> None:
        ending: FinishReason = "cancelled"
        try:
            while not self._stopping:
                self._take(block=not self._running and not self._waiting)
                if self._stopping:
                    break
                self._admit()
                self._reap()
                if self._running:
                    self._step()
                self._flush()
        except (
            Exception
        ) as exc:  # a bug outside the backend's own guarded calls: fail every job, take no more
            log_unexpected("the generation loop", exc)
            ending = "error"
        finally:
            with self._lock:
                self._closed = True
            for seq in list(self._running):
                self._end(seq, ending)
            while self._waiting:
                self._post(self._dequeue(), Delta("", 0, ending))
            while not self._inbox.empty():  # only after a failure: stop() leaves nothing behind its marker
                job = self._inbox.get_nowait()
                if isinstance(job, Job):
                    with self._lock:
                        self._queued -= 1
                    self._post(job, Delta("", 0, ending))
            self._flush()
            try:
                self.backend.close()
            except Exception as exc:
                log_unexpected("unloading a model", exc)

    def _post(self, job: Job, delta: Delta) -> None:
        self._outbox.append((job, delta))

    def _flush(self) -> None:
        """Hand this iteration's deltas to the event loop in one wake-up (not one per job)."""
        if not self._outbox:
            return
        out, self._outbox = self._outbox, []
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Job, Delta]]] = {}
        for item in out:
            by_loop.setdefault(item[0].loop, []).append(item)
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # the loop is closed: the node is shutting down
                for job, _ in items:
                    job.cancel()

    def _take(self, *, block: bool) -> None:
        if not block and self._inbox.empty():
            return  # the usual case between two steps: no exception to raise and catch
        try:
            job = self._inbox.get(block=block)
            while True:
                if job is None:
                    self._stopping = True
                    return
                if isinstance(job, _Wake):
                    # cancel_all(): the jobs submitted before it are all in the queues now.
                    for waiting in [*self._waiting, *(run.job for run in self._running.values())]:
                        waiting.cancel()
                else:
                    self._waiting.append(job)
                job = self._inbox.get_nowait()
        except queue.Empty:
            pass

    def _admit(self) -> None:
        """Start waiting jobs in order while the backend has room (a job that must wait holds the rest
        back, so a long prompt is not passed over for ever by short ones)."""
        while self._waiting:
            job = self._waiting[0]
            if job.cancelled.is_set():
                self._dequeue()
                self.skipped += 1  # its client left while it waited: it never touches the model
                self._post(job, Delta("", 0, "cancelled"))
                continue
            failed = False
            try:
                seq = self.backend.admit(job.prompt_ids, job.params, job.scope)
            except NeverFits as exc:  # the node sizes each job to the context first: a sizing bug
                log.error("a job can never fit this model's cache: %s", exc)
                seq, failed = None, True
            except Exception as exc:
                log_unexpected("starting a job", exc)
                seq, failed = None, True
            if seq is None and not failed and self._running:
                return  # it waits for running jobs to end
            if seq is None:
                self._dequeue()  # it failed, or an idle cache has no room for it: it would wait for ever
                self._post(job, Delta("", 0, "error"))
                continue
            run = _Running(job, IncrementalDecoder(self.backend.decode), StopMatcher(job.stops))
            with self._lock:  # one move, so load (active + queued) never dips between the two
                self._waiting.popleft()
                self._queued -= 1
                self._running[seq] = run
                self._active = len(self._running)
            self.started += 1

    def _dequeue(self) -> Job:
        with self._lock:
            self._queued -= 1
            return self._waiting.popleft()

    def _reap(self) -> None:
        for seq, run in list(self._running.items()):
            if run.job.cancelled.is_set():
                self._end(seq, "cancelled")

    def _step(self) -> None:
        try:
            steps = self.backend.step()
        except Exception as exc:
            log_unexpected("generation", exc)
            for seq in list(self._running):
                self._end(seq, "error")
            return
        for step in steps:
            run = self._running.get(step.seq)
            if run is None:
                continue
            prompt = None if step.prompt_scores is None else self._named_prompt(run.job, step.prompt_scores)
            scored = tuple(self._named(t, s) for t, s in zip(step.tokens, step.scores, strict=False))
            parts: list[str] = []
            for i, token in enumerate(step.tokens):
                run.produced += 1
                text, stopped = run.stopper.push(run.decoder.push(token))
                parts.append(text)
                if stopped:
                    self._end(step.seq, "stop", "".join(parts), scored[: i + 1], prompt)
                    break
            else:
                if step.finish is not None:
                    text, stopped = run.stopper.push(run.decoder.flush())
                    parts.append(text if stopped else text + run.stopper.flush())
                    self._forget(step.seq)
                    reason = "stop" if stopped else step.finish
                    self._post(run.job, Delta("".join(parts), run.produced, reason, scored, prompt))
                elif any(parts) or scored or prompt is not None:
                    self._post(run.job, Delta("".join(parts), run.produced, None, scored, prompt))

    def _named(self, token: int, scores: Scores) -> TokenLogprob:
        """Scores with tokens as text (each decoded alone, as OpenAI and vLLM show them), and their bytes."""
        decode = self.backend.decode
        raw = self._token_bytes()
        return TokenLogprob(
            decode([token]), scores.logprob, tuple((decode([t]), v) for t, v in scores.top),
            raw=None if raw is None else raw(token),
            top_raw=None if raw is None else tuple(raw(t) for t, _ in scores.top),
        )  # fmt: skip

    def _token_bytes(self) -> Callable[[int], bytes] | None:
        if self._raw is False:
            self._raw = token_bytes(self.backend)  # once, on the first logprobs this model returns
        return self._raw

    def _named_prompt(self, job: Job, scores: list[Scores]) -> tuple[TokenLogprob, ...]:
        raw = self._token_bytes()
        first_id = job.prompt_ids[:1]
        first = TokenLogprob(
            self.backend.decode(first_id), None, raw=None if raw is None or not first_id else raw(first_id[0])
        )
        return (first, *(self._named(t, s) for t, s in zip(job.prompt_ids[1:], scores, strict=False)))

    def _end(
        self, seq: int, reason: FinishReason, text: str = "", scored: tuple[TokenLogprob, ...] = (),
        prompt: tuple[TokenLogprob, ...] | None = None,
    ) -> None:  # fmt: skip
        """End a sequence the backend is still running (cancelled, stopped by a stop string, failed)."""
        run = self._forget(seq)
        try:
            self.backend.cancel(seq)
        except Exception as exc:
            log_unexpected("cancelling a job", exc)
        self._post(run.job, Delta(text, run.produced, reason, scored, prompt))

    def _forget(self, seq: int) -> _Running:
        with self._lock:
            run = self._running.pop(seq)
            self._active = len(self._running)
        return run
