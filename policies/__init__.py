"""The policy engine: pure decisions about who may send what.

It sees only what the scheduler may see of a request (model, max_tokens, a prompt size estimate, whether the
body is sealed), never its text, so the same rules hold once prompts are end-to-end encrypted.

- ``policies.schema``: the policy file (groups, limits, course prompts, terms, retention) and ``resolve``;
- ``policies.engine``: ``decide(principal, visible, window) -> Allowed | Refused``;
- here: the scheduler-wide baseline (``[scheduler.policy]``) that every group's rules sit under.
"""

from __future__ import annotations

from dataclasses import replace

from pydantic import BaseModel, ConfigDict, Field

from policies.engine import (
    Allowed,
    Decision,
    Meter,
    Principal,
    RateFigures,
    Refused,
    UsageWindow,
    Visible,
    decide,
    duration,
)
from policies.schema import DEFAULT_GROUP, GroupRules, PolicyFile, resolve
from protocol.federation import TIERS, Tier
from protocol.policy import Limits

__all__ = [
    "DEFAULT_GROUP",
    "Allowed",
    "Decision",
    "GroupRules",
    "Limits",
    "Meter",
    "Policy",
    "PolicyFile",
    "Principal",
    "RateFigures",
    "Refused",
    "UsageWindow",
    "Visible",
    "decide",
    "duration",
    "effective",
    "resolve",
]


class Policy(BaseModel):
    """The scheduler's own baseline: no group can loosen it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    require_e2e: bool | None = Field(
        default=None,
        description="Refuse requests the scheduler could read: every prompt must come sealed through "
        "`hearth proxy`. Unset means the role's default: `hearth scheduler start` (a federation) requires "
        "it, `hearth up` (one user on one machine) does not. A group's require_e2e can only add to it.",
    )
    max_tokens_cap: int = Field(
        default=8192, ge=1, description="Largest max_tokens any request may ask for, whatever its group."
    )
    tiers: list[Tier] = Field(
        default_factory=lambda: list(TIERS),
        min_length=1,
        description="Node tiers requests may be placed on: `club` (club-run servers) and `community` "
        '(volunteers\' machines). A club that wants prompts to stay on its own servers sets ["club"]. A '
        "group's tiers are narrowed to these.",
    )


def effective(baseline: Policy, group: GroupRules) -> GroupRules:
    """A group's rules under the scheduler's baseline: the stricter of the two wherever both speak."""
    cap = (
        baseline.max_tokens_cap
        if group.max_tokens is None
        else min(group.max_tokens, baseline.max_tokens_cap)
    )
    return replace(
        group,
        max_tokens=cap,
        tiers=group.tiers & frozenset(baseline.tiers),
        require_e2e=bool(baseline.require_e2e) or bool(group.require_e2e),
    )
