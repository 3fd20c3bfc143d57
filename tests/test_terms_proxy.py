"""Terms of use for users behind `hearth proxy` and in `hearth chat`, on a real stack (scheduler, node, demo
model) whose policy file has terms: the proxy forwards /v1/terms, /v1/terms/accept and /v1/policy with the
user's token and answers what the scheduler answered; a refusal for terms not accepted reaches an OpenAI
client unchanged and `hearth chat` tells its user what to run; the headers of the scheduler's generation
answers (x-ratelimit-*, x-request-id) reach the proxy's client as the scheduler sent them.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import openai
import pytest
from aiohttp import web
from click.testing import CliRunner

from hearth.cli import main
from hearth.proxy import SealedClient, state_path
from hearth.proxy_server import serve
from hearth.terms_cli import how_to_accept
from node.settings import ModelSettings
from scheduler.store import Store
from tests.support import LoopThread, Stack, start_stack, stop_stack, wait_for

VERSION = "7"
TERMS = "Use it for your studies. Nothing you type is read by the club."
PASSED = ("x-ratelimit-", "x-request-id", "retry-after")


@dataclass
class Proxied:
    stack: Stack
    proxy_url: str  # the proxy's root; its OpenAI API is under /v1
    token: str  # the user's token, which the proxy sends
    seen: list[Any] = field(default_factory=list)  # the scheduler's answers to the proxy's generation calls


def _user(stack: Stack, name: str) -> str:
    store = Store(stack.data_dir / "hearth.db")
    try:
        return store.create_token(name, "user")[0]
    finally:
        store.close()


@pytest.fixture(scope="module")
def proxied(
    servers: LoopThread, demo_model: ModelSettings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Proxied]:
    data = tmp_path_factory.mktemp("terms-proxy")
    policy = data / "policies.toml"
    # Limits the answers report in their x-ratelimit-* headers, high enough never to refuse.
    limits = "[groups.default]\nrequests_per_minute = 100000\ntokens_per_day = 100000000\n"
    policy.write_text(f'{limits}[terms]\nversion = "{VERSION}"\ntext = "{TERMS}"\n', encoding="utf-8")

    async def start() -> Proxied:
        stack = await start_stack(data, [demo_model], scheduler={"policy_file": policy})
        token = await asyncio.to_thread(_user, stack, "behind-the-proxy")
        env = Proxied(stack, "", token)

        async def answered(session: Any, ctx: Any, params: aiohttp.TraceRequestEndParams) -> None:
            if params.method == "POST" and params.url.path.endswith("/completions"):
                env.seen.append(params.response.headers.copy())

        trace = aiohttp.TraceConfig()
        trace.on_request_end.append(answered)
        session = aiohttp.ClientSession(trace_configs=[trace])
        client = SealedClient(stack.base_url, token, state_path(data / "user", stack.base_url), session)

        async def has_keys() -> bool:
            await client.refresh(force=True)
            return stack.node_id in client.hints.get("hearth-demo", [])

        await wait_for(has_keys, within=60, interval=0.2)
        runner, env.proxy_url = await serve(client, "127.0.0.1", 0)
        stack.runners.insert(0, runner)
        stack.tasks.append(asyncio.ensure_future(_close_later(session)))
        return env

    env = servers.call(start())
    yield env
    servers.call(stop_stack(env.stack))


async def _close_later(session: aiohttp.ClientSession) -> None:
    try:
        await asyncio.Event().wait()
    finally:
        await session.close()


def _direct(env: Proxied, method: str, path: str, token: str, **kw: Any) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"}
    return httpx.request(method, env.stack.base_url + path, headers=headers, timeout=30, **kw)


def _proxy(env: Proxied, method: str, path: str, **kw: Any) -> httpx.Response:
    # Any API key, or none: the proxy speaks for its user with the user's token.
    return httpx.request(method, env.proxy_url + path, timeout=30, **kw)


def test_the_proxy_forwards_the_terms_with_the_users_token(proxied: Proxied) -> None:
    env = proxied
    before = _proxy(env, "GET", "/v1/terms")
    assert before.status_code == 200
    assert before.json() == _direct(env, "GET", "/v1/terms", env.token).json()
    assert before.json()["version"] == VERSION and before.json()["text"] == TERMS
    stale = _proxy(env, "POST", "/v1/terms/accept", json={"version": "6"})
    assert stale.status_code == 409
    assert stale.json() == _direct(env, "POST", "/v1/terms/accept", env.token, json={"version": "6"}).json()
    assert stale.json()["error"]["code"] == "terms_version_changed"
    bad = _proxy(env, "POST", "/v1/terms/accept", content=b"[]")
    assert (bad.status_code, bad.json()["error"]["type"]) == (400, "invalid_request_error")


def test_accepting_through_the_proxy_is_the_users_acceptance(proxied: Proxied) -> None:
    env = proxied
    accepted = _proxy(env, "POST", "/v1/terms/accept", json={"version": VERSION})
    assert accepted.status_code == 200, accepted.text
    assert (accepted.json()["accepted"], accepted.json()["accepted_version"]) == (True, VERSION)
    assert _direct(env, "GET", "/v1/terms", env.token).json() == accepted.json()


def test_the_proxy_answers_for_the_policy_what_the_scheduler_answers(proxied: Proxied) -> None:
    env = proxied
    direct = _direct(env, "GET", "/v1/policy", env.token)
    through = _proxy(env, "GET", "/v1/policy")
    assert (through.status_code, through.json()) == (direct.status_code, direct.json())


def _picked(headers: Any) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items() if k.lower().startswith(PASSED)}


@pytest.mark.parametrize("stream", [False, True])
def test_generation_headers_reach_the_proxys_client_as_the_scheduler_sent_them(
    proxied: Proxied, stream: bool
) -> None:
    env = proxied
    _proxy(env, "POST", "/v1/terms/accept", json={"version": VERSION}).raise_for_status()
    env.seen.clear()
    with openai.OpenAI(base_url=env.proxy_url + "/v1", api_key="-", max_retries=0, timeout=120) as client:
        raw = client.chat.completions.with_raw_response.create(
            model="hearth-demo", messages=[{"role": "user", "content": "hi"}], max_tokens=4, stream=stream,
            extra_body={"ignore_eos": True},
        )  # fmt: skip
        answer = raw.parse()
        if stream:
            assert "".join(c.choices[0].delta.content or "" for c in answer if c.choices)  # type: ignore[union-attr]
        else:
            assert answer.choices[0].message.content  # type: ignore[union-attr]
    assert env.seen  # the last is the answer the client got (a re-seal would have come first)
    scheduler = _picked(env.seen[-1])
    assert _picked(raw.headers) == scheduler
    # Issue 13: every generation answer of the scheduler carries these (the lead's change on the scheduler).
    assert "x-request-id" in scheduler and "x-ratelimit-remaining-requests" in scheduler, scheduler


# ----- refused for terms not accepted (needs the scheduler's enforcement, issue 13) -----


def test_a_refusal_for_terms_reaches_an_openai_client_unchanged(
    servers: LoopThread, proxied: Proxied, tmp_path: Path
) -> None:
    env = proxied
    token = _user(env.stack, "not-yet")
    body = {"model": "hearth-demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    direct = _direct(env, "POST", "/v1/chat/completions", token, json=body)
    assert direct.status_code == 403, direct.text
    assert direct.json()["error"]["code"] == "terms_not_accepted"
    assert VERSION in direct.json()["error"]["message"]

    # The module's proxy speaks for the module's user; this user runs a proxy of their own.
    async def own_proxy() -> tuple[web.AppRunner, str, aiohttp.ClientSession]:
        session = aiohttp.ClientSession()
        client = SealedClient(env.stack.base_url, token, state_path(tmp_path, env.stack.base_url), session)
        await client.refresh(force=True)
        runner, url = await serve(client, "127.0.0.1", 0)
        return runner, url, session

    runner, url, session = servers.call(own_proxy())
    try:
        with (
            openai.OpenAI(base_url=url + "/v1", api_key="-", max_retries=0, timeout=120) as client,
            pytest.raises(openai.PermissionDeniedError) as info,
        ):
            client.chat.completions.create(**body)  # type: ignore[call-overload]
    finally:
        servers.call(runner.cleanup())
        servers.call(session.close())
    assert info.value.response.json() == direct.json()
    assert info.value.code == "terms_not_accepted"


def _hearth() -> list[str]:
    script = Path(sys.executable).with_name("hearth")
    return [str(script)] if script.exists() else [sys.executable, "-c", "from hearth.cli import main; main()"]


def test_hearth_chat_tells_the_user_how_to_accept_the_terms(proxied: Proxied, tmp_path: Path) -> None:
    env = proxied
    token = _user(env.stack, "chatter")
    chat = [*_hearth(), "chat", "--scheduler", env.stack.base_url, "--token", token, "--model", "hearth-demo",
            "--max-tokens", "4", "--data-dir", str(tmp_path)]  # fmt: skip
    refused = subprocess.run(chat, input=b"hello\n\n", capture_output=True, timeout=120)
    where = f" --scheduler {env.stack.base_url}"
    assert refused.returncode == 1, refused.stdout
    assert refused.stderr.decode().splitlines() == [
        f"hearth: error: this token has not accepted version {VERSION} of the terms of use yet: read them with "
        f"`hearth terms show{where}`, then accept them with `hearth terms accept{where} --version {VERSION}`"
    ]
    accepted = CliRunner().invoke(
        main, ["terms", "accept", "--yes", "--version", VERSION, "--scheduler", env.stack.base_url,
               "--token", token], env={"HEARTH_TOKEN": ""},
    )  # fmt: skip
    assert accepted.exit_code == 0, accepted.output
    answered = subprocess.run(chat, input=b"hello\n\n", capture_output=True, timeout=120)
    assert answered.returncode == 0, answered.stderr.decode()
    assert answered.stdout.decode().split("> ", 2)[1].strip()


def test_the_how_to_line_without_a_version_still_says_what_to_run() -> None:
    assert how_to_accept(None, "http://127.0.0.1:8000/") == (
        "this token has not accepted the terms of use yet: read them with `hearth terms show`, then accept "
        "them with `hearth terms accept`"
    )


def test_forwarding_to_a_scheduler_that_is_gone_is_a_503_with_retry_after(
    servers: LoopThread, tmp_path: Path
) -> None:
    async def start() -> tuple[web.AppRunner, str, aiohttp.ClientSession]:
        session = aiohttp.ClientSession()
        client = SealedClient("http://127.0.0.1:9", "t", tmp_path / "pin.json", session)
        runner, url = await serve(client, "127.0.0.1", 0)
        return runner, url, session

    runner, url, session = servers.call(start())
    try:
        r = httpx.get(url + "/v1/terms", timeout=30)
    finally:
        servers.call(runner.cleanup())
        servers.call(session.close())
    assert (r.status_code, r.json()["error"]["code"]) == (503, "scheduler_unreachable")
    assert r.headers["Retry-After"] == "2"
