"""LAN discovery: browse `_hearth._tcp.local.` and report each node's advert.

A record is only a hint (anyone can publish one): the federation turns an unknown node into a pending
enrollment and gives work only to approved nodes. Records are resolved with a bounded timeout, malformed
ones are ignored, and the number of nodes tracked is bounded.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from zeroconf import IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from protocol.advert import SERVICE_TYPE, Advert, decode_txt
from protocol.errors import ProtocolError

log = logging.getLogger("hearth.scheduler.discovery")

RESOLVE_TIMEOUT_MS = 3000
MAX_NODES = 10_000


class Discovery:
    def __init__(
        self,
        on_change: Callable[[Advert], None],
        on_remove: Callable[[str], None],
        *,
        interfaces: list[str] | None = None,
    ) -> None:
        self._on_change = on_change
        self._on_remove = on_remove
        self._interfaces = interfaces
        self._zc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._adverts: dict[str, Advert] = {}  # by service name
        # One resolve per name at a time: a newer event cancels the older resolve, so a slow, stale answer
        # never overwrites a newer one, and a node removed meanwhile is not brought back.
        self._resolving: dict[str, asyncio.Task[None]] = {}
        self._warned: set[str] = set()

    @property
    def adverts(self) -> dict[str, Advert]:
        return {a.node_id: a for a in self._adverts.values()}

    async def start(self) -> None:
        self._zc = (
            AsyncZeroconf(interfaces=self._interfaces, ip_version=IPVersion.V4Only)
            if self._interfaces is not None
            else AsyncZeroconf(ip_version=IPVersion.V4Only)
        )
        self._browser = AsyncServiceBrowser(self._zc.zeroconf, SERVICE_TYPE, handlers=[self._handler])

    def _handler(
        self, zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        pending = self._resolving.pop(name, None)
        if pending is not None:
            pending.cancel()
        if state_change is ServiceStateChange.Removed:
            advert = self._adverts.pop(name, None)
            if advert is not None:
                self._on_remove(advert.node_id)
            return
        if len(self._adverts) + len(self._resolving) >= MAX_NODES and name not in self._adverts:
            return
        task = asyncio.ensure_future(self._resolve(service_type, name))
        self._resolving[name] = task
        task.add_done_callback(lambda done: self._resolved(name, done))

    def _resolved(self, name: str, task: asyncio.Task[None]) -> None:
        if self._resolving.get(name) is task:
            del self._resolving[name]

    async def _resolve(self, service_type: str, name: str) -> None:
        assert self._zc is not None
        info = AsyncServiceInfo(service_type, name)
        if not await info.async_request(self._zc.zeroconf, RESOLVE_TIMEOUT_MS):
            return
        addresses = info.parsed_addresses()
        try:
            if not addresses or info.port is None:
                raise ProtocolError("advert has no address")
            advert = decode_txt(info.properties, host=addresses[0], port=info.port)
        except ProtocolError as exc:
            if name not in self._warned and len(self._warned) < MAX_NODES:
                self._warned.add(name)
                log.warning("ignoring a malformed zeroconf record (%s)", exc.message)
            return
        if self._adverts.get(name) != advert:
            self._adverts[name] = advert
            self._on_change(advert)

    async def close(self) -> None:
        if self._browser is not None:
            await self._browser.async_cancel()
        tasks = list(self._resolving.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._zc is not None:
            await self._zc.async_close()
