"""Plaintext requests (where the policy allows them) still cross the network sealed: the scheduler seals each
one toward its node itself, opens the node's sealed answer, and hands the client plain OpenAI responses.

The node here listens on the machine's LAN address, as a volunteer's node does, behind a recording tap: the
canary in the prompt must not appear in anything that crosses that hop, and the node must refuse a
plaintext job that arrives from anywhere but loopback.
"""

from __future__ import annotations

import dataclasses
import socket
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import psutil  # type: ignore[import-untyped]
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from node.settings import ModelSettings
from protocol.envelope import SEALED_JOB, public_key_bytes
from protocol.identity import b64e
from protocol.web import is_loopback
from scheduler.state import FEDERATION
from tests.support import LoopThread, Stack, Tapped, start_tapped_stack, stop_tapped_stack, wait_for

CANARY = "okapi-canary-51e9d0"


def lan_address() -> str | None:
    """An IPv4 address of this machine other than loopback (where other machines would reach a node)."""
    for addresses in psutil.net_if_addrs().values():
        for a in addresses:
            if a.family == socket.AF_INET and not a.address.startswith("127."):
                return str(a.address)
    return None


LAN = lan_address()


@pytest.fixture(scope="module")
def remote(
    servers: LoopThread, demo_model: ModelSettings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Tapped]:
    if LAN is None:
        pytest.skip("this machine has no network address but loopback")
    data = tmp_path_factory.mktemp("remote")

    env = servers.call(
        start_tapped_stack(
            data, [demo_model], host=LAN, scheduler={"policy": {"require_e2e": False}},
            node={"e2e_flush_interval": 0.0},
        )
    )  # fmt: skip
    yield env
    servers.call(stop_tapped_stack(env))


def _client(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.api, api_key=stack.token, max_retries=0)


def _chat(stack: Stack, *, stream: bool) -> tuple[str, str, int]:
    """(text, response id, completion tokens) of a greedy chat with the canary in its prompt."""
    messages = [{"role": "user", "content": f"Say {CANARY} and nothing else."}]
    args = {"model": "hearth-demo", "messages": messages, "max_tokens": 8, "temperature": 0,
            "extra_body": {"ignore_eos": True}}  # fmt: skip
    if not stream:
        r = _client(stack).chat.completions.create(**args)  # type: ignore[call-overload]
        assert r.usage is not None
        return r.choices[0].message.content or "", r.id, r.usage.completion_tokens
    chunks = list(
        _client(stack).chat.completions.create(stream=True, stream_options={"include_usage": True}, **args)  # type: ignore[call-overload]
    )
    assert chunks[-1].usage is not None
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks[0].id, chunks[-1].usage.completion_tokens


def test_a_plaintext_request_crosses_the_network_sealed(remote: Tapped, servers: LoopThread) -> None:
    stack = remote.stack
    text, _, tokens = _chat(stack, stream=False)
    streamed, response_id, streamed_tokens = _chat(stack, stream=True)
    # The user gets their answer as from any node: the same greedy text both ways, counted.
    assert text and streamed == text
    assert tokens == streamed_tokens == 8
    # Nothing the node received or sent on the network hop can be read.
    seen = bytes(remote.tap.seen)
    assert SEALED_JOB.encode() in seen
    assert CANARY.encode() not in seen
    assert text.encode() not in seen
    # The usage row has the counts the node reported.
    job_id = response_id.removeprefix("chatcmpl-")

    async def recorded() -> bool:
        with sqlite3.connect(stack.data_dir / "hearth.db") as db:
            return db.execute("select 1 from usage where request_id = ?", [job_id]).fetchone() is not None

    servers.call(wait_for(recorded, within=10))
    with sqlite3.connect(stack.data_dir / "hearth.db") as db:
        row = db.execute(
            "select status, completion_tokens from usage where request_id = ?", [job_id]
        ).fetchone()
    assert row == ("ok", 8)
    for path in stack.data_dir.rglob("*"):
        if path.is_file():
            assert CANARY.encode() not in path.read_bytes(), path


