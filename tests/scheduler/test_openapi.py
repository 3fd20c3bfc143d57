"""/openapi.json is valid, covers every route, and real responses match its schemas."""

from __future__ import annotations

import json

import httpx
import jsonschema
import pytest
from openapi_spec_validator import validate

from scheduler.openapi import openapi_document
from tests.support import Stack

MSG = [{"role": "user", "content": "hi"}]


def test_document_is_valid_openapi(stack: Stack) -> None:
    doc = httpx.get(stack.base_url + "/openapi.json").json()
    validate(doc)
    assert doc == json.loads(json.dumps(openapi_document()))


def test_every_route_is_documented_and_every_documented_route_exists(stack: Stack) -> None:
    assert stack.scheduler_app is not None
    served = {
        (r.method.lower(), r.resource.canonical)
        for r in stack.scheduler_app.router.routes()
        if r.method != "HEAD" and r.resource is not None
    }
    documented = {(m, p) for p, ops in openapi_document()["paths"].items() for m in ops}
    assert served == documented


def _validator(name: str) -> jsonschema.protocols.Validator:
    doc = openapi_document()
    schema = {"$ref": f"#/components/schemas/{name}", "components": doc["components"]}
    return jsonschema.Draft202012Validator(schema)


def test_real_responses_match_their_schemas(stack: Stack) -> None:
    h = {"Authorization": f"Bearer {stack.token}"}
    _validator("ModelList").validate(httpx.get(stack.api + "/models", headers=h).json())
    body = {"model": "hearth-demo", "messages": MSG, "max_tokens": 4}
    _validator("ChatCompletion").validate(
        httpx.post(stack.api + "/chat/completions", json=body, headers=h).json()
    )
    comp = {"model": "hearth-demo", "prompt": "x", "max_tokens": 4}
    _validator("Completion").validate(httpx.post(stack.api + "/completions", json=comp, headers=h).json())
    with httpx.stream(
        "POST",
        stack.api + "/chat/completions",
        headers=h,
        json={**body, "stream": True, "stream_options": {"include_usage": True}},
    ) as r:
        events = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    for event in events[:-1]:
        _validator("ChatCompletionChunk").validate(json.loads(event))
    err = httpx.post(stack.api + "/chat/completions", json={"model": 1}, headers=h)
    _validator("ErrorResponse").validate(err.json())


TOOL = {"type": "function", "function": {"name": "pick", "parameters": {
    "type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["n"],
    "additionalProperties": False}}}  # fmt: skip


@pytest.mark.parametrize(
    "extra",
    [
        {
            "tools": [TOOL],
            "tool_choice": "required",
            "parallel_tool_calls": False,
        },  # tool calls: content null, tool_calls, "tool_calls"
        {"logprobs": True, "top_logprobs": 2},
        {"n": 2},
    ],
)
def test_tool_calls_logprobs_and_choices_match_their_schemas(stack: Stack, extra: dict[str, object]) -> None:
    h = {"Authorization": f"Bearer {stack.token}"}
    body = {"model": "hearth-demo", "messages": MSG, "max_tokens": 120, "seed": 1, **extra}
    whole = httpx.post(stack.api + "/chat/completions", json=body, headers=h, timeout=60).json()
    _validator("ChatCompletion").validate(whole)
    _, events = _stream(stack, "/chat/completions", {**body, "stream": True})
    for event in events[:-1]:
        _validator("ChatCompletionChunk").validate(json.loads(event))
    if "tools" in extra:
        assert (
            whole["choices"][0]["message"]["tool_calls"]
            and whole["choices"][0]["finish_reason"] == "tool_calls"
        )
        assert any(
            "tool_calls" in json.loads(e)["choices"][0]["delta"]
            for e in events[:-1]
            if json.loads(e)["choices"]
        )


def _stream(stack: Stack, path: str, body: dict[str, object]) -> tuple[str, list[str]]:
    h = {"Authorization": f"Bearer {stack.token}"}
    with httpx.stream("POST", stack.api + path, headers=h, json=body, timeout=30) as r:
        assert r.status_code == 200
        lines = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]
        return r.headers["Content-Type"], lines


