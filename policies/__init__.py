"""The policy engine: pure decisions about who may send what.

It sees only what the scheduler may see of a request (model, max_tokens, whether the body is sealed),
never its text, so the same rules hold once prompts are end-to-end encrypted.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

from protocol.errors import InvalidRequest, PermissionDenied
from protocol.federation import TIERS, Tier


class Policy(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    require_e2e: bool | None = Field(
        default=None,
        description="Refuse requests the scheduler could read: every prompt must come sealed through "
        "`hearth proxy`. Unset means the role's default: `hearth scheduler start` (a federation) requires "
        "it, `hearth up` (one user on one machine) does not.",
    )
    max_tokens_cap: int = Field(default=8192, ge=1, description="Largest max_tokens any request may ask for.")
    tiers: list[Tier] = Field(
        default_factory=lambda: list(TIERS),
        min_length=1,
        description="Node tiers requests may be placed on: `club` (club-run servers) and `community` "
        '(volunteers\' machines). A club that wants prompts to stay on its own servers sets ["club"].',
    )


@dataclass(frozen=True, slots=True)
class Visible:
    """What the scheduler knows about a request."""

    model: str
    max_tokens: int | None
    sealed: bool


def check(policy: Policy, request: Visible) -> None:
    """Raise the refusal the request earns, or return None when it may proceed."""
    if not request.sealed and policy.require_e2e:
        raise PermissionDenied(
            "this scheduler accepts only end-to-end encrypted requests; send them through `hearth proxy`",
            code="e2e_required",
        )
    if request.max_tokens is not None and request.max_tokens > policy.max_tokens_cap:
        raise InvalidRequest(
            f"max_tokens may be at most {policy.max_tokens_cap} here",
            param="max_tokens",
            code="max_tokens_over_cap",
        )
