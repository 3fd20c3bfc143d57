"""End-to-end encryption through real servers: the `openai` client → `hearth proxy` → scheduler → node.

Every byte between the proxy and the scheduler, and between the scheduler and the node, passes through a
recording tap; a canary in the prompt must never show up in any of it, nor in the scheduler's database or
logs, while the answers still arrive intact (streaming and not).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import openai
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from hearth.proxy import SealedClient, state_path
from hearth.proxy_server import serve
from node.app import load_transformers, start_node
from node.backends.base import SamplingParams
from node.settings import ModelSettings, NodeSettings
from node.trust import Trust
from protocol.envelope import MEDIA_TYPE as ENVELOPE
from protocol.envelope import Candidate, seal_request, to_wire
from scheduler.state import FEDERATION
from tests.support import (
    LoopThread,
    Stack,
    Tap,
    WrappedBackend,
    certify_node,
    port_of,
    start_stack,
    stop_stack,
    wait_for,
)

CANARY = "zebra-canary-7f3a1c"


# Armed by a test: the next generation on any node dies after a few tokens (a node failing on purpose).
DIE_MID_STREAM = threading.Event()
TOKENS_BEFORE_DYING = 3


class DiesWhenArmed(WrappedBackend):
    def generate(
        self, prompt_ids: Sequence[int], params: SamplingParams, cancelled: threading.Event
    ) -> Iterator[int]:
        doomed = DIE_MID_STREAM.is_set()
        DIE_MID_STREAM.clear()
        for i, token in enumerate(super().generate(prompt_ids, params, cancelled)):
            if doomed and i == TOKENS_BEFORE_DYING:
                raise RuntimeError("this node dies mid-stream on purpose")
            yield token


def flaky_loader(model: ModelSettings, settings: NodeSettings) -> Any:
    return DiesWhenArmed(load_transformers(model, settings))


@dataclass
class E2E:
    stack: Stack
    proxy_url: str
    scheduler_tap: Tap
    node_tap: Tap
    client: SealedClient
    second: str = "second"


@pytest.fixture(scope="module")
def e2e(
    servers: LoopThread, demo_model: ModelSettings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[E2E]:
    data = tmp_path_factory.mktemp("e2e")

    async def start() -> E2E:
        node_tap = Tap(0)
        node_public = await node_tap.start()
        stack = await start_stack(
            data, [demo_model], scheduler={"policy": {"require_e2e": True}}, loader=flaky_loader,
            node={"public_url": node_public, "e2e_flush_interval": 0.0},
        )  # fmt: skip
        node_tap.aim(stack.node_url)
        # A second node serving the same model, so a sealed request has two candidates.
        second_dir = data / "second"
        await certify_node(stack, second_dir, "second")
        second_tap = Tap(0)
        second = NodeSettings(
            node_id="second", models=[demo_model], advertise=False, heartbeat_interval=0.2,
            data_dir=second_dir, scheduler_url=stack.base_url, e2e_flush_interval=0.0,
            public_url=await second_tap.start(),
        )  # fmt: skip
        trust = await asyncio.to_thread(Trust.open, second_dir)
        runner, second_url, _ = await start_node(second, trust=trust, loader=flaky_loader)
        second_tap.aim(second_url)
        node_tap.others.append(second_tap)  # one tap object reports both nodes' traffic
        stack.runners.append(runner)
        sched_tap = Tap(port_of(stack.base_url))
        sched_public = await sched_tap.start()
        session = aiohttp.ClientSession()
        client = SealedClient(sched_public, stack.token, state_path(data / "user", sched_public), session)

        async def has_keys() -> bool:
            directory = await client.refresh(force=True)
            healthy = set(client.hints.get("hearth-demo", []))
            return {stack.node_id, "second"} <= set(directory.usable(time.time())) & healthy

        await wait_for(has_keys, within=60, interval=0.2)
        runner, url = await serve(client, "127.0.0.1", 0)
        stack.runners.insert(0, runner)
        stack.tasks.append(asyncio.ensure_future(_close_later(session)))
        return E2E(stack, url + "/v1", sched_tap, node_tap, client)

    env = servers.call(start())
    yield env
    servers.call(stop_stack(env.stack))
    servers.call(env.scheduler_tap.close())
    servers.call(env.node_tap.close())


async def _close_later(session: aiohttp.ClientSession) -> None:
    try:
        await asyncio.Event().wait()
    finally:
        await session.close()


def _ask(env: E2E, *, stream: bool, max_tokens: int = 8) -> tuple[str, openai.types.CompletionUsage | None]:
    client = openai.OpenAI(base_url=env.proxy_url, api_key="unused-locally", max_retries=0)
    messages = [{"role": "user", "content": f"Please repeat {CANARY} back to me."}]
    if not stream:
        r = client.chat.completions.create(
            model="hearth-demo", messages=messages, max_tokens=max_tokens,  # type: ignore[arg-type]
            extra_body={"ignore_eos": True},
        )  # fmt: skip
        return r.choices[0].message.content or "", r.usage
    chunks = list(
        client.chat.completions.create(
            model="hearth-demo", messages=messages, max_tokens=max_tokens, stream=True,  # type: ignore[arg-type]
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
        )
    )  # fmt: skip
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks[-1].usage


def test_the_openai_client_works_through_the_proxy_and_the_canary_never_shows(
    e2e: E2E, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    text, usage = _ask(e2e, stream=False)
    assert text and usage is not None and usage.completion_tokens == 8
    text, usage = _ask(e2e, stream=True)
    assert text and usage is not None and usage.completion_tokens == 8
    # What crossed the wire, both hops, both ways: sealed.
    assert e2e.scheduler_tap.seen and e2e.node_tap.seen
    assert CANARY.encode() not in bytes(e2e.scheduler_tap.seen)
    assert CANARY.encode() not in bytes(e2e.node_tap.seen)
    assert ENVELOPE.encode() in bytes(e2e.scheduler_tap.seen)
    # What the scheduler stores and logs.
    for path in e2e.stack.data_dir.rglob("*"):
        if path.is_file():
            assert CANARY.encode() not in path.read_bytes(), path
    # What the servers logged (the test's own OpenAI client logs its requests at DEBUG: that is the user's
    # side, and not what is checked here).
    client_side = ("openai", "httpx", "httpcore")
    server_log = "\n".join(r.getMessage() for r in caplog.records if not r.name.startswith(client_side))
    assert CANARY not in server_log


def test_a_sealed_requests_usage_row_has_its_time_to_first_token(e2e: E2E) -> None:
    """The scheduler cannot read a sealed answer, but it sees when its first frame came."""
    started = time.time()
    _ask(e2e, stream=True)
    deadline = time.monotonic() + 30  # the usage writer commits in batches, off the request path
    rows: list[tuple[float | None, float, float, str]] = []
    while not rows and time.monotonic() < deadline:
        time.sleep(0.05)
        with sqlite3.connect(e2e.stack.data_dir / "hearth.db") as db:
            rows = db.execute(
                "select ttft_ms, started, ended, status from usage where started >= ? and status = 'ok'",
                [started - 1],
            ).fetchall()
    assert rows, "no usage row was written"
    ttft_ms, begun, ended, _ = rows[0]
    assert ttft_ms is not None and 0 < ttft_ms <= (ended - begun) * 1000


def test_plaintext_is_refused_when_e2e_is_required(e2e: E2E) -> None:
    r = httpx.post(
        e2e.stack.api + "/chat/completions",
        json={"model": "hearth-demo", "messages": [{"role": "user", "content": CANARY}]},
        headers={"Authorization": f"Bearer {e2e.stack.token}"},
    )
    assert r.status_code == 403
    assert r.json()["error"]["code"] == "e2e_required"
    assert "hearth proxy" in r.json()["error"]["message"]


@pytest.fixture
def envelope(e2e: E2E) -> dict[str, Any]:
    """An envelope as the scheduler received it: one request is sent through the proxy and answered now."""
    before = len(e2e.scheduler_tap.seen)
    text, _ = _ask(e2e, stream=False)
    assert text
    seen = bytes(e2e.scheduler_tap.seen[before:])
    start = seen.find(b'{"suite": "hearth-e2e-v1"')
    assert start >= 0
    doc: dict[str, Any] = json.JSONDecoder().raw_decode(seen[start:].decode("latin-1"))[0]
    return doc


def test_a_replayed_envelope_runs_at_most_once_per_candidate(e2e: E2E, envelope: dict[str, Any]) -> None:
    # Send an envelope the scheduler received (and a node answered) again, several times. Each node
    # remembers what it opened, so the copy can run on a candidate that has not seen it (blind failover
    # needs that) and never twice on one: the candidates bound how often an envelope can run.
    doc = envelope
    statuses = []
    for _ in range(8):
        r = httpx.post(
            e2e.stack.api + "/chat/completions", content=json.dumps(doc),
            headers={"Authorization": f"Bearer {e2e.stack.token}", "Content-Type": ENVELOPE}, timeout=30,
        )  # fmt: skip
        statuses.append(r.status_code)
        if r.status_code != 200:
            assert r.json()["error"]["code"] == "envelope_invalid"
    # The original ran on one candidate; the copies may run once on the other, never more.
    assert statuses.count(200) <= len(doc["wraps"]) - 1
    assert statuses.count(400) >= len(statuses) - 1


def test_the_proxy_pins_the_authority_and_the_head(e2e: E2E, tmp_path: Path) -> None:
    pinned = json.loads(e2e.client.state_path.read_text())
    assert pinned["authority_key"]
    assert pinned["head"]["seq"] >= 2  # the node's certificate and its key statement


def _greedy(env: E2E, *, stream: bool) -> tuple[str, int]:
    client = openai.OpenAI(base_url=env.proxy_url, api_key="unused-locally", max_retries=0)
    messages = [{"role": "user", "content": f"Tell me a story about {CANARY}."}]
    args: dict[str, Any] = {"model": "hearth-demo", "messages": messages, "max_tokens": 12, "temperature": 0,
                            "extra_body": {"ignore_eos": True}}  # fmt: skip
    if not stream:
        r = client.chat.completions.create(**args)
        assert r.usage is not None
        return r.choices[0].message.content or "", r.usage.completion_tokens
    chunks = list(client.chat.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    roles = [c for c in chunks if c.choices and c.choices[0].delta.role == "assistant"]
    assert len(roles) == 1, "one stream: the role event once"
    assert len({c.id for c in chunks}) == 1, "one stream: one id"
    usage = chunks[-1].usage
    assert usage is not None
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), usage.completion_tokens


@pytest.mark.parametrize("stream", [True, False], ids=["streaming", "not streaming"])
def test_a_node_dying_mid_stream_is_replaced_blindly(
    e2e: E2E, stream: bool, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    reference, _ = _greedy(e2e, stream=stream)
    before = len(e2e.scheduler_tap.seen)
    DIE_MID_STREAM.set()
    text, completion_tokens = _greedy(e2e, stream=stream)
    assert not DIE_MID_STREAM.is_set(), "a node ran the doomed job"
    assert completion_tokens == 12
    assert text == reference, "the replacement went on from where the first node stopped"
    resumed = "resuming a sealed answer another node began" in caplog.text
    # Streaming, the user had tokens already: the replacement resumed. Not streaming, the user had nothing
    # (a non-streaming answer is one frame at the end), so the replacement simply started over.
    assert resumed == stream
    wire = bytes(e2e.scheduler_tap.seen[before:])
    assert CANARY.encode() not in wire
    # The usage row is written by the scheduler's writer after the answer: it may land a moment later.
    deadline = time.monotonic() + 10
    while True:
        with sqlite3.connect(e2e.stack.data_dir / "hearth.db") as db:
            statuses = [r[0] for r in db.execute("select status from usage order by ended desc limit 1")]
        if statuses == ["ok"] or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert statuses == ["ok"], "the request's row is the replacement's"


def test_candidates_that_cannot_take_it_get_a_reseal(e2e: E2E, servers: LoopThread) -> None:
    assert e2e.stack.scheduler_app is not None
    registry = e2e.stack.scheduler_app[FEDERATION].registry
    registry.set_drain(e2e.second, True)
    try:
        one = SealedClient(
            e2e.client.scheduler_url,
            e2e.client.token,
            e2e.client.state_path,
            e2e.client.session,
            candidates=1,
        )

        async def ask() -> bytes:
            await one.refresh(force=True)
            one.hints = {"hearth-demo": [e2e.second]}  # a stale hint: the drained node only
            one.fetched = time.monotonic()  # keep it: the proxy would re-read the directory otherwise
            body = {"model": "hearth-demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                    "ignore_eos": True}  # fmt: skip
            payloads = (await one.send("chat", json.dumps(body).encode())).payloads
            return b"".join([p async for p in payloads])

        before = len(e2e.scheduler_tap.seen)
        answer = json.loads(servers.call(ask()))
        assert answer["usage"]["completion_tokens"] == 2
        assert b'"reseal"' in bytes(e2e.scheduler_tap.seen[before:])
    finally:
        registry.set_drain(e2e.second, False)


def test_every_failure_to_open_looks_the_same(e2e: E2E, envelope: dict[str, Any]) -> None:
    # Take a real envelope and break it in different places: the scheduler (parsing) or the node (opening)
    # refuses each, and the status and body never say which check failed.
    good = envelope

    def flip(text: str) -> str:
        return ("B" if text[5] == "A" else "A").join((text[:5], text[6:]))

    broken = []
    for change in ("wrap", "ciphertext", "nonce", "max_tokens", "model_len", "expired"):
        doc = json.loads(json.dumps(good))
        doc["header"]["request_id"] = f"broken-{change}"  # not a replay of the original
        if change == "wrap":
            doc["wraps"][0]["wrap"] = flip(doc["wraps"][0]["wrap"])
        elif change == "ciphertext":
            doc["ciphertext"] = flip(doc["ciphertext"])
        elif change == "nonce":
            doc["nonce"] = flip(doc["nonce"])
        elif change == "max_tokens":
            doc["header"]["max_tokens"] = 4
        elif change == "model_len":
            doc["header"]["bucket"] = 3000
        else:
            doc["header"]["issued_at"] -= 3600
            doc["header"]["expires_at"] -= 3600
        broken.append(doc)
    answers = set()
    for doc in broken:
        r = httpx.post(
            e2e.stack.api + "/chat/completions", content=json.dumps(doc),
            headers={"Authorization": f"Bearer {e2e.stack.token}", "Content-Type": ENVELOPE}, timeout=30,
        )  # fmt: skip
        answers.add((r.status_code, r.text))
    assert len(answers) == 1
    status, text = answers.pop()
    assert status == 400 and json.loads(text)["error"]["code"] == "envelope_invalid"


def test_a_candidate_that_cannot_open_the_envelope_passes_it_to_another(
    e2e: E2E, servers: LoopThread
) -> None:
    # The wrap for one node is sealed to a key that node does not hold (as if it had lost its keys): when
    # the scheduler tries that node first, it refuses, and the other candidate answers instead.
    async def candidates() -> list[Candidate]:
        directory = await e2e.client.refresh()
        return e2e.client.choose(directory, "hearth-demo", prefer=[e2e.stack.node_id, e2e.second])

    good = servers.call(candidates())
    lost = next(c for c in good if c.node_id == e2e.second)
    stranger = X25519PrivateKey.generate().public_key()
    chosen = [c if c is not lost else Candidate(lost.node_id, lost.key_id, stranger) for c in good]
    body = json.dumps({"model": "hearth-demo", "messages": [{"role": "user", "content": CANARY}],
                       "max_tokens": 2, "stream": True}).encode()  # fmt: skip
    refused_before = _node_refusals(e2e)
    for i in range(40):
        sealed, _ = seal_request(
            body, endpoint="chat", model="hearth-demo", max_tokens=2, stream=True, request_id=f"lost-{i}",
            issued_at=int(time.time()), ttl_s=60, candidates=chosen,
        )  # fmt: skip
        r = httpx.post(
            e2e.stack.api + "/chat/completions", content=json.dumps(to_wire(sealed)),
            headers={"Authorization": f"Bearer {e2e.stack.token}", "Content-Type": ENVELOPE}, timeout=30,
        )  # fmt: skip
        assert r.status_code == 200, r.text
        if _node_refusals(e2e) > refused_before:
            break  # the node without the key was tried first at least once, and the answer still came
    assert _node_refusals(e2e) > refused_before


def _node_refusals(env: E2E) -> float:
    text = httpx.get(env.stack.base_url + "/metrics").text
    found = re.search(r'^hearth_requests_total\{endpoint="chat",status="refused_400"\} (\S+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


def test_a_node_raises_an_alarm_when_the_directory_does_not_show_its_key(
    e2e: E2E, servers: LoopThread
) -> None:
    assert e2e.stack.scheduler_app is not None
    # Both nodes check often in this module's stack (see the fixture): no alarm while all is well.
    nodes = e2e.stack.scheduler_app[FEDERATION].registry.nodes
    assert all(n.status is not None and n.status.alarm is None for n in nodes.values())


def _hearth_cli() -> list[str]:
    script = Path(sys.executable).with_name("hearth")
    return [str(script)] if script.exists() else [sys.executable, "-c", "from hearth.cli import main; main()"]


def test_the_hearth_proxy_command_serves_the_openai_client(e2e: E2E, tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [*_hearth_cli(), "proxy", "--scheduler", e2e.client.scheduler_url, "--token", e2e.stack.token,
         "--port", "0", "--candidates", "2", "--data-dir", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        lines = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stdout.readline().decode()
            lines.append(line)
            if "point any OpenAI client at" in line:
                break
        banner = "".join(lines)
        assert "federation authority" in banner, banner
        url = banner.split("point any OpenAI client at ", 1)[1].split()[0]
        # Closed before the proxy is: its pooled connection would otherwise outlive the test, unclosed.
        with openai.OpenAI(base_url=url, api_key="anything", max_retries=0) as client:
            chunks = list(
                client.chat.completions.create(
                    model="hearth-demo", messages=[{"role": "user", "content": CANARY}], max_tokens=4,
                    stream=True, extra_body={"ignore_eos": True},
                )
            )  # fmt: skip
            assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            assert [m.id for m in client.models.list().data] == ["hearth-demo"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        if proc.stdout is not None:
            proc.stdout.close()


def test_hearth_chat_talks_through_the_same_sealing(e2e: E2E, tmp_path: Path) -> None:
    done = subprocess.run(
        [*_hearth_cli(), "chat", "--scheduler", e2e.client.scheduler_url, "--token", e2e.stack.token,
         "--max-tokens", "4", "--data-dir", str(tmp_path)],
        input=b"Say something about " + CANARY.encode() + b"\n\n", capture_output=True, timeout=120,
    )  # fmt: skip
    out = done.stdout.decode()
    assert done.returncode == 0, done.stderr.decode()
    assert out.startswith("hearth chat: hearth-demo, sealed end to end")
    answer = out.split("> ", 2)[1].strip()
    assert answer, out


def test_the_proxy_without_a_token_says_so_in_one_line(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "HEARTH_TOKEN"}
    done = subprocess.run(
        [*_hearth_cli(), "proxy", "--scheduler", "http://127.0.0.1:9", "--data-dir", str(tmp_path)],
        capture_output=True, timeout=60, env=env,
    )  # fmt: skip
    assert done.returncode == 1
    assert done.stderr.decode().strip().splitlines() == [
        "hearth: error: this needs your API token: pass --token or set HEARTH_TOKEN"
    ]


def test_tokenizer_requests_through_the_proxy_are_sealed_both_hops(e2e: E2E) -> None:
    """POST /tokenize and /detokenize carry the user's text: the scheduler and the network see none of it."""
    root = e2e.proxy_url.removesuffix("/v1")
    text = f"Count the tokens of {CANARY} please."
    seen_before = (len(e2e.scheduler_tap.seen), len(e2e.node_tap.seen))
    tokens = httpx.post(root + "/tokenize", json={"prompt": text, "add_special_tokens": False}, timeout=60)
    assert tokens.status_code == 200, tokens.text
    ids = tokens.json()["tokens"]
    assert tokens.json()["count"] == len(ids) > 0
    back = httpx.post(root + "/detokenize", json={"tokens": ids}, timeout=60)
    assert back.status_code == 200, back.text
    assert back.json()["prompt"].strip() == text
    assert len(e2e.scheduler_tap.seen) > seen_before[0] and len(e2e.node_tap.seen) > seen_before[1]
    assert CANARY.encode() not in bytes(e2e.scheduler_tap.seen)
    assert CANARY.encode() not in bytes(e2e.node_tap.seen)
    assert b"/tokenize" in bytes(e2e.scheduler_tap.seen) and ENVELOPE.encode() in bytes(
        e2e.scheduler_tap.seen
    )
