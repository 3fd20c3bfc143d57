"""A real scheduler and demo node per console test module (each module's tests share one)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from node.settings import ModelSettings
from tests.support import LoopThread, Stack, start_stack, stop_stack


@pytest.fixture(scope="module")
def cluster(
    servers: LoopThread, demo_model: ModelSettings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    stack = servers.call(start_stack(tmp_path_factory.mktemp("console"), [demo_model]))
    yield stack
    servers.call(stop_stack(stack))
