"""Typed settings of a node: which models it serves and how."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from protocol.server import ServerLimits


class NodeServerLimits(ServerLimits):
    """A node's connection limits: those of any service, but no per-address cap by default. The node's
    one client is its scheduler, whose relays hold a connection per running job, so a cap would cap the
    node's capacity (and every job is signed by the scheduler anyway)."""

    max_connections_per_address: int = Field(
        default=0,
        ge=0,
        description="Open connections one address may hold; another is answered 503 and closed. 0 (the "
        "default): no limit, since the scheduler holds one per running job.",
    )


class ModelSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    path: Path | None = Field(
        default=None,
        description="Local directory of the model in Hugging Face layout (or give `huggingface`).",
    )
    huggingface: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9][\w.-]*/[\w.-]+$",
        description='A Hugging Face id this node may fetch, e.g. "Qwen/Qwen2.5-0.5B-Instruct": its config is '
        "read at start (to estimate its memory), its weights downloaded when it is first loaded.",
    )
    id: str | None = Field(
        default=None, description="Name clients use; default: the directory's name, or the Hugging Face id."
    )
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
    backend: Literal["exllamav2", "transformers"] | None = Field(
        default=None,
        description="Run this model on this backend instead of the node's (`node.backend`): e.g. a small "
        "model on the CPU beside GPU models.",
    )
    max_sequences: int | None = Field(
        default=None,
        ge=1,
        le=256,
        description="Sequences generated at once (continuous batching). Default: 32 on exllamav2 (fewer when "
        "the cache holds fewer 256-token pages), 1 on transformers, where sequences take turns.",
    )
    cache_tokens: int | None = Field(
        default=None,
        ge=256,
        le=1 << 24,
        description="exllamav2: KV-cache tokens shared by all of this model's sequences, rounded up to a "
        "multiple of 256; a sequence is never longer. Default: the model's context length.",
    )
    cache_quant: Literal["fp16", "q8", "q6", "q4"] = Field(
        default="fp16",
        description="exllamav2: how the KV cache is stored; q8/q6/q4 hold 2×/2.7×/4× the tokens in the same "
        "VRAM at a small cost in quality.",
    )
    preload: bool = Field(
        default=True,
        description="Load the model when the node starts; when false it is loaded on the scheduler's demand "
        "(and may be unloaded again, least recently used first, to make room for another).",
    )

    @model_validator(mode="after")
    def _one_source(self) -> ModelSettings:
        if (self.path is None) == (self.huggingface is None):
            raise ValueError("give a model either a `path` or a `huggingface` id")
        return self

    @property
    def model_id(self) -> str:
        if self.id:
            return self.id
        return self.path.name if self.path is not None else str(self.huggingface)


DESKTOP_PROCESSES = [
    "Xorg", "Xwayland", "gnome-shell", "kwin_x11", "kwin_wayland", "plasmashell", "mutter", "sway",
    "Hyprland", "cinnamon", "xfwm4", "picom", "compiz",
]  # fmt: skip


