"""Wire schemas of the terms of use: what `GET /v1/terms` answers, what `POST /v1/terms/accept` takes, and
the operator's view of who accepted which version (`GET /admin/terms`).

The scheduler builds its replies with these models, the OpenAPI document is generated from them, and the
CLI (`hearth terms`) reads them, so what is documented is what is sent.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StrictStr, StringConstraints

# A terms version as the policy file writes it (policies.schema.Terms); one of another form was never in
# force, so it is refused as a malformed body rather than as a stale version.
TERMS_VERSION = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
TermsVersion = Annotated[StrictStr, StringConstraints(pattern=TERMS_VERSION)]


class TermsAcceptRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    version: TermsVersion = Field(
        description="The version being accepted: the one `GET /v1/terms` showed. Another than the version "
        "in force is refused (409 terms_version_changed), so nobody accepts a text they did not see."
    )


class _Reply(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TermsDocument(_Reply):
    """The terms in force and where the caller's token stands with them."""

    version: str | None = Field(description="The version in force; null when the policy has no terms.")
    text: str | None = Field(description="The terms' text; null when the policy has no terms.")
    accepted: bool = Field(
        description="Whether the token may generate as far as the terms go: it accepted the version in "
        "force, or there are no terms."
    )
    accepted_version: str | None = Field(
        description="The version this token accepted last (null: never); may be an older one."
    )
    accepted_at: float | None = Field(description="Unix time of that acceptance (null: never).")


class TermsStatus(_Reply):
    token_id: str = Field(description="The token's id (stable across rotation).")
    name: str = Field(description="The token's name.")
    accepted_version: str | None = Field(description="The version it accepted last (null: never).")
    accepted_at: float | None = Field(description="Unix time of that acceptance (null: never).")
    current: bool = Field(description="It accepted the version in force, or there are no terms.")


class TermsStatusList(_Reply):
    version: str | None = Field(description="The version in force; null when the policy has no terms.")
    tokens: list[TermsStatus] = Field(description="Every token that is not revoked, oldest first.")
