"""The usage of record is what nodes sign: each node lists the jobs it ran, with their token counts, in its
next heartbeat (which it signs), and the scheduler confirms or corrects the row the relay wrote from the
answer's stream (scheduler.ledger). The node here sits behind a tap that can change what it answers, as
someone on the network could."""

from __future__ import annotations

import logging
import re
import sqlite3
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest

from node.settings import ModelSettings
from tests.support import LoopThread, Stack, Tapped, start_tapped_stack, stop_tapped_stack


@pytest.fixture(scope="module")
def tapped(
    servers: LoopThread, demo_model: ModelSettings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Tapped]:
    env = servers.call(start_tapped_stack(tmp_path_factory.mktemp("receipts"), [demo_model]))
    yield env
    servers.call(stop_tapped_stack(env))


def _receipts(stack: Stack) -> dict[str, float]:
    text = httpx.get(stack.base_url + "/metrics").text
    return {
        m.group(1): float(m.group(2))
        for m in re.finditer(r'^hearth_usage_receipts_total\{outcome="(\w+)"\} (\S+)$', text, re.M)
    }


def _until(predicate: Callable[[], bool], within: float = 15.0) -> None:
    """Poll from the test's thread (the servers' loop must stay free to answer)."""
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def _row(stack: Stack, request_id: str, want: Any = None) -> tuple[Any, ...]:
    """The usage row of ``request_id`` (once it equals ``want``, when given)."""

    def read() -> tuple[Any, ...] | None:
        with sqlite3.connect(stack.data_dir / "hearth.db") as db:
            row: tuple[Any, ...] | None = db.execute(
                "select status, prompt_tokens, completion_tokens from usage where request_id = ?",
                [request_id],
            ).fetchone()
        return row

    def ready() -> bool:
        row = read()
        return row is not None and (want is None or row == want)

    _until(ready)
    row = read()
    assert row is not None
    return row


def _chat(stack: Stack, max_tokens: int) -> openai.types.chat.ChatCompletion:
    client = openai.OpenAI(base_url=stack.api, api_key=stack.token, max_retries=0)
    return client.chat.completions.create(
        model="hearth-demo", messages=[{"role": "user", "content": "count me"}], max_tokens=max_tokens,
        extra_body={"ignore_eos": True},
    )  # fmt: skip


def test_a_finished_job_is_confirmed_by_the_nodes_signed_heartbeat(tapped: Tapped) -> None:
    stack = tapped.stack
    before = _receipts(stack).get("confirmed", 0)
    r = _chat(stack, 5)
    assert r.usage is not None
    row = _row(stack, r.id.removeprefix("chatcmpl-"))
    assert row == ("ok", r.usage.prompt_tokens, 5)
    _until(lambda: _receipts(stack).get("confirmed", 0) > before)


def test_counts_changed_on_the_way_are_corrected_to_what_the_node_signed(
    tapped: Tapped, caplog: pytest.LogCaptureFixture
) -> None:
    stack = tapped.stack
    caplog.set_level(logging.WARNING, logger="hearth.scheduler")
    # The META frame's counts (the client's own usage, inside the answer, goes on to "total_tokens").
    tapped.tap.rewrite = lambda data: data.replace(b'"completion_tokens":7}', b'"completion_tokens":1}')
    try:
        r = _chat(stack, 7)
    finally:
        tapped.tap.rewrite = None
    assert r.usage is not None and r.usage.completion_tokens == 7
    row = _row(stack, r.id.removeprefix("chatcmpl-"), want=("ok", r.usage.prompt_tokens, 7))
    assert row[2] == 7
    assert any("changed them" in rec.getMessage() for rec in caplog.records)
    assert _receipts(stack).get("corrected", 0) >= 1


def test_an_abandoned_stream_is_billed_for_what_the_node_made(tapped: Tapped) -> None:
    stack = tapped.stack
    corrected = _receipts(stack).get("corrected", 0)
    with httpx.stream(
        "POST", stack.api + "/chat/completions", headers={"Authorization": f"Bearer {stack.token}"},
        json={"model": "hearth-demo", "messages": [{"role": "user", "content": "go on"}], "max_tokens": 200,
              "stream": True, "ignore_eos": True},
        timeout=30,
    ) as r:  # fmt: skip
        events = []
        for line in r.iter_lines():
            if line.startswith("data: {"):
                events.append(line)
            if len(events) == 4:  # the role, then three tokens: the client leaves
                break
    request_id = re.search(r'"id": ?"chatcmpl-([^"]+)"', events[0]).group(1)  # type: ignore[union-attr]

    def billed() -> bool:
        with sqlite3.connect(stack.data_dir / "hearth.db") as db:
            row = db.execute(
                "select status, completion_tokens from usage where request_id = ?", [request_id]
            ).fetchone()
        return row is not None and row[0] == "cancelled" and row[1] >= 3

    _until(billed)
    # The stream's last count (about once a second) was older than the node's: the receipt corrected it.
    _until(lambda: _receipts(stack).get("corrected", 0) > corrected)
