"""Wire documents of the policy: what `GET /v1/policy` tells a caller, and what the admin API's
`/admin/policy` and `/admin/events` carry. ``Limits`` is shared with the policy file's schema
(policies.schema), so a limit means the same thing in the file, the API and the console.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

Count = Annotated[int, Field(ge=1, le=10**12)]
MAX_POLICY_CHARS = 1024 * 1024


class Limits(BaseModel):
    """How much one holder may use. Unset means no limit of that kind."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    requests_per_minute: Count | None = Field(
        default=None, description="Requests admitted in any sliding 60 seconds."
    )
    tokens_per_minute: Count | None = Field(
        default=None,
        description="Tokens (prompt + completion; max_tokens counts until the answer ends) in any sliding "
        "60 seconds.",
    )
    concurrent_requests: Count | None = Field(
        default=None, description="Requests in flight at once (queued or streaming)."
    )
    tokens_per_day: Count | None = Field(
        default=None,
        description="Quota: prompt + completion tokens per calendar day (UTC). Reserved at admission, "
        "settled with the node's counts.",
    )
    tokens_per_month: Count | None = Field(
        default=None, description="Quota: prompt + completion tokens per calendar month (UTC)."
    )

    def merged(self, parent: Limits) -> Limits:
        """These limits, with what they leave unset taken from ``parent``."""
        return Limits.model_validate(
            {
                name: getattr(self, name) if getattr(self, name) is not None else getattr(parent, name)
                for name in Limits.model_fields
            }
        )


class _Reply(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GroupView(_Reply):
    """A group's rules as they apply (inheritance and the scheduler's baseline applied)."""

    name: str
    models: list[str] | None = Field(description="Model names and globs it may use; null: every model.")
    max_tokens: int | None = Field(description="The largest max_tokens a request may ask for.")
    max_prompt_tokens: int | None
    tiers: list[str] = Field(description="Node tiers its requests may reach.")
    require_e2e: bool
    weight: float = Field(description="Its share in the fair queue.")
    system_prompt: str | None = Field(description="The course prompt every request of the group starts with.")
    each: Limits = Field(description="Limits on each token of the group.")
    total: Limits = Field(description="Limits on the whole group together.")


class Meter(_Reply):
    """Counters as the scheduler keeps them now (tokens: used and reserved by requests in flight)."""

    requests_minute: int
    tokens_minute: int
    in_flight: int
    tokens_today: int
    tokens_this_month: int


class CallerTerms(_Reply):
    version: str | None = Field(description="The version in force; null: no terms to accept.")
    accepted: bool = Field(description="Whether this token's holder accepted that version.")


class CallerPolicy(_Reply):
    """`GET /v1/policy`: the rules that apply to the caller, and where they stand."""

    token_id: str
    group: str
    rules: GroupView
    usage: Meter = Field(description="This token's counters now.")
    group_usage: Meter = Field(description="The whole group's counters now.")
    terms: CallerTerms


class PolicyState(_Reply):
    """`GET /admin/policy`: the policy in force."""

    source: str = Field(description="The policy file it was loaded from, or (built in).")
    digest: str = Field(description="SHA-256 of the file as loaded: send it back with a change.")
    text: str | None = Field(description="The file as loaded (null when built in).")
    terms_version: str | None
    groups: list[GroupView]
    loaded_at: float | None = Field(default=None, description="Unix time this policy was put in force.")
    last_error: str | None = Field(
        default=None,
        description="Why the last reload was refused (file, line and field), while the file still has it: "
        "the policy in force is then the earlier one.",
    )


class PolicyUpdate(BaseModel):
    """`PUT /admin/policy`: a whole new policy file, validated before it is written and applied."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    text: Annotated[str, StringConstraints(max_length=MAX_POLICY_CHARS)] = Field(
        description="The policy file's new text (TOML)."
    )
    digest: str | None = Field(
        default=None,
        description="The digest of the policy this change was made from: if the file changed since, the "
        "change is refused (409) rather than overwriting someone else's.",
    )


EventKind = Literal[
    "node_joined", "node_left", "node_healthy", "node_unhealthy", "node_yielding", "node_working",
    "admitted", "refused", "finished", "policy_reloaded", "dropped",
]  # fmt: skip


class AdminEvent(BaseModel):
    """One event of `GET /admin/events` (server-sent events; metadata only, never a prompt)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    seq: int = Field(description="Increasing per scheduler process.")
    at: float = Field(description="Unix time.")
    kind: EventKind
    node_id: str | None = None
    group: str | None = None
    model: str | None = None
    status: str | int | None = None
    refusal: str | None = Field(default=None, description="The kind of limit that refused a request.")
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    ttft_ms: float | None = Field(default=None, description="finished: time to the answer's first token.")
    request_id: str | None = Field(default=None, description="finished: the answer's x-request-id.")
    outcome: str | None = Field(default=None, description="policy_reloaded: applied or refused.")
    count: int | None = Field(default=None, description="dropped: events this stream lost (it fell behind).")
