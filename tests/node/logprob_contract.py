"""Log probabilities, prompt scoring (echo) and logit bias: what every backend must do with them.

tests/node/test_logprob_contract.py puts the transformers backend and the exllamav2 backend (on its CPU
stand-ins) through each check, and checks both against the model's own distribution, computed in the test
from the model itself (``reference``: prompt ids → the log-softmax at every position).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from node.backends.base import BatchBackend, CacheScope, SamplingParams, Scores
from tests.node.backend_contract import PROMPT

Reference = Callable[[Sequence[int]], torch.Tensor]  # ids → (positions, vocabulary) log-probabilities


@dataclass(frozen=True)
class Tolerance:
    """How close a backend's figures must be to the reference's. ``exact``: the same arithmetic (the CPU
    backends against their own model), so the most likely tokens come in the reference's order. A GPU's
    half-precision kernels against a float32 reference differ in the third decimal, which reorders a
    random model's near-equal candidates: there each figure is checked against the reference's for that
    token, and the order by the figures themselves."""

    logprob: float = 1e-4
    exact: bool = True


EXACT = Tolerance()
GPU_TOLERANCE = Tolerance(logprob=0.05, exact=False)  # exllamav2's fp16 kernels against float32


@dataclass
class Run:
    tokens: list[int] = field(default_factory=list)
    scores: list[Scores] = field(default_factory=list)
    prompt: list[Scores] | None = None
    finish: str | None = None


def run(backend: BatchBackend, prompt: Sequence[int], params: SamplingParams) -> Run:
    seq = backend.admit(prompt, params, CacheScope.private())
    assert seq is not None, "an idle backend must admit a job that fits"
    out = Run()
    for _ in range(10_000):
        for step in backend.step():
            if step.seq != seq:
                continue
            out.tokens += step.tokens
            out.scores += step.scores
            if step.prompt_scores is not None:
                assert out.prompt is None, "the prompt is scored once"
                out.prompt = step.prompt_scores
            if step.finish is not None:
                out.finish = step.finish
                return out
    raise AssertionError("the sequence did not end")


def ids(backend: BatchBackend) -> list[int]:
    return backend.encode(PROMPT, add_special_tokens=True)


def greedy_tokens_come_with_the_models_own_logprobs(
    backend: BatchBackend, reference: Reference, tol: Tolerance = EXACT
) -> None:
    prompt = ids(backend)
    params = SamplingParams(max_new_tokens=6, temperature=0.0, ignore_eos=True, logprobs=4)
    got = run(backend, prompt, params)
    assert len(got.scores) == len(got.tokens) == 6
    expected = reference([*prompt, *got.tokens])
    for i, (token, scores) in enumerate(zip(got.tokens, got.scores, strict=True)):
        row = expected[len(prompt) - 1 + i]
        assert math.isclose(scores.logprob, float(row[token]), abs_tol=tol.logprob)
        # Greedy: the token is the most likely one, and the top list is the model's, in order.
        assert scores.top[0][0] == token and math.isclose(scores.top[0][1], scores.logprob, abs_tol=1e-9)
        if tol.exact:
            assert [t for t, _ in scores.top] == torch.topk(row, 4).indices.tolist()
        else:
            assert math.isclose(scores.logprob, float(row.max()), abs_tol=tol.logprob)
            assert [v for _, v in scores.top] == sorted((v for _, v in scores.top), reverse=True)
            for t, v in scores.top:
                assert math.isclose(v, float(row[t]), abs_tol=tol.logprob)


def logprobs_are_the_raw_distributions_whatever_the_sampling(
    backend: BatchBackend, reference: Reference, tol: Tolerance = EXACT
) -> None:
    prompt = ids(backend)
    params = SamplingParams(
        max_new_tokens=5, temperature=1.7, top_k=5, seed=3, ignore_eos=True, logprobs=0,
        logit_bias=((7, 3.0),), repetition_penalty=1.3,
    )  # fmt: skip
    got = run(backend, prompt, params)
    expected = reference([*prompt, *got.tokens])
    for i, (token, scores) in enumerate(zip(got.tokens, got.scores, strict=True)):
        assert scores.top == ()
        assert math.isclose(scores.logprob, float(expected[len(prompt) - 1 + i][token]), abs_tol=tol.logprob)


def echo_scores_the_prompt_as_the_model_does(
    backend: BatchBackend, reference: Reference, tol: Tolerance = EXACT
) -> None:
    prompt = ids(backend)
    got = run(backend, prompt, SamplingParams(max_new_tokens=0, prompt_logprobs=True, logprobs=2))
    assert got.tokens == [] and got.finish == "length"  # scoring only, as max_tokens 0 asks
    assert got.prompt is not None and len(got.prompt) == len(prompt) - 1
    expected = reference(prompt)
    for i, scores in enumerate(got.prompt):
        assert math.isclose(scores.logprob, float(expected[i][prompt[i + 1]]), abs_tol=tol.logprob)
        assert len(scores.top) == 2 and scores.top[0][1] >= scores.top[1][1] >= scores.logprob - 1e-9
    # Scoring and generating at once: the same prompt scores, then the answer.
    both = run(backend, prompt, SamplingParams(max_new_tokens=3, temperature=0.0, prompt_logprobs=True))
    assert both.prompt is not None and len(both.tokens) <= 3
    for mine, theirs in zip(both.prompt, got.prompt, strict=True):
        assert math.isclose(mine.logprob, theirs.logprob, abs_tol=0.0 if tol.exact else tol.logprob)


def logit_bias_forces_and_bans(backend: BatchBackend, reference: Reference, tol: Tolerance = EXACT) -> None:
    prompt = ids(backend)
    greedy = SamplingParams(max_new_tokens=4, temperature=0.0, ignore_eos=True)
    plain = run(backend, prompt, greedy).tokens
    forced_token = next(t for t in reversed(prompt) if t != plain[0])  # a word, not an end-of-text token
    forced = SamplingParams(**{**_fields(greedy), "logit_bias": ((forced_token, 100.0),)})
    assert run(backend, prompt, forced).tokens == [forced_token] * 4
    banned = SamplingParams(**{**_fields(greedy), "logit_bias": ((plain[0], -100.0),)})
    assert run(backend, prompt, banned).tokens[0] != plain[0]
    sampled = SamplingParams(
        max_new_tokens=4, temperature=1.0, seed=1, ignore_eos=True, logit_bias=((forced_token, 100.0),)
    )
    assert run(backend, prompt, sampled).tokens == [forced_token] * 4


def _fields(params: SamplingParams) -> dict[str, object]:
    return {name: getattr(params, name) for name in params.__slots__}  # type: ignore[attr-defined]


LOGPROB_CONTRACT: list[Callable[[BatchBackend, Reference, Tolerance], None]] = [
    greedy_tokens_come_with_the_models_own_logprobs,
    logprobs_are_the_raw_distributions_whatever_the_sampling,
    echo_scores_the_prompt_as_the_model_does,
    logit_bias_forces_and_bans,
]
