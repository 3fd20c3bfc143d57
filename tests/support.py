"""Real Hearth servers for tests: a node and a scheduler on 127.0.0.1, port 0, on their own event loop.

The servers run in a background thread so that tests can use the synchronous `openai` client, the async
one, or raw HTTP, exactly as users do. The loop runs in debug mode and records every callback that held it
for too long (see ``SLOW_CALLBACK_CPU_S``); tests fail if any did (nothing may block the event loop).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
from aiohttp import web

from hardware.probe import NodeProbe
from hardware.probe import probe as probe_gpus
from hearth.up import certify_local_node
from node.app import load_transformers, start_node
from node.backends.base import Backend, SamplingParams
from node.pool import BackendLoader
from node.settings import ModelSettings, NodeSettings
from node.trust import Enrollment, Trust
from protocol.federation import ModelStatus, NodeStatus
from protocol.identity import (
    Identity,
    init_authority,
    issue_certificate,
    load_authority,
    load_or_create_identity,
    sign_request,
)
from protocol.web import start_site
from scheduler.app import create_app as create_scheduler_app
from scheduler.placement import ClusterSnapshot
from scheduler.settings import SchedulerSettings
from scheduler.state import FEDERATION
from scheduler.store import NodeRecord, Store

T = TypeVar("T")
# A callback that spends this much of the loop thread's own CPU time holds the loop: a model load, a
# generation loop, bulk crypto or serialization on the loop. CPU time, not wall time: on a 2-core box a
# callback of a few milliseconds can wait half a second for the GIL and the cores behind the generation
# threads and the test's own client, which says nothing about the code under test.
SLOW_CALLBACK_CPU_S = 0.2
# A callback that takes this long on the wall clock blocks the loop whatever it spends it on: a
# synchronous sleep, socket or download waits without using the CPU.
SLOW_CALLBACK_WALL_S = 2.0


class _SlowCallbacks:
    """Times each callback of the watched loops by the loop thread's CPU clock and the wall clock.

    Time in Python's cyclic garbage collector is left out: a full collection of this test process (torch,
    transformers, a hundred clients) can take half a second in whichever callback happens to allocate,
    which says nothing about that callback's code. A collection in any thread counts against the wall
    clock: it holds the GIL, so every thread waits for it (the console tests run Textual in the main
    thread beside the servers' loop)."""

    _installed = False
    _gc = threading.local()  # this thread's time in the collector (CPU)
    _gc_wall = 0.0  # every thread's time in the collector (wall clock), in total
    _gc_wall_started: float | None = None

    def __init__(self) -> None:
        self.seen: list[str] = []

    @classmethod
    def _gc_seconds(cls) -> float:
        return float(getattr(cls._gc, "total", 0.0))

    @classmethod
    def _on_gc(cls, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            cls._gc.started = time.thread_time()
            cls._gc_wall_started = time.monotonic()
        elif getattr(cls._gc, "started", None) is not None:
            cls._gc.total = cls._gc_seconds() + time.thread_time() - cls._gc.started
            cls._gc.started = None
            if cls._gc_wall_started is not None:
                cls._gc_wall += time.monotonic() - cls._gc_wall_started
                cls._gc_wall_started = None

    @classmethod
    def install(cls) -> None:
        # The timing wraps asyncio's own callback runner (test support only: asyncio's debug mode times
        # by the wall clock alone). Handles of loops that are not watched pass straight through.
        if cls._installed:
            return
        cls._installed = True
        gc.callbacks.append(cls._on_gc)
        run = asyncio.events.Handle._run

        def timed(handle: asyncio.Handle) -> None:
            watch = getattr(handle._loop, "hearth_slow", None)  # type: ignore[attr-defined]
            if watch is None:
                return run(handle)
            wall, cpu, collecting, anywhere = (
                time.monotonic(),
                time.thread_time(),
                cls._gc_seconds(),
                cls._gc_wall,
            )
            try:
                return run(handle)
            finally:
                cpu = time.thread_time() - cpu - (cls._gc_seconds() - collecting)
                wall = time.monotonic() - wall - (cls._gc_wall - anywhere)
                if cpu >= SLOW_CALLBACK_CPU_S or wall >= SLOW_CALLBACK_WALL_S:
                    watch.seen.append(f"{handle!r:.160} took {cpu:.3f} s of CPU, {wall:.3f} s of wall time")

        asyncio.events.Handle._run = timed  # type: ignore[method-assign]


class LoopThread:
    """An asyncio loop in a daemon thread; ``call`` runs a coroutine there and waits for it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.loop.set_debug(True)  # never-awaited coroutines, calls from the wrong thread
        self.loop.slow_callback_duration = SLOW_CALLBACK_WALL_S  # our own timing below is the check
        self.slow = _SlowCallbacks()
        _SlowCallbacks.install()
        self.loop.hearth_slow = self.slow  # type: ignore[attr-defined]
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


@dataclass
class Stack:
    """A node and a scheduler wired together, as `hearth up` wires them."""

    data_dir: Path
    base_url: str = ""
    node_url: str = ""
    node_id: str = "local"
    token: str = ""
    scheduler_app: web.Application | None = None
    scheduler_identity: Identity | None = None
    runners: list[web.AppRunner] = field(default_factory=list)
    tasks: list[asyncio.Future[None]] = field(default_factory=list)

    @property
    def api(self) -> str:
        return self.base_url + "/v1"

    def node_headers(self, method: str, path: str, body: bytes = b"") -> dict[str, str]:
        """Headers of a call the scheduler itself would make to its node."""
        assert self.scheduler_identity is not None
        return sign_request(self.scheduler_identity, method, path, body, audience=self.node_id)

    def snapshot(self) -> ClusterSnapshot:
        assert self.scheduler_app is not None
        return self.scheduler_app[FEDERATION].registry.snapshot()


# Short enough that tests notice a dead node in seconds, long enough for a loaded 2-core machine.
FAST_SCHEDULER = {"heartbeat_interval": 0.2, "node_timeout": 2.0, "discovery": False}


async def start_scheduler(data_dir: Path, **settings: Any) -> Stack:
    """A scheduler (with a fresh admin token) that trusts the local authority of ``data_dir``."""
    authority = await asyncio.to_thread(_local_authority, data_dir)
    stack = Stack(data_dir)
    store = Store(data_dir / "hearth.db")
    stack.token, _ = store.create_token("test", "admin")
    store.close()
    sched = SchedulerSettings(
        port=0, data_dir=data_dir, authority_key=authority.public_b64, **{**FAST_SCHEDULER, **settings}
    )
    stack.scheduler_identity = await asyncio.to_thread(load_or_create_identity, data_dir / "scheduler.key")
    stack.scheduler_app = create_scheduler_app(sched)
    runner, stack.base_url = await start_site(stack.scheduler_app, "127.0.0.1", 0)
    stack.runners.insert(0, runner)
    return stack


def _local_authority(data_dir: Path) -> Identity:
    where = data_dir / "authority"
    return load_authority(where) if (where / "authority.key").exists() else init_authority(where)


async def start_stack(
    data_dir: Path,
    models: list[ModelSettings],
    *,
    loader: BackendLoader = load_transformers,
    scheduler: dict[str, Any] | None = None,
    node: dict[str, Any] | None = None,
    probe: Callable[[], NodeProbe] = probe_gpus,
    wait_ready: bool = True,
) -> Stack:
    """A scheduler and one node, in this process, ready to answer unless ``wait_ready`` is false.
    ``probe``: what the node reads of its GPUs (NVML, or recorded fixtures for owner-first tests)."""
    node_settings = NodeSettings(
        models=models, advertise=False, heartbeat_interval=0.2, data_dir=data_dir / "node", **(node or {})
    )
    await asyncio.to_thread(_local_authority, data_dir)
    _, trust = await asyncio.to_thread(certify_local_node, data_dir, node_settings.node_id)
    stack = await start_scheduler(data_dir, **(scheduler or {}))
    stack.node_id = node_settings.node_id
    node_settings = node_settings.model_copy(update={"scheduler_url": stack.base_url})
    try:
        node_runner, stack.node_url, _ = await start_node(
            node_settings, trust=trust, loader=loader, probe=probe
        )
        stack.runners.append(node_runner)
        if wait_ready:
            await wait_for(lambda: _ready(stack, [m.model_id for m in models]), within=60)
    except BaseException:
        await stop_stack(stack)  # a stack that never came up still listens: close it, not the collector
        raise
    return stack


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1].split("/")[0])


@dataclass
class Tap:
    """A TCP forwarder that keeps every byte it forwards, both ways (to see what crosses a hop)."""

    target_port: int
    host: str = "127.0.0.1"  # where the tap listens and its target is
    own: bytearray = field(default_factory=bytearray)
    server: asyncio.Server | None = None
    others: list[Tap] = field(default_factory=list)
    # What the target answers may be changed on its way (someone on the network tampering with it).
    rewrite: Callable[[bytes], bytes] | None = None

    @property
    def seen(self) -> bytearray:
        return self.own + b"".join(other.seen for other in self.others)

    def aim(self, url: str) -> None:
        """Forward to the server at ``url`` (known once it has started, behind the tap's own address)."""
        self.target_port = port_of(url)

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._handle, self.host, 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"http://{self.host}:{port}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(self.host, self.target_port)

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, answers: bool = False) -> None:
            try:
                while data := await src.read(65536):
                    self.own += data
                    rewrite = self.rewrite if answers else None
                    dst.write(rewrite(data) if rewrite is not None else data)
                    await dst.drain()
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                dst.close()
                with contextlib.suppress(ConnectionError):
                    await dst.wait_closed()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer, answers=True))

    async def close(self) -> None:
        for other in self.others:
            await other.close()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


