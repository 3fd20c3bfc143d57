"""The logprob contract (tests/node/logprob_contract.py) on both backends: transformers, alone and with
three sequences taking turns, and exllamav2 on its CPU stand-ins (tests/node/exllamav2_cpu.py), paged and
unpaged; each checked against its model's own log-softmax, computed here from the model itself."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from node.backends.base import BatchBackend, Sequential
from node.backends.transformers_backend import TransformersBackend
from tests.node.logprob_contract import EXACT, GPU_TOLERANCE, LOGPROB_CONTRACT, Reference, Tolerance

Check = Callable[[BatchBackend, Reference, Tolerance], None]


@pytest.fixture(scope="module")
def reference_backend(demo_model_dir: Path) -> Iterator[TransformersBackend]:
    backend = TransformersBackend.load(demo_model_dir)
    yield backend
    backend.close()


def transformers_reference(backend: TransformersBackend) -> Reference:
    model: Any = backend._model  # the very weights the backend runs

    def reference(ids: Sequence[int]) -> torch.Tensor:
        with torch.inference_mode():
            logits = model(input_ids=torch.tensor([list(ids)])).logits[0]
        return torch.log_softmax(logits.double(), dim=-1)

    return reference


# The GPU run's looser reading (tests/gpu/test_features.py) is checked here too, where it must pass as well.
@pytest.mark.parametrize("tol", [EXACT, GPU_TOLERANCE], ids=["exact", "gpu-tolerance"])
@pytest.mark.parametrize("sequences", [1, 3])
@pytest.mark.parametrize("check", LOGPROB_CONTRACT, ids=lambda c: c.__name__)
def test_the_transformers_backend_meets_the_logprob_contract(
    reference_backend: TransformersBackend, sequences: int, check: Check, tol: Tolerance
) -> None:
    check(
        Sequential(reference_backend, max_sequences=sequences), transformers_reference(reference_backend), tol
    )


@pytest.fixture(scope="module")
def _exllamav2_on_a_cpu() -> Iterator[None]:
    if importlib.util.find_spec("exllamav2") is None:
        pytest.skip("needs exllamav2's Python (pip install --no-deps exllamav2==0.3.2; the dev extra has it)")
    from tests.node import exllamav2_cpu

    try:
        with exllamav2_cpu.stand_in():
            yield
    except RuntimeError as exc:
        pytest.skip(str(exc))


@pytest.mark.usefixtures("_exllamav2_on_a_cpu")
@pytest.mark.parametrize(("paged", "sequences"), [(True, 4), (False, 1)], ids=["paged", "unpaged"])
@pytest.mark.parametrize("check", LOGPROB_CONTRACT, ids=lambda c: c.__name__)
def test_the_exllamav2_backend_meets_the_logprob_contract(
    demo_model_dir: Path, paged: bool, sequences: int, check: Check
) -> None:
    from tests.node import exllamav2_cpu

    backend, model = exllamav2_cpu.load(
        demo_model_dir, cache_tokens=2048, max_sequences=sequences, paged=paged
    )
    vocab = model.config.vocab_size

    def reference(ids: Sequence[int]) -> torch.Tensor:
        # The stand-in's model: the next token's logits are its table's row for the last one.
        return torch.log_softmax(model.table[list(ids)][:, :vocab].double(), dim=-1)

    try:
        check(backend, reference, EXACT)
    finally:
        backend.close()
