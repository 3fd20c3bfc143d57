"""A plaintext stream whose node dies mid-answer is continued by another node: the client loses nothing.

Two real nodes in their own processes serve the demo model; a stream starts on one, which is then killed
(`kill -9`). The scheduler hands the other node the events the client already has (node.plain's `resume`,
or sealed under the request's response seed when it seals toward its nodes) and relays the rest. The client
sees one answer: one role event, no error, one finish, `[DONE]`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from node.resume import Resume
from node.sealed import _resume
from protocol.directory import KeyStatement, key_id
from protocol.envelope import from_wire, open_request, public_key_bytes
from protocol.identity import b64e
from scheduler.relay import RelayJob, seal_toward
from scheduler.state import FEDERATION
from tests.support import LoopThread, Stack, certify_node, start_scheduler, stop_stack, wait_for

ROOT = Path(__file__).resolve().parents[2]
MAX_TOKENS = 400


@pytest.fixture
def pair(
    request: pytest.FixtureRequest, servers: LoopThread, demo_model_dir: Path, tmp_path: Path
) -> Iterator[tuple[Stack, dict[str, subprocess.Popen[str]]]]:
    stack = servers.call(start_scheduler(tmp_path / "scheduler", seal_toward_nodes=request.param))
    procs: dict[str, subprocess.Popen[str]] = {}
    try:
        for node_id in ("n1", "n2"):
            servers.call(certify_node(stack, tmp_path / node_id, node_id))
            proc = subprocess.Popen(
                [sys.executable, "-m", "tests.node_process", str(demo_model_dir), str(tmp_path / node_id)],
                cwd=ROOT, stdout=subprocess.PIPE, text=True,
            )  # fmt: skip
            procs[node_id] = proc
            assert proc.stdout is not None
            proc.stdout.readline()

        async def both_ready() -> bool:
            ready = {
                n.node_id for n in stack.snapshot().nodes if n.healthy for m in n.models if m.phase == "ready"
            }
            keys = stack.scheduler_app[FEDERATION].directory.keys if stack.scheduler_app else {}
            return ready >= {"n1", "n2"} and set(keys) >= {"n1", "n2"}

        servers.call(wait_for(both_ready, within=90))
        yield stack, procs
    finally:
        for proc in procs.values():
            proc.kill()
            proc.wait()
            assert proc.stdout is not None
            proc.stdout.close()
        servers.call(stop_stack(stack))


def _serving(stack: Stack) -> str:
    busy = [n.node_id for n in stack.snapshot().nodes for m in n.models if m.active > 0]
    assert len(busy) == 1, busy
    return busy[0]


@pytest.mark.parametrize(
    ("pair", "endpoint"),
    [
        ("remote", "chat"),  # loopback nodes get plaintext, and the replacement the events as they are
        ("remote", "completion"),  # the same for plain completions
        ("always", "chat"),  # sealed by the scheduler: the replacement opens the events under the same seed
        ("remote", "tools"),  # a streamed tool call cut mid-arguments: the replacement finishes the call
        ("always", "tools"),  # the same, sealed
    ],
    indirect=["pair"],
)
def test_a_plaintext_stream_survives_its_node_being_killed(
    pair: tuple[Stack, dict[str, subprocess.Popen[str]]], endpoint: str
) -> None:
    stack, procs = pair
    if endpoint == "completion":
        path, body = "/completions", {"prompt": "Once upon a time"}
    else:
        path, body = "/chat/completions", {"messages": [{"role": "user", "content": "go on"}]}
    body |= {"model": "hearth-demo", "max_tokens": MAX_TOKENS, "ignore_eos": True, "stream": True,
             "stream_options": {"include_usage": True}}  # fmt: skip
    if endpoint == "tools":
        # A call longer than max_tokens (200 words at least), so the kill lands within its arguments.
        body |= {"tools": [WORDS], "tool_choice": "required"}
    events: list[str] = []
    with httpx.stream(
        "POST", stack.api + path, json=body, timeout=120, headers={"Authorization": f"Bearer {stack.token}"}
    ) as r:
        assert r.status_code == 200
        lines = (line for line in r.iter_lines() if line.startswith("data: "))
        for _ in range(6):
            events.append(next(lines))
        victim = _serving(stack)
        os.kill(procs[victim].pid, signal.SIGKILL)
        events += list(lines)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
    assert not [c for c in chunks if "error" in c], "no error event"
    assert len({c["id"] for c in chunks}) == 1, "one answer"
    choices = [c["choices"][0] for c in chunks if c["choices"]]
    if endpoint != "completion":
        assert sum(1 for ch in choices if ch["delta"].get("role")) == 1, "one role event"
    if endpoint == "tools":
        _assert_one_call(choices)
    finishes = [ch["finish_reason"] for ch in choices if ch.get("finish_reason")]
    assert finishes == ["length"]
    usage = chunks[-1]["usage"]
    # The answer is as long as asked: what the killed node wrote, then what its replacement wrote.
    assert usage["completion_tokens"] == MAX_TOKENS
    survivor = ({"n1", "n2"} - {victim}).pop()
    assert stack.snapshot().nodes and any(n.node_id == survivor and n.healthy for n in stack.snapshot().nodes)


WORDS = {"type": "function", "function": {"name": "words", "parameters": {
    "type": "object", "properties": {"words": {"type": "array", "items": {"type": "string", "maxLength": 8},
                                               "minItems": 200}},
    "required": ["words"], "additionalProperties": False}}}  # fmt: skip


def _assert_one_call(choices: list[dict[str, Any]]) -> None:
    """The client saw one call, opened once under one id, whose arguments (cut by max_tokens) are one
    JSON document so far: nothing the killed node sent is repeated or lost at the seam."""
    parts = [p for ch in choices for p in ch["delta"].get("tool_calls", ())]
    assert not [ch for ch in choices if ch["delta"].get("content")]
    opened = [p for p in parts if "id" in p]
    assert len(opened) == 1 and opened[0]["function"]["name"] == "words"
    assert {p["index"] for p in parts} == {0}
    arguments = "".join(p["function"]["arguments"] for p in parts)
    closed = []
    for tail in ("]}", '"]}', '""]}'):
        try:
            closed.append(json.loads(arguments + tail))
        except ValueError:
            continue
    assert len(closed) == 1, arguments
    assert all(isinstance(w, str) and len(w) <= 8 for w in closed[0]["words"])


def test_a_resumed_answer_is_sealed_to_the_node_it_goes_to_and_opens_there() -> None:
    """seal_toward's hand-over, opened by the node's own code: sealed under the envelope's own response seed
    (a fresh one per attempt, so no node can derive another's secret), and the node numbers its own
    frames after it."""
    private = X25519PrivateKey.generate()
    raw_public = public_key_bytes(private.public_key())
    now = int(time.time())
    key = KeyStatement("n2", key_id(raw_public), b64e(raw_public), now - 10, now + 3600)
    request = json.dumps(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    ).encode()
    job = RelayJob("req1", "tok", "chat", "m", True, b"{}", now)
    said = b'data: {"id":"chatcmpl-req1","created":5,"choices":[{"delta":{"content":"Hello"}}]}\n\n'
    seeds = []
    for _ in range(2):
        sent, unsealer = seal_toward(job, request, None, key, said)
        doc = json.loads(sent.body)
        (segment,) = doc["resume"]
        assert segment["node_id"] == "n2"
        body, seed = open_request(
            from_wire(doc["envelope"]), node_id="n2", keys={key.key_id: private}, now=now
        )
        assert body == request
        assert _resume(doc["resume"], seed, "req1", "chat") == (1, Resume("Hello", 5))
        assert unsealer._opener.seq == 1  # the scheduler opens n2's own frames from there on
        seeds.append(seed)
    assert seeds[0] != seeds[1]
