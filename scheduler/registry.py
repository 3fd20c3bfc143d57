"""The scheduler's view of its nodes, kept fresh by polling each node's /status.

Polling runs in one owned task; placement reads an immutable snapshot built per request from the last
poll plus the requests in flight (O(models): microseconds for a handful, to be cached per poll once the
federation brings many nodes).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from protocol.web import read_capped
from scheduler.placement import ClusterSnapshot, ModelState, NodeState
from scheduler.settings import NodeLink, SchedulerSettings

log = logging.getLogger("hearth.scheduler.registry")

MAX_STATUS_BYTES = 256 * 1024


@dataclass
class NodeEntry:
    link: NodeLink
    last_ok: float = 0.0
    models: tuple[ModelState, ...] = ()
    reachable: bool = False
    inflight: dict[str, int] = field(default_factory=dict)

    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.link.secret.get_secret_value()}"}


class Registry:
    def __init__(self, settings: SchedulerSettings, session: aiohttp.ClientSession) -> None:
        self._settings = settings
        self._session = session
        self.nodes = {link.node_id: NodeEntry(link) for link in settings.nodes}

    def snapshot(self) -> ClusterSnapshot:
        now = time.monotonic()
        timeout = self._settings.node_timeout
        return ClusterSnapshot(
            tuple(
                NodeState(
                    entry.link.node_id,
                    entry.reachable and now - entry.last_ok < timeout,
                    tuple(
                        ModelState(
                            m.id, m.phase, m.context_length, m.active + entry.inflight.get(m.id, 0), m.queued
                        )
                        for m in entry.models
                    ),
                )
                for entry in self.nodes.values()
            )
        )

    async def poll_once(self) -> None:
        await asyncio.gather(*(self._poll(entry) for entry in self.nodes.values()))

    async def run(self) -> None:
        while True:
            await self.poll_once()
            await asyncio.sleep(self._settings.poll_interval)

    async def _poll(self, entry: NodeEntry) -> None:
        url = entry.link.url.rstrip("/") + "/status"
        try:
            timeout = aiohttp.ClientTimeout(total=min(5.0, self._settings.node_timeout))
            async with self._session.get(url, headers=entry.auth_headers(), timeout=timeout) as resp:
                if resp.status != 200:
                    raise ValueError(f"status {resp.status}")
                doc = _parse_status(await read_capped(resp, MAX_STATUS_BYTES))
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            if entry.reachable:
                log.warning("node %s stopped answering (%s)", entry.link.node_id, type(exc).__name__)
            entry.reachable = False
            return
        if not entry.reachable:
            log.info("node %s is answering", entry.link.node_id)
        entry.models = doc
        entry.reachable = True
        entry.last_ok = time.monotonic()

    def mark_failed(self, node_id: str) -> None:
        """A relay saw the node fail: stop placing there until the next good poll."""
        if node_id in self.nodes:
            self.nodes[node_id].reachable = False


def _parse_status(raw: bytes) -> tuple[ModelState, ...]:
    """The models of a node's status document; ValueError when it is malformed."""
    try:
        doc: Any = json.loads(raw)
        return tuple(
            ModelState(
                id=str(m["id"]),
                phase=m["state"] if m.get("state") in ("loading", "ready", "failed") else "failed",
                context_length=m["context_length"] if isinstance(m.get("context_length"), int) else None,
                active=int(m.get("active", 0)),
                queued=int(m.get("queued", 0)),
            )
            for m in doc["models"]
        )
    except (KeyError, TypeError, AttributeError, ValueError):
        raise ValueError("malformed status document") from None
