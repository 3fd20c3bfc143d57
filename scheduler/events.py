"""The live event stream of the admin API (`GET /admin/events`): metadata only, never a prompt.

Publishers call ``publish(kind, **fields)`` from the event loop; each subscriber (an admin's open stream)
has a bounded queue, and one that falls behind loses its oldest events (it is told how many), so a slow
console can never hold up the request path or grow the scheduler's memory.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

QUEUE_EVENTS = 1000


class Subscription:
    def __init__(self) -> None:
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(QUEUE_EVENTS)
        self.dropped = 0

    def offer(self, event: dict[str, Any]) -> None:
        if self.queue.full():
            self.queue.get_nowait()
            self.dropped += 1
        self.queue.put_nowait(event)


class EventBus:
    def __init__(self) -> None:
        self._subscribers: set[Subscription] = set()
        self._seq = itertools.count(1)

    def publish(self, kind: str, **fields: Any) -> None:
        if not self._subscribers:
            return  # the common case: nobody watches, and the request path pays nothing more
        event = {"seq": next(self._seq), "at": time.time(), "kind": kind, **fields}
        for sub in self._subscribers:
            sub.offer(event)

    @property
    def watchers(self) -> int:
        return len(self._subscribers)

    @asynccontextmanager
    async def subscribe(self) -> AsyncIterator[Subscription]:
        sub = Subscription()
        self._subscribers.add(sub)
        try:
            yield sub
        finally:
            self._subscribers.discard(sub)


class NodeWatch:
    """Turns the registry's snapshots into node events: joined, left, healthy or not, yielding or not."""

    def __init__(self, bus: EventBus) -> None:
        self._bus = bus
        self._seen: dict[str, tuple[bool, bool]] = {}  # node id → (healthy, yielding)

    def look(self, nodes: list[tuple[str, bool, bool]]) -> None:
        now = {node_id: (healthy, yielding) for node_id, healthy, yielding in nodes}
        for node_id, (healthy, yielding) in now.items():
            before = self._seen.get(node_id)
            if before is None:
                self._bus.publish("node_joined", node_id=node_id)
                before = (True, False)
            if healthy != before[0]:
                self._bus.publish("node_healthy" if healthy else "node_unhealthy", node_id=node_id)
            if yielding != before[1]:
                self._bus.publish("node_yielding" if yielding else "node_working", node_id=node_id)
        for node_id in self._seen.keys() - now.keys():
            self._bus.publish("node_left", node_id=node_id)
        self._seen = now