def test_the_node_refuses_plaintext_from_the_network(remote: Tapped) -> None:
    stack = remote.stack
    body = b'{"endpoint":"chat","request_id":"r1","request":{"model":"hearth-demo","messages":[]}}'
    r = httpx.post(
        stack.node_url + "/jobs", content=body, headers=stack.node_headers("POST", "/jobs", body), timeout=10
    )
    assert r.status_code == 403
    assert r.json()["error"]["code"] == "plaintext_refused"


def test_a_node_without_a_key_in_the_directory_gets_no_plaintext(remote: Tapped, servers: LoopThread) -> None:
    stack = remote.stack
    assert stack.scheduler_app is not None
    directory = stack.scheduler_app[FEDERATION].directory
    kept = directory.keys.pop(stack.node_id)
    try:
        with pytest.raises(openai.APIStatusError) as info:
            _client(stack).chat.completions.create(
                model="hearth-demo", messages=[{"role": "user", "content": CANARY}], max_tokens=2
            )
        assert info.value.status_code == 503
        assert "encryption key" in info.value.message
        assert CANARY.encode() not in bytes(remote.tap.seen)
    finally:
        directory.keys.setdefault(stack.node_id, kept)


def test_a_node_that_cannot_open_what_the_scheduler_sealed_is_the_operators_problem(remote: Tapped) -> None:
    # The directory shows a key the node does not hold (as if it had lost its keys): the plaintext client
    # sent no envelope, so it gets 503 node_failed, not a 400 that would blame its request.
    stack = remote.stack
    assert stack.scheduler_app is not None
    directory = stack.scheduler_app[FEDERATION].directory
    kept = directory.keys[stack.node_id]
    stranger = public_key_bytes(X25519PrivateKey.generate().public_key())
    directory.keys[stack.node_id] = dataclasses.replace(kept, public_key=b64e(stranger))
    try:
        with pytest.raises(openai.APIStatusError) as info:
            _client(stack).chat.completions.create(
                model="hearth-demo", messages=[{"role": "user", "content": CANARY}], max_tokens=2
            )
        assert info.value.status_code == 503
        assert info.value.code == "node_failed" and "keys and clock" in info.value.message
    finally:
        directory.keys[stack.node_id] = kept


def test_always_seals_toward_loopback_nodes_too(
    servers: LoopThread, demo_model: ModelSettings, tmp_path: Path
) -> None:
    env = servers.call(
        start_tapped_stack(
            tmp_path, [demo_model], scheduler={"policy": {"require_e2e": False}, "seal_toward_nodes": "always"},
            node={"e2e_flush_interval": 0.0},
        )
    )  # fmt: skip
    try:
        text, _, tokens = _chat(env.stack, stream=True)
        assert text and tokens == 8
        # A tokenizer request (a job kind of its own) is sealed toward its node the same way.
        r = httpx.post(
            env.stack.base_url + "/tokenize", json={"prompt": CANARY},
            headers={"Authorization": f"Bearer {env.stack.token}"}, timeout=60,
        )  # fmt: skip
        assert r.status_code == 200, r.text
        assert r.json()["count"] > 0
        assert SEALED_JOB.encode() in bytes(env.tap.seen)
        assert CANARY.encode() not in bytes(env.tap.seen)
    finally:
        servers.call(stop_tapped_stack(env))


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True), ("127.8.9.10", True), ("::1", True), ("[::1]", True), ("localhost", True),
        ("::ffff:127.0.0.1", True), ("192.0.2.2", False), ("::ffff:192.0.2.2", False), ("fd00::2", False),
        ("gpu-box.lan", False), ("localhost.example.org", False), ("", False), (None, False),
    ],
)  # fmt: skip
def test_what_counts_as_loopback(host: str | None, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_hearth_node_status_reaches_a_node_bound_to_its_lan_address(remote: Tapped) -> None:
    from click.testing import CliRunner

    from hearth.cli import main

    result = CliRunner().invoke(main, ["node", "status", "--data-dir", str(remote.stack.data_dir)])
    assert result.exit_code == 0, result.output
    assert f"at http://{LAN}:" in result.output and "state: serving" in result.output
