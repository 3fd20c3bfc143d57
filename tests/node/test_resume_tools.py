"""Blind failover of a streamed answer under tools: the replacement node goes on with the tool calls the
client has, under their ids, and the client reads one answer.

A real answer (the demo model, under a tools grammar) is streamed by one writer up to every possible
point; node.resume reads those events back as the replacement would, and a second writer, primed with
them, streams the rest. The client's view of the two streams together must be the single writer's.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from node.backends.base import SamplingParams
from node.backends.transformers_backend import TransformersBackend
from node.constrain import request_constraint
from node.resume import said
from node.tool_calls import ToolResponseWriter
from protocol.envelope import EnvelopeError
from protocol.schemas import parse_request

PLACE = {"type": "object", "properties": {"city": {"enum": ["Oslo", 'Quote"d \\ city']},
         "days": {"type": "integer", "minimum": 1, "maximum": 9}},
         "required": ["city", "days"], "additionalProperties": False}  # fmt: skip
TOOLS = [
    {"type": "function", "function": {"name": "weather", "parameters": PLACE}},
    {"type": "function", "function": {"name": "nothing"}},
]


def _request(**body: Any) -> Any:
    return parse_request(
        "chat", {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True, **body}
    )


def _writer() -> ToolResponseWriter:
    return ToolResponseWriter("chat", model="m", request_id="r1", stream=True, include_usage=False, created=7)


def _client_view(stream: bytes) -> dict[str, Any]:
    """What an OpenAI client assembles: content, each call's id, name and arguments, the finish."""
    content, calls, finishes, roles = "", {}, [], 0
    for event in stream.split(b"\n\n"):
        if not event.startswith(b"data: {"):
            continue
        (choice,) = json.loads(event[6:])["choices"]
        delta = choice["delta"]
        roles += "role" in delta
        content += delta.get("content") or ""
        for part in delta.get("tool_calls") or ():
            if "id" in part:
                assert part["index"] not in calls, "a call is opened once"
                calls[part["index"]] = {"id": part["id"], "name": part["function"]["name"], "arguments": ""}
            calls[part["index"]]["arguments"] += part["function"]["arguments"]
        if choice["finish_reason"]:
            finishes.append(choice["finish_reason"])
    return {
        "content": content,
        "calls": [calls[i] for i in sorted(calls)],
        "finishes": finishes,
        "roles": roles,
    }


def _split_and_resume(text: str, k: int) -> tuple[bytes, str]:
    """The client's stream when the first node sent ``text[:k]`` and its replacement the rest."""
    first = _writer()
    before = first.start() + first.delta(text[:k])
    resumed = said(before, "chat")
    assert resumed.began
    # What the replacement goes on from is exactly what the first node generated up to a point.
    assert text.startswith(resumed.text), (resumed.text, text)
    second = _writer()
    second.resume(resumed)
    after = second.delta(text[len(resumed.text) :]) + second.finish_choice(0, "stop") + second.end(1, 1)
    return before + after, resumed.text


@pytest.fixture(scope="module")
def backend(demo_model_dir: Path) -> TransformersBackend:
    return TransformersBackend.load(demo_model_dir, threads=1)


def _generate(backend: TransformersBackend, req: Any, seed: int, sent: str = "") -> str:
    factory = request_constraint(backend, req, backend.encode(sent, add_special_tokens=False) if sent else ())
    params = SamplingParams(max_new_tokens=400, seed=seed, constraint=factory)
    prompt = backend.encode("<s>hello", add_special_tokens=False)
    if sent:
        prompt += backend.encode(sent, add_special_tokens=False)
    tokens = list(backend.generate(prompt, params, threading.Event()))
    assert len(tokens) < 400, "a bounded call ran to max_tokens"
    return backend.decode(tokens)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_a_tool_call_answer_cut_anywhere_reads_as_one_answer(backend: TransformersBackend, seed: int) -> None:
    req = _request(tools=TOOLS, tool_choice="required")
    text = _generate(backend, req, seed)
    whole = _writer()
    expected = _client_view(
        whole.start() + whole.delta(text) + whole.finish_choice(0, "stop") + whole.end(1, 1)
    )
    assert expected["calls"] and expected["finishes"] == ["tool_calls"]
    for k in range(len(text) + 1):
        stream, _ = _split_and_resume(text, k)
        got = _client_view(stream)
        assert got["roles"] == 1 and got["finishes"] == ["tool_calls"] and got["content"] == ""
        # Same calls, arguments and names; ids are the ones the first node gave, kept by the second.
        assert [(c["name"], c["arguments"]) for c in got["calls"]] == [
            (c["name"], c["arguments"]) for c in expected["calls"]
        ], k
        assert len({c["id"] for c in got["calls"]}) == len(got["calls"])
        for call in got["calls"]:
            jsonschema.validate(json.loads(call["arguments"]), PLACE if call["name"] == "weather" else {})


def test_a_content_answer_under_tools_resumes_as_content() -> None:
    text = "It is sunny in Oslo."
    for k in range(len(text) + 1):
        stream, _ = _split_and_resume(text, k)
        got = _client_view(stream)
        assert (got["content"], got["calls"], got["finishes"]) == (text, [], ["stop"])


def test_the_replacement_model_goes_on_under_the_grammar_from_the_rebuilt_calls(
    backend: TransformersBackend,
) -> None:
    """The rebuilt text is a prefix the grammar accepts: the replacement's matcher follows its tokens,
    then finishes the open call and the answer validates."""
    req = _request(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "weather"}})
    text = _generate(backend, req, seed=5)
    first = _writer()
    cut = text.index('"arguments":') + len('"arguments":{"city":')  # in the first call's arguments
    before = first.start() + first.delta(text[:cut])
    resumed = said(before, "chat")
    assert resumed.calls and resumed.text == text[:cut]
    rest = _generate(backend, req, seed=9, sent=resumed.text)
    second = _writer()
    second.resume(resumed)
    stream = before + second.delta(rest) + second.finish_choice(0, "stop")
    got = _client_view(stream)
    assert got["finishes"] == ["tool_calls"] and got["calls"][0]["id"] == resumed.calls[0].id
    for call in got["calls"]:
        jsonschema.validate(json.loads(call["arguments"]), PLACE if call["name"] == "weather" else {})


@pytest.mark.parametrize(
    "delta",
    [
        {"tool_calls": [{"index": 1, "id": "call_x", "function": {"name": "w", "arguments": ""}}]},  # gap
        {"tool_calls": [{"index": 0, "id": "bad id!", "function": {"name": "w", "arguments": ""}}]},
        {"tool_calls": [{"index": 0, "id": "call_x", "function": {"name": "not a name", "arguments": ""}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": "{"}}]},  # arguments of no call
        {"tool_calls": [{"index": 0, "id": "call_x", "function": {"name": "w", "arguments": 5}}]},
        {"tool_calls": "call"},
    ],
)
def test_events_that_are_not_a_tool_call_stream_are_refused(delta: dict[str, Any]) -> None:
    event = b"data: " + json.dumps({"created": 1, "choices": [{"index": 0, "delta": delta}]}).encode()
    with pytest.raises(EnvelopeError):
        said(event + b"\n\n", "chat")
