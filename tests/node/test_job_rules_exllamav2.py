"""The job rules on a node running the exllamav2 backend (on a CPU: tests/node/exllamav2_cpu.py): the
answer is sized in the node before any backend sees it, so the course's prompt and the token budget hold
for exllamav2's generator as for the reference backend (tests/node/test_job_rules.py)."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from typing import Any

import pytest

from node.settings import ModelSettings, NodeSettings
from tests.node.test_job_rules import COURSE, GREEDY, HI, chat, completion, run_plain
from tests.support import LoopThread, Stack, start_stack, stop_stack

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("exllamav2") is None,
    reason="needs exllamav2's Python (pip install --no-deps exllamav2==0.3.2; the dev extra has it)",
)


def _load(model: ModelSettings, settings: NodeSettings) -> Any:
    from tests.node import exllamav2_cpu

    assert model.path is not None
    backend, _ = exllamav2_cpu.load(model.path, cache_tokens=4096, max_sequences=4)
    return backend


@pytest.fixture(scope="module")
def exl_stack(
    servers: LoopThread, demo_model: ModelSettings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    from tests.node import exllamav2_cpu

    try:
        with exllamav2_cpu.stand_in():
            s = servers.call(start_stack(tmp_path_factory.mktemp("exl-rules"), [demo_model], loader=_load))
            try:
                yield s
            finally:
                servers.call(stop_stack(s))
    except RuntimeError as exc:
        pytest.skip(str(exc))


@pytest.mark.parametrize(
    ("endpoint", "request_"),
    [
        ("chat", chat(HI, max_tokens=30, **GREEDY)),  # one JSON body
        ("chat", chat(HI, max_tokens=30, stream=True, **GREEDY)),  # streamed
        ("completion", completion("Once upon", max_tokens=30, **GREEDY)),  # completions
    ],
)
def test_the_budget_and_the_course_prompt_hold_on_exllamav2(
    exl_stack: Stack, endpoint: str, request_: dict[str, Any]
) -> None:
    # The prompt as this backend's tokenizer counts it, from the same job without a budget.
    course = {"system_prompt": COURSE}
    bare = run_plain(exl_stack, endpoint, {**request_, "max_tokens": 1})
    free = run_plain(exl_stack, endpoint, {**request_, "max_tokens": 1}, rules=course)
    assert bare.status == free.status == 200
    prompt = free.meta["prompt_tokens"]
    assert prompt > bare.meta["prompt_tokens"], "the course's prompt reached the model"
    cut = run_plain(exl_stack, endpoint, request_, rules={**course, "max_total_tokens": prompt + 4})
    assert cut.status == 200, cut.error
    assert cut.meta == {"finish_reason": "length", "prompt_tokens": prompt, "completion_tokens": 4}
    refused = run_plain(exl_stack, endpoint, request_, rules={**course, "max_total_tokens": prompt})
    assert refused.status == 429 and refused.error is not None and refused.error["code"] == "quota_exceeded"
