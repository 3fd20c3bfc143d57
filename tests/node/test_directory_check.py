"""A node checks that the scheduler's directory shows its current key, and raises the alarm when not.

The scheduler here is a small aiohttp app on 127.0.0.1 that serves whatever directory the test sets: a
scheduler that dropped or swapped a node's key, which nobody runs on purpose.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from aiohttp import web

from node.app import start_node
from node.heartbeat import status_doc
from node.settings import NodeSettings
from node.state import STATE
from node.trust import Enrollment, Trust
from protocol.directory import EMPTY, GENESIS, Head, entry_hash, make_entry
from protocol.identity import Identity, init_authority, issue_certificate
from protocol.web import start_site
from tests.support import LoopThread, wait_for


def _log(*items: tuple[str, dict[str, Any]]) -> dict[str, Any]:
    entries, prev = [], GENESIS
    for seq, (kind, doc) in enumerate(items):
        entry = make_entry(seq, prev, kind, doc, 0)  # type: ignore[arg-type]
        entries.append(entry)
        prev = entry_hash(entry)
    return {"entries": entries, "head": Head(len(entries), prev).to_json(), "more": False}


def test_a_missing_key_raises_the_alarm_and_its_return_clears_it(servers: LoopThread, tmp_path: Path) -> None:
    authority = init_authority(tmp_path / "authority")
    scheduler = Identity.generate()
    served: dict[str, Any] = {"authority_key": authority.public_b64, **_log(), "head": EMPTY.to_json()}

    async def directory(request: web.Request) -> web.Response:
        return web.json_response(served)

    async def heartbeat(request: web.Request) -> web.Response:
        return web.json_response({"error": {"message": "busy", "code": "x"}}, status=503)

    async def start() -> tuple[web.AppRunner, web.AppRunner, Any]:
        app = web.Application()
        app.router.add_get("/v1/directory", directory)
        app.router.add_post("/v1/nodes/heartbeat", heartbeat)
        sched_runner, url = await start_site(app, "127.0.0.1", 0)
        trust = await asyncio.to_thread(Trust.open, tmp_path / "node")
        trust.enroll(Enrollment(url, scheduler.public_b64, authority.public_b64, "lonely", "club"))
        cert = issue_certificate(
            authority, node_id="lonely", tier="club", identity_key=trust.identity.public_b64,
            encryption_key=trust.encryption_public, scheduler_key=scheduler.public_b64,
        )  # fmt: skip
        trust.accept_certificate(cert, authority.public_b64)
        settings = NodeSettings(
            node_id="lonely", data_dir=tmp_path / "node", scheduler_url=url, advertise=False,
            directory_check_interval=0.2, memory_budget_bytes=1 << 30,
        )  # fmt: skip
        node_runner, _, node_app = await start_node(settings, trust=trust)
        served["cert"] = cert
        return sched_runner, node_runner, node_app

    sched_runner, node_runner, node_app = servers.call(start())
    state = node_app[STATE]
    try:

        async def alarmed() -> bool:
            return state.key_alarm is not None

        servers.call(wait_for(alarmed, within=10))
        assert "does not show this node's current encryption key" in (state.key_alarm or "")
        assert status_doc(state)["alarm"] == state.key_alarm  # what the operator sees in `hearth node list`

        # The scheduler logs the certificate and the current statement: the alarm clears by itself.
        _, statement = state.keys.current()
        served.update(_log(("certificate", served.pop("cert")), ("key", statement)))

        async def cleared() -> bool:
            return state.key_alarm is None

        servers.call(wait_for(cleared, within=10))
    finally:
        servers.call(node_runner.cleanup())
        servers.call(sched_runner.cleanup())
