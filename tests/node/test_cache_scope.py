"""Prefix-cache scopes: each user's plaintext requests share one scope per node, users never share one, and
a job that names a malformed scope is refused. (Sealed jobs get a private scope: tests/test_e2e.py.)"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from typing import ClassVar

import httpx
import pytest

from node.app import load_transformers
from node.backends.base import BatchBackend, CacheScope, SamplingParams, Sequential
from node.settings import ModelSettings, NodeSettings
from scheduler.store import Store
from tests.support import LoopThread, Stack, start_stack, stop_stack


class RecordsScopes(Sequential):
    """The reference backend, noting the cache scope of every job it admits."""

    seen: ClassVar[list[bytes]] = []

    def admit(self, prompt_ids: Sequence[int], params: SamplingParams, scope: CacheScope) -> int | None:
        seq = super().admit(prompt_ids, params, scope)
        if seq is not None:
            RecordsScopes.seen.append(scope.key)
        return seq


@pytest.fixture(scope="module")
def stack(
    servers: LoopThread, demo_model: ModelSettings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    def loader(model: ModelSettings, settings: NodeSettings) -> BatchBackend:
        return RecordsScopes(load_transformers(model, settings))

    s = servers.call(start_stack(tmp_path_factory.mktemp("scopes"), [demo_model], loader=loader))
    yield s
    servers.call(stop_stack(s))


def _ask(stack: Stack, token: str) -> None:
    body = {"model": "hearth-demo", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 2}
    r = httpx.post(
        stack.api + "/chat/completions", json=body, headers={"Authorization": f"Bearer {token}"}, timeout=30
    )
    assert r.status_code == 200, r.text


def test_a_users_requests_share_a_scope_and_other_users_do_not(stack: Stack) -> None:
    store = Store(stack.data_dir / "hearth.db")
    other, _ = store.create_token("other", "user")
    store.close()
    RecordsScopes.seen.clear()
    _ask(stack, stack.token)
    _ask(stack, stack.token)
    _ask(stack, other)
    first, second, third = RecordsScopes.seen
    assert first == second, "one user's requests share their cached prompt pages"
    assert third != first, "another user's request never meets them"
    assert all(key.startswith(b"user:") for key in (first, third))


@pytest.mark.parametrize("scope", ["", "0" * 31, "G" * 32, 7, "0" * 33])
def test_a_malformed_scope_is_refused(stack: Stack, scope: object) -> None:
    job = {"job_id": "j1", "endpoint": "chat", "request_id": "r1", "cache_scope": scope,
           "request": {"model": "hearth-demo", "messages": [{"role": "user", "content": "hi"}]}}  # fmt: skip
    raw = json.dumps(job).encode()
    r = httpx.post(
        stack.node_url + "/jobs", content=raw, headers=stack.node_headers("POST", "/jobs", raw), timeout=30
    )
    assert r.status_code == 400 and "cache_scope" in r.text
