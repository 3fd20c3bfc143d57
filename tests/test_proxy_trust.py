"""`hearth proxy` fails closed: a directory it must not trust stops every request before anything is sealed.

The scheduler here is a small aiohttp app on 127.0.0.1 serving directories crafted by the test: a hostile
or broken scheduler, which no user runs on purpose.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from hearth.proxy import SealedClient, TrustError
from protocol.directory import GENESIS, Head, entry_hash, make_entry, make_key_statement
from protocol.envelope import public_key_bytes
from protocol.errors import HearthError
from protocol.identity import Identity, b64e, fingerprint, issue_certificate
from protocol.web import start_site
from tests.support import LoopThread

NOW = int(time.time())


def directory(authority: Identity, *, node_id: str = "gpu-1", key_end: int = NOW + 3600) -> dict[str, Any]:
    ident = Identity.generate()
    cert = issue_certificate(
        authority, node_id=node_id, tier="club", identity_key=ident.public_b64,
        encryption_key=b64e(public_key_bytes(X25519PrivateKey.generate().public_key())),
        scheduler_key=Identity.generate().public_b64,
    )  # fmt: skip
    raw = public_key_bytes(X25519PrivateKey.generate().public_key())
    statement = make_key_statement(
        ident, node_id=node_id, public_raw=raw, not_before=NOW - 60, not_after=key_end
    )
    entries, prev = [], GENESIS
    for seq, (kind, doc) in enumerate([("certificate", cert), ("key", statement)]):
        entry = make_entry(seq, prev, kind, doc, NOW)  # type: ignore[arg-type]
        entries.append(entry)
        prev = entry_hash(entry)
    return {"authority_key": authority.public_b64, "head": Head(len(entries), prev).to_json(),
            "entries": entries, "more": False, "placement": {"m": [node_id]}}  # fmt: skip


class Hostile:
    def __init__(self) -> None:
        self.doc: dict[str, Any] = {}

    async def handle(self, request: web.Request) -> web.Response:
        since = int(request.query.get("since", "0"))
        doc = dict(self.doc, entries=self.doc["entries"][since:])
        return web.json_response(doc)


@pytest.fixture
def hostile(servers: LoopThread) -> Iterator[tuple[Hostile, str]]:
    scheduler = Hostile()
    app = web.Application()
    app.router.add_get("/v1/directory", scheduler.handle)
    runner, url = servers.call(start_site(app, "127.0.0.1", 0))
    yield scheduler, url
    servers.call(runner.cleanup())


def refresh(servers: LoopThread, url: str, state: Path, **kwargs: Any) -> Any:
    async def go() -> Any:
        async with aiohttp.ClientSession() as session:
            client = SealedClient(url, "t", state, session, **kwargs)
            d = await client.refresh(force=True)
            return client.choose(d, "m")

    return servers.call(go())


def test_the_first_authority_is_pinned_and_another_is_refused(
    servers: LoopThread, hostile: tuple[Hostile, str], tmp_path: Path
) -> None:
    scheduler, url = hostile
    club = Identity.generate()
    scheduler.doc = directory(club)
    assert [c.node_id for c in refresh(servers, url, tmp_path / "pin.json")] == ["gpu-1"]
    scheduler.doc = directory(Identity.generate())  # the scheduler swaps in an authority of its own
    with pytest.raises(TrustError, match="another authority"):
        refresh(servers, url, tmp_path / "pin.json")


def test_an_authority_the_user_did_not_expect_is_refused_on_first_use(
    servers: LoopThread, hostile: tuple[Hostile, str], tmp_path: Path
) -> None:
    scheduler, url = hostile
    club = Identity.generate()
    scheduler.doc = directory(Identity.generate())
    with pytest.raises(TrustError, match=r"not .* as expected"):
        refresh(servers, url, tmp_path / "pin.json", authority=fingerprint(club.public_raw))
    scheduler.doc = directory(club)
    assert refresh(servers, url, tmp_path / "pin.json", authority=fingerprint(club.public_raw))


def test_a_rewritten_history_is_refused_even_after_a_proxy_restart(
    servers: LoopThread, hostile: tuple[Hostile, str], tmp_path: Path
) -> None:
    scheduler, url = hostile
    club = Identity.generate()
    scheduler.doc = directory(club)
    refresh(servers, url, tmp_path / "pin.json")
    # Same authority, same node id, but another history (another certificate and key for gpu-1): a fork.
    scheduler.doc = directory(club)
    with pytest.raises(TrustError, match="continuation"):
        refresh(servers, url, tmp_path / "pin.json")  # a new SealedClient: the head comes from the file


def test_a_head_that_does_not_match_its_entries_is_refused(
    servers: LoopThread, hostile: tuple[Hostile, str], tmp_path: Path
) -> None:
    scheduler, url = hostile
    scheduler.doc = directory(Identity.generate())
    scheduler.doc["head"]["hash"] = "f" * 64
    with pytest.raises(TrustError, match="head"):
        refresh(servers, url, tmp_path / "pin.json")


def test_expired_key_statements_leave_nothing_to_seal_to(
    servers: LoopThread, hostile: tuple[Hostile, str], tmp_path: Path
) -> None:
    scheduler, url = hostile
    scheduler.doc = directory(Identity.generate(), key_end=NOW - 1)
    with pytest.raises(HearthError, match="no node this proxy trusts"):
        refresh(servers, url, tmp_path / "pin.json")


def test_a_scheduler_that_is_gone_gets_a_clear_error(servers: LoopThread, tmp_path: Path) -> None:
    async def go() -> None:
        async with aiohttp.ClientSession() as session:
            client = SealedClient("http://127.0.0.1:9", "t", tmp_path / "pin.json", session)
            await client.send("chat", b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}')

    with pytest.raises(HearthError, match="could not be reached"):
        servers.call(go())
