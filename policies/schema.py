"""The policy file's schema: groups, their limits and course prompts, terms of use, and retention.

One TOML file (`policies.toml`) holds a club's rules; it is validated against these models before it is
applied, and every field here is documented in docs/policies.md (a test checks that). A group names only
what differs from its parent; ``resolve`` turns the file into one flat ``GroupRules`` per group.
"""

from __future__ import annotations

import fnmatch
import functools
import re
from dataclasses import dataclass
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from protocol.federation import TIERS, Tier
from protocol.policy import Count, Limits
from protocol.rules import MAX_SYSTEM_PROMPT_CHARS

DEFAULT_GROUP = "default"
GROUP_NAME = r"^[a-z0-9][a-z0-9_.-]{0,63}$"
MAX_TERMS_CHARS = 100_000
GroupName = Annotated[str, StringConstraints(pattern=GROUP_NAME)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Group(Limits):
    """A group of tokens and its rules. The limits it inherits from Limits apply to each token in it."""

    description: str = Field(
        default="", max_length=500, description="What the group is for (shown to operators)."
    )
    parent: GroupName | None = Field(
        default=None, description="A group to inherit every unset field from (cycles are refused)."
    )
    models: list[Annotated[str, StringConstraints(min_length=1, max_length=200)]] | None = Field(
        default=None,
        description='Models the group may use: names or shell-style globs ("llama-3*"). Default: every '
        "model.",
    )
    max_tokens: Count | None = Field(
        default=None, description="Largest max_tokens a request may ask for (and the default)."
    )
    max_prompt_tokens: Count | None = Field(
        default=None,
        description="Largest prompt, in tokens as the scheduler estimates them (about 4 bytes each; a "
        "sealed prompt by its padded size). Larger prompts get 400.",
    )
    tiers: list[Tier] | None = Field(
        default=None,
        min_length=1,
        description='Node tiers the group\'s requests may reach: "club", "community". Default: both.',
    )
    require_e2e: bool | None = Field(
        default=None,
        description="Refuse the group's requests unless they come end-to-end encrypted (`hearth proxy`). "
        "Default: the scheduler's [scheduler.policy] require_e2e.",
    )
    weight: float | None = Field(
        default=None,
        gt=0,
        le=1000,
        description="Share in the fair queue: a token in a group of weight 2 is served twice as many tokens "
        "as one of weight 1 when both wait. Default 1.",
    )
    system_prompt: (
        Annotated[str, StringConstraints(min_length=1, max_length=MAX_SYSTEM_PROMPT_CHARS)] | None
    ) = Field(
        default=None,
        description="A course's system prompt, set by its instructor. The node puts it first in every "
        "request of the group after opening it, so it holds for sealed requests and the scheduler still "
        "reads no prompt; the client cannot remove it.",
    )
    total: Limits | None = Field(
        default=None,
        description="Limits on the whole group together (all its tokens), besides each token's own.",
    )


class Terms(_Strict):
    """Terms of use every token's holder must accept before generating."""

    version: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")] = Field(
        description="The version holders accept; a new version asks everyone again."
    )
    text: Annotated[str, StringConstraints(max_length=MAX_TERMS_CHARS)] | None = Field(
        default=None, description="The terms, inline."
    )
    file: str | None = Field(
        default=None,
        description="A file holding the terms (UTF-8), relative to the policy file. One of text or file.",
    )

    @model_validator(mode="after")
    def _one_source(self) -> Terms:
        if (self.text is None) == (self.file is None):
            raise ValueError("give the terms as text or as file, one of the two")
        return self


class Retention(_Strict):
    usage_days: int = Field(
        default=90,
        ge=1,
        le=36500,
        description="Days a request's usage row is kept; older rows are folded into daily totals per token, "
        "group, model and node.",
    )


class PolicyFile(_Strict):
    """The whole file."""

    groups: dict[GroupName, Group] = Field(
        default_factory=dict,
        description=f'Groups by name; tokens without one belong to "{DEFAULT_GROUP}" (implicitly unlimited '
        "when the file does not define it).",
    )
    terms: Terms | None = Field(default=None, description="Terms of use; none: nothing to accept.")
    retention: Retention = Field(default_factory=Retention, description="How long usage rows are kept.")

    @model_validator(mode="after")
    def _parents(self) -> PolicyFile:
        for name, group in self.groups.items():
            seen = [name]
            parent = group.parent
            while parent is not None:
                if parent not in self.groups:
                    raise ValueError(f"group {name!r} names an unknown parent {parent!r}")
                if parent in seen:
                    raise ValueError(f"groups {' -> '.join([*seen, parent])} inherit in a circle")
                seen.append(parent)
                parent = self.groups[parent].parent
        return self


@dataclass(frozen=True, slots=True)
class GroupRules:
    """One group's rules with inheritance applied: what the engine checks a request against."""

    name: str
    models: tuple[str, ...] | None  # None: every model
    max_tokens: int | None
    max_prompt_tokens: int | None
    tiers: frozenset[str]
    require_e2e: bool | None
    weight: float
    system_prompt: str | None
    each: Limits  # per token
    total: Limits  # the whole group together

    def allows_model(self, model: str) -> bool:
        return self.models is None or any(_glob(p).match(model) for p in self.models)


@functools.lru_cache(maxsize=1024)
def _glob(pattern: str) -> re.Pattern[str]:
    return re.compile(fnmatch.translate(pattern))


def resolve(policy: PolicyFile) -> dict[str, GroupRules]:
    """Every group's flat rules, and ``default`` (unlimited unless the file defines it)."""
    out: dict[str, GroupRules] = {}
    names = [*policy.groups]
    if DEFAULT_GROUP not in policy.groups:
        names.append(DEFAULT_GROUP)
    for name in names:
        chain: list[Group] = []
        current: str | None = name
        while current is not None and current in policy.groups:
            chain.append(policy.groups[current])
            current = policy.groups[current].parent
        merged = Group()
        total = Limits()
        for group in reversed(chain):  # the root first, each child over it
            fields = {k: v for k, v in group if v is not None and k not in ("total", "parent")}
            merged = merged.model_copy(update=fields)
            if group.total is not None:
                total = group.total.merged(total)
        out[name] = GroupRules(
            name=name,
            models=tuple(merged.models) if merged.models is not None else None,
            max_tokens=merged.max_tokens,
            max_prompt_tokens=merged.max_prompt_tokens,
            tiers=frozenset(merged.tiers if merged.tiers is not None else TIERS),
            require_e2e=merged.require_e2e,
            weight=merged.weight if merged.weight is not None else 1.0,
            system_prompt=merged.system_prompt,
            each=Limits.model_validate({k: getattr(merged, k) for k in Limits.model_fields}),
            total=total,
        )
    return out
