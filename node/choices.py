"""Several jobs read as one answer: the choices of a request with n > 1 or several prompts.

Each choice is a job of its own in the runner (so they batch like any others, and each may end on its
own); the handler waits on one event that any of them sets, and takes what each has ready, in index
order. ``Batch`` offers what the handler needs of a single job, for every job at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

from node.backends.base import CacheScope
from node.prepare import Prepared
from node.runner import Delta, Job, JobRunner
from protocol.schemas import ChatCompletionRequest, CompletionRequest


class Batch:
    def __init__(self, jobs: list[Job], notify: asyncio.Event) -> None:
        self.jobs = jobs
        self._notify = notify
        self.produced = [0] * len(jobs)  # completion tokens of each choice so far

    @classmethod
    def submit(
        cls,
        runner: JobRunner,
        prepared: Sequence[Prepared],
        stops: Sequence[str],
        scope: CacheScope | None,
    ) -> Batch:
        """A job per choice, all or none (a full queue refuses the request whole)."""
        notify = asyncio.Event()
        jobs: list[Job] = []
        try:
            for p in prepared:
                jobs.append(runner.submit(p.prompt_ids, p.params, stops, scope, notify))
        except BaseException:
            for job in jobs:
                job.cancel()
            raise
        return cls(jobs, notify)

    @property
    def completion(self) -> int:
        return sum(self.produced)

    def _ready(self) -> list[tuple[int, Delta]]:
        out = [(i, delta) for i, job in enumerate(self.jobs) for delta in job.ready()]
        for i, delta in out:
            self.produced[i] = delta.completion_tokens
        return out

    async def next_deltas(self) -> list[tuple[int, Delta]]:
        """Wait for at least one delta of any choice, then take every one ready (index, delta)."""
        while True:
            self._notify.clear()
            out = self._ready()  # after the clear: a delta landing now sets it again
            if out:
                return out
            await self._notify.wait()

    def cancel(self) -> None:
        for job in self.jobs:
            job.cancel()


def echoes(
    req: ChatCompletionRequest | CompletionRequest,
    prepared: Sequence[Prepared],
    decode: Callable[[Sequence[int]], str],
) -> list[str] | None:
    """The text each choice echoes first (completions' echo): its prompt as sent, or token ids decoded."""
    if not isinstance(req, CompletionRequest) or not req.echo:
        return None
    prompts = req.prompts()
    out: list[str] = []
    for index, p in enumerate(prepared):
        prompt = prompts[index // req.n]
        out.append(prompt if isinstance(prompt, str) else decode(p.prompt_ids))
    return out
