"""The console's client against a real scheduler and a real node on 127.0.0.1 (the demo model).

The client runs in its own event loop in the test's thread, as the console does in its own process; the
servers run in the `servers` loop thread.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import openai
import pytest
from aiohttp import web
from pydantic import BaseModel

from node.demo import DEMO_MODEL_ID
from node.enroll import enroll
from node.settings import ModelSettings
from protocol.accounts import AuditLog, TokenCreateRequest, TokenList, UsageReport
from protocol.admin import AuthorityKeys, EnrollmentList, ModelPlacements, NodeList
from protocol.errors import (
    AuthenticationFailed,
    ConfigError,
    ConflictError,
    HearthError,
    InvalidRequest,
    NotFound,
    PermissionDenied,
)
from protocol.policy import AdminEvent, PolicyState
from protocol.server import start_site
from protocol.terms import TermsDocument, TermsStatusList
from scheduler.state import EVENTS
from tests.support import LoopThread, Stack, start_scheduler, start_stack, stop_stack, wait_for
from tui.authority import approve_enrollment, sign_enrollment
from tui.client import ConsoleClient, Unreachable

T = TypeVar("T")

POLICY = '[groups.students]\nmodels = ["hearth-*"]\ntokens_per_day = 20000\n'
CANARY = "okapi-canary-5d2e9b"


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run the client in a loop of its own, as the console runs it."""
    return asyncio.run(coro)


def with_client(stack: Stack, fn: Callable[[ConsoleClient], Awaitable[T]], token: str | None = None) -> T:
    async def go() -> T:
        async with ConsoleClient(stack.base_url, token or stack.token) as client:
            return await fn(client)

    return run(go())


