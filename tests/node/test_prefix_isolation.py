"""Prefix-cache isolation (cf. vLLM CVE-2025-46570): one user's cached prompt must not speed up another's.

The CPU reference backend keeps no KV cache between jobs at all: every job computes its whole prompt from
an empty cache. This test holds it to that by counting the prompt positions each job's first forward pass
computes: the same long prompt, sent twice (as two users would), is computed in full both times. A backend
that adds a prefix cache must key it by user and extend this test (the GPU backend's issue).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from node.backends.base import SamplingParams
from node.backends.transformers_backend import TransformersBackend


@pytest.fixture(scope="module")
def backend(demo_model_dir: Path) -> TransformersBackend:
    return TransformersBackend.load(demo_model_dir)


class CountingModel:
    """The real model, noting how many positions each call computes."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.computed: list[int] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def __call__(self, **kwargs: Any) -> Any:
        self.computed.append(int(kwargs["input_ids"].shape[1]))
        return self.inner(**kwargs)


def test_a_repeated_prompt_is_computed_in_full_every_time(backend: TransformersBackend) -> None:
    prompt = backend.encode(
        "A shared secret preamble that another user might also send. " * 8, add_special_tokens=True
    )
    counting = CountingModel(backend._model)
    backend._model = counting
    try:
        for _ in range(2):  # user A, then user B with the same prompt
            list(backend.generate(prompt, SamplingParams(max_new_tokens=2, temperature=0), threading.Event()))
    finally:
        backend._model = counting.inner
    prefills = [n for n in counting.computed if n > 1]
    assert prefills == [len(prompt), len(prompt)], "the second job reused no cached prompt positions"
