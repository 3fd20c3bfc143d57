"""The backend contract (tests/node/backend_contract.py) on the transformers reference backend, alone and
with three sequences taking turns, and the job runner driving it: what the exllamav2 backend passes on a GPU
(tests/gpu/test_exllamav2.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from node.backends.base import BatchBackend, SamplingParams, Sequential
from node.backends.transformers_backend import TransformersBackend
from node.runner import Delta, Job, JobRunner
from protocol.errors import Unavailable
from tests.node.backend_contract import CONTRACT, PROMPT


@pytest.fixture(scope="module")
def reference(demo_model_dir: Path) -> Iterator[TransformersBackend]:
    backend = TransformersBackend.load(demo_model_dir)
    yield backend
    backend.close()


@pytest.mark.parametrize("sequences", [1, 3])
@pytest.mark.parametrize("check", CONTRACT, ids=lambda c: c.__name__)
def test_the_reference_backend_meets_the_contract(
    reference: TransformersBackend, sequences: int, check: Callable[[BatchBackend], None]
) -> None:
    check(Sequential(reference, max_sequences=sequences))


async def _collect(
    runner: JobRunner, prompt: list[int], params: SamplingParams, stops: list[str]
) -> list[Delta]:
    job = runner.submit(prompt, params, stops)
    deltas: list[Delta] = []
    while not deltas or deltas[-1].finish_reason is None:
        deltas += await job.next_deltas()
    return deltas


@pytest.fixture
def own(demo_model_dir: Path) -> TransformersBackend:
    """A backend of the test's own: a runner that stops closes its backend."""
    return TransformersBackend.load(demo_model_dir)


async def test_the_runner_runs_jobs_side_by_side_and_ends_each_on_its_own_terms(
    own: TransformersBackend,
) -> None:
    reference = own
    runner = JobRunner(Sequential(reference, max_sequences=3), name="contract")
    runner.start()
    try:
        prompt = reference.encode(PROMPT, add_special_tokens=True)
        greedy = SamplingParams(max_new_tokens=24, temperature=0.0, ignore_eos=True)
        free = await _collect(runner, prompt, greedy, [])
        text = "".join(d.text for d in free)
        assert free[-1].finish_reason == "length" and free[-1].completion_tokens == 24
        stop = text[len(text) // 2 :][:3]
        assert stop.strip(), "the random model wrote whitespace only"
        # Three at once: a stop string cuts one, a short limit another, the third runs out its tokens.
        stopped, short, full = await asyncio.gather(
            _collect(runner, prompt, greedy, [stop]),
            _collect(runner, prompt, SamplingParams(max_new_tokens=5, temperature=0.0, ignore_eos=True), []),
            _collect(runner, prompt, greedy, []),
        )
        assert "".join(d.text for d in stopped) == text[: text.index(stop)]
        assert stopped[-1].finish_reason == "stop"
        assert short[-1].finish_reason == "length" and short[-1].completion_tokens == 5
        assert "".join(d.text for d in full) == text, "a job's answer does not depend on its neighbours"
        assert runner.started == 4 and runner.active == 0 and runner.queued == 0
    finally:
        await asyncio.to_thread(runner.stop)


async def test_cancel_all_and_stop_end_every_job_with_a_final_delta(own: TransformersBackend) -> None:
    reference = own
    runner = JobRunner(Sequential(reference, max_sequences=2), name="stopping")
    runner.start()
    prompt = reference.encode(PROMPT, add_special_tokens=True)
    long = SamplingParams(max_new_tokens=1500, temperature=0.0, ignore_eos=True)
    jobs = [runner.submit(prompt, long, []) for _ in range(5)]  # two run, three wait
    # Both running ones have begun (under load the second may be admitted a moment after the first).
    for job in jobs[:2]:
        assert (await job.next_deltas())[-1].finish_reason is None
    runner.cancel_all()
    ends = [await _last(job) for job in jobs]
    assert {d.finish_reason for d in ends} == {"cancelled"}
    assert runner.skipped == 3, "the waiting ones never touched the model"
    await asyncio.to_thread(runner.stop)
    assert own._model is None, "the stopped runner released the model"
    with pytest.raises(Unavailable, match="being unloaded"):
        runner.submit(prompt, long, [])


async def _last(job: Job) -> Delta:
    while True:
        deltas = await job.next_deltas()
        if deltas[-1].finish_reason is not None:
            return deltas[-1]


class BrokenDecoder(Sequential):
    """A backend whose detokenizer fails: a bug the runner does not guard against call by call."""

    def decode(self, ids: Sequence[int]) -> str:
        raise RuntimeError("broken on purpose")


async def test_a_failing_generation_loop_fails_every_job_and_takes_no_more(own: TransformersBackend) -> None:
    runner = JobRunner(BrokenDecoder(own), name="broken")
    runner.start()
    prompt = own.encode(PROMPT, add_special_tokens=True)
    params = SamplingParams(max_new_tokens=50, temperature=0.0, ignore_eos=True)
    jobs = [runner.submit(prompt, params, []) for _ in range(3)]  # one runs, two wait
    assert [(await _last(job)).finish_reason for job in jobs] == ["error"] * 3
    assert runner.closed and runner.load == 0
    with pytest.raises(Unavailable):
        runner.submit(prompt, params, [])
    await asyncio.to_thread(runner.stop)


def test_a_suspended_answer_leaves_its_thread_out_of_inference_mode(reference: TransformersBackend) -> None:
    import threading

    import torch

    prompt = reference.encode(PROMPT, add_special_tokens=True)
    params = SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True, presence_penalty=0.5)
    answers = [reference.generate(prompt, params, threading.Event()) for _ in range(2)]
    for answer in answers:  # interleaved on one thread, as Sequential runs them
        next(answer)
        assert not torch.is_inference_mode_enabled()
    answers[1].close()
    assert len(list(answers[0])) == 7
    assert not torch.is_inference_mode_enabled()
