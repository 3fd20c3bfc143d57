"""Benchmark: what the node's job runner costs per token, with a backend that costs nothing.

The runner (node/runner.py) sits between every backend and the event loop: it admits jobs, steps the backend,
decodes tokens into text, checks stop strings and posts each delta to the loop. Its cost per token is what a
GPU node adds to exllamav2's own per-token time (a few milliseconds for a 7–8B model at batch 1), so it must
stay in microseconds. Jobs of ``--tokens`` tokens run through a ``JobRunner`` over a backend that yields a
token as soon as asked, 1 and 4 at a time (``Sequential``), and the event loop takes every delta as a request
handler would.

    .venv/bin/python -m tests.bench.bench_runner
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import threading
import time
from collections.abc import Iterator, Sequence

from node.backends.base import SamplingParams, Sequential
from node.runner import JobRunner


class Instant:
    """A backend whose every token is ready at once: what is left is the runner's own cost."""

    context_length = 1 << 30
    chat_template = None
    bos_token = eos_token = ""

    def encode(self, text: str, *, add_special_tokens: bool) -> list[int]:
        return [1] * len(text)

    def decode(self, ids: Sequence[int]) -> str:
        return "x" * len(ids)

    def generate(
        self, prompt_ids: Sequence[int], params: SamplingParams, cancelled: threading.Event
    ) -> Iterator[int]:
        for _ in range(params.max_new_tokens):
            if cancelled.is_set():
                return
            yield 7

    def close(self) -> None:
        pass


async def _run(sequences: int, jobs: int, tokens: int) -> float:
    """Microseconds per token, wall clock, for ``jobs`` jobs at once."""
    runner = JobRunner(Sequential(Instant(), max_sequences=sequences), max_queued=jobs)
    runner.start()

    async def one() -> None:
        job = runner.submit([1, 2, 3], SamplingParams(max_new_tokens=tokens), ["never appears"])
        while (await job.next_deltas())[-1].finish_reason is None:
            pass

    start = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(jobs)))
    elapsed = time.perf_counter() - start
    await asyncio.to_thread(runner.stop)
    return elapsed / (jobs * tokens) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=20_000, help="tokens per job")
    parser.add_argument("--repeats", type=int, default=5)
    opts = parser.parse_args()
    print("| sequences at once | jobs | µs per token (median of runs) | min | max |")
    print("|---|---|---|---|---|")
    for sequences, jobs in ((1, 1), (1, 4), (4, 4)):
        runs = [asyncio.run(_run(sequences, jobs, opts.tokens)) for _ in range(opts.repeats)]
        print(f"| {sequences} | {jobs} | {statistics.median(runs):.1f} | {min(runs):.1f} | {max(runs):.1f} |")


if __name__ == "__main__":
    main()
