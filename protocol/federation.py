"""Wire schemas between nodes and their scheduler: enrollment and heartbeats.

    POST /v1/enroll            node → scheduler, authenticated by a one-time enrollment code
    POST /v1/nodes/heartbeat   node → scheduler, signed with the node's identity key (protocol.identity)

A heartbeat carries what placement needs and nothing a user typed: memory, loaded models, cache, queue and
measured speed, and the usage receipts of the jobs the node ran since its last heartbeat (its signature on
the heartbeat makes them the node's signed account of the tokens it served). Nodes are run by volunteers
and are not trusted to send sane numbers, so every field is bounded here and a document that breaks a
bound is refused as a whole.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from protocol.errors import InvalidRequest, ProtocolError

Tier = Literal["club", "community"]
TIERS: tuple[Tier, ...] = ("club", "community")
ModelPhase = Literal["available", "loading", "ready", "failed"]

NODE_ID_PATTERN = r"^[a-z0-9][a-z0-9-]{0,62}$"
NodeId = Annotated[str, StringConstraints(pattern=NODE_ID_PATTERN)]
ModelId = Annotated[str, StringConstraints(min_length=1, max_length=256)]
Key = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{43}$")]  # 32 raw bytes, base64url
Count = Annotated[int, Field(ge=0, le=2**31 - 1)]
Bytes = Annotated[int, Field(ge=0, le=2**60)]
# Printable ASCII only (a host in IDNA form): a class like [^\s] means other characters to other regex
# engines, and the OpenAPI document's readers must agree with pydantic on what is valid.
Url = Annotated[str, StringConstraints(pattern=r"^https?://[!-.0-~]+(/[!-~]*)?$", max_length=512)]

JobId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,64}$")]

MAX_MODELS = 256
MAX_RECEIPTS = 1024  # per heartbeat; a node with more sends the rest with its next ones
MAX_DOC_BYTES = 256 * 1024


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelStatus(_Wire):
    id: ModelId
    phase: ModelPhase
    context_length: Count | None = None
    footprint_bytes: Bytes = 0
    cache_tokens: Count = 0
    cache_free_tokens: Count | None = None  # not reserved by running jobs, as of this heartbeat
    # The cache is reserved in pages of this many tokens (unpaged exllamav2: the whole cache is one page).
    page_tokens: Annotated[int, Field(ge=1, le=2**31 - 1)] = 1
    max_sequences: Annotated[int, Field(ge=1, le=4096)] = 1
    default_max_tokens: Annotated[int, Field(ge=1, le=2**31 - 1)] = 1024
    active: Count = 0
    queued: Count = 0
    tokens_per_s: Annotated[float, Field(ge=0, le=1e7)] = 0.0
    load_seconds: Annotated[float, Field(ge=0, le=1e6)] = 0.0
    idle_seconds: Annotated[float, Field(ge=0, le=1e9)] = 0.0
    started: Count = 0  # jobs that ran, since the node started
    skipped: Count = 0  # jobs whose client left before they ran
    template: Annotated[str, StringConstraints(max_length=64)] | None = None


class UsageReceipt(_Wire):
    """One job the node ran (the scheduler's job id) and the token counts it streamed for it."""

    job_id: JobId
    prompt_tokens: Count
    completion_tokens: Count


class NodeStatus(_Wire):
    node_id: NodeId
    version: Annotated[str, StringConstraints(max_length=64)]
    url: Url
    tier: Tier
    gpus: Annotated[str, StringConstraints(max_length=200)] = "cpu"
    memory_total_bytes: Bytes
    memory_free_bytes: Bytes
    draining: bool = False
    yielding: bool = False
    yield_reason: Annotated[str, StringConstraints(max_length=300)] | None = None  # why, for the operator
    models: Annotated[list[ModelStatus], Field(max_length=MAX_MODELS)] = []
    # The node's current encryption-key statement (protocol.directory), checked by the scheduler and
    # appended to the directory when it is new.
    key_statement: dict[str, Any] | None = None
    alarm: Annotated[str, StringConstraints(max_length=200)] | None = None
    usage: Annotated[list[UsageReceipt], Field(max_length=MAX_RECEIPTS)] = []


class HeartbeatReply(_Wire):
    """What the scheduler answers an approved node: its certificate, and whether to drain."""

    certificate: dict[str, Any] | None = None
    drain: bool = False
    interval: float = Field(gt=0, le=3600)


class EnrollRequest(_Wire):
    code: Annotated[str, StringConstraints(min_length=8, max_length=128)]
    node_id: NodeId
    identity_key: Key
    encryption_key: Key
    url: Url | None = None
    proof: Annotated[str, StringConstraints(max_length=128)]  # identity signature over proof_message()


class EnrollReply(_Wire):
    enrollment_id: str
    node_id: NodeId
    tier: Tier
    scheduler_key: Key
    authority_key: Key | None


def proof_message(code: str, node_id: str, identity_key: str, encryption_key: str) -> bytes:
    """What an enrolling node signs: proves it holds the identity key it asks to be certified."""
    return f"hearth-enroll-v1\n{code}\n{node_id}\n{identity_key}\n{encryption_key}".encode()


def parse(model: type[_Wire], doc: Any, *, untrusted_peer: bool = True) -> Any:
    """Validate a decoded document: ProtocolError for what a peer answered (a bad gateway to whoever asked),
    InvalidRequest for what a client sent, a person or a node calling the scheduler (its own mistake)."""
    try:
        return model.model_validate(doc)
    except ValidationError as exc:
        err = exc.errors(include_input=False, include_url=False, include_context=False)[0]
        where = ".".join(str(p) for p in err["loc"]) or "document"
        message = f"malformed {model.__name__}: {where}: {err['msg']}"
        if untrusted_peer:
            raise ProtocolError(message) from None
        raise InvalidRequest(message, param=where if err["loc"] else None) from None
