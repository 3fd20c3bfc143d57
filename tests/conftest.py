"""Shared fixtures: the generated demo model and a real node + scheduler on 127.0.0.1."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from node.demo import DEMO_MODEL_ID, build_demo_model
from node.settings import ModelSettings
from tests.support import LoopThread, Stack, start_stack, stop_stack


@pytest.fixture(scope="session")
def demo_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_demo_model(tmp_path_factory.mktemp("models") / DEMO_MODEL_ID)


@pytest.fixture(scope="session")
def demo_model(demo_model_dir: Path) -> ModelSettings:
    return ModelSettings(path=demo_model_dir, id=DEMO_MODEL_ID, default_max_tokens=64)


@pytest.fixture(scope="session")
def servers() -> Iterator[LoopThread]:
    thread = LoopThread()
    yield thread
    thread.close()


@pytest.fixture(scope="session")
def stack(
    servers: LoopThread, demo_model: ModelSettings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    """One node serving the demo model behind one scheduler, shared by the API tests."""
    s = servers.call(start_stack(tmp_path_factory.mktemp("stack"), [demo_model]))
    yield s
    servers.call(stop_stack(s))


@pytest.fixture(autouse=True)
def _event_loop_never_blocked(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail any test during which a server callback held the event loop (STYLE: never block the loop)."""
    if "servers" not in request.fixturenames:
        yield
        return
    thread: LoopThread = request.getfixturevalue("servers")
    before = len(thread.slow.seen)
    yield
    assert thread.slow.seen[before:] == [], "a callback blocked the servers' event loop"
