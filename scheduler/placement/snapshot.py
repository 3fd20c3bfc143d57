"""The data placement decides over: a frozen snapshot of the cluster and what is known of one request.

Everything here is immutable and holds plain numbers, so filters and scorers are pure functions that can
be table-tested and benchmarked without a network. The registry builds a snapshot from the nodes'
heartbeats plus the scheduler's own count of work in flight; placement never does I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

# available: the node can load it on demand; loading: a load is under way; ready: it serves now;
# failed: its last load failed on this node.
ModelPhase = Literal["available", "loading", "ready", "failed"]

# busy: worth waiting for in the queue (capacity is taken, a load is under way);
# unavailable: retry later but do not queue (the node is down, draining, yielding, or the model failed);
# never: this request can never run there (too large, context too long, tier not allowed);
# unknown_model: the node does not serve the model at all.
RefusalKind = Literal["busy", "unavailable", "never", "unknown_model"]

Action = Literal["run", "load"]


@dataclass(frozen=True, slots=True)
class ModelState:
    """One model on one node, as of the last heartbeat plus the scheduler's in-flight bookkeeping."""

    id: str
    phase: ModelPhase
    context_length: int | None  # tokens, prompt included; None until known
    footprint_bytes: int  # memory the model holds once loaded: weights + cache + reserve
    cache_tokens: int = 0  # KV-cache tokens for all sequences together (0 while not loaded)
    page_tokens: int = 1  # the backend reserves cache in pages of this many tokens (exllamav2: 256)
    max_sequences: int = 1  # sequences the backend runs at once
    default_max_tokens: int = 1024  # what the node generates when a request sets no max_tokens
    active: int = 0  # jobs the scheduler has in flight there, plus any the node reports on its own
    reserved_tokens: int = 0  # cache tokens those jobs reserved (prompt + max_tokens each)
    outstanding_tokens: int = 0  # tokens those jobs may still generate
    tokens_per_s: float = 0.0  # measured decode speed, 0 when not yet measured
    load_seconds: float = 0.0  # estimated cold-load time
    last_used: float = 0.0  # monotonic seconds of its last job (LRU eviction)

    @property
    def warm(self) -> bool:
        return self.phase in ("ready", "loading")

    @property
    def idle(self) -> bool:
        return self.phase == "ready" and self.active == 0


@dataclass(frozen=True, slots=True)
class NodeState:
    node_id: str
    tier: str
    healthy: bool
    draining: bool = False
    yielding: bool = False
    yield_reason: str | None = None  # the node's words: what its owner is doing
    memory_total_bytes: int = 0  # VRAM of its GPUs, or a CPU node's declared memory budget
    memory_free_bytes: int = 0  # of which not held by loaded models or other processes
    models: tuple[ModelState, ...] = ()

    def model(self, model_id: str) -> ModelState | None:
        for m in self.models:
            if m.id == model_id:
                return m
        return None


@dataclass(frozen=True, slots=True)
class ClusterSnapshot:
    nodes: tuple[NodeState, ...]

    def model_ids(self) -> list[str]:
        """Models some node serves now or can load."""
        return sorted({m.id for n in self.nodes for m in n.models if m.phase != "failed"})


@dataclass(frozen=True, slots=True)
class PlacementRequest:
    model: str
    max_tokens: int | None  # None: the node's default_max_tokens for the model
    prompt_tokens: int = 0  # an estimate from the visible (padded) length; the node counts exactly
    tiers: frozenset[str] = frozenset({"club", "community"})  # tiers this request may reach
    exclude: frozenset[str] = frozenset()  # nodes already tried for this request (failover)
    candidates: frozenset[str] | None = None  # a sealed request's candidate nodes; None: any node


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a node (or the whole cluster) cannot take a request, in numbers the API and TUI can show."""

    kind: RefusalKind
    resource: str  # what ran out or does not match: "model", "health", "drain", "tier", "context",
    # "memory", "cache", "sequences", "loading", ...
    reason: str  # one sentence for the person who sent the request; never request text
    node_id: str | None = None
    requested: int | None = None
    free: int | None = None


@dataclass(frozen=True, slots=True)
class Placement:
    node_id: str
    score: float
    action: Action = "run"  # "load": the node must load the model first
    evict: tuple[str, ...] = field(default=())  # idle models to unload first, least recently used first
