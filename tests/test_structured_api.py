"""Structured output and tool calls through the official `openai` client, plaintext to the scheduler and
sealed through `hearth proxy` (the node enforces both: under E2E only it can read the request).

The demo model is random, so the tests check form, not content: every answer parses and validates against
its schema (several: nested objects, arrays, enums, required and optional fields, $ref), tool calls come
back as OpenAI sends them (ids, finish_reason, streamed deltas), and what cannot be honoured is a 400
naming the field. The schemas bound their strings, numbers and arrays: a random model would otherwise
write a string until max_tokens (the grammar allows it), and a cut answer does not parse.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from node.settings import ModelSettings
from tests.support import LoopThread, SealedStack, Stack, start_sealed_stack, stop_stack

MODEL = "hearth-demo"
ASK = [{"role": "user", "content": "Answer in JSON, please."}]
ROOM = 400  # max_tokens: far more than any bounded schema here needs

SCHEMAS: dict[str, dict[str, Any]] = {
    # nested objects, an enum, a bounded integer, all required
    "nested": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 12},
            "address": {
                "type": "object",
                "properties": {
                    "city": {"enum": ["Paris", "Oslo", "Lima"]},
                    "zip": {"type": "integer", "minimum": 0, "maximum": 99999},
                },
                "required": ["city", "zip"],
                "additionalProperties": False,
            },
        },
        "required": ["name", "address"],
        "additionalProperties": False,
    },
    # an array of objects, with bounds on its length
    "array": {
        "type": "array",
        "items": {
            "type": "object",
            "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 9}, "ok": {"type": "boolean"}},
            "required": ["id", "ok"],
            "additionalProperties": False,
        },
        "minItems": 1,
        "maxItems": 3,
    },
    # an optional field beside a required one, and null in an enum
    "optional": {
        "type": "object",
        "properties": {
            "mood": {"enum": ["happy", "sad", None]},
            "note": {"type": "string", "maxLength": 5},
        },
        "required": ["mood"],
        "additionalProperties": False,
    },
    # a definition used twice through $ref, and anyOf
    "refs": {
        "$defs": {"small": {"type": "integer", "minimum": -5, "maximum": 5}},
        "type": "object",
        "properties": {
            "a": {"$ref": "#/$defs/small"},
            "b": {"anyOf": [{"$ref": "#/$defs/small"}, {"type": "boolean"}]},
        },
        "required": ["a", "b"],
        "additionalProperties": False,
    },
}

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"enum": ["Paris", "Oslo"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "days"],
            "additionalProperties": False,
        },
    },
}
CLOCK = {"type": "function", "function": {"name": "get_time"}}  # no parameters: "{}"
TOOLS = [WEATHER, CLOCK]
ARGUMENTS = {
    "get_weather": WEATHER["function"]["parameters"],
    "get_time": {"type": "object", "maxProperties": 0},
}


@pytest.fixture(scope="module")
def sealed(
    servers: LoopThread, demo_model: ModelSettings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SealedStack]:
    """A stack that takes sealed requests only, and `hearth proxy` in front of it."""
    env = servers.call(start_sealed_stack(tmp_path_factory.mktemp("structured-proxy"), [demo_model]))
    yield env
    servers.call(stop_stack(env.stack))


@pytest.fixture(params=["plain", "sealed"])
def client(request: pytest.FixtureRequest) -> openai.OpenAI:
    if request.param == "plain":
        stack: Stack = request.getfixturevalue("stack")
        return openai.OpenAI(base_url=stack.api, api_key=stack.token, max_retries=0)
    env: SealedStack = request.getfixturevalue("sealed")
    return openai.OpenAI(base_url=env.url, api_key="unused-locally", max_retries=0)


def _json_schema(name: str) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": SCHEMAS[name], "strict": True}}


def _streamed(client: openai.OpenAI, **kwargs: Any) -> list[Any]:
    return list(client.chat.completions.create(model=MODEL, messages=ASK, stream=True, **kwargs))


# ----- response_format -----


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_answers_validate_against_their_schema(client: openai.OpenAI, name: str) -> None:
    for seed in (1, 2):
        r = client.chat.completions.create(
            model=MODEL, messages=ASK, max_tokens=ROOM, seed=seed,  # type: ignore[arg-type]
            response_format=_json_schema(name),  # type: ignore[arg-type]
        )  # fmt: skip
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content or ""), SCHEMAS[name])


@pytest.mark.parametrize("name", ["nested", "array"])
def test_streamed_answers_validate_and_equal_the_whole_answer(client: openai.OpenAI, name: str) -> None:
    args: dict[str, Any] = {"max_tokens": ROOM, "seed": 5, "response_format": _json_schema(name)}
    chunks = _streamed(client, **args)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    jsonschema.validate(json.loads(text), SCHEMAS[name])
    whole = client.chat.completions.create(model=MODEL, messages=ASK, **args)  # type: ignore[call-overload]
    assert whole.choices[0].message.content == text


def test_json_object_answers_are_objects(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model=MODEL, messages=ASK, max_tokens=ROOM, seed=3,  # type: ignore[arg-type]
        response_format={"type": "json_object"}, extra_body={"temperature": 0.0},
    )  # fmt: skip
    if r.choices[0].finish_reason == "stop":  # a random model may fill any object until max_tokens
        assert isinstance(json.loads(r.choices[0].message.content or ""), dict)
    else:
        assert (r.choices[0].message.content or "").startswith("{")


class Forecast(BaseModel):
    city: Literal["Paris", "Oslo"]
    rain: bool
    degrees: Annotated[int, Field(ge=-30, le=45)]
    summary: Annotated[str, Field(max_length=10)]


def test_the_sdks_parse_fills_a_pydantic_model(client: openai.OpenAI) -> None:
    r = client.chat.completions.parse(
        model=MODEL, messages=ASK, max_tokens=ROOM, seed=4, response_format=Forecast
    )  # type: ignore[arg-type]
    parsed = r.choices[0].message.parsed
    assert isinstance(parsed, Forecast)
    assert -30 <= parsed.degrees <= 45 and len(parsed.summary) <= 10


@pytest.mark.parametrize(
    ("body", "param", "says"),
    [
        # a keyword llguidance cannot enforce: named
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {}}}}},
         "response_format.json_schema.schema", "not"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
            "type": "array", "uniqueItems": True}}}}, "response_format.json_schema.schema", "uniqueItems"),
        # the same in a tool's parameters
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
            "type": "object", "dependentRequired": {"a": ["b"]}}}}]}, "tools.0.function.parameters",
         "dependentRequired"),
        ({"response_format": {"type": "yaml"}}, "response_format", "response_format"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema.json_schema", "required"),
        # the deprecated function-calling fields: refused, never ignored
        ({"functions": [{"name": "f"}]}, "functions", "use tools"),
        ({"function_call": "auto"}, "function_call", "use tool_choice"),
        ({"tool_choice": "required"}, "tool_choice", "needs tools"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
         "tool_choice", "not in tools"),
        ({"tools": [WEATHER, WEATHER]}, "tools", "same name"),
        ({"messages": [{"role": "tool", "content": "18C"}]}, "messages.0", "tool_call_id"),
    ],
)  # fmt: skip
def test_what_cannot_be_honoured_is_a_400_naming_the_field(
    client: openai.OpenAI, body: dict[str, Any], param: str, says: str
) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model=MODEL,
            max_tokens=8,
            **{"messages": ASK, **body},  # type: ignore[call-overload]
        )
    error = refused.value.body
    assert isinstance(error, dict)
    assert error["param"] == param and says in error["message"], error


# ----- completions -----


@pytest.mark.parametrize("stream", [False, True])
def test_completions_hold_every_choice_to_the_schema(client: openai.OpenAI, stream: bool) -> None:
    """vLLM's extension, which OpenAI's completions lack: what follows the prompt is held to the format,
    for every prompt and sample (two prompts × n=2)."""
    args: dict[str, Any] = {"extra_body": {"response_format": _json_schema("nested")}}
    prompts = ["A record:", "Another one:"]
    if stream:
        texts = ["", "", "", ""]
        for chunk in client.completions.create(
            model=MODEL, prompt=prompts, n=2, max_tokens=ROOM, seed=6, stream=True, **args
        ):
            for choice in chunk.choices:
                texts[choice.index] += choice.text
    else:
        r = client.completions.create(model=MODEL, prompt=prompts, n=2, max_tokens=ROOM, seed=6, **args)
        assert {c.finish_reason for c in r.choices} == {"stop"}
        texts = [c.text for c in sorted(r.choices, key=lambda c: c.index)]
    assert len(texts) == 4
    for text in texts:
        jsonschema.validate(json.loads(text), SCHEMAS["nested"])


def test_completions_echo_the_prompt_before_the_held_answer(client: openai.OpenAI) -> None:
    r = client.completions.create(
        model=MODEL, prompt="JSON:", echo=True, max_tokens=ROOM, seed=2,
        extra_body={"response_format": {"type": "json_object"}, "temperature": 0.0},
    )  # fmt: skip
    text = r.choices[0].text
    assert text.startswith("JSON:")
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text.removeprefix("JSON:")), dict)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("guided_json", {"type": "object"}),
        ("guided_regex", "[a-z]+"),
        ("guided_choice", ["yes", "no"]),
        ("guided_grammar", 'root ::= "a"'),
        ("structured_outputs", {"choice": ["yes", "no"]}),
    ],
)
@pytest.mark.parametrize("endpoint", ["chat", "completion"])
def test_vllms_own_constraints_are_refused_not_ignored(
    client: openai.OpenAI, endpoint: str, field: str, value: Any
) -> None:
    def send() -> object:
        if endpoint == "chat":
            return client.chat.completions.create(
                model=MODEL, messages=ASK, max_tokens=4, extra_body={field: value}
            )
        return client.completions.create(model=MODEL, prompt="hi", max_tokens=4, extra_body={field: value})

    with pytest.raises(openai.BadRequestError) as refused:
        send()
    error = refused.value.body
    assert isinstance(error, dict)
    assert error["param"] == field and "response_format" in error["message"], error


@pytest.mark.parametrize("field", ["tools", "tool_choice", "functions", "function_call"])
def test_completions_refuse_tools(client: openai.OpenAI, field: str) -> None:
    value: Any = [WEATHER] if field in ("tools", "functions") else "auto"
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(model=MODEL, prompt="hi", max_tokens=4, extra_body={field: value})
    error = refused.value.body
    assert isinstance(error, dict)
    assert error["param"] == field and "chat/completions" in error["message"], error


# ----- tools -----


def _check_calls(calls: Any, names: set[str]) -> None:
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_") and call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), ARGUMENTS[call.function.name])
    assert len({call.id for call in calls}) == len(calls)


def test_required_tool_calls_come_back_with_ids_and_valid_arguments(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model=MODEL,
        messages=ASK,
        max_tokens=ROOM,
        seed=1,
        tools=TOOLS,
        tool_choice="required",  # type: ignore[arg-type]
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    _check_calls(choice.message.tool_calls, {"get_weather", "get_time"})


def test_a_named_function_is_the_one_called_once_without_parallel_calls(client: openai.OpenAI) -> None:
    for seed in (1, 2, 3):
        r = client.chat.completions.create(
            model=MODEL, messages=ASK, max_tokens=ROOM, seed=seed, tools=TOOLS,  # type: ignore[arg-type]
            tool_choice={"type": "function", "function": {"name": "get_weather"}}, parallel_tool_calls=False,
        )  # fmt: skip
        calls = r.choices[0].message.tool_calls
        assert calls is not None and len(calls) == 1
        _check_calls(calls, {"get_weather"})


def test_streamed_tool_calls_arrive_as_openai_sends_them(client: openai.OpenAI) -> None:
    args: dict[str, Any] = {"max_tokens": ROOM, "seed": 6, "tools": TOOLS, "tool_choice": "required"}
    chunks = _streamed(client, **args)
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert deltas[0].role == "assistant"
    calls: dict[int, dict[str, Any]] = {}
    for delta in deltas:
        for part in delta.tool_calls or ():
            if part.index not in calls:
                # A call opens with its id, type and name, and no arguments yet.
                assert part.id and part.type == "function" and part.function and part.function.name
                assert part.function.arguments == ""
                calls[part.index] = {"id": part.id, "name": part.function.name, "arguments": ""}
            else:
                assert part.id is None and part.function and part.function.name is None
                calls[part.index]["arguments"] += part.function.arguments or ""
    assert sorted(calls) == list(range(len(calls))) and calls
    assert sum(len(c["arguments"]) > 0 for c in calls.values()) == len(calls)
    for call in calls.values():
        jsonschema.validate(json.loads(call["arguments"]), ARGUMENTS[call["name"]])
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    # The same seed gives the same calls unstreamed (their ids are new).
    whole = client.chat.completions.create(model=MODEL, messages=ASK, **args)  # type: ignore[call-overload]
    got = [(c.function.name, c.function.arguments) for c in whole.choices[0].message.tool_calls]
    assert got == [(c["name"], c["arguments"]) for c in calls.values()]


def test_auto_answers_with_text_or_with_calls(client: openai.OpenAI) -> None:
    for seed in range(4):
        r = client.chat.completions.create(
            model=MODEL,
            messages=ASK,
            max_tokens=ROOM,
            seed=seed,
            tools=TOOLS,  # type: ignore[arg-type]
        )
        choice = r.choices[0]
        if choice.message.tool_calls:
            assert choice.message.content is None and choice.finish_reason in ("tool_calls", "length")
        else:
            assert "<tool_call>" not in (choice.message.content or "")


def test_tool_choice_none_answers_in_text(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model=MODEL,
        messages=ASK,
        max_tokens=16,
        seed=1,
        tools=TOOLS,
        tool_choice="none",  # type: ignore[arg-type]
    )
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason in ("stop", "length")


def test_a_tool_loop_sends_the_results_back(client: openai.OpenAI) -> None:
    messages: list[Any] = [{"role": "user", "content": "What is the weather in Oslo?"}]
    first = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=ROOM,
        seed=2,
        tools=[WEATHER],
        tool_choice="required",  # type: ignore[arg-type]
    )
    message = first.choices[0].message
    assert message.tool_calls
    messages.append(message.model_dump(exclude_none=True))
    for call in message.tool_calls:
        messages.append({"role": "tool", "tool_call_id": call.id, "content": '{"degrees": 11}'})
    second = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, tools=[WEATHER])  # type: ignore[arg-type]
    assert second.usage is not None and second.usage.prompt_tokens > first.usage.prompt_tokens  # type: ignore[union-attr]
    assert second.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_tools_and_a_schema_together_give_calls_or_a_valid_answer(client: openai.OpenAI) -> None:
    for seed in range(3):
        r = client.chat.completions.create(
            model=MODEL, messages=ASK, max_tokens=ROOM, seed=seed, tools=[WEATHER],  # type: ignore[arg-type]
            response_format=_json_schema("optional"),  # type: ignore[arg-type]
        )  # fmt: skip
        message = r.choices[0].message
        if message.tool_calls:
            _check_calls(message.tool_calls, {"get_weather"})
        else:
            jsonschema.validate(json.loads(message.content or ""), SCHEMAS["optional"])


def test_prompt_text_stays_out_of_the_logs(
    client: openai.OpenAI, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    canary = "okapi-canary-51c2"
    schema = {"type": "object", "properties": {canary: {"type": "boolean"}}, "required": [canary],
              "additionalProperties": False}  # fmt: skip
    with caplog.at_level("DEBUG"):
        r = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": canary}], max_tokens=ROOM, seed=1,  # type: ignore[arg-type]
            response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": schema}},
        )  # fmt: skip
    assert canary in (r.choices[0].message.content or "")  # the schema's key, in the answer
    assert canary not in caplog.text