@pytest.fixture(scope="module")
def cluster(
    servers: LoopThread, demo_model: ModelSettings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    data = tmp_path_factory.mktemp("console")
    (data / "policies.toml").write_text(POLICY, encoding="utf-8")
    stack = servers.call(start_stack(data, [demo_model]))
    yield stack
    servers.call(stop_stack(stack))


def _user_token(stack: Stack, name: str = "someone") -> str:
    secret = with_client(stack, lambda c: c.create_token(TokenCreateRequest(name=name))).secret
    return secret


# (method, arguments, the document it answers)
# fmt: off
READS: list[tuple[str, tuple[Any, ...], type[BaseModel]]] = [
    ("nodes", (), NodeList),
    ("enrollments", (), EnrollmentList),
    ("enrollments", ("approved",), EnrollmentList),  # the state filter is a query parameter
    ("models", (), ModelPlacements),
    ("authority", (), AuthorityKeys),
    ("tokens", (), TokenList),
    ("usage", (), UsageReport),
    ("usage", ("model", "1d"), UsageReport),  # another dimension and window
    ("audit", ("30d", 5), AuditLog),
    ("policy", (), PolicyState),
    ("terms_status", (), TermsStatusList),
    ("terms", (), TermsDocument),  # a user's route; an admin token may read it too
]
# fmt: on


@pytest.mark.parametrize(("method", "args", "model"), READS)
def test_every_read_answers_its_document(
    cluster: Stack, method: str, args: tuple[Any, ...], model: type[BaseModel]
) -> None:
    doc = with_client(cluster, lambda c: getattr(c, method)(*args))
    assert isinstance(doc, model)


def test_the_reads_show_the_cluster_as_it_is(cluster: Stack) -> None:
    async def read(c: ConsoleClient) -> tuple[NodeList, ModelPlacements, PolicyState, str]:
        return await c.nodes(), await c.models(), await c.policy(), await c.metrics_text()

    nodes, models, policy, metrics = with_client(cluster, read)
    assert [n.node_id for n in nodes.nodes] == [cluster.node_id]
    assert [m.id for m in models.models] == [DEMO_MODEL_ID]
    assert {g.name for g in policy.groups} == {"default", "students"}
    assert "hearth_requests_total" in metrics


def test_drain_and_undrain_a_real_node(cluster: Stack) -> None:
    async def drain(c: ConsoleClient, flag: bool) -> tuple[bool, bool]:
        record = await c.drain(cluster.node_id, flag)
        (node,) = (await c.nodes()).nodes
        return record.drain, node.draining

    assert with_client(cluster, lambda c: drain(c, True)) == (True, True)
    assert with_client(cluster, lambda c: drain(c, False)) == (False, False)


def _models_status(stack: Stack, secret: str) -> int:
    """What the real `openai` client gets from /v1/models with this token: 200, or the error's status."""
    try:
        openai.OpenAI(base_url=stack.api, api_key=secret, max_retries=0).models.list()
    except openai.APIStatusError as exc:
        return exc.status_code
    return 200


def test_create_rotate_and_revoke_a_token(cluster: Stack) -> None:
    made = with_client(
        cluster, lambda c: c.create_token(TokenCreateRequest(name="visitor", group="students"))
    )
    assert made.token.group == "students" and made.token.state == "active"
    assert _models_status(cluster, made.secret) == 200
    rotated = with_client(cluster, lambda c: c.rotate_token(made.token.id))
    assert rotated.token.id == made.token.id and rotated.secret != made.secret
    assert (_models_status(cluster, made.secret), _models_status(cluster, rotated.secret)) == (401, 200)
    revoked = with_client(cluster, lambda c: c.revoke_token(made.token.id))
    assert revoked.state == "revoked"
    assert _models_status(cluster, rotated.secret) == 401
    listed = with_client(cluster, lambda c: c.tokens())
    assert any(t.id == made.token.id and t.state == "revoked" for t in listed.tokens)


def test_put_policy_applies_it_and_refuses_a_stale_digest(cluster: Stack) -> None:
    async def change(c: ConsoleClient) -> tuple[PolicyState, str]:
        before = await c.policy()
        after = await c.put_policy(POLICY.replace("20000", "30000"), digest=before.digest)
        await c.put_policy(POLICY, digest=after.digest)  # as it was, for the other tests
        return after, before.digest

    after, stale = with_client(cluster, change)
    (students,) = [g for g in after.groups if g.name == "students"]
    assert students.each.tokens_per_day == 30000
    with pytest.raises(ConflictError) as refused:
        with_client(cluster, lambda c: c.put_policy(POLICY, digest=stale + "0"))
    assert (refused.value.status, refused.value.code) == (409, "policy_changed")
    with pytest.raises(InvalidRequest) as bad:
        with_client(cluster, lambda c: c.put_policy("[groups.x]\nweight = 'heavy'\n"))
    assert bad.value.code == "invalid_policy"


def _pending(stack: Stack, tmp_path: Path, node_id: str) -> None:
    """A machine enrolls with a code, as `hearth node enroll` does."""
    code = with_client(stack, lambda c: c.create_code("club", note=node_id))
    enroll(tmp_path / node_id, stack.base_url, code.code, node_id, None)


def test_approve_an_enrollment_signed_on_the_operators_machine(cluster: Stack, tmp_path: Path) -> None:
    authority_dir = cluster.data_dir / "authority"  # the stack's operator key (tests.support)
    _pending(cluster, tmp_path, "volunteer-a")
    _pending(cluster, tmp_path, "volunteer-b")
    _pending(cluster, tmp_path, "volunteer-c")

    async def decide(c: ConsoleClient) -> dict[str, str]:
        pending = {e.node_id: e for e in (await c.enrollments("pending")).enrollments}
        keys = await c.authority()
        cert = await asyncio.to_thread(
            sign_enrollment, authority_dir, pending["volunteer-a"], keys.scheduler_key
        )
        await c.approve("volunteer-a", cert)
        await approve_enrollment(c, authority_dir, "volunteer-b")
        await c.reject("volunteer-c")
        return {e.node_id: e.state for e in (await c.enrollments()).enrollments if e.node_id in pending}

    states = with_client(cluster, decide)
    assert states == {"volunteer-a": "approved", "volunteer-b": "approved", "volunteer-c": "rejected"}
    gone = with_client(cluster, lambda c: c.revoke_node("volunteer-a"))
    assert gone.state == "revoked"


def test_approval_without_the_authority_key_says_where_it_looked(cluster: Stack, tmp_path: Path) -> None:
    _pending(cluster, tmp_path, "volunteer-d")
    pending = with_client(cluster, lambda c: c.enrollments("pending")).enrollments
    record = next(e for e in pending if e.node_id == "volunteer-d")
    with pytest.raises(ConfigError) as missing:
        sign_enrollment(tmp_path / "nowhere", record, "unused")
    assert str(tmp_path / "nowhere" / "authority.key") in missing.value.message
    assert "never on the scheduler" in missing.value.message
    with pytest.raises(ConfigError, match="no enrollment called ghost"):
        with_client(cluster, lambda c: approve_enrollment(c, cluster.data_dir / "authority", "ghost"))


def test_the_event_stream_shows_a_request_served_and_never_its_prompt(cluster: Stack) -> None:
    secret = _user_token(cluster, "events-watcher")
    bus = cluster.scheduler_app[EVENTS] if cluster.scheduler_app is not None else None
    assert bus is not None

    async def watch(c: ConsoleClient) -> list[AdminEvent]:
        seen: list[AdminEvent] = []
        before = bus.watchers

        async def collect() -> None:
            async for event in c.events():
                seen.append(event)
                if event.kind == "finished":
                    return

        task = asyncio.create_task(collect())
        await wait_for(lambda: _true(bus.watchers > before), within=60)  # subscribed: nothing is missed
        ask = openai.AsyncOpenAI(base_url=cluster.api, api_key=secret, max_retries=0)
        answer = await ask.chat.completions.create(
            model=DEMO_MODEL_ID,
            messages=[{"role": "user", "content": f"Say {CANARY}."}],
            max_tokens=4,
            extra_body={"ignore_eos": True},  # the random demo model may otherwise end at once
        )
        await ask.close()
        assert answer.choices
        await asyncio.wait_for(task, 60)
        return seen

    events = with_client(cluster, watch)
    kinds = [e.kind for e in events]
    assert "admitted" in kinds and kinds[-1] == "finished"
    assert events[-1].model == DEMO_MODEL_ID and events[-1].completion_tokens == 4
    assert events[-1].request_id and events[-1].ttft_ms is not None
    assert all(CANARY not in e.model_dump_json() for e in events)


async def _true(value: bool) -> bool:
    return value


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def test_a_closed_port_is_unreachable() -> None:
    url = f"http://127.0.0.1:{_closed_port()}"

    async def both(c: ConsoleClient) -> list[Unreachable]:
        found = []
        for attempt in (c.nodes(), anext(aiter(c.events()))):
            try:
                await attempt
            except Unreachable as exc:
                found.append(exc)
        return found

    async def go() -> list[Unreachable]:
        async with ConsoleClient(url, "whatever") as c:
            return await both(c)

    found = run(go())
    assert len(found) == 2
    for exc in found:
        assert exc.status == 503 and url in exc.message and "\n" not in exc.message


def test_a_gateway_page_is_unreachable_not_a_crash(servers: LoopThread) -> None:
    """A reverse proxy in front of a stopped scheduler answers 502 with an HTML page."""

    async def gateway(request: web.Request) -> web.Response:
        return web.Response(status=502, text="<html>Bad Gateway</html>", content_type="text/html")

    async def page(request: web.Request) -> web.Response:
        return web.Response(text="<html>a web site</html>", content_type="text/html")

    app = web.Application()
    app.router.add_get("/admin/nodes", gateway)
    app.router.add_get("/admin/models", page)
    runner, url = servers.call(start_site(app, "127.0.0.1", 0))
    try:

        async def go() -> list[str]:
            messages = []
            async with ConsoleClient(url, "t") as c:
                for call in (c.nodes(), c.models()):
                    try:
                        await call
                    except Unreachable as exc:
                        messages.append(exc.message)
            return messages

        said = run(go())
    finally:
        servers.call(runner.cleanup())
    assert len(said) == 2 and all(url in m for m in said)
    assert "502" in said[0] and "not JSON" in said[1]


def test_the_stream_raises_unreachable_when_the_scheduler_stops(servers: LoopThread, tmp_path: Path) -> None:
    stack = servers.call(start_scheduler(tmp_path))
    assert stack.scheduler_app is not None
    bus = stack.scheduler_app[EVENTS]
    stopped = False
    try:

        async def go() -> BaseException | None:
            async with ConsoleClient(stack.base_url, stack.token) as c:
                stream = c.events()
                first = asyncio.create_task(anext(stream))
                await wait_for(lambda: _true(bus.watchers == 1), within=60)
                await asyncio.to_thread(servers.call, stop_stack(stack))
                try:
                    await asyncio.wait_for(first, 60)
                except Unreachable as exc:
                    return exc
                finally:
                    await stream.aclose()
            return None

        found = run(go())
        stopped = True
    finally:
        if not stopped:
            servers.call(stop_stack(stack))
    assert isinstance(found, Unreachable) and stack.base_url in found.message


# (what is tried, with which token, the error class, its status and code)
# fmt: off
ERRORS: list[tuple[str, str, type[HearthError], int, str]] = [
    ("nodes", "user", PermissionDenied, 403, "permission_denied"),  # a user's token on an admin route
    ("events", "user", PermissionDenied, 403, "permission_denied"),  # the stream too, before it starts
    ("nodes", "nonsense", AuthenticationFailed, 401, "invalid_api_key"),  # no such token
    ("drain-ghost", "admin", NotFound, 404, "not_found"),  # an unknown node
    ("accept-old", "user", ConflictError, 409, "no_terms"),  # no terms in this policy to accept
]
# fmt: on


@pytest.mark.parametrize(("what", "who", "kind", "status", "code"), ERRORS)
def test_an_api_error_keeps_its_status_and_code(
    cluster: Stack, what: str, who: str, kind: type[HearthError], status: int, code: str
) -> None:
    token = {"user": _user_token(cluster), "nonsense": "hst-nonsense", "admin": cluster.token}[who]
    calls: dict[str, Callable[[ConsoleClient], Awaitable[Any]]] = {
        "nodes": lambda c: c.nodes(),
        "events": lambda c: anext(aiter(c.events())),
        "drain-ghost": lambda c: c.drain("ghost"),
        "accept-old": lambda c: c.accept_terms("v1"),
    }
    with pytest.raises(kind) as refused:
        with_client(cluster, calls[what], token=token)
    assert (refused.value.status, refused.value.code) == (status, code)
