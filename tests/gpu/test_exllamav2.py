"""The exllamav2 backend on a GPU: the backend contract (the same checks the CPU reference passes), prefix
cache isolation between users, continuous batching, cancellation, and a real node serving through it.
Run with `bash tests/gpu/run.sh`."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from node.backends.base import BatchBackend, CacheScope, SamplingParams
from tests.gpu.gpu_model import build_gpu_model, exllamav2_missing
from tests.node.backend_contract import CONTRACT, drive, drive_all

missing = exllamav2_missing()
pytestmark = pytest.mark.skipif(missing is not None, reason=f"exllamav2 cannot run: {missing}")

CACHE_TOKENS = 16 * 1024


@pytest.fixture(scope="session")
def gpu_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_gpu_model(tmp_path_factory.getbasetemp() / "llama-3.2-1b", "llama-3.2-1b")


@pytest.fixture(scope="module")
def backend(gpu_model: Path) -> Iterator[BatchBackend]:
    from node.backends.exllamav2_backend import ExLlamaV2Backend

    loaded = ExLlamaV2Backend.load(gpu_model, cache_tokens=CACHE_TOKENS, max_sequences=8)
    yield loaded
    loaded.close()


@pytest.mark.parametrize("check", CONTRACT, ids=lambda c: c.__name__)
def test_exllamav2_meets_the_backend_contract(
    backend: BatchBackend, check: Callable[[BatchBackend], None]
) -> None:
    check(backend)


def _paged(backend: BatchBackend) -> bool:
    return bool(backend._paged)  # type: ignore[attr-defined]


def test_the_cache_is_reported_in_pages(backend: BatchBackend) -> None:
    cache = backend.cache()
    print("paged attention (flash-attn):", _paged(backend), cache)
    if _paged(backend):
        assert (cache.total_tokens, cache.page_tokens, cache.max_sequences) == (CACHE_TOKENS, 256, 8)
    else:  # without flash-attn: one sequence at a time in one page that is the whole cache
        assert (cache.total_tokens, cache.page_tokens, cache.max_sequences) == (CACHE_TOKENS, CACHE_TOKENS, 1)


def _long_prompt(backend: BatchBackend) -> list[int]:
    ids = backend.encode(
        "Shared preamble that two different users might both send. " * 60, add_special_tokens=True
    )
    assert len(ids) > 2 * 256, "the prompt must fill whole cache pages"
    return ids


def _reused(backend: BatchBackend, prompt: list[int], scope: CacheScope) -> tuple[int, int]:
    """(whole cached pages, tokens copied from partly matching pages) the job started from."""
    seq = backend.admit(prompt, SamplingParams(max_new_tokens=2, temperature=0.0, ignore_eos=True), scope)
    assert seq is not None
    job = backend._jobs[seq]  # type: ignore[attr-defined]
    drive(backend, seq)
    return int(job.cached_pages), int(job.cached_tokens)


def test_one_users_cached_prompt_never_speeds_up_anothers(backend: BatchBackend) -> None:
    prompt = _long_prompt(backend)
    alice, bob = CacheScope(b"user:alice"), CacheScope(b"user:bob")
    assert _reused(backend, prompt, alice) == (0, 0), "a fresh cache has nothing to reuse"
    pages, _ = _reused(backend, prompt, alice)
    if _paged(backend):
        assert pages >= 2, "the same user's next turn reuses the prompt's whole pages"
    else:
        assert pages == 0, "unpaged, nothing is reused (exllamav2's reuse of the last prefix is off)"
    assert _reused(backend, prompt, bob) == (0, 0), "another user's identical prompt is computed in full"
    assert _reused(backend, prompt, CacheScope.private()) == (0, 0)
    # Nor does a prompt that shares only part of a first page with Alice's.
    assert _reused(backend, prompt[:100], bob) == (0, 0)


def test_jobs_run_batched_and_a_cancelled_one_frees_its_pages_at_once(backend: BatchBackend) -> None:
    if not _paged(backend):
        pytest.skip("flash-attn is not installed: exllamav2 runs one sequence at a time")
    total = backend.cache().total_tokens
    prompt = backend.encode("Tell me a story.", add_special_tokens=True)
    params = SamplingParams(max_new_tokens=200, temperature=0.8, ignore_eos=True)
    seqs = [backend.admit(prompt, params, CacheScope.private()) for _ in range(4)]
    assert None not in seqs
    got: dict[int, int] = {}
    together = 0
    for _ in range(20):
        steps = backend.step()
        together = max(together, sum(1 for s in steps if s.tokens))
        for s in steps:
            got[s.seq] = got.get(s.seq, 0) + len(s.tokens)
    assert together == 4, "the four jobs produce tokens in the same iteration"
    victim, *rest = seqs
    assert victim is not None
    backend.cancel(victim)
    assert backend.cache().free_tokens >= total - 3 * 256, "the cancelled job's pages are free at once"
    for s in backend.step():
        assert s.seq != victim
        got[s.seq] = got.get(s.seq, 0) + len(s.tokens)
    ends = drive_all(backend, [s for s in rest if s is not None])
    assert all(finish == "length" for _, finish in ends.values())
    assert all(got[seq] + len(tokens) == 200 for seq, (tokens, _) in ends.items()), "no token was lost"
    assert backend.cache().free_tokens == total


def test_loading_and_unloading_another_model_leaves_running_jobs_alone(
    backend: BatchBackend, gpu_model: Path
) -> None:
    import threading

    import torch

    from node.backends.exllamav2_backend import ExLlamaV2Backend

    prompt = backend.encode("Keep going.", add_special_tokens=True)
    seq = backend.admit(
        prompt, SamplingParams(max_new_tokens=300, temperature=0.8, ignore_eos=True), CacheScope.private()
    )
    assert seq is not None
    before = torch.cuda.memory_reserved()

    def other() -> None:
        second = ExLlamaV2Backend.load(gpu_model, cache_tokens=4096, max_sequences=2)
        second.close()

    loader = threading.Thread(target=other)
    loader.start()
    tokens, finish = drive(backend, seq)  # steps on while the other model loads and unloads
    loader.join()
    assert (len(tokens), finish) == (300, "length")
    # The second model's weights and cache went back (within the allocator's slack).
    assert torch.cuda.memory_reserved() - before < 256 << 20


def test_a_model_too_big_for_the_gpus_is_refused_in_a_line_and_leaves_nothing(gpu_model: Path) -> None:
    import torch

    from node.backends.exllamav2_backend import ExLlamaV2Backend
    from protocol.errors import ConfigError

    before = torch.cuda.memory_reserved()
    free, _ = torch.cuda.mem_get_info()
    # A 1B-shaped fp16 cache takes 32 KiB a token: twice the free memory's worth.
    tokens = 2 * free // (32 << 10) // 256 * 256
    with pytest.raises(ConfigError, match="does not fit in the GPUs' free memory"):
        ExLlamaV2Backend.load(gpu_model, cache_tokens=tokens, max_sequences=2)
    assert torch.cuda.memory_reserved() - before < 64 << 20, "the partial load went back to the driver"
