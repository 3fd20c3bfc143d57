"""Nodes that fail: an error mid-generation and a node killed mid-stream end the stream with a clear
error event, never a hang; a failure before the answer starts is a clean error status."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import httpx
import openai
import pytest

from node.app import load_transformers
from node.backends.base import Backend, SamplingParams
from node.settings import ModelSettings, NodeSettings
from tests.support import (
    LoopThread,
    Stack,
    WrappedBackend,
    certify_node,
    start_scheduler,
    start_stack,
    stop_stack,
    wait_for,
)

ROOT = Path(__file__).resolve().parents[2]
BODY = {"model": "hearth-demo", "messages": [{"role": "user", "content": "go"}], "max_tokens": 1500}
# The random demo model may end its answer before the third token, where the failure is: it must not.
NO_EOS = {"ignore_eos": True}


class BreaksAfterThreeTokens(WrappedBackend):
    """Raises mid-generation: a node that fails on purpose."""

    def generate(
        self, prompt_ids: Sequence[int], params: SamplingParams, cancelled: threading.Event
    ) -> Iterator[int]:
        for n, token in enumerate(super().generate(prompt_ids, params, cancelled)):
            if n == 3:
                raise RuntimeError("simulated GPU fault")
            yield token


@pytest.fixture
def breaking_stack(servers: LoopThread, demo_model: ModelSettings, tmp_path: Path) -> Iterator[Stack]:
    def loader(model: ModelSettings, settings: NodeSettings) -> Backend:
        return BreaksAfterThreeTokens(load_transformers(model, settings))  # type: ignore[return-value]

    stack = servers.call(start_stack(tmp_path, [demo_model], loader=loader))
    yield stack
    servers.call(stop_stack(stack))


def test_generation_error_mid_stream_ends_with_an_error_event(breaking_stack: Stack) -> None:
    client = openai.OpenAI(base_url=breaking_stack.api, api_key=breaking_stack.token, max_retries=0)
    stream = client.chat.completions.create(stream=True, extra_body=NO_EOS, **BODY)  # type: ignore[call-overload]
    with pytest.raises(openai.APIError, match="failed while generating"):
        for _ in stream:
            pass


def test_generation_error_without_streaming_is_a_500(breaking_stack: Stack) -> None:
    r = httpx.post(
        breaking_stack.api + "/chat/completions",
        json={**BODY, **NO_EOS},
        headers={"Authorization": f"Bearer {breaking_stack.token}"},
        timeout=30,
    )
    assert r.status_code == 500
    assert r.json()["error"]["code"] == "generation_failed"


@pytest.fixture
def killable(
    servers: LoopThread, demo_model_dir: Path, tmp_path: Path
) -> Iterator[tuple[Stack, subprocess.Popen[str]]]:
    stack = servers.call(start_scheduler(tmp_path / "scheduler"))
    servers.call(certify_node(stack, tmp_path / "doomed", "doomed"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.node_process", str(demo_model_dir), str(tmp_path / "doomed")],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    proc.stdout.readline()

    async def ready() -> bool:
        return any(m.phase == "ready" for n in stack.snapshot().nodes if n.healthy for m in n.models)

    servers.call(wait_for(ready, within=60))
    yield stack, proc
    proc.kill()
    proc.wait()
    proc.stdout.close()
    servers.call(stop_stack(stack))


def test_node_killed_mid_stream_ends_the_stream_with_node_failed(
    killable: tuple[Stack, subprocess.Popen[str]],
) -> None:
    stack, proc = killable
    headers = {"Authorization": f"Bearer {stack.token}"}
    with httpx.stream(
        "POST",
        stack.api + "/chat/completions",
        json={**BODY, **NO_EOS, "stream": True},
        headers=headers,
        timeout=20,
    ) as r:
        lines = r.iter_lines()
        for _ in range(4):
            next(lines)
        os.kill(proc.pid, signal.SIGKILL)
        rest = [line for line in lines if line.startswith("data: ")]
    last = json.loads(rest[-1].removeprefix("data: "))
    assert last["error"]["code"] == "node_failed"
    # The scheduler stops sending work there: the next request is refused at once with 503.
    r2 = httpx.post(stack.api + "/chat/completions", json=BODY, headers=headers, timeout=20)
    assert r2.status_code == 503
    assert "Retry-After" in r2.headers
