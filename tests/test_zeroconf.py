"""Real zeroconf on 127.0.0.1: a node's advert is seen, kept current (coalesced), and removed."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest
from zeroconf import IPVersion, ServiceInfo
from zeroconf.asyncio import AsyncZeroconf

from node.advertise import Advertiser
from protocol.advert import SERVICE_TYPE, Advert
from protocol.web import start_site
from scheduler.app import create_app
from scheduler.discovery import Discovery
from scheduler.settings import SchedulerSettings

LOOPBACK = ["127.0.0.1"]
ADVERT = Advert("zc-node", "0.2.0", 9100, "community", "00112233445566778899", "cpu", 1 << 30, ("m",), 0)


async def until(predicate: Callable[[], bool], within: float = 10.0) -> None:
    # Polling: the state is set by zeroconf's callbacks, which have no event of their own to wait on.
    async with asyncio.timeout(within):
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.05)


class Seen:
    def __init__(self) -> None:
        self.adverts: dict[str, Advert] = {}
        self.removed: list[str] = []

    def change(self, advert: Advert) -> None:
        self.adverts[advert.node_id] = advert

    def remove(self, node_id: str) -> None:
        self.removed.append(node_id)


async def test_an_advert_is_seen_updated_and_removed() -> None:
    seen = Seen()
    discovery = Discovery(seen.change, seen.remove, interfaces=LOOPBACK)
    advertiser = Advertiser(ADVERT, interfaces=LOOPBACK, min_interval=0.2)
    await discovery.start()
    try:
        await advertiser.start()
        await until(lambda: "zc-node" in seen.adverts)
        assert seen.adverts["zc-node"] == Advert(**{**_fields(ADVERT), "host": "127.0.0.1"})
        # A burst of changes goes out as at most a couple of updates, and the last one wins.
        for load in range(1, 11):
            advertiser.update(Advert(**{**_fields(ADVERT), "load": load, "models": ("m", "n")}))
        await until(lambda: seen.adverts["zc-node"].load == 10)
        assert seen.adverts["zc-node"].models == ("m", "n")
        assert advertiser.publishes <= 3
        # The same advert again publishes nothing.
        before = advertiser.publishes
        advertiser.update(Advert(**{**_fields(ADVERT), "load": 10, "models": ("m", "n")}))
        await asyncio.sleep(0.5)
        assert advertiser.publishes == before
        await advertiser.close()
        await until(lambda: "zc-node" in seen.removed)
    finally:
        await advertiser.close()
        await discovery.close()


async def test_a_malformed_record_is_ignored() -> None:
    seen = Seen()
    discovery = Discovery(seen.change, seen.remove, interfaces=LOOPBACK)
    rogue = AsyncZeroconf(interfaces=LOOPBACK, ip_version=IPVersion.V4Only)
    info = ServiceInfo(SERVICE_TYPE, f"rogue.{SERVICE_TYPE}", addresses=[socket.inet_aton("127.0.0.1")], port=1,
                       properties={"id": "Rogue Node!", "tier": "gold"}, server="rogue.local.")  # fmt: skip
    good = Advertiser(Advert(**{**_fields(ADVERT), "node_id": "fine"}), interfaces=LOOPBACK)
    await discovery.start()
    try:
        await rogue.async_register_service(info)
        await good.start()
        await until(lambda: "fine" in seen.adverts)  # by then the rogue record has been seen too
        assert all(a.port != 1 for a in seen.adverts.values()), "the rogue record was taken"
    finally:
        await good.close()
        await rogue.async_unregister_service(info)
        await rogue.async_close()
        await discovery.close()


def _fields(advert: Advert) -> dict[str, object]:
    return {name: getattr(advert, name) for name in Advert.__slots__}


async def test_a_scheduler_without_multicast_still_serves(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # An address no interface has: zeroconf cannot join the multicast group there.
    settings = SchedulerSettings(port=0, data_dir=tmp_path, zeroconf_interfaces=["10.254.254.254"])
    runner, url = await start_site(create_app(settings), "127.0.0.1", 0)
    try:
        async with aiohttp.ClientSession() as session, session.get(url + "/healthz") as resp:
            assert resp.status == 200
        assert "LAN discovery is off" in caplog.text
    finally:
        await runner.cleanup()
