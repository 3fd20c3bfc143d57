"""Every bad request gets OpenAI's error shape with the right status; never a traceback or a hang."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from protocol.responses import ErrorResponse
from scheduler.store import Store
from tests.support import LoopThread, Stack, certify_node, start_scheduler, stop_stack, wait_for

MSG = [{"role": "user", "content": "hi"}]
OK = {"model": "hearth-demo", "messages": MSG, "max_tokens": 4}

# fmt: off
CASES: list[tuple[str, str, Any, dict[str, str] | None, int, str | None]] = [
    # (name, path, body (bytes = raw), headers (None = a valid token), status, code)
    ("malformed JSON", "/v1/chat/completions", b'{"model": ', None, 400, None),
    ("body is a list", "/v1/chat/completions", [1, 2], None, 400, None),
    ("empty body", "/v1/chat/completions", b"", None, 400, None),
    ("deeply nested JSON", "/v1/chat/completions", b"[" * 100_000 + b"]" * 100_000, None, 400, None),
    ("missing messages", "/v1/chat/completions", {"model": "hearth-demo"}, None, 400, None),
    ("missing model", "/v1/chat/completions", {"messages": MSG}, None, 400, None),
    ("empty messages", "/v1/chat/completions", {**OK, "messages": []}, None, 400, None),
    ("content of wrong type", "/v1/chat/completions", {**OK, "messages": [{"role": "user", "content": 5}]}, None, 400, None),
    ("unknown role", "/v1/chat/completions", {**OK, "messages": [{"role": "wizard", "content": "x"}]}, None, 400, None),
    ("lone surrogate in content", "/v1/chat/completions", b'{"model": "hearth-demo", "messages": [{"role": "user", "content": "a\\ud800b"}]}', None, 400, None),
    ("lone surrogate in prompt", "/v1/completions", b'{"model": "hearth-demo", "prompt": "\\udfff"}', None, 400, None),
    ("temperature as string", "/v1/chat/completions", {**OK, "temperature": "hot"}, None, 400, None),
    ("temperature out of range", "/v1/chat/completions", {**OK, "temperature": 9}, None, 400, None),
    ("negative max_tokens", "/v1/chat/completions", {**OK, "max_tokens": -1}, None, 400, None),
    ("repetition_penalty near zero", "/v1/chat/completions", {**OK, "repetition_penalty": 5e-324}, None, 400, None),  # every token seen would weigh ~1e300 times more
    ("n above 8", "/v1/chat/completions", {**OK, "n": 9}, None, 400, None),
    ("top_logprobs without logprobs", "/v1/chat/completions", {**OK, "top_logprobs": 2}, None, 400, None),
    ("best_of above n", "/v1/completions", {"model": "hearth-demo", "prompt": "x", "best_of": 2}, None, 400, None),
    ("tool without its function", "/v1/chat/completions", {**OK, "tools": [{"type": "function"}]}, None, 400, None),
    ("legacy functions", "/v1/chat/completions", {**OK, "functions": [{"name": "f"}]}, None, 400, None),
    ("logit_bias out of range", "/v1/chat/completions", {**OK, "logit_bias": {"5": -101}}, None, 400, None),
    ("too many stop sequences", "/v1/chat/completions", {**OK, "stop": ["a", "b", "c", "d", "e"]}, None, 400, None),
    ("max_tokens beyond context", "/v1/chat/completions", {**OK, "max_tokens": 4096}, None, 400, "context_length_exceeded"),
    ("max_tokens over the policy cap", "/v1/chat/completions", {**OK, "max_tokens": 100000}, None, 400, "max_tokens_over_cap"),
    ("prompt beyond context", "/v1/completions", {"model": "hearth-demo", "prompt": "word " * 3000, "max_tokens": 4}, None, 400, "context_length_exceeded"),
    ("completion prompt list of strings and ids", "/v1/completions", {"model": "hearth-demo", "prompt": ["a", [1]]}, None, 400, None),
    ("no token", "/v1/chat/completions", OK, {}, 401, "invalid_api_key"),
    ("bad token", "/v1/chat/completions", OK, {"Authorization": "Bearer hth_nope"}, 401, "invalid_api_key"),
    ("wrong scheme", "/v1/chat/completions", OK, {"Authorization": "Basic abc"}, 401, "invalid_api_key"),
    ("unknown model", "/v1/chat/completions", {**OK, "model": "gpt-9"}, None, 404, "model_not_found"),
    ("unknown model, completions", "/v1/completions", {"model": "gpt-9", "prompt": "x"}, None, 404, "model_not_found"),
    ("unknown endpoint", "/v1/embeddings", OK, None, 404, "not_found"),
    ("body over the size limit", "/v1/chat/completions", {**OK, "messages": [{"role": "user", "content": "x" * 2_000_000}]}, None, 413, "payload_too_large"),
]
# fmt: on


@pytest.mark.parametrize(
    ("name", "path", "body", "headers", "status", "code"), CASES, ids=[c[0] for c in CASES]
)
def test_error_shape_and_status(
    stack: Stack,
    name: str,
    path: str,
    body: Any,
    headers: dict[str, str] | None,
    status: int,
    code: str | None,
) -> None:
    hdrs = {"Authorization": f"Bearer {stack.token}"} if headers is None else headers
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(stack.base_url + path, content=content, headers=hdrs, timeout=30)
    assert r.status_code == status, r.text
    err = ErrorResponse.model_validate(r.json()).error
    assert err.code == code
    assert err.message and "Traceback" not in err.message
    if status == 400 and code is None:
        assert err.type == "invalid_request_error"


def test_chunked_body_over_the_limit_is_413(stack: Stack) -> None:
    """No Content-Length to check up front: the limit holds while the body streams in."""

    def body() -> Iterator[bytes]:
        yield b'{"model": "hearth-demo", "messages": [{"role": "user", "content": "'
        for _ in range(40):
            yield b"x" * 65536
        yield b'"}]}'

    r = httpx.post(
        stack.api + "/chat/completions", content=body(), headers={"Authorization": f"Bearer {stack.token}"}
    )
    assert r.status_code == 413
    assert ErrorResponse.model_validate(r.json()).error.code == "payload_too_large"


def test_method_not_allowed_has_the_error_shape(stack: Stack) -> None:
    r = httpx.get(stack.api + "/chat/completions", timeout=10)
    assert r.status_code == 405
    assert ErrorResponse.model_validate(r.json()).error.code == "method_not_allowed"


def test_validation_errors_never_quote_the_value(stack: Stack) -> None:
    canary = "CANARY-7d1e-never-echo"
    r = httpx.post(
        stack.api + "/chat/completions",
        json={**OK, "messages": [{"role": canary, "content": canary}], "temperature": canary},
        headers={"Authorization": f"Bearer {stack.token}"},
    )
    assert r.status_code == 400
    assert canary not in r.text


def test_revoked_token_is_refused(stack: Stack) -> None:
    store = Store(stack.data_dir / "hearth.db")
    token, record = store.create_token("short-lived")
    headers = {"Authorization": f"Bearer {token}"}
    assert httpx.get(stack.api + "/models", headers=headers).status_code == 200
    store.revoke_token(record.id)
    store.close()
    r = httpx.get(stack.api + "/models", headers=headers)
    assert r.status_code == 401


def test_unknown_model_when_no_node_ever_answered_is_404(servers: LoopThread, tmp_path: Path) -> None:
    """An approved node that never sent a heartbeat is not capacity: its models are unknown, 404 at once."""

    async def start() -> Stack:
        stack = await start_scheduler(tmp_path)
        await certify_node(stack, tmp_path / "gone", "gone")  # approved, never started
        return stack

    stack = servers.call(start())
    try:
        r = httpx.post(
            stack.api + "/chat/completions", json=OK, headers={"Authorization": f"Bearer {stack.token}"}
        )
        # The scheduler never heard from the node, so it cannot know the model: 404. That is the honest answer.
        assert r.status_code == 404
    finally:
        servers.call(stop_stack(stack))


def test_node_down_after_it_was_seen_gives_503(servers: LoopThread, demo_model: Any, tmp_path: Path) -> None:
    from tests.support import start_stack

    stack = servers.call(start_stack(tmp_path, [demo_model], scheduler={"node_timeout": 0.6}))
    headers = {"Authorization": f"Bearer {stack.token}"}
    try:
        assert (
            httpx.post(stack.api + "/chat/completions", json=OK, headers=headers, timeout=30).status_code
            == 200
        )
        node_runner = stack.runners.pop()
        servers.call(node_runner.cleanup())

        async def unhealthy() -> bool:
            return not any(n.healthy for n in stack.snapshot().nodes)

        servers.call(wait_for(unhealthy, within=10))
        r = httpx.post(stack.api + "/chat/completions", json=OK, headers=headers, timeout=10)
        assert r.status_code == 503
        assert int(r.headers["Retry-After"]) >= 1
        assert ErrorResponse.model_validate(r.json()).error.code == "no_capacity"
    finally:
        servers.call(stop_stack(stack))


def test_a_token_limited_to_other_tiers_gets_403_naming_the_tier(stack: Stack) -> None:
    """The local node of `hearth up` is a club server: a community-only token may not reach it."""
    store = Store(stack.data_dir / "hearth.db")
    community, _ = store.create_token("volunteers-only", tiers=("community",))
    club, _ = store.create_token("club-only", tiers=("club",))
    store.close()
    r = httpx.post(stack.api + "/chat/completions", json=OK, headers={"Authorization": f"Bearer {community}"})
    assert r.status_code == 403
    body = ErrorResponse.model_validate(r.json())
    assert body.error.code == "tier_not_allowed"
    assert "outside the tiers allowed here (community)" in body.error.message
    ok = httpx.post(stack.api + "/chat/completions", json=OK, headers={"Authorization": f"Bearer {club}"})
    assert ok.status_code == 200


@pytest.mark.parametrize("path", ["/chat/completions", "/completions"])
def test_a_temperature_next_to_zero_answers_as_greedy_decoding_does(stack: Stack, path: str) -> None:
    """The smallest positive temperature once overflowed the sampler (a 500): its limit is greedy."""
    h = {"Authorization": f"Bearer {stack.token}"}
    body = {"model": "hearth-demo", "max_tokens": 4, "ignore_eos": True}
    body |= {"messages": MSG} if path == "/chat/completions" else {"prompt": "hello there"}
    texts = []
    for temperature in (5e-324, 1e-40, 0.0):
        r = httpx.post(stack.api + path, json={**body, "temperature": temperature}, headers=h, timeout=60)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        texts.append(choice["message"]["content"] if "message" in choice else choice["text"])
    assert texts[0] == texts[1] == texts[2]
