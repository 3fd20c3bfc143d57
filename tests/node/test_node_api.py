"""The node's own API: only its scheduler may use it; jobs are validated before any work."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from protocol import frames
from tests.support import Stack

CHAT = {"model": "hearth-demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
JOB = {"endpoint": "chat", "request_id": "abc123", "job_id": "job1", "request": CHAT}


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/status", None),  # status reveals load: scheduler only
        ("GET", "/metrics", None),  # metrics too
        ("POST", "/jobs", JOB),  # and of course work
    ],
)
@pytest.mark.parametrize("auth", [None, "Bearer wrong", "Basic abc"], ids=["none", "wrong", "scheme"])
def test_calls_without_the_schedulers_signature_get_401(
    stack: Stack, method: str, path: str, body: Any, auth: str | None
) -> None:
    headers = {"Authorization": auth} if auth else {}
    r = httpx.request(method, stack.node_url + path, json=body, headers=headers)
    assert r.status_code == 401
    assert r.json()["error"]["type"] == "authentication_error"


def test_healthz_is_open(stack: Stack) -> None:
    assert httpx.get(stack.node_url + "/healthz").json() == {"status": "ok"}


@pytest.mark.parametrize(
    ("job", "status"),
    [
        ({**JOB, "endpoint": "embeddings"}, 400),  # unknown endpoint
        ({**JOB, "request_id": "../../etc"}, 400),  # request ids are plain tokens
        ({**JOB, "job_id": "a b"}, 400),  # and so are job ids (usage receipts name them)
        ({k: v for k, v in JOB.items() if k != "job_id"}, 400),  # which every job has
        ({**JOB, "request": {**CHAT, "model": "other"}}, 404),  # a model this node does not serve
        ({**JOB, "request": {**CHAT, "messages": []}}, 400),  # the node validates the request itself
    ],
)
def test_bad_jobs_are_refused_before_any_work(stack: Stack, job: dict[str, Any], status: int) -> None:
    body = json.dumps(job).encode()
    r = httpx.post(stack.node_url + "/jobs", content=body, headers=stack.node_headers("POST", "/jobs", body))
    assert r.status_code == status


def test_a_job_streams_frames_ending_with_final_usage(stack: Stack) -> None:
    body = json.dumps(JOB).encode()
    headers = stack.node_headers("POST", "/jobs", body)
    r = httpx.post(stack.node_url + "/jobs", content=body, headers=headers, timeout=30)
    assert r.headers["Content-Type"] == frames.MEDIA_TYPE
    decoder = frames.FrameDecoder()
    got = decoder.feed(r.content)
    decoder.close()
    assert got[-1].final and got[-1].kind == frames.META
    meta = got[-1].json()
    assert meta["completion_tokens"] <= 3 and meta["prompt_tokens"] > 0
    metrics = httpx.get(stack.node_url + "/metrics", headers=stack.node_headers("GET", "/metrics")).text
    assert 'hearth_node_tokens_total{kind="completion",model="hearth-demo"}' in metrics
    assert "hearth_node_jobs_active" in metrics
