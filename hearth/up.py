"""`hearth up`: a scheduler and one local node on this machine, in one process and one command.

The node listens on 127.0.0.1 only, with a random per-run secret the scheduler presents, so nothing else on
the machine can send it work. The scheduler's API is the one users talk to.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from aiohttp import web
from pydantic import SecretStr

from hearth.config import HearthSettings
from node.app import create_app as create_node_app
from node.settings import ModelSettings
from protocol.errors import ConfigError
from protocol.web import in_daemon_thread, start_site
from scheduler.app import REGISTRY
from scheduler.app import create_app as create_scheduler_app
from scheduler.settings import NodeLink
from scheduler.store import Store

log = logging.getLogger("hearth.up")

READY_TIMEOUT = 600.0


def ensure_admin_token(db_path: Path) -> str | None:
    """Create the first admin token; return it (to print once), or None if one exists already."""
    store = Store(db_path)
    try:
        if store.has_admin_token():
            return None
        token, _ = store.create_token("admin (created by hearth up)", "admin")
        return token
    finally:
        store.close()


async def serve_up(
    settings: HearthSettings,
    models: Callable[[], list[ModelSettings]],
    *,
    out: Callable[[str], None] = print,
    stop: asyncio.Event | None = None,
) -> None:
    """Run until ``stop`` is set (by SIGINT/SIGTERM when not given)."""
    data_dir = settings.data_dir
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create the data directory {data_dir}: {exc.strerror}") from None
    stop = stop or _stop_on_signals()

    out("Preparing the model…")
    preparing = in_daemon_thread(models, "hearth-prepare-model")
    stopping: asyncio.Future[Any] = asyncio.ensure_future(stop.wait())
    await asyncio.wait(
        [cast("asyncio.Future[Any]", preparing), stopping], return_when=asyncio.FIRST_COMPLETED
    )
    stopping.cancel()
    if not preparing.done():
        preparing.cancel()  # the download or build thread is a daemon: it ends with the process
        return
    model_list = preparing.result()
    model_ids = [m.model_id for m in model_list]
    admin_token = await asyncio.to_thread(
        ensure_admin_token, settings.scheduler.model_copy(update={"data_dir": data_dir}).db_path
    )

    secret = secrets.token_urlsafe(32)
    node_settings = settings.node.model_copy(
        update={"host": "127.0.0.1", "port": 0, "secret": SecretStr(secret), "models": model_list}
    )
    runners: list[web.AppRunner] = []
    try:
        node_runner, node_url = await start_site(create_node_app(node_settings), "127.0.0.1", 0)
        runners.append(node_runner)
        sched_settings = settings.scheduler.model_copy(
            update={
                "data_dir": data_dir,
                "nodes": [NodeLink(node_id=node_settings.node_id, url=node_url, secret=SecretStr(secret))],
            }
        )
        app = create_scheduler_app(sched_settings)
        sched_runner, base_url = await start_site(app, sched_settings.host, sched_settings.port)
        runners.insert(0, sched_runner)
        for model_id in model_ids:
            await _wait_ready(app, model_id, stop)
        if stop.is_set():
            return
        _banner(out, base_url, model_ids, admin_token, data_dir)
        await stop.wait()
        out("Shutting down…")
    finally:
        for runner in runners:
            await runner.cleanup()


async def _wait_ready(app: web.Application, model_id: str, stop: asyncio.Event) -> None:
    registry = app[REGISTRY]
    deadline = asyncio.get_running_loop().time() + READY_TIMEOUT
    while not stop.is_set():
        await registry.poll_once()
        for node in registry.snapshot().nodes:
            state = node.model(model_id)
            if state is not None and node.healthy and state.ready:
                return
            if state is not None and state.phase == "failed":
                raise ConfigError(f"the model {model_id} failed to load; the log above says why")
        if asyncio.get_running_loop().time() > deadline:
            raise ConfigError(f"the model {model_id} did not become ready in {READY_TIMEOUT:.0f} s")
        await asyncio.sleep(0.2)


def _banner(
    out: Callable[[str], None], base_url: str, model_ids: list[str], token: str | None, data_dir: Path
) -> None:
    out("")
    out("Hearth is up.")
    out(f"  API base URL: {base_url}/v1")
    if token:
        out(f"  API token:    {token}")
        out("                (admin token, shown only this once: keep it somewhere safe)")
    else:
        out(f"  API token:    the one printed on first start, or: hearth tokens create --data-dir {data_dir}")
    out(f"  Model{'s' if len(model_ids) > 1 else ''}:        {', '.join(model_ids)}")
    out("")
    out("Try it:")
    out(f"  export HEARTH_TOKEN={token or '<your token>'}")
    out(f'  curl {base_url}/v1/chat/completions -H "Authorization: Bearer $HEARTH_TOKEN" \\')
    out(
        f'       -H \'Content-Type: application/json\' -d \'{{"model": "{model_ids[0]}", '
        '"messages": [{"role": "user", "content": "Hello"}]}\''
    )
    out("Press Ctrl-C to stop.")
    if hasattr(sys.stdout, "flush"):
        sys.stdout.flush()


def _stop_on_signals() -> asyncio.Event:
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
