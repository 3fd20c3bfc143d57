"""`hearth up`: a scheduler and one local node on this machine, in one process and one command.

It is the federation in miniature, on the same code path: a local authority (in the data dir, since the
operator and the machine are one here) certifies the local node, which heartbeats to the scheduler and
accepts only calls signed by it. The node listens on 127.0.0.1 only and does not advertise on the LAN.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from aiohttp import web

from hearth.config import HearthSettings
from hearth.serve import node_settings, stop_on_signals
from node.app import start_node
from node.settings import ModelSettings
from node.trust import Enrollment, Trust
from protocol.errors import ConfigError
from protocol.identity import (
    Identity,
    init_authority,
    issue_certificate,
    load_authority,
    load_or_create_identity,
)
from protocol.web import in_daemon_thread, start_site
from scheduler.app import create_app as create_scheduler_app
from scheduler.state import FEDERATION
from scheduler.store import Store

log = logging.getLogger("hearth.up")

READY_TIMEOUT = 600.0
LOCAL_TIER = "club"


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


def certify_local_node(data_dir: Path, node_id: str) -> tuple[Identity, Trust]:
    """The desktop's own authority approves the local node (blocking file and database work)."""
    authority_dir = data_dir / "authority"
    authority = (
        load_authority(authority_dir)
        if (authority_dir / "authority.key").exists()
        else init_authority(authority_dir)
    )
    scheduler_key = load_or_create_identity(data_dir / "scheduler.key")
    trust = Trust.open(data_dir / "node")
    # The scheduler's URL is known only once it listens; `node.scheduler_url` gives it to the node.
    trust.enroll(Enrollment("", scheduler_key.public_b64, authority.public_b64, node_id, LOCAL_TIER))
    cert = issue_certificate(
        authority, node_id=node_id, tier=LOCAL_TIER, identity_key=trust.identity.public_b64,
        encryption_key=trust.encryption_public, scheduler_key=scheduler_key.public_b64,
    )  # fmt: skip
    store = Store(data_dir / "hearth.db")
    try:
        if (old := store.node(node_id)) is not None and old.identity_key != trust.identity.public_b64:
            store.db.table("nodes").delete(node_id)  # the node's keys were made anew: this is it now
        store.upsert_pending(
            node_id=node_id, source="local", tier=LOCAL_TIER, identity_key=trust.identity.public_b64,
            encryption_key=trust.encryption_public, fingerprint=trust.identity.fingerprint, url=None,
        )  # fmt: skip
        store.set_node_state(node_id, "approved", certificate=cert)
    finally:
        store.close()
    return authority, trust


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
    stop = stop or stop_on_signals()

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

    node_base = node_settings(settings)
    authority, trust = await asyncio.to_thread(certify_local_node, data_dir, node_base.node_id)
    runners: list[web.AppRunner] = []
    try:
        sched_settings = settings.scheduler.model_copy(
            update={"data_dir": data_dir, "authority_key": authority.public_b64, "discovery": False}
        )
        app = create_scheduler_app(sched_settings)
        sched_runner, base_url = await start_site(
            app, sched_settings.host, sched_settings.port, sched_settings.http
        )
        runners.append(sched_runner)
        node = node_base.model_copy(
            update={
                "host": "127.0.0.1", "port": 0, "models": model_list, "tier": LOCAL_TIER, "advertise": False,
                "scheduler_url": base_url.replace("0.0.0.0", "127.0.0.1"),
            }
        )  # fmt: skip
        node_runner, _, _ = await start_node(node, trust=trust)
        runners.append(node_runner)
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
    registry = app[FEDERATION].registry
    deadline = asyncio.get_running_loop().time() + READY_TIMEOUT
    while not stop.is_set():
        for node in registry.snapshot().nodes:
            state = node.model(model_id)
            if state is not None and node.healthy and state.phase == "ready":
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
