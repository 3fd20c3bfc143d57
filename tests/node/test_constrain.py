"""Constrained decoding on the transformers backend, and the pieces around it: generated schemas' answers
validate (Hypothesis), grammars compile once per model, tool calls are read back from any split of the
text, and tools reach a template with a tools section as Hugging Face templates expect them.

Generated schemas are bounded (strings, integers, arrays, properties): the grammar lets a random model
write an unbounded string until max_tokens, and a cut answer cannot validate.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from node.backends.base import SamplingParams
from node.backends.transformers_backend import TransformersBackend
from node.constrain import Grammars, build_grammar, grammars_for
from node.templates import ChatTemplate
from node.tool_calls import ToolCallReader
from node.tools import chat_messages
from protocol.errors import InvalidRequest
from protocol.schemas import parse_request

NAMES = st.sampled_from(["a", "b", "id", "name", "tags", "x_1", "deep"])


def _leaf() -> st.SearchStrategy[dict[str, Any]]:
    return st.one_of(
        st.builds(lambda n: {"type": "string", "maxLength": n}, st.integers(0, 6)),
        st.builds(
            lambda lo, span: {"type": "integer", "minimum": lo, "maximum": lo + span},
            st.integers(-50, 50),
            st.integers(0, 200),
        ),
        st.just({"type": "boolean"}),
        st.just({"type": "null"}),
        st.builds(
            lambda vs: {"enum": vs},
            st.lists(
                st.one_of(st.text("abcxyz", max_size=4), st.integers(-3, 3), st.booleans()),
                min_size=1,
                max_size=4,
                unique_by=lambda v: (type(v), v),
            ),
        ),
        st.builds(lambda p: {"type": "string", "pattern": p}, st.sampled_from(["^[a-c]{1,3}$", "^x[0-9]?$"])),
    )


def _grow(inner: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[dict[str, Any]]:
    objects = st.dictionaries(NAMES, inner, min_size=1, max_size=3).flatmap(
        lambda props: st.builds(
            lambda required: {
                "type": "object", "properties": props, "required": required, "additionalProperties": False,
            },
            st.lists(st.sampled_from(sorted(props)), unique=True),
        )
    )  # fmt: skip
    arrays = st.builds(
        lambda items, most: {"type": "array", "items": items, "maxItems": most}, inner, st.integers(0, 3)
    )
    either = st.builds(lambda a, b: {"anyOf": [a, b]}, inner, inner)
    return st.one_of(objects, arrays, either)


SCHEMAS = st.recursive(_leaf(), _grow, max_leaves=6)


def _request(**body: Any) -> Any:
    return parse_request("chat", {"model": "m", "messages": [{"role": "user", "content": "hi"}], **body})


def _answer(backend: TransformersBackend, factory: Any, seed: int, max_new: int = 300) -> str:
    params = SamplingParams(max_new_tokens=max_new, seed=seed, constraint=factory)
    tokens = list(
        backend.generate(backend.encode("<s>hello", add_special_tokens=False), params, threading.Event())
    )
    assert len(tokens) < max_new, "a bounded schema's answer ran to max_tokens"
    return backend.decode(tokens)


@pytest.fixture(scope="module")
def backend(demo_model_dir: Path) -> TransformersBackend:
    return TransformersBackend.load(demo_model_dir, threads=1)


@settings(max_examples=100, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(schema=SCHEMAS, seed=st.integers(0, 2**16))
def test_answers_to_generated_schemas_validate(
    backend: TransformersBackend, schema: dict[str, Any], seed: int
) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}
    factory = grammars_for(backend).constraint(build_grammar(_request(response_format=fmt)))
    jsonschema.validate(json.loads(_answer(backend, factory, seed)), schema)


def _in_schema_order(value: Any, schema: dict[str, Any]) -> Any:
    """``value`` with each object's keys in its schema's order (the order the grammar writes them in)."""
    if isinstance(value, dict) and "properties" in schema:
        order = list(schema["properties"])
        return {
            k: _in_schema_order(value[k], schema["properties"][k]) for k in sorted(value, key=order.index)
        }
    if isinstance(value, list) and "items" in schema:
        return [_in_schema_order(v, schema["items"]) for v in value]
    return value


def _instances(schema: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Valid instances of a schema SCHEMAS draws (hypothesis-jsonschema 0.23 fails under Hypothesis 6.170)."""
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    if "anyOf" in schema:
        return st.one_of([_instances(s) for s in schema["anyOf"]])
    kind = schema["type"]
    if kind == "string":
        if "pattern" in schema:
            return st.from_regex(schema["pattern"], fullmatch=True)
        return st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=schema["maxLength"])
    if kind == "integer":
        return st.integers(schema["minimum"], schema["maximum"])
    if kind == "boolean":
        return st.booleans()
    if kind == "null":
        return st.none()
    if kind == "array":
        return st.lists(_instances(schema["items"]), max_size=schema["maxItems"])
    props, required = schema["properties"], schema["required"]
    optional = [k for k in props if k not in required]
    return st.lists(st.sampled_from(optional) if optional else st.nothing(), unique=True).flatmap(
        lambda chosen: st.fixed_dictionaries({k: _instances(props[k]) for k in [*required, *chosen]})
    )


