"""Typed settings of the scheduler."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from policies import Policy
from protocol.server import ServerLimits


class SchedulerSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    host: str = Field(default="127.0.0.1", description="Address the API listens on.")
    port: int = Field(default=8000, ge=0, le=65535, description="Port of the API; 0 picks a free one.")
    data_dir: Path = Field(default=Path("."), description="Where the database and the scheduler's key live.")
    max_body_bytes: int = Field(
        default=1024 * 1024, ge=1024, description="Largest request body accepted; larger ones get 413."
    )
    authority_key: str | None = Field(
        default=None,
        description="Public key of the federation authority (printed by `hearth authority init`). Node "
        "certificates must be signed by it; without it no node can be approved.",
    )
    heartbeat_interval: float = Field(
        default=2.0, gt=0, le=3600, description="Seconds between a node's heartbeats (told to each node)."
    )
    node_timeout: float = Field(
        default=6.0, gt=0, description="A node silent for this long gets no new work until it is heard again."
    )
    discovery: bool = Field(
        default=True, description="Browse the LAN over zeroconf for nodes (`_hearth._tcp.local.`)."
    )
    zeroconf_interfaces: list[str] | None = Field(
        default=None, description='Addresses zeroconf uses (e.g. ["127.0.0.1"]); default: all interfaces.'
    )
    enrollment_code_ttl: float = Field(
        default=24 * 3600.0,
        gt=0,
        description="Seconds an enrollment code stays valid when not told otherwise.",
    )
    max_queue_wait: float = Field(
        default=60.0, gt=0, description="Longest a request waits for capacity before 503 + Retry-After."
    )
    max_queued: int = Field(
        default=1024, ge=1, description="Requests waiting at once before new ones get 503."
    )
    failover_attempts: int = Field(
        default=3, ge=1, description="Nodes tried for one request when a node fails before its first token."
    )
    load_timeout: float = Field(
        default=600.0, gt=0, description="Seconds a model load on demand may take before it is given up."
    )
    stream_idle_timeout: float = Field(
        default=120.0, gt=0, description="A node stream that sends nothing for this long is ended as failed."
    )
    seal_toward_nodes: Literal["remote", "always"] = Field(
        default="remote",
        description="Plaintext requests (where the policy allows them) go on to their node sealed by the "
        "scheduler: `remote` for every node it reaches over a network, `always` for loopback nodes too.",
    )
    retry_after: float = Field(default=5.0, gt=0, description="Retry-After seconds sent with 503 answers.")
    http: ServerLimits = Field(
        default_factory=ServerLimits, description="Limits on each client connection (slow or greedy clients)."
    )
    policy: Policy = Field(
        default_factory=Policy, description="The scheduler-wide baseline under every group's rules."
    )
    policy_file: Path | None = Field(
        default=None,
        description="The policy file (groups, quotas, rate limits, terms; docs/policies.md), reloaded when "
        "it changes. Default: policies.toml beside the config file, else in the data directory; none there "
        "means one unlimited default group.",
    )

    @property
    def db_path(self) -> Path:
        return self.data_dir / "hearth.db"

    # Where the config file that named these settings lives (set by hearth.config.load_settings): the
    # policy file's default place. Not a setting of its own.
    _config_dir: Path | None = PrivateAttr(default=None)

    @property
    def config_dir(self) -> Path | None:
        return self._config_dir

    @config_dir.setter
    def config_dir(self, value: Path | None) -> None:
        self._config_dir = value

    @property
    def policy_path(self) -> Path:
        if self.policy_file is not None:
            return self.policy_file
        return (self._config_dir or self.data_dir) / "policies.toml"

    @property
    def key_path(self) -> Path:
        return self.data_dir / "scheduler.key"
