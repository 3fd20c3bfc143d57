"""A node's zeroconf advert: registered once it listens, re-published on change, at most once per interval.

Load and free memory change with every job; multicasting each change would flood a busy LAN, so updates
are coalesced: the latest advert is published at most once per ``min_interval`` seconds, and an advert
equal to the one on the air publishes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket

from zeroconf import IPVersion, ServiceInfo
from zeroconf.asyncio import AsyncZeroconf

from protocol.advert import SERVICE_TYPE, Advert, encode_txt, service_name

log = logging.getLogger("hearth.node.advertise")


class Advertiser:
    def __init__(
        self,
        advert: Advert,
        *,
        interfaces: list[str] | None = None,
        address: str = "127.0.0.1",
        min_interval: float = 5.0,
    ) -> None:
        self._advert = advert
        self._published: Advert | None = None
        self._interfaces = interfaces
        self._address = address
        self._min_interval = min_interval
        self._zc: AsyncZeroconf | None = None
        self._info: ServiceInfo | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self.publishes = 0  # registrations and updates sent, for tests and metrics

    def _service_info(self, advert: Advert) -> ServiceInfo:
        try:
            packed = socket.inet_aton(self._address)
        except OSError:
            packed = socket.inet_aton("127.0.0.1")
        return ServiceInfo(
            SERVICE_TYPE,
            service_name(advert.node_id),
            addresses=[packed],
            port=advert.port,
            properties=encode_txt(advert),
            # Not "<node id>.local.": that may be the machine's own mDNS name, announced by its OS. The key
            # fingerprint is this node's alone.
            server=f"hearth-{advert.fingerprint}.local.",
        )

    async def start(self) -> None:
        interfaces = self._interfaces if self._interfaces is not None else None
        self._zc = (
            AsyncZeroconf(interfaces=interfaces, ip_version=IPVersion.V4Only)
            if interfaces is not None
            else AsyncZeroconf(ip_version=IPVersion.V4Only)
        )
        self._info = self._service_info(self._advert)
        # Each call returns a task that finishes once the announcements are out: wait for it too.
        await (await self._zc.async_register_service(self._info, allow_name_change=False))
        self._published = self._advert
        self.publishes += 1
        self._task = asyncio.create_task(self._run(), name="hearth-advert")

    def update(self, advert: Advert) -> None:
        self._advert = advert
        self._wake.set()

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self._advert != self._published and self._zc is not None:
                self._info = self._service_info(self._advert)
                self._published = self._advert
                self.publishes += 1
                try:
                    await (await self._zc.async_update_service(self._info))
                except Exception as exc:  # a network hiccup must not end the advert for good
                    log.warning("zeroconf update failed (%s); trying again", type(exc).__name__)
                    self._published = None
                    self._wake.set()
            await asyncio.sleep(self._min_interval)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._zc is not None:
            if self._info is not None:
                with contextlib.suppress(Exception):  # shutting down: nothing to do about a failed goodbye
                    await (await self._zc.async_unregister_service(self._info))
            await self._zc.async_close()
            self._zc = None
