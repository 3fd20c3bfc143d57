"""Real Hearth servers for tests: a node and a scheduler on 127.0.0.1, port 0, on their own event loop.

The servers run in a background thread so that tests can use the synchronous `openai` client, the async
one, or raw HTTP, exactly as users do. The loop runs in debug mode and records every callback that held it
for longer than ``SLOW_CALLBACK_S``; tests fail if any did (nothing may block the event loop).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import web
from pydantic import SecretStr

from node.app import BackendLoader, load_transformers
from node.app import create_app as create_node_app
from node.backends.base import Backend, SamplingParams
from node.settings import ModelSettings, NodeSettings
from protocol.web import start_site
from scheduler.app import REGISTRY
from scheduler.app import create_app as create_scheduler_app
from scheduler.settings import NodeLink, SchedulerSettings
from scheduler.store import Store

T = TypeVar("T")
# Generous: on a 2-core box the loop also waits for the GIL behind generation threads; a real block
# (a model load, a generation loop, a synchronous download) holds it for seconds.
SLOW_CALLBACK_S = 0.5


class _SlowCallbacks(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.seen: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if "took" in record.getMessage() and "Executing" in record.getMessage():
            self.seen.append(record.getMessage()[:200])


class LoopThread:
    """An asyncio loop in a daemon thread; ``call`` runs a coroutine there and waits for it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.loop.set_debug(True)
        self.loop.slow_callback_duration = SLOW_CALLBACK_S
        self.slow = _SlowCallbacks()
        logging.getLogger("asyncio").addHandler(self.slow)
        self._thread = threading.Thread(target=self.loop.run_forever, name="test-servers", daemon=True)
        self._thread.start()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 120) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        async def cancel_the_rest() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        self.call(cancel_the_rest(), timeout=30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()
        logging.getLogger("asyncio").removeHandler(self.slow)


@dataclass
class Stack:
    """A node and a scheduler wired together, as `hearth up` wires them."""

    data_dir: Path
    base_url: str = ""
    node_url: str = ""
    node_secret: str = ""
    token: str = ""
    scheduler_app: web.Application | None = None
    runners: list[web.AppRunner] = field(default_factory=list)

    @property
    def api(self) -> str:
        return self.base_url + "/v1"


async def start_scheduler(
    data_dir: Path, node_url: str, node_secret: str, *, node_id: str = "local", **settings: Any
) -> Stack:
    """A scheduler (with a fresh admin token) whose one node is at ``node_url``."""
    stack = Stack(data_dir, node_url=node_url, node_secret=node_secret)
    store = Store(data_dir / "hearth.db")
    stack.token, _ = store.create_token("test", "admin")
    store.close()
    sched = SchedulerSettings(
        port=0,
        data_dir=data_dir,
        nodes=[NodeLink(node_id=node_id, url=node_url, secret=SecretStr(node_secret))],
        **{"poll_interval": 0.2, **settings},
    )
    stack.scheduler_app = create_scheduler_app(sched)
    runner, stack.base_url = await start_site(stack.scheduler_app, "127.0.0.1", 0)
    stack.runners.insert(0, runner)
    return stack


async def start_stack(
    data_dir: Path,
    models: list[ModelSettings],
    *,
    loader: BackendLoader = load_transformers,
    scheduler: dict[str, Any] | None = None,
    node: dict[str, Any] | None = None,
) -> Stack:
    secret = secrets.token_urlsafe(24)
    node_settings = NodeSettings(secret=SecretStr(secret), models=models, **(node or {}))
    node_runner, node_url = await start_site(create_node_app(node_settings, loader=loader), "127.0.0.1", 0)
    stack = await start_scheduler(data_dir, node_url, secret, **(scheduler or {}))
    stack.runners.append(node_runner)
    await wait_for(lambda: _ready(stack, [m.model_id for m in models]), within=60)
    return stack


class WrappedBackend:
    """A real backend with one behaviour changed, for tests that need a node to misbehave on purpose."""

    def __init__(self, inner: Backend) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> object:
        return getattr(self._inner, name)

    def generate(
        self, prompt_ids: Sequence[int], params: SamplingParams, cancelled: threading.Event
    ) -> Iterator[int]:
        return self._inner.generate(prompt_ids, params, cancelled)


async def _ready(stack: Stack, model_ids: list[str]) -> bool:
    assert stack.scheduler_app is not None
    snapshot = stack.scheduler_app[REGISTRY].snapshot()
    ready = {m.id for n in snapshot.nodes if n.healthy for m in n.models if m.ready}
    return set(model_ids) <= ready


async def stop_stack(stack: Stack) -> None:
    for runner in stack.runners:
        await runner.cleanup()


async def wait_for(
    predicate: Callable[[], Awaitable[bool]], *, within: float, interval: float = 0.05
) -> None:
    deadline = time.monotonic() + within
    while not await predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(interval)