@dataclass
class Tapped:
    """A stack and the tap between its scheduler and its node."""

    stack: Stack
    tap: Tap


async def start_tapped_stack(
    data_dir: Path,
    models: list[ModelSettings],
    *,
    host: str = "127.0.0.1",
    scheduler: dict[str, Any] | None = None,
    node: dict[str, Any] | None = None,
) -> Tapped:
    """A stack whose scheduler reaches its node through a Tap (the node listening on ``host``)."""
    tap = Tap(0, host=host)
    public = await tap.start()
    node = {**(node or {}), "public_url": public, **({"host": host} if host != "127.0.0.1" else {})}
    stack = await start_stack(data_dir, models, scheduler=scheduler, node=node)
    tap.aim(stack.node_url)
    return Tapped(stack, tap)


async def stop_tapped_stack(env: Tapped) -> None:
    env.tap.rewrite = None
    await stop_stack(env.stack)
    await env.tap.close()


class WrappedBackend:
    """A real backend with one behaviour changed, for tests that need a node to misbehave on purpose."""

    def __init__(self, inner: Backend) -> None:
        self._inner = inner

    @classmethod
    def loader(cls) -> BackendLoader:
        """A node's loader that serves each model (the demo model, in the tests) through this wrapper."""

        def load(model: ModelSettings, settings: NodeSettings) -> Backend:
            return cls(load_transformers(model, settings))  # type: ignore[return-value]

        return load

    def __getattr__(self, name: str) -> object:
        return getattr(self._inner, name)

    def generate(
        self, prompt_ids: Sequence[int], params: SamplingParams, cancelled: threading.Event
    ) -> Iterator[int]:
        return self._inner.generate(prompt_ids, params, cancelled)