class OwnerFirstSettings(BaseModel):
    """When a volunteer's machine goes back to its owner (node.owner)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool | None = Field(
        default=None,
        description="Yield the machine to its owner when they need it. Unset: on for a community (volunteer) "
        "node, off for a club server.",
    )
    hours: list[str] = Field(
        default_factory=list,
        max_length=32,
        description='When the node may serve, in this machine\'s local time, e.g. ["Mon-Fri 19:00-08:00", '
        '"Sat-Sun 00:00-24:00"] (a window that ends before it starts runs past midnight); outside them it '
        "yields. Empty: any time.",
    )
    owner_processes: bool = Field(
        default=True,
        description="Yield while a GPU process that is not Hearth's (a game, a render, the owner's own "
        "training) uses at least `process_min_bytes` of VRAM, as NVML reports it.",
    )
    process_min_bytes: int = Field(
        default=256 * 1024 * 1024,
        ge=0,
        description="Smaller GPU processes (a browser's, a video player's) do not make the node yield.",
    )
    ignore_processes: list[str] = Field(
        default_factory=lambda: list(DESKTOP_PROCESSES),
        description="Program names whose GPU use never makes the node yield: the desktop itself.",
    )
    vram_ceiling: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description="Yield when the VRAM other processes use, plus what Hearth's models hold, would pass "
        "this fraction of the GPUs' memory (e.g. 0.9). Unset: no ceiling.",
    )
    drain_seconds: float = Field(
        default=30.0,
        ge=0,
        description="How long running answers may go on once the node yields; then they are cancelled.",
    )
    release_after: float = Field(
        default=10.0,
        ge=0,
        description="Seconds of yielding, with nothing running, after which the models are unloaded and "
        "their memory goes back to the owner.",
    )
    resume_after: float = Field(
        default=60.0,
        ge=0,
        description="How long every reason to yield must have been gone before the node serves again "
        "(reloading what it unloaded).",
    )
    check_interval: float = Field(
        default=5.0, gt=0, le=3600, description="Seconds between two looks at the clock and the GPUs."
    )

    @field_validator("hours")
    @classmethod
    def _windows(cls, value: list[str]) -> list[str]:
        from node.owner import parse_window

        for text in value:
            parse_window(text)  # ValueError with what is wrong
        return value


class NodeSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    host: str = Field(default="127.0.0.1", description="Address the node API listens on.")
    port: int = Field(default=0, ge=0, le=65535, description="Port of the node API; 0 picks a free one.")
    node_id: str = Field(
        default="local",
        pattern=r"^[a-z0-9][a-z0-9-]{0,62}$",
        description="This node's name in the cluster (lower-case letters, digits and '-').",
    )
    tier: Literal["club", "community"] = Field(
        default="community",
        description="`club` for a club-run server, `community` for a volunteer's machine; the tier comes "
        "from the enrollment code, this is what the node advertises before it is enrolled.",
    )
    data_dir: Path | None = Field(
        default=None,
        description="Where the node keeps its keys, enrollment and certificate "
        "(default: the `node` folder in Hearth's data dir).",
    )
    public_url: str | None = Field(
        default=None,
        description="The URL the scheduler reaches this node at (default: http://HOST:PORT as bound).",
    )
    memory_budget_bytes: int | None = Field(
        default=None,
        ge=1,
        description="CPU node: memory its models may use, standing in for VRAM in placement (default: half "
        "of this machine's RAM). GPU nodes read free VRAM through NVML instead.",
    )
    scheduler_url: str | None = Field(
        default=None, description="The scheduler's URL (default: the one given at `hearth node enroll`)."
    )
    authority_key: str | None = Field(
        default=None,
        description="The federation authority's public key, for a LAN node that is approved without a "
        "code: the node accepts a certificate only when this key signed it.",
    )
    heartbeat_interval: float = Field(
        default=2.0, gt=0, description="Seconds between heartbeats until the scheduler says otherwise."
    )
    advertise: bool = Field(default=True, description="Advertise this node on the LAN over zeroconf.")
    zeroconf_interfaces: list[str] | None = Field(
        default=None, description='Addresses zeroconf uses (e.g. ["127.0.0.1"]); default: all interfaces.'
    )
    advert_interval: float = Field(
        default=5.0, gt=0, description="Least seconds between two zeroconf updates of this node's record."
    )
    backend: Literal["auto", "exllamav2", "transformers"] = Field(
        default="auto",
        description="What runs the models: exllamav2 on NVIDIA GPUs, transformers on the CPU. `auto` picks "
        "exllamav2 when it is installed and torch sees a CUDA GPU.",
    )
    threads: int | None = Field(
        default=None, ge=1, description="CPU threads for generation; default: torch's."
    )
    max_body_bytes: int = Field(
        default=8 * 1024 * 1024, ge=1024, description="Largest job body accepted (a sealed one included)."
    )
    key_rotation: float = Field(
        default=86400.0,
        ge=60,
        le=3.5 * 86400,
        description="Seconds between two end-to-end encryption keys; each key's statement is valid twice as "
        "long, so proxies that fetched the directory a while ago still reach this node.",
    )
    e2e_flush_interval: float = Field(
        default=0.02,
        ge=0,
        le=1,
        description="Least seconds between two frames of a sealed stream: tokens generated meanwhile leave "
        "together, so frame timing says less about the answer. 0 sends each burst at once.",
    )
    directory_check_interval: float = Field(
        default=60.0,
        gt=0,
        description="Seconds between two checks that the scheduler's directory shows this node's current "
        "encryption key (an alarm is raised when it does not).",
    )
    http: NodeServerLimits = Field(
        default_factory=NodeServerLimits, description="Limits on each connection to this node's API."
    )
    owner_first: OwnerFirstSettings = Field(
        default_factory=OwnerFirstSettings,
        description="Owner first: when this machine stops serving so its owner can use it.",
    )
    models: list[ModelSettings] = Field(default_factory=list, description="Models this node serves.")
