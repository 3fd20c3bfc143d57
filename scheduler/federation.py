"""How nodes join and stay in touch: enrollment, heartbeats, LAN discovery, and signed calls to nodes.

    POST /v1/enroll            a node redeems a one-time code and asks to be certified (pending approval)
    POST /v1/nodes/heartbeat   an approved node's signed status; pending and revoked nodes are told so

The scheduler trusts a node only through the certificate an operator's authority key signed; it signs its
own calls to nodes with its identity key (scheduler.key in its data dir), which every certificate names,
so a node accepts work only from its own scheduler. Discovery over zeroconf finds LAN nodes and their
addresses, but a node the operator has not approved is a pending enrollment, never capacity.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal, cast, get_args
from urllib.parse import quote

import aiohttp
from yarl import URL

from protocol.errors import (
    AuthenticationFailed,
    ConflictError,
    InvalidRequest,
    PermissionDenied,
    ProtocolError,
    Unavailable,
)
from protocol.federation import (
    EnrollReply,
    EnrollRequest,
    HeartbeatReply,
    ModelPhase,
    NodeStatus,
    UsageReceipt,
    parse,
    proof_message,
)
from protocol.identity import (
    Identity,
    RequestVerifier,
    b64d,
    fingerprint,
    sign_request,
    verify_signature,
)
from protocol.web import parse_json, read_capped
from scheduler.directory import DirectoryLog
from scheduler.registry import Registry
from scheduler.store import AsyncStore, NodeRecord

if TYPE_CHECKING:
    from protocol.advert import Advert

log = logging.getLogger("hearth.scheduler.federation")

MAX_IDENTITY_BYTES = 16 * 1024
LOAD_CALL_TIMEOUT_S = 10.0
UNREACHABLE_RETRY_S = 5.0  # a node that is back is heard from within a few heartbeats


def answered_phase(doc: Any) -> ModelPhase | None:
    """The model's phase a node's answer to a load or unload states (None: it did not say)."""
    phase = doc.get("phase") if isinstance(doc, dict) else None
    return cast(ModelPhase, phase) if phase in get_args(ModelPhase) else None


def model_path(model: str, action: Literal["load", "unload"]) -> str:
    """A node's route for one of its models. The id is one path segment, whatever it holds: a Hugging Face
    id has a "/", and nothing in an id may reach another route."""
    return f"/models/{quote(model, safe='')}/{action}"


@dataclass
class Federation:
    """The scheduler's side of its nodes: who they are (records), and how to call them."""

    identity: Identity
    store: AsyncStore
    registry: Registry
    session: aiohttp.ClientSession
    heartbeat_interval: float
    authority_key: str | None
    directory: DirectoryLog
    on_receipts: Callable[[str, list[UsageReceipt]], None] = lambda node_id, receipts: None
    records: dict[str, NodeRecord] = field(default_factory=dict)  # every known node, by node id
    pending_status: dict[str, NodeStatus] = field(default_factory=dict)  # last word from pending nodes
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.verifier = RequestVerifier(self.identity.fingerprint, self._signer)

    def _signer(self, fp: str) -> bytes | None:
        for record in self.records.values():
            if record.fingerprint == fp:
                return b64d(record.identity_key, length=32)
        return None

    def _by_fingerprint(self, fp: str) -> NodeRecord:
        for record in self.records.values():
            if record.fingerprint == fp:
                return record
        raise AuthenticationFailed("unknown signer")

    async def load(self) -> None:
        """Rebuild from the database: approved nodes are capacity again as soon as they are heard."""
        records = await self.store.write(lambda db: db.nodes())
        for record in records:
            self.remember(record)
        await self.directory.load()

    def remember(self, record: NodeRecord) -> None:
        self.records[record.node_id] = record
        if record.state == "approved":
            self.registry.approve(record)
        else:
            self.registry.remove(record.node_id)
        if record.state != "pending":
            self.pending_status.pop(record.node_id, None)

    # enrollment

    async def enroll(self, doc: Any) -> EnrollReply:
        req: EnrollRequest = parse(EnrollRequest, doc, untrusted_peer=False)
        for name in ("identity_key", "encryption_key"):
            try:
                b64d(getattr(req, name), length=32)
            except ProtocolError:  # the right length, but another spelling of the key: the node's mistake
                raise InvalidRequest(f"{name} is not canonical base64url", param=name) from None
        message = proof_message(req.code, req.node_id, req.identity_key, req.encryption_key)
        try:
            proof = b64d(req.proof)
        except ProtocolError:
            proof = b""
        if not verify_signature(b64d(req.identity_key, length=32), message, proof):
            raise PermissionDenied("the enrollment proof does not match the identity key")
        known = self.records.get(req.node_id)
        if known is not None and known.identity_key != req.identity_key:
            raise ConflictError(f"the node id {req.node_id} belongs to another machine; choose another name")
        code = await self.store.write(lambda db: db.redeem_code(req.code, req.node_id))
        if code is None:
            raise PermissionDenied(
                "this enrollment code is unknown, used or expired; ask the operator for a new one",
                code="invalid_enrollment_code",
            )
        record = await self.store.write(
            lambda db: db.upsert_pending(
                node_id=req.node_id, source="code", tier=code.tier, identity_key=req.identity_key,
                encryption_key=req.encryption_key, fingerprint=fingerprint(b64d(req.identity_key)),
                url=req.url,
            )
        )  # fmt: skip
        self.remember(record)
        log.info("node %s enrolled with a code (tier %s); waiting for approval", record.node_id, record.tier)
        return EnrollReply(
            enrollment_id=record.node_id,
            node_id=record.node_id,
            tier=record.tier,  # type: ignore[arg-type]
            scheduler_key=self.identity.public_b64,
            authority_key=self.authority_key,
        )

    # heartbeats

    async def heartbeat(self, method: str, path: str, headers: Any, body: bytes) -> HeartbeatReply:
        fp = self.verifier.verify(method, path, headers, body)
        record = self._by_fingerprint(fp)
        # The node is the client of this call: a status the scheduler cannot read is its mistake (400).
        status: NodeStatus = parse(NodeStatus, parse_json(body), untrusted_peer=False)
        if status.node_id != record.node_id:
            raise PermissionDenied("a node may report only on itself")
        if record.state == "pending":
            self.pending_status[record.node_id] = status
            raise PermissionDenied(
                "this node is waiting for the operator's approval", code="pending_approval"
            )
        if record.state != "approved":
            raise PermissionDenied(f"this node's enrollment was {record.state}", code=f"node_{record.state}")
        if record.url != status.url:
            await self.store.write(lambda db: db.set_node_url(record.node_id, status.url))
            self.records[record.node_id] = record = replace(record, url=status.url)
        self.registry.heartbeat(record.node_id, status)
        self.on_receipts(record.node_id, status.usage)  # signed, like the whole heartbeat
        await self.directory.heard(record, status.key_statement)
        return HeartbeatReply(
            certificate=record.certificate, drain=record.drain, interval=self.heartbeat_interval
        )

    # discovery

    def discovered(self, advert: Advert) -> None:
        """A node advertised itself on the LAN. Unknown ones become pending enrollments."""
        known = next((r for r in self.records.values() if r.fingerprint == advert.fingerprint), None)
        if known is not None or advert.node_id in self.records:
            return
        self._spawn(self._enroll_discovered(advert))

    async def _enroll_discovered(self, advert: Advert) -> None:
        url = f"http://{advert.host}:{advert.port}"
        try:
            async with self.session.get(url + "/identity", timeout=aiohttp.ClientTimeout(total=5)) as resp:
                doc: Any = json.loads(await read_capped(resp, MAX_IDENTITY_BYTES))
            node_id, identity_key, encryption_key = doc["node_id"], doc["identity_key"], doc["encryption_key"]
            signed = f"hearth-identity-v1\n{node_id}\n{identity_key}\n{encryption_key}".encode()
            raw = b64d(identity_key, length=32)
            b64d(encryption_key, length=32)
            if (
                node_id != advert.node_id
                or fingerprint(raw) != advert.fingerprint
                or not verify_signature(raw, signed, b64d(doc["signature"]))
            ):
                raise ProtocolError("the identity does not match the advert")
        except (aiohttp.ClientError, TimeoutError, ValueError, KeyError, TypeError, ProtocolError) as exc:
            log.warning("ignoring discovered node %s: %s", advert.node_id, type(exc).__name__)
            return
        try:
            record = await self.store.write(
                lambda db: db.upsert_pending(
                    node_id=advert.node_id, source="discovered", tier=advert.tier, identity_key=identity_key,
                    encryption_key=encryption_key, fingerprint=advert.fingerprint, url=url,
                )
            )  # fmt: skip
        except ConflictError:
            log.warning("a LAN node claims the id %s with another key; ignored", advert.node_id)
            return
        self.remember(record)
        log.info("discovered node %s on the LAN; waiting for approval", advert.node_id)

    # calls to nodes

    def signed_headers(self, node_id: str, method: str, path: str, body: bytes) -> dict[str, str]:
        return sign_request(self.identity, method, path, body, audience=node_id)

    async def call(self, node_id: str, path: str, doc: dict[str, Any]) -> tuple[int, Any]:
        """A signed POST to a node; (status, JSON body or None)."""
        runtime = self.registry.nodes.get(node_id)
        record = self.records.get(node_id)
        url = (runtime.url if runtime else None) or (record.url if record else None)
        if url is None:
            raise ProtocolError(f"no address known for {node_id}")
        # The path as the request line will carry it (the client requotes it: "%21" goes as "!"), since
        # the node checks the signature against what it receives.
        path = str(URL(path))
        body = json.dumps(doc).encode()
        headers = {**self.signed_headers(node_id, "POST", path, body), "Content-Type": "application/json"}
        timeout = aiohttp.ClientTimeout(total=LOAD_CALL_TIMEOUT_S)
        async with self.session.post(
            url.rstrip("/") + path, data=body, headers=headers, timeout=timeout
        ) as r:
            try:
                return r.status, json.loads(await read_capped(r, MAX_IDENTITY_BYTES))
            except ValueError:
                return r.status, None

    def load_model(self, node_id: str, model: str, evict: tuple[str, ...]) -> None:
        """A cold load placement asked for (admission): in the background, its outcome in the registry."""
        self._spawn(self._load(node_id, model, evict))

    async def _load(self, node_id: str, model: str, evict: tuple[str, ...]) -> None:
        with contextlib.suppress(Unavailable):  # logged, and in the registry: the requests learn of it
            await self.ask_load(node_id, model, evict)

    async def ask_load(self, node_id: str, model: str, evict: tuple[str, ...]) -> tuple[int, Any]:
        """Ask a node to load one of its models, once ``registry.start_load`` noted that a load is under way
        (a cold load, or the operator's): the node's (status, body). A refusal or a node that cannot be
        reached ends the load in the registry, so nothing waits for it; the latter raises Unavailable."""
        try:
            status, doc = await self._model_call(node_id, model, "load", {"evict": list(evict)})
        except Unavailable:
            self.registry.load_refused(node_id, model)
            raise
        if status not in (200, 202):
            log.warning("node %s refused to load %s (status %d)", node_id, model, status)
            self.registry.load_refused(node_id, model)
        # A load taken needs no more here: the registry shows it loading until a heartbeat says how it
        # went (the answer "loading" may arrive after a heartbeat that says "ready", and must not undo it).
        return status, doc

    async def ask_unload(self, node_id: str, model: str) -> tuple[int, Any]:
        """Ask a node to unload one of its models (the operator's call): the node's (status, body); raises
        Unavailable when it cannot be reached."""
        status, doc = await self._model_call(node_id, model, "unload", {})
        if status == 200 and answered_phase(doc) == "available":
            self.registry.reported_phase(node_id, model, "available")
        return status, doc

    async def _model_call(
        self, node_id: str, model: str, action: Literal["load", "unload"], doc: dict[str, Any]
    ) -> tuple[int, Any]:
        try:
            return await self.call(node_id, model_path(model, action), doc)
        except (aiohttp.ClientError, TimeoutError, ProtocolError) as exc:
            log.warning("%s of %s on %s failed: %s", action, model, node_id, type(exc).__name__)
            self.registry.mark_failed(node_id)  # no new work until it is heard from again
            raise Unavailable(
                f"the node {node_id} cannot be reached ({type(exc).__name__}); try again once it is back",
                code="node_unreachable",
                retry_after=UNREACHABLE_RETRY_S,
            ) from None

    def push_certificate(self, node_id: str, public_url: str) -> None:
        """Hand an approved LAN node its certificate (a node enrolled with a code fetches it itself)."""
        record = self.records.get(node_id)
        if record is None or record.certificate is None:
            return
        self._spawn(self._push(node_id, {"certificate": record.certificate, "scheduler_url": public_url}))

    async def _push(self, node_id: str, doc: dict[str, Any]) -> None:
        try:
            status, _ = await self.call(node_id, "/certificate", doc)
        except (aiohttp.ClientError, TimeoutError, ProtocolError) as exc:
            log.warning("could not hand %s its certificate: %s", node_id, type(exc).__name__)
            return
        if status != 200:
            log.warning("node %s did not take its certificate (status %d)", node_id, status)

    def _spawn(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
