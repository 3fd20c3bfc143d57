"""The client libraries users put in front of an OpenAI-compatible API, unchanged, against a real stack:
LangChain (`langchain-openai`) and LiteLLM, plaintext to the scheduler and sealed through `hearth proxy`.

Each library builds its own requests (its own JSON schema from a pydantic model, its own tool definitions,
its own streaming reader); these tests check that Hearth answers them so that the library's own parsing
succeeds. The demo model is random, so they check form, not content. No library may reach past 127.0.0.1:
every connection the process opens during a test is recorded (an audit hook) and checked.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
from collections.abc import Iterator
from typing import Annotated, Any, Literal

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from node.settings import ModelSettings
from tests.support import LoopThread, SealedStack, Stack, start_sealed_stack, stop_stack
from tests.test_structured_api import WEATHER  # the same get_weather tool, as OpenAI's JSON

# LiteLLM fetches its model-cost map from GitHub at import unless told to use its bundled copy.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import litellm
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, HumanMessage, ToolMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI

# LiteLLM's GitHub Copilot provider, imported lazily, declares ReadOnly TypedDict items; pydantic warns.
pytestmark = pytest.mark.filterwarnings("ignore:Items? .* `ReadOnly` qualifier:UserWarning")

MODEL = "hearth-demo"
ROOM = 200  # max_tokens: far more than any bounded schema here needs

# ----- nothing beyond 127.0.0.1 -----

_connections: list[Any] | None = None  # recording while a list


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if _connections is None:
        return
    if event == "socket.connect" and args[0].family in (socket.AF_INET, socket.AF_INET6):
        _connections.append(args[1][0])
    elif event == "socket.getaddrinfo":
        _connections.append(args[0])


sys.addaudithook(_audit)  # stays for the process; inert unless a test here records


@pytest.fixture(autouse=True)
def _loopback_only(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    global _connections
    for name in ("LANGSMITH_TRACING", "LANGCHAIN_TRACING_V2", "LANGSMITH_API_KEY", "LANGCHAIN_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    _connections = []
    try:
        yield
        seen = list(_connections)
    finally:
        _connections = None
    hosts = {h.decode() if isinstance(h, bytes) else h for h in seen}
    # (none at all is fine: a library may reuse a kept-alive connection from an earlier test)
    assert hosts <= {"127.0.0.1", "localhost", "::1"}, f"reached past this machine: {hosts}"


# ----- the stack, plain and sealed -----


@pytest.fixture(scope="module")
def sealed(
    servers: LoopThread, demo_model: ModelSettings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SealedStack]:
    env = servers.call(start_sealed_stack(tmp_path_factory.mktemp("clients-proxy"), [demo_model]))
    yield env
    servers.call(stop_stack(env.stack))


@pytest.fixture
def http() -> Iterator[openai.DefaultHttpxClient]:
    """The HTTP client a test hands its library, closed when the test ends: a library's own client lives in
    a module-wide cache, its connections open, until the process exits."""
    with openai.DefaultHttpxClient() as client:
        yield client


@pytest.fixture
def litellm_owned(http: openai.DefaultHttpxClient, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """LiteLLM sends through `http`, and its blocking calls find an event loop this test closes.

    A blocking `litellm.completion` times itself on the thread's event loop; where the thread has none,
    asyncio makes one that nobody closes, and it is collected later, inside another test, as unclosed
    sockets (its self-pipe)."""
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    monkeypatch.setattr(litellm, "client_session", http)
    try:
        yield
    finally:
        litellm.in_memory_llm_clients_cache.flush_cache()  # its cached clients send through `http`, closed
        asyncio.set_event_loop(None)
        loop.close()


@pytest.fixture(params=["plain", "sealed"])
def endpoint(request: pytest.FixtureRequest) -> tuple[str, str]:
    """(base URL ending in /v1, API key) as a user would give them to a library."""
    if request.param == "plain":
        stack: Stack = request.getfixturevalue("stack")
        return stack.api, stack.token
    env: SealedStack = request.getfixturevalue("sealed")
    return env.url, "unused-locally"


def _chat(endpoint: tuple[str, str], http: openai.DefaultHttpxClient, **kwargs: Any) -> ChatOpenAI:
    url, key = endpoint
    return ChatOpenAI(model=MODEL, base_url=url, api_key=key, max_retries=0, http_client=http, **kwargs)  # type: ignore[arg-type]


# ----- LangChain -----


class Forecast(BaseModel):
    """A weather forecast."""

    city: Literal["Paris", "Oslo"]
    rain: bool
    degrees: Annotated[int, Field(ge=-30, le=45)]
    summary: Annotated[str, Field(max_length=10)]


class Note(BaseModel):
    """json_mode sends no schema (the prompt describes it), so every field here has a default."""

    title: str = "untitled"
    tags: list[str] = []


@pytest.mark.parametrize(
    ("method", "schema", "options"),
    [
        ("json_schema", Forecast, {}),
        # strict: LangChain then closes the objects (additionalProperties: false); without it a weak model
        # may add keys of its own until max_tokens, as the JSON Schema allows (docs/api.md)
        ("function_calling", Forecast, {"strict": True}),
        ("json_mode", Note, {}),
    ],
)
def test_langchain_structured_output_returns_a_validated_object(
    endpoint: tuple[str, str],
    http: openai.DefaultHttpxClient,
    method: str,
    schema: type[BaseModel],
    options: dict[str, Any],
) -> None:
    # Greedy: json_mode leaves the object's contents to the model, and the random one then closes it at once.
    llm = _chat(endpoint, http, max_tokens=ROOM, seed=1, temperature=0.0)
    structured = llm.with_structured_output(schema, method=method, include_raw=True, **options)  # type: ignore[arg-type]
    result = structured.invoke("The weather in Oslo, as JSON.")
    assert isinstance(result, dict) and result["parsing_error"] is None, result
    parsed = result["parsed"]
    assert isinstance(parsed, schema)
    raw = result["raw"]
    assert isinstance(raw, AIMessage)
    if method == "function_calling":
        assert raw.response_metadata["finish_reason"] == "tool_calls"
        [call] = raw.tool_calls
        assert call["name"] == "Forecast" and call["id"] and Forecast.model_validate(call["args"]) == parsed
    else:
        assert raw.response_metadata["finish_reason"] == "stop"
        assert schema.model_validate(json.loads(str(raw.content))) == parsed


class Tags(BaseModel):
    tags: set[int]  # pydantic writes "uniqueItems": true, which Hearth cannot enforce while generating


def test_langchain_gets_hearths_400_for_a_schema_it_cannot_enforce(
    endpoint: tuple[str, str], http: openai.DefaultHttpxClient
) -> None:
    structured = _chat(endpoint, http, max_tokens=ROOM).with_structured_output(Tags, method="json_schema")
    with pytest.raises(openai.BadRequestError) as refused:
        structured.invoke("Some tags, please.")
    assert refused.value.status_code == 400 and "uniqueItems" in str(refused.value)


@tool
def get_weather(city: Literal["Paris", "Oslo"], days: Annotated[int, Field(ge=1, le=7)]) -> str:
    """The weather in a city for the next few days."""
    return f"{days} days of sun in {city}"


def test_langchain_tool_loop(endpoint: tuple[str, str], http: openai.DefaultHttpxClient) -> None:
    llm = _chat(endpoint, http, max_tokens=ROOM, seed=2)
    messages: list[BaseMessage] = [HumanMessage("What is the weather in Oslo this week?")]
    asked = llm.bind_tools([get_weather], tool_choice="get_weather", strict=True).invoke(messages)
    assert isinstance(asked, AIMessage) and asked.response_metadata["finish_reason"] == "tool_calls"
    assert asked.tool_calls and not asked.invalid_tool_calls
    messages.append(asked)
    for call in asked.tool_calls:
        assert call["name"] == "get_weather" and call["id"]
        answer = get_weather.invoke(call)  # the tool validates its own arguments
        assert isinstance(answer, ToolMessage) and answer.tool_call_id == call["id"]
        messages.append(answer)
    final = llm.bind_tools([get_weather], tool_choice="none").invoke(messages, max_tokens=8)
    assert isinstance(final, AIMessage) and not final.tool_calls and isinstance(final.content, str)
    assert final.response_metadata["finish_reason"] in ("stop", "length")
    assert final.usage_metadata is not None and final.usage_metadata["output_tokens"] > 0


def test_langchain_streams_a_tool_call_it_can_assemble(
    endpoint: tuple[str, str], http: openai.DefaultHttpxClient
) -> None:
    llm = _chat(endpoint, http, max_tokens=ROOM, seed=2).bind_tools(
        [get_weather], tool_choice="get_weather", strict=True
    )
    chunks = list(llm.stream("What is the weather in Paris?"))
    assert len(chunks) > 2  # it did stream
    whole = chunks[0]
    for chunk in chunks[1:]:
        whole += chunk  # LangChain joins tool_call_chunks by index
    assert isinstance(whole, AIMessageChunk) and not whole.invalid_tool_calls
    [call] = whole.tool_calls
    assert call["name"] == "get_weather" and call["id"]
    jsonschema.validate(call["args"], get_weather.tool_call_schema.model_json_schema())  # type: ignore[union-attr]
    assert whole.response_metadata["finish_reason"] == "tool_calls"


# ----- LiteLLM -----

PARAMETERS = WEATHER["function"]["parameters"]  # type: ignore[index]


def _litellm(endpoint: tuple[str, str], **kwargs: Any) -> Any:
    url, key = endpoint
    return litellm.completion(
        model=f"openai/{MODEL}",  # any OpenAI-compatible server
        api_base=url,
        api_key=key,
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=[WEATHER],
        tool_choice="required",
        max_tokens=ROOM,
        seed=3,
        **kwargs,
    )


@pytest.mark.usefixtures("litellm_owned")
def test_litellm_tool_calls(endpoint: tuple[str, str]) -> None:
    r = _litellm(endpoint)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    for call in choice.message.tool_calls:
        assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
        jsonschema.validate(json.loads(call.function.arguments), PARAMETERS)
    assert r.usage.completion_tokens > 0


@pytest.mark.usefixtures("litellm_owned")
def test_litellm_streamed_tool_calls(endpoint: tuple[str, str]) -> None:
    chunks = list(_litellm(endpoint, stream=True))
    calls: dict[int, dict[str, str]] = {}
    reasons = []
    for chunk in chunks:
        for choice in chunk.choices:
            reasons.append(choice.finish_reason)
            for part in choice.delta.tool_calls or ():
                call = calls.setdefault(part.index, {"id": "", "name": "", "arguments": ""})
                call["id"] += part.id or ""
                call["name"] += part.function.name or ""
                call["arguments"] += part.function.arguments or ""
    assert calls and sorted(calls) == list(range(len(calls)))
    for call in calls.values():
        assert call["id"].startswith("call_") and call["name"] == "get_weather"
        jsonschema.validate(json.loads(call["arguments"]), PARAMETERS)
    assert [r for r in reasons if r] == ["tool_calls"]
    # The same seed unstreamed gives the same calls.
    whole = _litellm(endpoint).choices[0].message.tool_calls
    assert [(c.function.name, c.function.arguments) for c in whole] == [
        (c["name"], c["arguments"]) for c in calls.values()
    ]


# LiteLLM's reader of the usage chunk reads pydantic fields the deprecated way (its code, not Hearth's answer).
@pytest.mark.filterwarnings(
    "ignore:Accessing the 'model_(computed_)?fields' attribute on the instance:DeprecationWarning"
)
@pytest.mark.usefixtures("litellm_owned")
def test_litellm_streams_text_with_usage_and_passes_on_a_400(endpoint: tuple[str, str]) -> None:
    url, key = endpoint
    common: dict[str, Any] = {
        "model": f"openai/{MODEL}",
        "api_base": url,
        "api_key": key,
        "messages": [{"role": "user", "content": "Hello"}],
        "max_tokens": 6,
    }
    text, usage = "", None
    for chunk in litellm.completion(**common, stream=True, stream_options={"include_usage": True}):
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        usage = getattr(chunk, "usage", None) or usage
    assert text and usage is not None and usage.completion_tokens == 6
    unenforceable = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {}}}}
    with pytest.raises(litellm.BadRequestError) as refused:
        litellm.completion(**common, response_format=unenforceable)
    assert refused.value.status_code == 400 and "not" in str(refused.value)
