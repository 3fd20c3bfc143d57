"""A node opening sealed jobs: the header must tell the truth, and a resume says what the user already has."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from node.keys import NodeKeys, ReplayMemory
from node.sealed import open_job
from protocol.envelope import (
    Candidate,
    EnvelopeError,
    ResponseSealer,
    response_secret,
    seal_request,
    to_wire,
)
from protocol.errors import InvalidRequest
from protocol.identity import Identity, b64e

BODY = {"model": "m", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8, "stream": True}


@pytest.fixture
def node(tmp_path: Path) -> tuple[NodeKeys, ReplayMemory]:
    keys = NodeKeys(tmp_path, Identity.generate(), "gpu-1", rotation_s=3600)
    return keys, ReplayMemory(tmp_path / "replay.log")


def _job(keys: NodeKeys, body: dict[str, Any], resume: Any = None, **header: Any) -> tuple[bytes, bytes]:
    now = int(time.time())
    (kid, key), *_ = keys.private_keys(now).items()
    args = {"endpoint": "chat", "model": "m", "max_tokens": 8, "stream": True, **header}
    sealed, seed = seal_request(
        json.dumps(body).encode(), request_id=f"r{time.monotonic_ns()}", issued_at=now, ttl_s=60,
        candidates=[Candidate("gpu-1", kid, key.public_key())], **args,
    )  # fmt: skip
    return json.dumps({"envelope": to_wire(sealed), "resume": resume, "job_id": "j1"}).encode(), seed


def test_a_fresh_job_opens(node: tuple[NodeKeys, ReplayMemory]) -> None:
    keys, replay = node
    raw, _ = _job(keys, BODY)
    job = open_job(raw, node_id="gpu-1", keys=keys, replay=replay)
    assert job.request.model == "m" and job.start_seq == 0 and not job.resume.began


@pytest.mark.parametrize(
    "header",
    [{"model": "other"}, {"max_tokens": 4000}, {"stream": False}, {"endpoint": "completion"}, {"choices": 2}],
)
def test_a_header_that_lies_about_the_body_is_refused(
    node: tuple[NodeKeys, ReplayMemory], header: Any
) -> None:
    # Refused before any work: as an envelope that does not open, or (another endpoint) as a body that is
    # not that endpoint's request, naming the field only.
    keys, replay = node
    raw, _ = _job(keys, BODY, **header)
    with pytest.raises(InvalidRequest):
        open_job(raw, node_id="gpu-1", keys=keys, replay=replay)


def _frames(seed: bytes, raw: bytes, payloads: list[bytes]) -> list[str]:
    request_id = json.loads(raw)["envelope"]["header"]["request_id"]
    sealer = ResponseSealer(response_secret(seed, "gpu-0", request_id), request_id)
    return [b64e(sealer.seal(p)) for p in payloads]


def test_a_resume_gives_the_text_already_sent_and_goes_on_numbering(
    node: tuple[NodeKeys, ReplayMemory],
) -> None:
    keys, replay = node
    raw, seed = _job(keys, BODY)
    events = [
        b'data: {"id":"x","created":123,"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}\n\n',
        b'data: {"id":"x","created":123,"choices":[{"index":0,"delta":{"content":"Hel"}}]}\n\n',
        b'data: {"id":"x","created":123,"choices":[{"index":0,"delta":{"content":"lo"}}]}\n\n',
    ]
    resume = [{"node_id": "gpu-0", "frames": _frames(seed, raw, events)}]
    doc = json.loads(raw)
    doc["resume"] = resume
    job = open_job(json.dumps(doc).encode(), node_id="gpu-1", keys=keys, replay=replay)
    assert (job.start_seq, job.resume.text, job.resume.created, job.resume.began) == (3, "Hello", 123, True)


def test_a_resume_of_keepalives_only_has_not_begun(node: tuple[NodeKeys, ReplayMemory]) -> None:
    keys, replay = node
    raw, seed = _job(keys, BODY)
    doc = json.loads(raw)
    doc["resume"] = [{"node_id": "gpu-0", "frames": _frames(seed, raw, [b": keepalive\n\n"] * 2)}]
    job = open_job(json.dumps(doc).encode(), node_id="gpu-1", keys=keys, replay=replay)
    assert job.start_seq == 2 and not job.resume.began, "the replacement must still send the role event"


def test_a_resume_with_a_damaged_frame_is_refused(node: tuple[NodeKeys, ReplayMemory]) -> None:
    keys, replay = node
    raw, seed = _job(keys, BODY)
    frames = _frames(seed, raw, [b"data: {}\n\n", b"data: {}\n\n"])
    doc = json.loads(raw)
    doc["resume"] = [{"node_id": "gpu-0", "frames": [frames[1], frames[0]]}]  # swapped
    with pytest.raises(EnvelopeError):
        open_job(json.dumps(doc).encode(), node_id="gpu-1", keys=keys, replay=replay)


def test_a_header_must_count_the_bodys_choices(node: tuple[NodeKeys, ReplayMemory]) -> None:
    """The scheduler reserves quota for the choices the header names: fewer than the body asks is refused."""
    keys, replay = node
    several = {**BODY, "n": 3}
    raw, _ = _job(keys, several)  # choices 1 in the header
    with pytest.raises(InvalidRequest):
        open_job(raw, node_id="gpu-1", keys=keys, replay=replay)
    raw, _ = _job(keys, several, choices=3)
    assert open_job(raw, node_id="gpu-1", keys=keys, replay=replay).request.choices == 3