@pytest.mark.parametrize(
    ("path", "body", "operation"),
    [
        ("/chat/completions", {"model": "hearth-demo", "messages": MSG}, "/v1/chat/completions"),
        ("/completions", {"model": "hearth-demo", "prompt": "x"}, "/v1/completions"),
    ],
)
def test_both_stream_forms_match_the_documented_events(
    stack: Stack, path: str, body: dict[str, object], operation: str
) -> None:
    """Each event of a stream is what the document's text/event-stream entry says: a chunk, then [DONE]."""
    doc = openapi_document()
    answers = doc["paths"][operation]["post"]["responses"]["200"]["content"]
    full = {"max_tokens": 4, "stream": True, "stream_options": {"include_usage": True}}
    content_type, events = _stream(stack, path, {**body, **full})
    assert content_type.split(";")[0] in answers
    event = answers["text/event-stream"]["schema"]
    chunk = event["properties"]["data"]["anyOf"][0]["contentSchema"]["$ref"].rsplit("/", 1)[1]
    assert events[-1] == "[DONE]"
    for data in events[:-1]:
        _validator(chunk).validate(json.loads(data))
    # The non-streaming answer is the strict form: a finish reason and usage, always.
    h = {"Authorization": f"Bearer {stack.token}"}
    whole = httpx.post(stack.api + path, json={**body, "max_tokens": 4}, headers=h, timeout=30)
    response = answers["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]
    _validator(response).validate(whole.json())
    assert whole.json()["choices"][0]["finish_reason"] in ("stop", "length")


def test_stream_events_are_not_described_by_the_non_streaming_schema() -> None:
    """The event of /v1/completions is a CompletionChunk (finish_reason null until the last), not a
    Completion; the document once said otherwise."""
    chunk = {
        "id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m",
        "choices": [{"index": 0, "text": "a", "finish_reason": None, "logprobs": None}],
    }  # fmt: skip
    _validator("CompletionChunk").validate(chunk)
    with pytest.raises(jsonschema.ValidationError):
        _validator("Completion").validate(chunk)


def test_created_answers_are_documented_as_201() -> None:
    paths = openapi_document()["paths"]
    for path in ("/admin/enrollment-codes", "/v1/enroll", "/admin/tokens"):
        assert set(paths[path]["post"]["responses"]) & {"200", "201"} == {"201"}


# Statuses each operation answers for a client's mistake or a fault, beyond its success (what the
# handlers raise; tests/test_fuzz_api.py checks that nothing outside the document is ever answered).
ERRORS = {
    ("post", "/v1/chat/completions"): {"400", "401", "403", "404", "409", "413", "422", "500", "502", "503"},
    ("post", "/v1/completions"): {"400", "401", "403", "404", "409", "413", "422", "500", "502", "503"},
    ("post", "/admin/enrollments/{node_id}/approve"): {"400", "401", "403", "404", "409", "413"},
    ("post", "/admin/enrollments/{node_id}/reject"): {"401", "403", "404", "409"},
    ("post", "/admin/nodes/{node_id}/revoke"): {"401", "403", "404", "409"},
    ("post", "/admin/nodes/{node_id}/drain"): {"400", "401", "403", "404", "413"},
    ("post", "/v1/enroll"): {"400", "403", "409", "413"},
    ("post", "/v1/nodes/heartbeat"): {"400", "401", "403", "413"},
    ("get", "/v1/terms"): {"401"},
    ("post", "/v1/terms/accept"): {"400", "401", "409", "413"},
    ("get", "/admin/terms"): {"401", "403"},
    ("post", "/admin/tokens"): {"400", "401", "403", "413"},
    ("post", "/admin/tokens/{token_id}/revoke"): {"401", "403", "404"},
    ("post", "/admin/tokens/{token_id}/rotate"): {"400", "401", "403", "404", "409", "413"},
    ("get", "/admin/usage"): {"400", "401", "403"},
    ("get", "/admin/audit"): {"400", "401", "403"},
}


def test_every_status_a_route_answers_is_documented() -> None:
    paths = openapi_document()["paths"]
    for (method, path), statuses in ERRORS.items():
        documented = set(paths[path][method]["responses"])
        assert statuses <= documented, (method, path, statuses - documented)
    for path, ops in paths.items():
        for op in ops.values():
            for status, answer in op["responses"].items():
                if status == "503":
                    assert "Retry-After" in answer["headers"], path


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("get", "/admin/nodes", None, 200),
        ("get", "/admin/models", None, 200),
        ("get", "/admin/authority", None, 200),
        ("get", "/admin/enrollments", None, 200),
        ("get", "/admin/terms", None, 200),
        ("get", "/v1/terms", None, 200),
        ("post", "/admin/enrollment-codes", {"tier": "community"}, 201),
        ("post", "/admin/tokens", {"name": "schema", "expires_in_seconds": 60.0}, 201),
        ("get", "/admin/tokens", None, 200),
        ("get", "/admin/usage?by=day&since=30d", None, 200),
        ("get", "/admin/audit?limit=5", None, 200),
        ("get", "/v1/directory", None, 200),
        ("get", "/healthz", None, 200),
    ],
)
def test_admin_and_service_answers_match_their_schemas(
    stack: Stack, method: str, path: str, body: dict[str, str] | None, status: int
) -> None:
    r = httpx.request(
        method.upper(), stack.base_url + path, json=body, headers={"Authorization": f"Bearer {stack.token}"}
    )
    assert r.status_code == status, r.text
    answer = openapi_document()["paths"][path.split("?")[0]][method]["responses"][str(status)]
    _validator(answer["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]).validate(r.json())


CHAT = {"model": "hearth-demo", "messages": MSG}
COMPLETION = {"model": "hearth-demo", "prompt": "x"}

# fmt: off
OPTIONS = [
    # (request model, body, accepted): what the document allows is what pydantic accepts
    ("ChatCompletionRequest", {**CHAT, "n": 1}, True),
    ("ChatCompletionRequest", {**CHAT, "n": 8}, True),
    ("ChatCompletionRequest", {**CHAT, "n": 9}, False),
    ("ChatCompletionRequest", {**CHAT, "logprobs": False}, True),
    ("ChatCompletionRequest", {**CHAT, "logprobs": True, "top_logprobs": 20}, True),
    ("ChatCompletionRequest", {**CHAT, "logprobs": True, "top_logprobs": 21}, False),
    ("ChatCompletionRequest", {**CHAT, "tools": []}, True),
    ("ChatCompletionRequest", {**CHAT, "tools": [{"type": "function"}]}, False),
    ("ChatCompletionRequest", {**CHAT, "response_format": {"type": "text"}}, True),
    ("ChatCompletionRequest", {**CHAT, "response_format": {"type": "json_object"}}, True),
    ("ChatCompletionRequest", {**CHAT, "response_format": {"type": "json_schema", "json_schema": {"name": "a"}}}, True),
    ("ChatCompletionRequest", {**CHAT, "response_format": {"type": "json_schema", "json_schema": {}}}, False),
    ("ChatCompletionRequest", {**CHAT, "response_format": {"type": "yaml"}}, False),
    ("ChatCompletionRequest", {**CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]}, True),
    ("ChatCompletionRequest", {**CHAT, "tools": [{"type": "function", "function": {"name": "f g"}}]}, False),
    ("ChatCompletionRequest", {**CHAT, "tool_choice": "required", "tools": [{"type": "function", "function": {"name": "f"}}]}, True),
    ("ChatCompletionRequest", {**CHAT, "tool_choice": "sometimes"}, False),
    ("ChatCompletionRequest", {**CHAT, "functions": None}, True),
    ("ChatCompletionRequest", {**CHAT, "functions": [{"name": "f"}]}, False),  # deprecated: use tools
    ("ChatCompletionRequest", {**CHAT, "function_call": "auto"}, False),
    ("ChatCompletionRequest", {**CHAT, "logit_bias": {}}, True),
    ("ChatCompletionRequest", {**CHAT, "logit_bias": {"1": 5}}, True),
    ("ChatCompletionRequest", {**CHAT, "logit_bias": {"1": 101}}, False),
    ("ChatCompletionRequest", {**CHAT, "stop": "x" * 256}, True),
    ("ChatCompletionRequest", {**CHAT, "stop": "x" * 257}, False),
    ("ChatCompletionRequest", {**CHAT, "stop": ""}, False),
    ("ChatCompletionRequest", {**CHAT, "repetition_penalty": 0.01}, True),
    ("ChatCompletionRequest", {**CHAT, "repetition_penalty": 0.001}, False),
    ("CompletionRequest", {**COMPLETION, "prompt": ""}, False),  # nothing to continue from
    ("CompletionRequest", {**COMPLETION, "prompt": [""]}, False),
    ("CompletionRequest", {**COMPLETION, "echo": False}, True),
    ("CompletionRequest", {**COMPLETION, "echo": True}, True),
    ("CompletionRequest", {**COMPLETION, "prompt": [1, 2]}, True),
    ("CompletionRequest", {**COMPLETION, "prompt": [[1], [2, 3]]}, True),
    ("CompletionRequest", {**COMPLETION, "prompt": [[]]}, False),
    ("CompletionRequest", {**COMPLETION, "prompt": [-1]}, False),
    ("CompletionRequest", {**COMPLETION, "suffix": ""}, True),
    ("CompletionRequest", {**COMPLETION, "suffix": "end"}, False),
    ("CompletionRequest", {**COMPLETION, "logprobs": None}, True),
    ("CompletionRequest", {**COMPLETION, "logprobs": 5}, True),
    ("CompletionRequest", {**COMPLETION, "logprobs": 6}, False),
    ("CompletionRequest", {**COMPLETION, "best_of": 1}, True),
    ("CompletionRequest", {**COMPLETION, "best_of": 9}, False),
    ("EnrollmentCodeRequest", {"tier": "club", "ttl_seconds": 60}, True),
    ("EnrollmentCodeRequest", {"tier": "club", "ttl_seconds": 59.5}, False),
    ("EnrollmentCodeRequest", {"tier": "club", "note": "x" * 201}, False),
    ("DrainRequest", {"drain": False}, True),
    ("DrainRequest", {"drain": "false"}, False),
    ("TermsAcceptRequest", {"version": "2026-09"}, True),
    ("TermsAcceptRequest", {"version": 2026}, False),
    ("TermsAcceptRequest", {"version": "two words"}, False),
    ("TermsAcceptRequest", {"version": "v" * 65}, False),
    ("TokenCreateRequest", {"name": "x", "expires_in_seconds": 1}, True),
    ("TokenCreateRequest", {"name": "x", "expires_in_seconds": 0}, False),
    ("TokenCreateRequest", {"name": ""}, False),
    ("TokenCreateRequest", {"name": "x", "scope": "root"}, False),
    ("TokenCreateRequest", {"name": 7}, False),
    ("TokenRotateRequest", {"grace_seconds": 0}, True),
    ("TokenRotateRequest", {"grace_seconds": -1}, False),
    ("TokenRotateRequest", {"grace_seconds": "10m"}, False),
]
# fmt: on


@pytest.mark.parametrize(("model", "body", "accepted"), OPTIONS)
def test_the_document_allows_what_the_server_accepts(
    model: str, body: dict[str, object], accepted: bool
) -> None:
    """Options Hearth accepts only "off" are documented so: a client (or a fuzzer) that follows the
    document never sends what is refused."""
    from protocol import accounts, admin, schemas, terms

    documented = _validator(model).is_valid(body)
    validated = (
        getattr(schemas, model, None) or getattr(admin, model, None) or getattr(accounts, model, None)
        or getattr(terms, model)
    )  # fmt: skip
    try:
        validated.model_validate(body)
        served = True
    except ValueError:
        served = False
    assert (documented, served) == (accepted, accepted)
