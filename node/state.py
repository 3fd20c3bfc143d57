"""What the node agent's handlers and background tasks share: its state, the application's keys to it, and
the check every scheduler-only call starts with. Its own module, so the parts that take the state (the job
path, heartbeats, owner-first yielding) import it without importing the app that wires them.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import web

from hardware.probe import NodeProbe
from node.keys import NodeKeys, ReplayMemory
from node.metrics import NodeMetrics
from node.owner import OwnerFirst
from node.pool import BackendLoader, ModelPool
from node.receipts import Receipts
from node.settings import NodeSettings
from node.trust import Trust
from protocol.directory import Directory
from protocol.errors import Unavailable
from protocol.identity import RequestVerifier, fingerprint


def _version() -> str:
    try:
        return importlib.metadata.version("hearth-llm")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "0+unknown"


VERSION = _version()  # what heartbeats and /status report, from the installed package's metadata


@dataclass
class NodeState:
    """What the node's handlers and background tasks share."""

    settings: NodeSettings
    trust: Trust
    pool: ModelPool
    verifier: RequestVerifier
    keys: NodeKeys
    replay: ReplayMemory
    url: str | None = None
    key_alarm: str | None = None  # the directory does not show this node's current key (see node.heartbeat)
    directory: Directory | None = None  # the scheduler's directory as this node last verified it
    draining: bool = False
    reply_interval: float | None = None  # the heartbeat interval the scheduler asked for
    offered_key: bytes | None = None  # the scheduler key a certificate being handed over names
    listening: asyncio.Event = field(default_factory=asyncio.Event)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    advert_changed: asyncio.Event = field(default_factory=asyncio.Event)
    receipts: Receipts = field(default_factory=Receipts)  # jobs run, for the next heartbeats
    owner: OwnerFirst | None = None  # owner-first yielding (node.owner)

    def __post_init__(self) -> None:
        # A certificate handed over at approval must come signed by the scheduler it names (and only once).
        self.cert_verifier = RequestVerifier(self.settings.node_id, self._offered)

    def _offered(self, fp: str) -> bytes | None:
        key = self.offered_key
        return key if key is not None and fingerprint(key) == fp else None

    def touch(self) -> None:
        self.changed.set()
        self.advert_changed.set()

    def refuse_if_yielding(self) -> None:
        owner = self.owner
        if owner is not None and owner.yielding:
            raise Unavailable(
                f"this node is yielding to its owner ({owner.reason}); it takes no new work until then",
                code="node_yielding",
                retry_after=max(5, int(owner.settings.resume_after)),
            )


SETTINGS = web.AppKey("settings", NodeSettings)
STATE = web.AppKey("state", NodeState)
METRICS = web.AppKey("metrics", NodeMetrics)
LOADER: web.AppKey[BackendLoader] = web.AppKey("loader")
PROBE: web.AppKey[Callable[[], NodeProbe]] = web.AppKey("probe")
TRUST = web.AppKey("trust", Trust)


async def authorize(request: web.Request, body: bytes = b"") -> NodeState:
    """The node's state, once the call is shown to be its scheduler's (signed, fresh, addressed here)."""
    state = request.app[STATE]
    state.verifier.verify(request.method, request.path_qs, request.headers, body)
    return state
