"""Long-running roles: `hearth scheduler start` and `hearth node start`, and the signal handling that
`hearth up` shares with them."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Callable

from aiohttp import web

from hearth.config import HearthSettings
from node.app import start_node
from node.settings import NodeSettings
from protocol.errors import ConfigError
from protocol.web import start_site
from scheduler.app import create_app as create_scheduler_app


def stop_on_signals() -> asyncio.Event:
    stop = asyncio.Event()

    def on_signal() -> None:
        if stop.is_set():  # a second Ctrl-C: the user wants out now, cleanup or not
            sys.stderr.write("hearth: stopped without cleanup\n")
            os._exit(130)
        stop.set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    return stop


def node_settings(settings: HearthSettings) -> NodeSettings:
    """The node section with its data dir filled in (default: `node/` in Hearth's data dir)."""
    node = settings.node
    if node.data_dir is None:
        node = node.model_copy(update={"data_dir": settings.data_dir / "node"})
    return node


async def serve_scheduler(
    settings: HearthSettings, *, out: Callable[[str], None] = print, stop: asyncio.Event | None = None
) -> None:
    stop = stop or stop_on_signals()
    sched = settings.scheduler.model_copy(update={"data_dir": settings.data_dir})
    if sched.policy.require_e2e is None:
        # A federation's nodes are other people's machines across a network: sealed prompts only.
        sched = sched.model_copy(update={"policy": sched.policy.model_copy(update={"require_e2e": True})})
    _make_dir(settings.data_dir)
    runner, url = await start_site(create_scheduler_app(sched), sched.host, sched.port, sched.http)
    try:
        out(f"Hearth scheduler listening on {url}")
        if sched.policy.require_e2e:
            out("  end-to-end encryption is required: users send requests through `hearth proxy`")
        if sched.authority_key is None:
            out("  no authority key is set: nodes can enroll, but none can be approved until")
            out("  scheduler.authority_key holds the key printed by `hearth authority init`")
        sys.stdout.flush()
        await stop.wait()
        out("Shutting down…")
    finally:
        await runner.cleanup()


async def serve_node(
    settings: HearthSettings, *, out: Callable[[str], None] = print, stop: asyncio.Event | None = None
) -> None:
    stop = stop or stop_on_signals()
    node = node_settings(settings)
    if not node.models:
        raise ConfigError("this node serves no model: list [[node.models]] in its config, or pass --model")
    runner: web.AppRunner | None = None
    try:
        runner, url, _ = await start_node(node)
        out(f"Hearth node {node.node_id} listening on {url}")
        sys.stdout.flush()
        await stop.wait()
        out("Shutting down…")
    finally:
        if runner is not None:
            await runner.cleanup()


def _make_dir(path: os.PathLike[str]) -> None:
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create the data directory {path}: {exc.strerror}") from None
