"""Wire schemas of the admin API (admin-scope tokens): the bodies it takes and the documents it answers.

The scheduler validates requests and builds its replies with these models, and the OpenAPI document is
generated from them, so what is documented is what is sent. Unknown request fields are ignored, as in the
public API, so an older scheduler still serves a newer client.

Request strings are strict: JSON can carry lone surrogates ("\\ud800"), which no database or log can
encode, and pydantic refuses them as it parses.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat

from protocol.federation import ModelPhase, Tier

EnrollmentState = Literal["pending", "approved", "rejected", "revoked"]
# How the scheduler learned of a node: a code (`hearth node enroll`), the LAN, or `hearth up`'s own node.
EnrollmentSource = Literal["code", "discovered", "local"]

MIN_CODE_TTL_S = 60
MAX_CODE_TTL_S = 30 * 24 * 3600
MAX_NOTE = 200


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class _Reply(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ----- requests -----


class EnrollmentCodeRequest(_Body):
    tier: Tier = Field(description="The tier a node enrolling with this code joins.")
    ttl_seconds: (
        Annotated[StrictFloat, Field(ge=MIN_CODE_TTL_S, le=MAX_CODE_TTL_S, allow_inf_nan=False)] | None
    ) = Field(
        default=None, description="Seconds the code stays valid (default: scheduler.enrollment_code_ttl)."
    )
    note: str = Field(default="", max_length=MAX_NOTE, description="For the operator's audit log.")


class ApproveRequest(_Body):
    certificate: dict[str, Any] = Field(
        description="The node's certificate document {certificate, signature}, signed by the federation "
        "authority key (`hearth enroll approve` signs it on the operator's machine)."
    )


class DrainRequest(_Body):
    drain: StrictBool = Field(default=True, description="true: finish running jobs, take no new ones.")


# ----- replies -----


class EnrollmentCode(_Reply):
    code: str = Field(description="The one-time code; the scheduler keeps only its hash.")
    tier: Tier
    expires: float = Field(description="Unix time after which the code is refused.")


class _NodeRecord(_Reply):
    node_id: str
    state: EnrollmentState
    source: EnrollmentSource
    tier: Tier
    fingerprint: str = Field(description="The first 10 bytes of SHA-256 of the identity key, in hex.")
    identity_key: str = Field(description="Ed25519 public key, base64url.")
    encryption_key: str = Field(description="X25519 public key, base64url.")
    url: str | None = Field(description="Where the scheduler reaches the node (null until it is heard).")
    drain: bool
    created: float
    updated: float
    gpus: str | None = Field(default=None, description="Once the node was heard from.")
    memory_total_bytes: int | None = None
    memory_free_bytes: int | None = None


class Enrollment(_NodeRecord):
    models: list[str] | None = Field(
        default=None, description="Model ids the node reported, once heard from."
    )


class EnrollmentList(_Reply):
    enrollments: list[Enrollment]


class NodeModel(_Reply):
    id: str
    phase: ModelPhase
    active: int = Field(description="Jobs running now.")
    context_length: int | None
    cache_tokens: int
    page_tokens: int
    max_sequences: int
    footprint_bytes: int = Field(
        default=0, description="Memory the model holds on the node: weights, cache and a reserve."
    )
    tokens_per_s: float = Field(
        default=0.0,
        description="Tokens per second one answer got, as the node measured it (an average over its recent "
        "answers, whole answers including their prompts); 0 until one finished.",
    )


class Node(_NodeRecord):
    healthy: bool
    draining: bool
    yielding: bool = Field(description="The node yields to its owner's own work.")
    yield_reason: str | None = Field(description="Why it yields, in the node's words.")
    last_heartbeat_seconds: float | None
    alarm: str | None = Field(description="The node's own alarm: the directory does not show its key.")
    key_id: str | None = Field(description="The id of the node's encryption key the directory shows.")
    models: list[NodeModel]


class NodeList(_Reply):
    nodes: list[Node]
    queued: int = Field(description="Requests waiting in the scheduler's fair queue.")


class ModelHost(_Reply):
    node_id: str
    phase: ModelPhase
    active: int
    healthy: bool


class ModelPlacement(_Reply):
    id: str
    nodes: list[ModelHost]


class ModelPlacements(_Reply):
    models: list[ModelPlacement]


class AuthorityKeys(_Reply):
    authority_key: str | None = Field(description="The authority key this scheduler trusts (null: none).")
    scheduler_key: str = Field(description="The scheduler's own public key, which certificates name.")


class ModelActionRequest(_Body):
    evict: list[str] = Field(
        default=[],
        max_length=64,
        description="load: models of the node to unload first if its memory is short (by default the node "
        "unloads idle ones, least recently used first).",
    )


class ModelAction(_Reply):
    """What a node answered the operator's load or unload of one of its models."""

    node_id: str
    model: str
    phase: ModelPhase | None = Field(
        description="The model's phase on the node after the call, if it said: a load answers loading (or "
        "ready, when it already was), an unload available."
    )


# ----- the queue: metadata only, never a prompt -----

JobState = Literal["waiting", "running"]


class QueueJob(_Reply):
    request_id: str = Field(description="The id the answer's x-request-id header carries.")
    token_id: str = Field(description="The token it came with: the fair queue's user.")
    group: str | None = Field(description="The token's policy group.")
    model: str
    sealed: bool = Field(description="End-to-end encrypted: the scheduler cannot read it.")
    state: JobState
    node_id: str | None = Field(description="The node running it (null while it waits).")
    age_seconds: float = Field(description="Since the scheduler admitted it.")
    waited_seconds: float = Field(description="In the fair queue: so far, or until it started.")
    streamed: int = Field(
        description="Answer chunks relayed so far (about one token each when streaming; 0 until the end "
        "otherwise)."
    )
    attempts: int = Field(description="Nodes tried, counting this one (more than 1 after a failover).")


class QueueUser(_Reply):
    """One user's fair-share standing (scheduler.fairness): who is served next, and by how far."""

    token_id: str
    group: str | None
    weight: float = Field(description="Their share of the queue (their group's weight).")
    waiting: int
    running: int
    ahead_tokens: float = Field(
        description="Weighted tokens of service this user has had beyond the least-served user who waits: "
        "0 is next in line, larger waits longer."
    )


class QueueState(_Reply):
    waiting: list[QueueJob] = Field(description="Oldest first.")
    running: list[QueueJob] = Field(description="Oldest first.")
    users: list[QueueUser] = Field(description="Users with work waiting or running, next in line first.")
    max_queued: int = Field(description="scheduler.max_queued: beyond this, requests get 503 queue_full.")
