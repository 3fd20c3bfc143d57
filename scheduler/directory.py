"""The scheduler's side of the node directory: it appends to the log and serves it; it cannot forge it.

    GET /v1/directory?since=N   entries from N on, the head, the authority key, and placement hints

Entries come from three events: an approved node's certificate (appended the first time the node is heard
after approval), each new encryption-key statement a node sends in its heartbeat (checked against the
node's identity key first), and a revocation. The log lives in SQLite (table ``directory``) and is never
rewritten. The response also carries unsigned hints (which nodes serve which model, by tier) that help a
proxy pick candidates; a proxy uses only nodes the verified log holds, so a lying hint costs a retry, never
privacy.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from typing import Any

from aiohttp import web

from protocol.directory import Head, KeyStatement, verify_key_statement
from protocol.errors import HearthError, InvalidRequest
from protocol.web import json_response
from scheduler.store import AsyncStore, NodeRecord, Store

log = logging.getLogger("hearth.scheduler.directory")

PAGE = 10_000
_SINCE = re.compile(r"[0-9]{1,15}")


class DirectoryLog:
    def __init__(self, store: AsyncStore) -> None:
        self._store = store
        self._lock = asyncio.Lock()
        self._serials: dict[str, str] = {}  # node id → serial of the certificate logged last
        self._keys: dict[str, str] = {}  # node id → key id of the statement logged last
        self._revoked: set[str] = set()
        self.keys: dict[str, KeyStatement] = {}  # node id → its latest statement (for E2E placement)

    async def load(self) -> None:
        def read_all(store: Store) -> list[dict[str, Any]]:
            out: list[dict[str, Any]] = []
            while len(page := store.directory_entries(len(out), PAGE)) == PAGE:
                out += page
            return out + page

        for entry in await self._store.write(read_all):
            self._note(entry["kind"], entry["doc"])

    def _note(self, kind: str, doc: dict[str, Any]) -> None:
        if kind == "certificate":
            node_id = doc["certificate"]["node_id"]
            self._serials[node_id] = doc["certificate"]["serial"]
            self._revoked.discard(node_id)
            self._keys.pop(node_id, None)
            self.keys.pop(node_id, None)
        elif kind == "key":
            st = doc["statement"]
            self._keys[st["node_id"]] = st["key_id"]
            self.keys[st["node_id"]] = KeyStatement(
                st["node_id"], st["key_id"], st["public_key"], st["not_before"], st["not_after"]
            )
        elif kind == "revoke":
            self._revoked.add(doc["node_id"])
            self.keys.pop(doc["node_id"], None)

    async def _append(self, kind: Any, node_id: str, doc: dict[str, Any]) -> None:
        at = int(time.time())
        await self._store.write(lambda db: db.append_directory(kind, node_id, doc, at))
        self._note(kind, doc)

    async def heard(self, record: NodeRecord, statement: dict[str, Any] | None) -> None:
        """An approved node sent a heartbeat: log its certificate and key statement if they are new."""
        if record.certificate is None:
            return
        async with self._lock:
            serial = record.certificate["certificate"]["serial"]
            if self._serials.get(record.node_id) != serial or record.node_id in self._revoked:
                await self._append("certificate", record.node_id, record.certificate)
                log.info("directory: certificate of %s logged", record.node_id)
            if statement is None:
                return
            body = statement.get("statement")
            if isinstance(body, dict) and body.get("key_id") == self._keys.get(record.node_id):
                return  # the key already logged: most heartbeats, and no signature to check again
            try:
                checked = verify_key_statement(statement, record.identity_key)
            except HearthError as exc:
                log.warning("node %s sent a key statement that does not verify: %s", record.node_id, exc)
                return
            if checked.node_id == record.node_id and self._keys.get(record.node_id) != checked.key_id:
                await self._append("key", record.node_id, statement)
                log.info("directory: key %s of %s logged", checked.key_id, record.node_id)

    async def revoked(self, node_id: str) -> None:
        async with self._lock:
            if node_id in self._serials and node_id not in self._revoked:
                await self._append("revoke", node_id, {"node_id": node_id})

    async def page(self, since: int) -> tuple[list[dict[str, Any]], Head]:
        def read(store: Store) -> tuple[list[dict[str, Any]], Head]:
            return store.directory_entries(since, PAGE), store.directory_head()

        return await self._store.write(read)


async def serve(
    request: web.Request, log_: DirectoryLog, authority_key: str | None, hints: Any
) -> web.Response:
    raw = request.query.get("since", "0")
    if _SINCE.fullmatch(raw) is None:  # str.isdigit() would take "²", which int() refuses
        raise InvalidRequest("since must be a whole number", param="since")
    entries, head = await log_.page(int(raw))
    return json_response(
        {
            "authority_key": authority_key,
            "head": head.to_json(),
            "entries": entries,
            "more": int(raw) + len(entries) < head.seq,
            "placement": hints,
        }
    )
