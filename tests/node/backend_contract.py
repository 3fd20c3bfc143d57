"""The backend contract: what every generation backend must do, as checks any backend can be put through.

tests/node/test_backend_contract.py runs them on the transformers reference backend (CPU, the generated
demo model); tests/gpu/test_exllamav2.py runs the same list on the exllamav2 backend with a model of a real
architecture. Each check takes a loaded ``BatchBackend`` (a one-sequence backend is adapted with
``Sequential``) and leaves it idle.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest

from node.backends.base import BatchBackend, CacheScope, NeverFits, SamplingParams

PROMPT = "The committee met on Tuesday to discuss the budget for the coming year, and"


def drive_all(
    backend: BatchBackend, seqs: Sequence[int], *, limit: int = 10_000
) -> dict[int, tuple[list[int], str]]:
    """Step until every one of ``seqs`` ends: each one's tokens and finish reason."""
    tokens: dict[int, list[int]] = {seq: [] for seq in seqs}
    ended: dict[int, tuple[list[int], str]] = {}
    for _ in range(limit):
        for step in backend.step():
            if step.seq in tokens and step.seq not in ended:
                tokens[step.seq] += step.tokens
                if step.finish is not None:
                    ended[step.seq] = (tokens[step.seq], step.finish)
        if len(ended) == len(tokens):
            return ended
    raise AssertionError(f"sequences {sorted(set(tokens) - set(ended))} did not end in {limit} steps")


def drive(backend: BatchBackend, seq: int) -> tuple[list[int], str]:
    return drive_all(backend, [seq])[seq]


def run(backend: BatchBackend, prompt: Sequence[int], params: SamplingParams) -> tuple[list[int], str]:
    seq = backend.admit(prompt, params, CacheScope.private())
    assert seq is not None, "an idle backend must admit a job that fits"
    return drive(backend, seq)


def prompt_ids(backend: BatchBackend) -> list[int]:
    return backend.encode(PROMPT, add_special_tokens=True)


def text_round_trips(backend: BatchBackend) -> None:
    ids = backend.encode(PROMPT, add_special_tokens=False)
    assert ids and all(isinstance(i, int) for i in ids)
    assert backend.decode(ids).strip() == PROMPT


def greedy_is_repeatable(backend: BatchBackend) -> None:
    params = SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True)
    first = run(backend, prompt_ids(backend), params)
    assert first == run(backend, prompt_ids(backend), params)
    assert first[0], "greedy decoding produced nothing"


def top_k_one_is_greedy(backend: BatchBackend) -> None:
    greedy = run(
        backend, prompt_ids(backend), SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True)
    )
    top1 = run(
        backend,
        prompt_ids(backend),
        SamplingParams(max_new_tokens=8, temperature=1.0, top_k=1, ignore_eos=True),
    )
    assert top1 == greedy


def a_seed_makes_sampling_repeatable(backend: BatchBackend) -> None:
    params = SamplingParams(max_new_tokens=16, temperature=1.0, seed=1234, ignore_eos=True)
    answers = {tuple(run(backend, prompt_ids(backend), params)[0]) for _ in range(2)}
    assert len(answers) == 1
    others = {
        tuple(
            run(
                backend,
                prompt_ids(backend),
                SamplingParams(max_new_tokens=16, temperature=1.0, seed=s, ignore_eos=True),
            )[0]
        )
        for s in range(5)
    }
    assert len(others) > 1, "five seeds gave one answer: the seed does not reach the sampler"


def max_new_tokens_is_exact(backend: BatchBackend) -> None:
    tokens, finish = run(
        backend, prompt_ids(backend), SamplingParams(max_new_tokens=7, temperature=0.0, ignore_eos=True)
    )
    assert (len(tokens), finish) == (7, "length")


def a_stop_token_ends_the_answer(backend: BatchBackend) -> None:
    free, _ = run(
        backend, prompt_ids(backend), SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True)
    )
    # A token's first appearance (the random test models repeat themselves): the answer must end before it.
    stop_at = next((i for i, t in enumerate(free) if i > 0 and t not in free[:i]), 0)
    tokens, finish = run(
        backend, prompt_ids(backend),
        SamplingParams(max_new_tokens=12, temperature=0.0, stop_token_ids=(free[stop_at],)),
    )  # fmt: skip
    assert (tokens, finish) == (free[:stop_at], "stop"), "the stop token is not yielded and ends the answer"


def cancel_frees_the_cache(backend: BatchBackend) -> None:
    idle = backend.cache()
    assert idle.free_tokens == idle.total_tokens, "an idle backend holds no cache"
    seq = backend.admit(
        prompt_ids(backend), SamplingParams(max_new_tokens=64, ignore_eos=True), CacheScope.private()
    )
    assert seq is not None
    for _ in range(3):
        backend.step()
    held = backend.cache().free_tokens
    assert held <= idle.total_tokens - len(prompt_ids(backend)) - 64, (
        "admission reserves prompt + max_new_tokens"
    )
    backend.cancel(seq)
    assert backend.cache().free_tokens == idle.total_tokens, "a cancelled job's cache is free at once"
    assert all(step.seq != seq for step in backend.step()), "a cancelled job makes no more steps"


def admission_waits_for_room_and_refuses_what_never_fits(backend: BatchBackend) -> None:
    cache = backend.cache()
    with pytest.raises(NeverFits):
        backend.admit(
            prompt_ids(backend), SamplingParams(max_new_tokens=cache.total_tokens), CacheScope.private()
        )
    params = SamplingParams(max_new_tokens=4, temperature=0.0, ignore_eos=True)
    running = []
    for _ in range(cache.max_sequences):
        seq = backend.admit(prompt_ids(backend), params, CacheScope.private())
        if seq is None:
            break  # the cache filled up before the batch did
        running.append(seq)
    assert running, "an idle backend admits a job that fits"
    assert backend.admit(prompt_ids(backend), params, CacheScope.private()) is None, (
        "a full backend says wait"
    )
    ends = drive_all(backend, running)
    assert len({tuple(tokens) for tokens, _ in ends.values()}) == 1, "batched greedy jobs agree"
    assert backend.cache().free_tokens == cache.total_tokens


CONTRACT: list[Callable[[BatchBackend], None]] = [
    text_round_trips,
    greedy_is_repeatable,
    top_k_one_is_greedy,
    a_seed_makes_sampling_repeatable,
    max_new_tokens_is_exact,
    a_stop_token_ends_the_answer,
    cancel_frees_the_cache,
    admission_waits_for_room_and_refuses_what_never_fits,
]