async def _ready(stack: Stack, model_ids: list[str]) -> bool:
    ready = {m.id for n in stack.snapshot().nodes if n.healthy for m in n.models if m.phase == "ready"}
    return set(model_ids) <= ready


async def stop_stack(stack: Stack) -> None:
    for task in stack.tasks:
        task.cancel()
    await asyncio.gather(*stack.tasks, return_exceptions=True)
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


async def attach_fake_node(
    stack: Stack,
    node_id: str,
    url: str,
    models: list[dict[str, Any]],
    *,
    gpus: str = "cpu",
    memory_total_bytes: int = 1 << 30,
) -> None:
    """Approve a node that is not a Hearth node (one that misbehaves on purpose) and keep it looking
    alive, as its heartbeats would; ``gpus`` is its heartbeat's GPU summary ("2x NVIDIA GeForce RTX 3090")."""
    assert stack.scheduler_app is not None
    fed = stack.scheduler_app[FEDERATION]
    ident = Identity.generate()
    store = fed.store.store

    def approve() -> NodeRecord:
        store.upsert_pending(
            node_id=node_id, source="code", tier="club", identity_key=ident.public_b64,
            encryption_key=ident.public_b64, fingerprint=ident.fingerprint, url=url,
        )  # fmt: skip
        return store.set_node_state(node_id, "approved")

    fed.remember(await fed.store.run(approve))
    status = NodeStatus(
        node_id=node_id, version="fake", url=url, tier="club", gpus=gpus, memory_total_bytes=memory_total_bytes,
        memory_free_bytes=memory_total_bytes // 2, models=[ModelStatus(**m) for m in models],
    )  # fmt: skip

    async def beat() -> None:
        while node_id in fed.registry.nodes:
            fed.registry.heartbeat(node_id, status)
            await asyncio.sleep(0.2)

    stack.tasks.append(asyncio.ensure_future(beat()))


