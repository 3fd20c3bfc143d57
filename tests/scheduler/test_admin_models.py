"""The operator loads and unloads a node's models: `POST /admin/nodes/{node_id}/models/{model_id}/load` and
`…/unload`, against a real scheduler and a real node on 127.0.0.1.

The node serves the demo model twice: under its own id, loaded at start, and under a Hugging Face-style id
with a "/" in it, loaded only on demand, so every call here also carries such an id through the admin
route and the scheduler's signed call to the node. Nodes that fail on purpose (one nobody answers for, one
that fell silent) are attached as in tests/support.py.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator, Sequence
from queue import Queue
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from node.app import load_transformers
from node.backends.base import Backend, SamplingParams
from node.demo import DEMO_MODEL_ID
from node.settings import ModelSettings, NodeSettings
from protocol.admin import ModelAction
from protocol.identity import Identity
from protocol.responses import ErrorResponse
from scheduler.openapi import openapi_document
from scheduler.state import FEDERATION
from scheduler.store import NodeRecord
from tests.support import (
    LoopThread,
    Stack,
    WrappedBackend,
    attach_fake_node,
    start_stack,
    stop_stack,
    wait_for,
)

SPARE = "club/spare-demo"  # a "/" in it, as in a Hugging Face id; not loaded at start
# While set, every answer stops after its first token (its job stays running) until it is cleared.
HOLD = threading.Event()
# While set, a model's load waits (in the node's load thread) until it is cleared.
HOLD_LOAD = threading.Event()


class Held(WrappedBackend):
    def generate(
        self, prompt_ids: Sequence[int], params: SamplingParams, cancelled: threading.Event
    ) -> Iterator[int]:
        for i, token in enumerate(super().generate(prompt_ids, params, cancelled)):
            yield token
            while i == 0 and HOLD.is_set() and not cancelled.is_set():
                time.sleep(0.01)


def held_loader(model: ModelSettings, settings: NodeSettings) -> Backend:
    while HOLD_LOAD.is_set():
        time.sleep(0.01)
    return Held(load_transformers(model, settings))  # type: ignore[return-value]


@pytest.fixture(scope="module")
def stack(
    servers: LoopThread, demo_model: ModelSettings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    spare = demo_model.model_copy(update={"id": SPARE, "preload": False})
    s = servers.call(
        start_stack(
            tmp_path_factory.mktemp("models"), [demo_model, spare], loader=held_loader, wait_ready=False
        )
    )

    async def demo_ready() -> bool:
        return any(m.id == DEMO_MODEL_ID and m.phase == "ready" for n in s.snapshot().nodes for m in n.models)

    servers.call(wait_for(demo_ready, within=60))
    yield s
    HOLD.clear()
    HOLD_LOAD.clear()
    servers.call(stop_stack(s))


def _headers(token: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"} if token is not None else {}


def act(
    stack: Stack, action: str, model: str, *, node: str | None = None, token: str | None = "admin", **kw: Any
) -> httpx.Response:
    node_id = stack.node_id if node is None else node
    path = f"/admin/nodes/{quote(node_id, safe='')}/models/{quote(model, safe='')}/{action}"
    secret = stack.token if token == "admin" else token
    return httpx.post(stack.base_url + path, headers=_headers(secret), timeout=30, **kw)


def phase(stack: Stack, model: str, node: str | None = None) -> str | None:
    doc = httpx.get(stack.base_url + "/admin/nodes", headers=_headers(stack.token), timeout=10).json()
    node_id = stack.node_id if node is None else node
    for n in doc["nodes"]:
        if n["node_id"] == node_id:
            return next((m["phase"] for m in n["models"] if m["id"] == model), None)
    return None


def until(what: str, predicate: Any, within: float = 60.0) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.05)


def error(r: httpx.Response, status: int, code: str | None, param: str | None = None) -> str:
    assert r.status_code == status, r.text
    err = ErrorResponse.model_validate(r.json()).error
    assert err.code == code, r.text
    if param is not None:
        assert err.param == param, r.text
    return err.message


def chat(stack: Stack, model: str) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    return httpx.post(stack.api + "/chat/completions", json=body, headers=_headers(stack.token), timeout=120)


def audit(stack: Stack) -> list[dict[str, Any]]:
    r = httpx.get(stack.base_url + "/admin/audit", headers=_headers(stack.token), timeout=10)
    return list(r.json()["entries"])


def user_token(stack: Stack) -> str:
    r = httpx.post(
        stack.base_url + "/admin/tokens", json={"name": "not-an-operator"}, headers=_headers(stack.token)
    )
    return str(r.json()["secret"])


def unloaded(stack: Stack) -> None:
    """The spare model not loaded, whatever an earlier test left."""
    r = act(stack, "unload", SPARE)
    assert r.status_code == 200, r.text
    until(f"{SPARE} is available", lambda: phase(stack, SPARE) == "available")


def test_the_operator_loads_a_model_the_node_has_then_unloads_it(stack: Stack) -> None:
    unloaded(stack)
    r = act(stack, "load", SPARE)
    assert r.status_code == 200, r.text
    took = ModelAction.model_validate(r.json())
    assert (took.node_id, took.model) == (stack.node_id, SPARE) and took.phase in ("loading", "ready")
    until(f"{SPARE} is ready", lambda: phase(stack, SPARE) == "ready")
    assert chat(stack, SPARE).status_code == 200  # the model the operator loaded answers

    r = act(stack, "unload", SPARE)
    assert r.status_code == 200, r.text
    assert ModelAction.model_validate(r.json()).phase == "available"
    assert phase(stack, SPARE) == "available"  # at once, not at the node's next heartbeat
    assert phase(stack, DEMO_MODEL_ID) == "ready"  # the other model is left alone

    done = [(e["action"], e["subject"], e["detail"]) for e in audit(stack)]
    assert ("model_load", stack.node_id, SPARE) in done and ("model_unload", stack.node_id, SPARE) in done
    actors = {e["actor"] for e in audit(stack) if e["action"] in ("model_load", "model_unload")}
    assert len(actors) == 1 and actors.pop().startswith("tok_")  # the admin token, not the scheduler


def test_a_load_names_what_to_evict_and_a_load_of_a_ready_model_changes_nothing(stack: Stack) -> None:
    r = act(stack, "load", DEMO_MODEL_ID, json={"evict": [SPARE]})
    assert r.status_code == 200, r.text
    assert ModelAction.model_validate(r.json()).phase == "ready"
    assert phase(stack, DEMO_MODEL_ID) == "ready"
    assert ("model_load", stack.node_id, f"{DEMO_MODEL_ID} (evict {SPARE})") in [
        (e["action"], e["subject"], e["detail"]) for e in audit(stack)
    ]


def test_a_load_under_way_is_not_asked_again_nor_unloaded(stack: Stack) -> None:
    unloaded(stack)

    def loads() -> int:
        return sum(e["action"] == "model_load" and e["detail"] == SPARE for e in audit(stack))

    before = loads()
    HOLD_LOAD.set()
    try:
        first = act(stack, "load", SPARE)
        assert first.status_code == 200, first.text
        assert ModelAction.model_validate(first.json()).phase == "loading"
        assert phase(stack, SPARE) == "loading"
        again = act(stack, "load", SPARE)  # the scheduler knows: it answers without asking the node
        assert again.status_code == 200 and ModelAction.model_validate(again.json()).phase == "loading"
        message = error(act(stack, "unload", SPARE), 409, "model_loading")
        assert "once it is ready" in message
    finally:
        HOLD_LOAD.clear()
    until(f"{SPARE} is ready", lambda: phase(stack, SPARE) == "ready")
    assert loads() == before + 1  # the load the node took, once


def test_a_model_whose_id_has_a_slash_is_loaded_on_demand(stack: Stack) -> None:
    """A request's cold load takes the same path as the operator's: the id reaches the node whole."""
    unloaded(stack)
    r = chat(stack, SPARE)
    assert r.status_code == 200, r.text
    assert phase(stack, SPARE) == "ready"


def test_unloading_a_model_with_a_job_running_is_a_conflict(stack: Stack) -> None:
    if phase(stack, SPARE) != "ready":
        assert act(stack, "load", SPARE).status_code == 200
        until(f"{SPARE} is ready", lambda: phase(stack, SPARE) == "ready")
    lines: Queue[str] = Queue()
    body = {"model": SPARE, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, "stream": True}

    def stream() -> None:
        with httpx.stream(
            "POST", stack.api + "/chat/completions", json=body, headers=_headers(stack.token), timeout=120
        ) as answer:
            for line in answer.iter_lines():
                lines.put(line)
        lines.put("(end)")

    HOLD.set()
    client = threading.Thread(target=stream)
    client.start()
    try:
        first = lines.get(timeout=120)
        assert first.startswith("data: {"), first  # the node is running the job
        message = error(act(stack, "unload", SPARE), 409, "model_busy")
        assert "drain" in message and SPARE in message
        assert phase(stack, SPARE) == "ready"  # nothing changed
    finally:
        HOLD.clear()
        client.join(120)
    seen = []
    while not lines.empty():
        seen.append(lines.get())
    assert seen[-1] == "(end)" and "data: [DONE]" in seen  # the job finished, untouched
    r = act(stack, "unload", SPARE)  # and once it has ended, the model unloads
    assert r.status_code == 200, r.text


# (what, action, node, model, token, body, status, code, param)
# fmt: off
REFUSALS: list[tuple[str, str, str | None, str, str | None, Any, int, str | None, str | None]] = [
    # a node nobody enrolled
    ("unknown node", "load", "ghost", SPARE, "admin", None, 404, "not_found", None),
    # a model this node does not have: named, with the ones it has
    ("unknown model", "load", None, "club/absent", "admin", None, 404, "model_not_found", "model_id"),
    ("unknown model", "unload", None, "club/absent", "admin", None, 404, "model_not_found", "model_id"),
    # nothing that is not a printable id reaches the node's URL
    ("control byte", "load", None, "bad\x01id", "admin", None, 400, None, "model_id"),
    ("dot segment", "unload", None, "..", "admin", None, 404, "not_found", None),  # normalised away: no route
    ("too long", "load", None, "m" * 300, "admin", None, 400, None, "model_id"),
    # evict names only models of the node
    ("evict unknown", "load", None, SPARE, "admin", {"evict": ["club/absent"]}, 400, None, "evict"),
    ("evict not a list", "load", None, SPARE, "admin", {"evict": "x"}, 400, None, "evict"),
    # only operators
    ("no token", "load", None, SPARE, None, None, 401, "invalid_api_key", None),
    ("user token", "unload", None, SPARE, "user", None, 403, "permission_denied", None),
]
# fmt: on


@pytest.mark.parametrize(
    ("what", "action", "node", "model", "token", "body", "status", "code", "param"),
    REFUSALS,
    ids=[f"{r[0].replace(' ', '_')}-{r[1]}" for r in REFUSALS],
)
def test_refusals_are_in_openais_shape_and_change_nothing(
    stack: Stack,
    what: str,
    action: str,
    node: str | None,
    model: str,
    token: str | None,
    body: Any,
    status: int,
    code: str | None,
    param: str | None,
) -> None:
    before = phase(stack, SPARE)
    secret = user_token(stack) if token == "user" else token
    r = act(stack, action, model, node=node, token=secret, json=body)
    message = error(r, status, code, param)
    if code == "model_not_found":
        assert "club/absent" in message and DEMO_MODEL_ID in message and SPARE in message
    assert phase(stack, SPARE) == before


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_node_that_cannot_be_reached_is_503_with_retry_after(stack: Stack, servers: LoopThread) -> None:
    node = f"gone-{_closed_port()}"
    url = f"http://127.0.0.1:{_closed_port()}"
    servers.call(attach_fake_node(stack, node, url, [{"id": "m-1", "phase": "available"}]))
    assert stack.scheduler_app is not None
    registry = stack.scheduler_app[FEDERATION].registry
    try:
        for action in ("load", "unload"):
            # Heard from again after the call before failed (its heartbeats go on: only calls fail).
            until(f"{node} is healthy", lambda: registry.healthy(node))
            r = act(stack, action, "m-1", node=node)
            assert "cannot be reached" in error(r, 503, "node_unreachable")
            assert int(r.headers["Retry-After"]) >= 1
        # The failed load ended in the registry, as a cold load's does: nothing waits for it.
        assert "m-1" not in registry.nodes[node].loading
    finally:
        httpx.post(f"{stack.base_url}/admin/nodes/{node}/revoke", headers=_headers(stack.token))


async def _approve_unheard(stack: Stack, node_id: str) -> None:
    """An approved node that never sent a heartbeat (not started yet)."""
    assert stack.scheduler_app is not None
    fed = stack.scheduler_app[FEDERATION]
    ident = Identity.generate()

    def approve() -> NodeRecord:
        fed.store.store.upsert_pending(
            node_id=node_id, source="code", tier="club", identity_key=ident.public_b64,
            encryption_key=ident.public_b64, fingerprint=ident.fingerprint, url=None,
        )  # fmt: skip
        return fed.store.store.set_node_state(node_id, "approved")

    fed.remember(await fed.store.run(approve))


def test_a_node_never_heard_from_is_409(stack: Stack, servers: LoopThread) -> None:
    node = f"unheard-{_closed_port()}"
    servers.call(_approve_unheard(stack, node))
    try:
        for action in ("load", "unload"):
            message = error(act(stack, action, "m-1", node=node), 409, "node_not_heard")
            assert "hearth node start" in message
    finally:
        httpx.post(f"{stack.base_url}/admin/nodes/{node}/revoke", headers=_headers(stack.token))


def test_a_silent_node_is_503_and_a_revoked_one_409(stack: Stack, servers: LoopThread) -> None:
    node = f"silent-{_closed_port()}"
    servers.call(attach_fake_node(stack, node, "http://127.0.0.1:9", [{"id": "m-1", "phase": "available"}]))
    beat = stack.tasks[-1]
    try:
        until(f"{node} is heard", lambda: phase(stack, "m-1", node) == "available")
        servers.loop.call_soon_threadsafe(beat.cancel)  # it falls silent
        assert stack.scheduler_app is not None
        registry = stack.scheduler_app[FEDERATION].registry
        until(f"{node} is unhealthy", lambda: not registry.healthy(node))
        r = act(stack, "load", "m-1", node=node)
        assert "not healthy" in error(r, 503, "node_unavailable")
        assert "Retry-After" in r.headers
    finally:
        httpx.post(f"{stack.base_url}/admin/nodes/{node}/revoke", headers=_headers(stack.token))
    r = act(stack, "load", "m-1", node=node)
    assert "revoked" in error(r, 409, "wrong_state")


def test_every_status_these_routes_answer_is_documented() -> None:
    paths = openapi_document()["paths"]
    for action, statuses in [
        ("load", {"200", "400", "401", "403", "404", "409", "413", "502", "503"}),
        ("unload", {"200", "400", "401", "403", "404", "409", "502", "503"}),
    ]:
        answers = paths[f"/admin/nodes/{{node_id}}/models/{{model_id}}/{action}"]["post"]["responses"]
        assert statuses <= set(answers), (action, statuses - set(answers))
        assert "Retry-After" in answers["503"]["headers"]