@settings(max_examples=100, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(schema=SCHEMAS, data=st.data())
def test_every_valid_answer_is_allowed(
    backend: TransformersBackend, schema: dict[str, Any], data: Any
) -> None:
    # The grammar must not be stricter than the schema: any instance, written compactly with its keys in
    # the schema's order, passes token by token and completes it.
    instance = data.draw(_instances(schema))
    text = json.dumps(_in_schema_order(instance, schema), separators=(",", ":"), ensure_ascii=False)
    fmt = {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}
    matcher = grammars_for(backend).constraint(build_grammar(_request(response_format=fmt)))()
    for token in backend.encode(text, add_special_tokens=False):
        assert bool(matcher.allowed(4096)[token]), text
        matcher.advance(token)
    eos = backend.encode("</s>", add_special_tokens=False)[0]
    assert bool(matcher.allowed(4096)[eos]), text


def test_a_grammar_compiles_once_per_model_and_each_sequence_gets_its_own_matcher(
    backend: TransformersBackend,
) -> None:
    grammars = Grammars(*backend.constraint_vocabulary())  # type: ignore[misc]
    grammar = build_grammar(_request(response_format={"type": "json_object"}))
    first, second = grammars.constraint(grammar), grammars.constraint(grammar)
    assert grammars.compiles == 1
    one, other = first(), second()
    one.advance(backend.encode("{", add_special_tokens=False)[0])
    # The other sequence is still at the start: "{" is allowed there, not after "{".
    brace = backend.encode("{", add_special_tokens=False)[0]
    assert bool(other.allowed(4096)[brace]) and not bool(one.allowed(4096)[brace])


def test_the_models_grammars_are_kept_with_the_model(backend: TransformersBackend) -> None:
    assert grammars_for(backend) is grammars_for(backend)


class SentencePieceOnly:
    """A model whose tokenizer has no tokenizer.json (exllamav2 reads such models)."""

    def constraint_vocabulary(self) -> None:
        return None


def test_a_tokenizer_llguidance_cannot_read_is_a_clear_400() -> None:
    with pytest.raises(InvalidRequest, match="tokenizer"):
        grammars_for(SentencePieceOnly())


# ----- reading tool calls back -----

CALLS = '<tool_call>{"name":"get_weather","arguments":{"city":"Oslo","n":[1,{"q":"}\\"]"}]}}</tool_call><tool_call>{"name":"f","arguments":{}}</tool_call>'


@pytest.mark.parametrize("size", [1, 2, 3, 7, len(CALLS)])
def test_tool_calls_are_read_whatever_pieces_the_text_comes_in(size: int) -> None:
    reader = ToolCallReader()
    events = []
    for i in range(0, len(CALLS), size):
        events += reader.push(CALLS[i : i + size])
    events += reader.finish()
    assert [(c.name, "".join(c.arguments)) for c in reader.calls] == [
        ("get_weather", '{"city":"Oslo","n":[1,{"q":"}\\"]"}]}'),
        ("f", "{}"),
    ]
    assert [kind for kind, _ in events if kind != "arguments"] == ["open", "open"]
    assert reader.content == []


@pytest.mark.parametrize("text", ["Hello", " <tool", "<tool_cal", "", "<to x"])
def test_text_that_is_not_a_call_is_content(text: str) -> None:
    reader = ToolCallReader()
    reader.push(text)
    reader.finish()
    assert "".join(reader.content) == text and reader.calls == []


# ----- tools in the prompt -----

TOOL_TEMPLATE = (
    "{% if tools %}TOOLS:{{ tools | tojson }}\n{% endif %}"
    "{% for m in messages %}{{ m.role }}:{{ m.content }}"
    "{% if m.tool_calls %}{% for c in m.tool_calls %}CALL {{ c.function.name }} {{ c.function.arguments | tojson }}"
    "{% endfor %}{% endif %}{% if m.tool_call_id %} ({{ m.tool_call_id }}){% endif %}\n{% endfor %}"
)
HISTORY = [
    {"role": "user", "content": "Weather in Oslo?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "w", "arguments": '{"city":"Oslo"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "11C"},
]  # fmt: skip
TOOL = {"type": "function", "function": {"name": "w", "parameters": {"type": "object"}}}


def test_a_template_with_a_tools_section_gets_tools_and_calls_as_hugging_face_passes_them() -> None:
    template = ChatTemplate.from_source(TOOL_TEMPLATE)
    assert template.takes_tools
    messages, tools = chat_messages(_request(messages=HISTORY, tools=[TOOL]), template)
    text = template.render(messages, tools=tools)
    assert 'TOOLS:[{"type": "function", "function": {"name": "w", "parameters": {"type": "object"}}}]' in text
    assert 'CALL w {"city": "Oslo"}' in text and "tool:11C (call_1)" in text


def test_a_template_without_one_gets_the_tools_in_a_system_message() -> None:
    template = ChatTemplate.named("chatml")
    assert not template.takes_tools
    messages, tools = chat_messages(_request(messages=HISTORY, tools=[TOOL]), template)
    assert tools is None and messages[0]["role"] == "system" and '"name": "w"' in messages[0]["content"]
    assert messages[2]["content"] == '<tool_call>{"name": "w", "arguments": {"city": "Oslo"}}</tool_call>'
    assert messages[3] == {"role": "user", "content": "<tool_response>\n11C\n</tool_response>"}
    # tool_choice "none": the history stays, the tools are not offered.
    quiet, _ = chat_messages(_request(messages=HISTORY, tools=[TOOL], tool_choice="none"), template)
    assert quiet[0]["role"] == "user"


def test_an_answer_resumed_on_another_node_goes_on_under_its_grammar(backend: TransformersBackend) -> None:
    # Failover: the new node's matcher follows what the first node sent, so the whole answer validates.
    from node.constrain import request_constraint

    schema = {"type": "object", "properties": {"a": {"enum": ["xy", "z"]}, "b": {"type": "boolean"}},
              "required": ["a", "b"], "additionalProperties": False}  # fmt: skip
    req = _request(response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": schema}})
    sent = '{"a":"xy",'
    factory = request_constraint(backend, req, backend.encode(sent, add_special_tokens=False))
    assert factory is not None
    jsonschema.validate(json.loads(sent + _answer(backend, factory, seed=3)), schema)


# ----- strict: true -----

OPEN = {"type": "object", "properties": {"a": {"type": "boolean"}, "n": {"type": "object", "properties": {
    "b": {"type": "integer"}}}}, "required": ["a"]}  # fmt: skip


def test_strict_closes_objects_that_do_not_say_what_else_they_allow() -> None:
    from node.constrain import closed

    got = closed({**OPEN, "$defs": {"d": {"type": "object"}}, "anyOf": [{"properties": {"x": {}}}]})
    assert got["additionalProperties"] is False and got["properties"]["n"]["additionalProperties"] is False
    assert got["$defs"]["d"]["additionalProperties"] is False
    assert got["anyOf"][0]["additionalProperties"] is False
    # allOf's members add up: they and the object around them stay open, what is inside them is closed.
    got = closed(
        {"type": "object", "allOf": [{"properties": {"y": {}}}, {"properties": {"z": {"type": "object"}}}]}
    )
    assert "additionalProperties" not in got and "additionalProperties" not in got["allOf"][0]
    assert got["allOf"][1]["properties"]["z"]["additionalProperties"] is False
    # What a schema says it allows stays allowed.
    for says in ({"additionalProperties": True}, {"additionalProperties": {"type": "integer"}},
                 {"patternProperties": {"^x": {}}}):  # fmt: skip
        assert closed({**OPEN, **says}).get("additionalProperties") == says.get("additionalProperties")
    assert closed(True) is True and OPEN.get("additionalProperties") is None, (
        "the client's schema is untouched"
    )


@pytest.mark.parametrize("strict", [True, False, None])
def test_under_strict_an_answer_has_only_the_properties_named(
    backend: TransformersBackend, strict: bool | None
) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "s", "schema": OPEN, "strict": strict}}
    tool = {"type": "function", "function": {"name": "f", "parameters": OPEN, "strict": strict}}
    for req, before in (
        (_request(response_format=fmt), '{"a":true,"n":{"b":1}'),
        (
            _request(tools=[tool], tool_choice="required"),
            '<tool_call>{"name":"f","arguments":{"a":true,"n":{"b":1}',
        ),
    ):
        factory = grammars_for(backend).constraint(build_grammar(req))
        constraint = factory()
        for token in backend.encode(before, add_special_tokens=False):
            constraint.advance(token)
        allowed = constraint.allowed(backend.vocab_size)
        (comma,) = backend.encode(",", add_special_tokens=False)
        (close,) = backend.encode("}", add_special_tokens=False)
        assert bool(allowed[close])
        assert bool(allowed[comma]) is (not strict), "another property may follow only where not strict"
