"""The rules a scheduler hands a node with each job: what the group's policy asks of the node itself.

They ride beside the request (plaintext or sealed), never inside it: the client's proxy seals the request,
and the scheduler adds the rules of the token's group to the job it signs for the node, so a client can
neither see them altered in transit nor strip them (docs/privacy.md, "Course prompts").
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StringConstraints

MAX_SYSTEM_PROMPT_CHARS = 8000
SystemPrompt = Annotated[str, StringConstraints(min_length=1, max_length=MAX_SYSTEM_PROMPT_CHARS)]


class JobRules(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    system_prompt: SystemPrompt | None = Field(
        default=None,
        description="The course's system prompt: the node puts it first in the conversation (chat) or "
        "before the prompt (completions), after opening the request.",
    )
    max_total_tokens: Annotated[StrictInt, Field(ge=1)] | None = Field(
        default=None,
        description="The most tokens (prompt + completion) this job may use: what the scheduler reserved "
        "of the holder's quota. The node shortens the answer to fit, or refuses a prompt that alone is "
        "larger (429 quota_exceeded).",
    )

    max_new_tokens: Annotated[StrictInt, Field(ge=1)] | None = Field(
        default=None,
        description="The group's cap on the answer, sent for a request that names no max_tokens (a "
        "completion's default of 16 included): the node generates no more.",
    )

    @property
    def empty(self) -> bool:
        return self.system_prompt is None and self.max_total_tokens is None and self.max_new_tokens is None
