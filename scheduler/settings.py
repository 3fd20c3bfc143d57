"""Typed settings of the scheduler."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from policies import Policy


class NodeLink(BaseModel):
    """A node the scheduler sends work to (enrolled nodes replace this list in the federation)."""

    model_config = ConfigDict(extra="forbid")

    node_id: str = Field(description="The node's name.")
    url: str = Field(description="Base URL of the node's API, e.g. http://127.0.0.1:9100.")
    secret: SecretStr = Field(description="Shared secret the scheduler presents to the node.")


class SchedulerSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    host: str = Field(default="127.0.0.1", description="Address the API listens on.")
    port: int = Field(default=8000, ge=0, le=65535, description="Port of the API; 0 picks a free one.")
    data_dir: Path = Field(default=Path("."), description="Where the database lives.")
    max_body_bytes: int = Field(
        default=1024 * 1024, ge=1024, description="Largest request body accepted; larger ones get 413."
    )
    poll_interval: float = Field(default=2.0, gt=0, description="Seconds between node status polls.")
    node_timeout: float = Field(
        default=6.0, gt=0, description="A node silent for this long gets no new work until it answers again."
    )
    stream_idle_timeout: float = Field(
        default=120.0, gt=0, description="A node stream that sends nothing for this long is ended as failed."
    )
    retry_after: float = Field(default=5.0, gt=0, description="Retry-After seconds sent with 503 answers.")
    policy: Policy = Field(default_factory=Policy, description="Request policy (see policies).")
    nodes: list[NodeLink] = Field(default_factory=list, description="Nodes to send work to.")

    @property
    def db_path(self) -> Path:
        return self.data_dir / "hearth.db"
