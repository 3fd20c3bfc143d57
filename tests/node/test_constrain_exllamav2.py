"""Constrained decoding on the exllamav2 backend, through exllamav2's own generator and filter interface
on a CPU (tests/node/exllamav2_cpu.py): sequences batched together each follow their own grammar, with
and without ignore_eos, greedy and sampled, and the answers validate; a stop token a grammar allows ends
the answer. tests/test_structured_api.py shows the same through the API on the transformers backend.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from node.backends.base import CacheScope, SamplingParams
from node.constrain import build_grammar, grammars_for
from protocol.schemas import parse_request
from tests.node.backend_contract import drive_all
from tests.node.test_constrain import SCHEMAS as GENERATED

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("exllamav2") is None,
    reason="needs exllamav2's Python (pip install --no-deps exllamav2==0.3.2; the dev extra has it)",
)

SCHEMAS: list[dict[str, Any]] = [
    {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}, "n": {"type": "integer",
     "minimum": 0, "maximum": 999}}, "required": ["city", "n"], "additionalProperties": False},
    {"type": "array", "items": {"type": "boolean"}, "minItems": 1, "maxItems": 4},
    {"type": "object", "properties": {"inner": {"type": "object", "properties": {"s": {"type": "string",
     "maxLength": 6}}, "required": ["s"], "additionalProperties": False}}, "required": ["inner"],
     "additionalProperties": False},
    {"enum": ["yes", "no", 3]},
]  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def _exllamav2_on_a_cpu() -> Iterator[None]:
    from tests.node import exllamav2_cpu

    try:
        with exllamav2_cpu.stand_in():
            yield
    except RuntimeError as exc:
        pytest.skip(str(exc))


def _factory(backend: Any, schema: dict[str, Any]) -> Any:
    req = parse_request("chat", {"model": "m", "messages": [{"role": "user", "content": "hi"}],
                                 "response_format": {"type": "json_schema", "json_schema": {"name": "s",
                                                     "schema": schema}}})  # fmt: skip
    return grammars_for(backend).constraint(build_grammar(req))


def _run_together(backend: Any, schemas: list[dict[str, Any]], **sampling: Any) -> list[str]:
    prompt = backend.encode("<s>Answer in JSON", add_special_tokens=False)
    seqs = []
    for i, schema in enumerate(schemas):
        params = SamplingParams(max_new_tokens=200, seed=i, constraint=_factory(backend, schema), **sampling)
        seq = backend.admit(prompt, params, CacheScope.private())
        assert seq is not None
        seqs.append(seq)
    ended = drive_all(backend, seqs)
    answers = []
    for seq in seqs:
        tokens, finish = ended[seq]
        assert finish == "stop", "a bounded schema's answer ran to max_tokens"
        answers.append(backend.decode(tokens))
    return answers


SAMPLINGS = pytest.mark.parametrize(
    "sampling",
    [{"temperature": 0.0}, {"temperature": 1.0}, {"temperature": 0.7, "top_k": 40, "ignore_eos": True}],
    ids=["greedy", "sampled", "ignore_eos"],
)


@SAMPLINGS
def test_batched_sequences_each_follow_their_own_schema(
    demo_model_dir: Path, sampling: dict[str, Any]
) -> None:
    from tests.node import exllamav2_cpu

    backend, _ = exllamav2_cpu.load(demo_model_dir, cache_tokens=4096, max_sequences=8)
    for answer, schema in zip(_run_together(backend, SCHEMAS, **sampling), SCHEMAS, strict=True):
        jsonschema.validate(json.loads(answer), schema)


@pytest.fixture(scope="module")
def batching(demo_model_dir: Path) -> Any:
    from tests.node import exllamav2_cpu

    return exllamav2_cpu.load(demo_model_dir, cache_tokens=8192, max_sequences=8)[0]


# A smaller run than the transformers backend's (tests/node/test_constrain.py): 25 batches of 4 schemas.
@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(schemas=st.lists(GENERATED, min_size=4, max_size=4))
def test_generated_schemas_validate_four_at_a_time(batching: Any, schemas: list[dict[str, Any]]) -> None:
    for answer, schema in zip(_run_together(batching, schemas), schemas, strict=True):
        jsonschema.validate(json.loads(answer), schema)
