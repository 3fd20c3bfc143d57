"""Typed settings of a node: which models it serves and how."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr


class ModelSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: Path = Field(description="Local directory of the model in Hugging Face layout.")
    id: str | None = Field(default=None, description="Name clients use; default: the directory's name.")
    chat_template: str | None = Field(
        default=None,
        description="Force a named template (alpaca, vicuna, llama-2, chatml, stackllama) instead of the "
        "model's own; the model's own is used when this is unset, chatml when the model ships none.",
    )
    truncation: Literal["auto", "disabled"] = Field(
        default="disabled",
        description="What to do with a conversation longer than the context when the request does not say: "
        '"auto" drops the oldest turns (system prompt kept), "disabled" refuses with '
        "context_length_exceeded.",
    )
    default_max_tokens: int = Field(
        default=1024, ge=1, description="Generated-token limit for chat requests that set no max_tokens."
    )
    max_queued: int = Field(default=64, ge=1, description="Requests waiting for this model before 503.")

    @property
    def model_id(self) -> str:
        return self.id or self.path.name


class NodeSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    host: str = Field(default="127.0.0.1", description="Address the node API listens on.")
    port: int = Field(default=0, ge=0, le=65535, description="Port of the node API; 0 picks a free one.")
    node_id: str = Field(default="local", description="This node's name in the scheduler.")
    secret: SecretStr = Field(
        default=SecretStr(""),
        description="Shared secret the scheduler presents on every call (set by `hearth up`; replaced by "
        "enrollment keys for remote nodes).",
    )
    threads: int | None = Field(
        default=None, ge=1, description="CPU threads for generation; default: torch's."
    )
    max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024, description="Largest job body accepted.")
    models: list[ModelSettings] = Field(default_factory=list, description="Models this node serves.")
