"""Issue 16's features on exllamav2 on a GPU, backend by backend: the logprob contract against the same
weights in float32 through transformers (tests/node/logprob_contract.py, at the GPU tolerance), and
constrained decoding through exllamav2's filter interface, several sequences batched, each under its own
grammar (the same schemas as on the CPU stand-ins, tests/node/test_constrain_exllamav2.py).
Run with `bash tests/gpu/run.sh`."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from node.backends.base import BatchBackend
from tests.gpu.gpu_model import build_gpu_model, exllamav2_missing
from tests.node.logprob_contract import GPU_TOLERANCE, LOGPROB_CONTRACT, Reference, Tolerance
from tests.node.test_constrain_exllamav2 import SAMPLINGS, SCHEMAS, _run_together

missing = exllamav2_missing()
pytestmark = pytest.mark.skipif(missing is not None, reason=f"exllamav2 cannot run: {missing}")


@pytest.fixture(scope="module")
def gpu_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_gpu_model(tmp_path_factory.getbasetemp() / "llama-3.2-1b", "llama-3.2-1b")


@pytest.fixture(scope="module")
def backend(gpu_model: Path) -> Iterator[BatchBackend]:
    from node.backends.exllamav2_backend import ExLlamaV2Backend

    loaded = ExLlamaV2Backend.load(gpu_model, cache_tokens=16 * 1024, max_sequences=8)
    yield loaded
    loaded.close()


@pytest.fixture(scope="module")
def reference(gpu_model: Path) -> Iterator[Reference]:
    """The same weights through transformers, in float32 on the GPU: the model's own distribution."""
    import torch
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(gpu_model, dtype=torch.float32).to("cuda").eval()

    def log_softmax(ids: Sequence[int]) -> torch.Tensor:
        with torch.inference_mode():
            logits = model(input_ids=torch.tensor([list(ids)], device="cuda")).logits[0]
        return torch.log_softmax(logits.double(), dim=-1).cpu()

    yield log_softmax
    model.to("cpu")  # its memory back to the GPU before the next module loads its own
    torch.cuda.empty_cache()


@pytest.mark.parametrize("check", LOGPROB_CONTRACT, ids=lambda c: c.__name__)
def test_exllamav2_meets_the_logprob_contract_on_a_gpu(
    backend: BatchBackend, reference: Reference, check: Callable[[BatchBackend, Reference, Tolerance], None]
) -> None:
    check(backend, reference, GPU_TOLERANCE)


@SAMPLINGS
def test_batched_sequences_each_follow_their_own_schema_on_a_gpu(
    backend: BatchBackend, sampling: dict[str, Any]
) -> None:
    schemas = SCHEMAS * 2  # eight at once, the backend's max_sequences
    for answer, schema in zip(_run_together(backend, schemas, **sampling), schemas, strict=True):
        jsonschema.validate(json.loads(answer), schema)