async def certify_node(stack: Stack, node_dir: Path, node_id: str, tier: str = "club") -> None:
    """Enroll and approve a node whose keys live in ``node_dir`` (for a node in another process), as
    `hearth node enroll` and `hearth enroll approve` would."""
    assert stack.scheduler_app is not None and stack.scheduler_identity is not None
    fed = stack.scheduler_app[FEDERATION]
    scheduler_key = stack.scheduler_identity.public_b64

    def certify() -> NodeRecord:
        authority = _local_authority(stack.data_dir)
        trust = Trust.open(node_dir)
        trust.enroll(Enrollment(stack.base_url, scheduler_key, authority.public_b64, node_id, tier))
        cert = issue_certificate(
            authority, node_id=node_id, tier=tier, identity_key=trust.identity.public_b64,
            encryption_key=trust.encryption_public, scheduler_key=scheduler_key,
        )  # fmt: skip
        store = fed.store.store
        store.upsert_pending(
            node_id=node_id, source="code", tier=tier, identity_key=trust.identity.public_b64,
            encryption_key=trust.encryption_public, fingerprint=trust.identity.fingerprint, url=None,
        )  # fmt: skip
        return store.set_node_state(node_id, "approved", certificate=cert)

    fed.remember(await fed.store.run(certify))


@dataclass
class SealedStack:
    """A stack (by default taking sealed requests only) and `hearth proxy` in front of it at ``url`` (ends in
    /v1)."""

    stack: Stack
    url: str


async def start_sealed_stack(
    data_dir: Path, models: list[ModelSettings], scheduler: dict[str, Any] | None = None
) -> SealedStack:
    """`start_stack` (by default with ``require_e2e``; ``scheduler`` settings instead), and a `hearth proxy`
    that already holds the node's keys. `stop_stack(sealed.stack)` stops the proxy too."""
    from hearth.proxy import SealedClient, state_path
    from hearth.proxy_server import serve

    settings = {"policy": {"require_e2e": True}} if scheduler is None else scheduler
    stack = await start_stack(data_dir, models, scheduler=settings)
    session = aiohttp.ClientSession()
    client = SealedClient(stack.base_url, stack.token, state_path(data_dir / "user", stack.base_url), session)

    async def has_keys() -> bool:
        await client.refresh(force=True)
        return all(stack.node_id in client.hints.get(m.model_id, []) for m in models)

    try:
        await wait_for(has_keys, within=60, interval=0.2)
        runner, url = await serve(client, "127.0.0.1", 0)
    except BaseException:
        await session.close()
        await stop_stack(stack)
        raise
    stack.runners.insert(0, runner)
    stack.tasks.append(asyncio.ensure_future(_close_when_cancelled(session)))
    return SealedStack(stack, url + "/v1")


async def _close_when_cancelled(session: aiohttp.ClientSession) -> None:
    try:
        await asyncio.Event().wait()
    finally:
        await session.close()
