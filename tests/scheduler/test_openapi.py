"""/openapi.json is valid, covers every route, and real responses match its schemas."""

from __future__ import annotations

import json

import httpx
import jsonschema
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
