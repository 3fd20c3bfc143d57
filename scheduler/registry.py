"""The scheduler's view of its approved nodes: heartbeats in, a frozen snapshot out.

Nodes push signed heartbeats (protocol.federation.NodeStatus); the registry keeps the last one per node
plus its own bookkeeping of the work it has in flight there, which is fresher than any heartbeat. Each
node's `NodeState` is rebuilt only when that node changes, and the cluster snapshot is the tuple of them,
rebuilt lazily after a change or when a node's heartbeat grows stale. Placement reads the snapshot and
nothing else.

Only approved nodes are here: a pending, rejected or revoked node is never capacity.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from protocol.federation import ModelPhase, ModelStatus, NodeStatus
from protocol.identity import b64d
from scheduler.placement import ClusterSnapshot, ModelState, NodeState
from scheduler.store import NodeRecord


@dataclass
class _Inflight:
    active: int = 0
    reserved: int = 0
    outstanding: int = 0


@dataclass(frozen=True, slots=True)
class Ticket:
    """One request's claim on a node's capacity, returned when it ends."""

    node_id: str
    model: str
    reserved: int  # cache tokens held on the node (whole pages)
    max_new: int
    user: str = ""
    prompt: int = 0  # prompt tokens charged to the user when it began (refunded against the real count)


@dataclass
class NodeRuntime:
    record: NodeRecord
    identity_raw: bytes
    status: NodeStatus | None = None
    last_seen: float = -math.inf
    failed: bool = False  # a relay saw it fail; cleared by its next heartbeat
    inflight: dict[str, _Inflight] = field(default_factory=dict)
    loading: dict[str, float] = field(default_factory=dict)  # loads we asked for → when
    ended: dict[str, float] = field(default_factory=dict)  # model → when our last job there ended
    models: dict[str, ModelState] = field(default_factory=dict)  # cached per model, rebuilt on change
    load_failed: set[str] = field(default_factory=set)

    @property
    def node_id(self) -> str:
        return self.record.node_id

    @property
    def url(self) -> str | None:
        return self.status.url if self.status is not None else self.record.url


class Registry:
    def __init__(
        self,
        *,
        node_timeout: float,
        load_timeout: float,
        on_change: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._timeout = node_timeout
        self._load_timeout = load_timeout
        self.on_change = on_change
        self._clock = clock
        self.nodes: dict[str, NodeRuntime] = {}
        self._states: dict[str, NodeState] = {}
        self._snapshot: ClusterSnapshot | None = None
        self._stale_at = math.inf  # when some healthy node's last heartbeat expires

    # membership (operator decisions)

    def approve(self, record: NodeRecord) -> None:
        old = self.nodes.get(record.node_id)
        runtime = NodeRuntime(record, b64d(record.identity_key, length=32))
        if old is not None and old.identity_raw == runtime.identity_raw:
            runtime.status, runtime.last_seen, runtime.inflight = old.status, old.last_seen, old.inflight
        self.nodes[record.node_id] = runtime
        self._touch(record.node_id)

    def remove(self, node_id: str) -> None:
        """Revoked or rejected: from now on the node gets no work."""
        if self.nodes.pop(node_id, None) is not None:
            self._states.pop(node_id, None)
            self._snapshot = None
            self.on_change()

    def set_drain(self, node_id: str, drain: bool) -> None:
        runtime = self.nodes.get(node_id)
        if runtime is not None:
            runtime.record = replace(runtime.record, drain=drain)
            self._touch(node_id)

    def identity_key(self, fingerprint: str) -> bytes | None:
        for runtime in self.nodes.values():
            if runtime.record.fingerprint == fingerprint:
                return runtime.identity_raw
        return None

    # heartbeats

    def heartbeat(self, node_id: str, status: NodeStatus) -> None:
        runtime = self.nodes[node_id]
        runtime.status = status
        runtime.last_seen = self._clock()
        runtime.failed = False
        for m in status.models:
            if m.phase in ("ready", "failed"):
                runtime.loading.pop(m.id, None)
            if m.phase == "ready":
                runtime.load_failed.discard(m.id)
        self._touch(node_id)

    def mark_failed(self, node_id: str) -> None:
        """A relay or a load saw the node fail: no new work until it is heard from again."""
        runtime = self.nodes.get(node_id)
        if runtime is not None and not runtime.failed:
            runtime.failed = True
            self._touch(node_id)

    def healthy(self, node_id: str) -> bool:
        runtime = self.nodes.get(node_id)
        return runtime is not None and self._healthy(runtime, self._clock())

    def _healthy(self, runtime: NodeRuntime, now: float) -> bool:
        return runtime.status is not None and not runtime.failed and now - runtime.last_seen < self._timeout

    # loads on demand

    def start_load(self, node_id: str, model: str) -> bool:
        """Note that a load was asked for; False when one is already under way (one load per model)."""
        runtime = self.nodes[node_id]
        if model in runtime.loading:
            return False
        runtime.loading[model] = self._clock()
        runtime.load_failed.discard(model)
        self._touch(node_id)
        return True

    def reported_phase(self, node_id: str, model: str, phase: ModelPhase) -> None:
        """A node answered a call with the model's phase (an unload: available): that stands until its next
        heartbeat, so an unloaded model gets no more work in between."""
        runtime = self.nodes.get(node_id)
        if runtime is None or runtime.status is None:
            return
        models = [
            m.model_copy(update={"phase": phase}) if m.id == model else m for m in runtime.status.models
        ]
        runtime.status = runtime.status.model_copy(update={"models": models})
        self._touch(node_id)

    def load_refused(self, node_id: str, model: str) -> None:
        runtime = self.nodes.get(node_id)
        if runtime is not None:
            runtime.loading.pop(model, None)
            runtime.load_failed.add(model)
            self._touch(node_id)

    # work in flight

    def begin(
        self, node_id: str, model: str, reserved: int, max_new: int, *, user: str = "", prompt: int = 0
    ) -> Ticket:
        entry = self.nodes[node_id].inflight.setdefault(model, _Inflight())
        entry.active += 1
        entry.reserved += reserved
        entry.outstanding += max_new
        self._touch(node_id, model)
        return Ticket(node_id, model, reserved, max_new, user, prompt)

    def end(self, ticket: Ticket) -> None:
        runtime = self.nodes.get(ticket.node_id)
        if runtime is None:
            return
        entry = runtime.inflight.get(ticket.model)
        if entry is not None:
            entry.active -= 1
            entry.reserved -= ticket.reserved
            entry.outstanding -= ticket.max_new
            if entry.active <= 0:
                del runtime.inflight[ticket.model]
        runtime.ended[ticket.model] = self._clock()
        self._touch(ticket.node_id, ticket.model)

    # the snapshot

    def snapshot(self) -> ClusterSnapshot:
        now = self._clock()
        if self._snapshot is not None and now < self._stale_at:
            return self._snapshot
        stale_at = math.inf
        for node_id, runtime in self.nodes.items():
            state = self._states.get(node_id)
            if state is None or state.healthy != self._healthy(runtime, now):
                state = self._states[node_id] = self._state(runtime, now)
            if state.healthy:
                stale_at = min(stale_at, runtime.last_seen + self._timeout)
        self._snapshot = ClusterSnapshot(tuple(self._states[n] for n in self.nodes))
        self._stale_at = stale_at
        return self._snapshot

    def _touch(self, node_id: str, model: str | None = None) -> None:
        """Something about ``node_id`` changed (only ``model``'s figures, when given)."""
        self._states.pop(node_id, None)
        runtime = self.nodes.get(node_id)
        if runtime is not None:
            if model is None:
                runtime.models.clear()
            else:
                runtime.models.pop(model, None)
        self._snapshot = None
        self.on_change()

    def _state(self, runtime: NodeRuntime, now: float) -> NodeState:
        status = runtime.status
        if status is None:
            return NodeState(runtime.node_id, runtime.record.tier, healthy=False)
        for model, asked in list(runtime.loading.items()):
            if now - asked > self._load_timeout:
                del runtime.loading[model]
                runtime.load_failed.add(model)
        return NodeState(
            node_id=runtime.node_id,
            tier=runtime.record.tier,
            healthy=self._healthy(runtime, now),
            draining=runtime.record.drain or status.draining,
            yielding=status.yielding,
            yield_reason=status.yield_reason,
            memory_total_bytes=status.memory_total_bytes,
            memory_free_bytes=status.memory_free_bytes,
            models=tuple(self._cached_model(runtime, m, now) for m in status.models),
        )

    def _cached_model(self, runtime: NodeRuntime, m: ModelStatus, now: float) -> ModelState:
        state = runtime.models.get(m.id)
        if state is None:
            state = runtime.models[m.id] = self._model(runtime, m, now)
        return state

    def _model(self, runtime: NodeRuntime, m: ModelStatus, now: float) -> ModelState:
        mine = runtime.inflight.get(m.id) or _Inflight()
        # Until the scheduler has sent a job of its own to this model, the node's count stands for jobs it
        # does not know of (those from before a restart). From then on its own count is fresher than any
        # heartbeat, which may have been sent just before a job ended.
        reported = 0 if m.id in runtime.ended or m.id in runtime.inflight else m.active + m.queued
        phase = m.phase
        if m.id in runtime.loading and phase == "available":
            phase = "loading"
        elif m.id in runtime.load_failed and phase != "ready":
            phase = "failed"
        return ModelState(
            id=m.id,
            phase=phase,
            context_length=m.context_length,
            footprint_bytes=m.footprint_bytes,
            cache_tokens=m.cache_tokens,
            page_tokens=m.page_tokens,
            max_sequences=m.max_sequences,
            default_max_tokens=m.default_max_tokens,
            active=max(mine.active, reported),
            reserved_tokens=mine.reserved,
            outstanding_tokens=mine.outstanding,
            tokens_per_s=m.tokens_per_s,
            load_seconds=m.load_seconds,
            last_used=now - m.idle_seconds,
        )
