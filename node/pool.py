"""The models a node serves: which are loaded, what each holds in memory, and loads on demand.

A node declares models (local directories) and a memory pool: a CPU node's declared budget, or its GPUs'
VRAM. Each model's footprint is estimated from its config.json before a byte is loaded (hardware.estimator:
weights + a cache for the full context + a reserve), so the scheduler can tell a cold load's cost and fit
from the heartbeat alone. Loading a model that does not fit unloads idle ones, least recently used first;
a model with work running is never evicted.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from hardware.estimator import DEFAULT_RESERVE_BYTES, footprint, kv_bytes_per_token, weight_bytes
from hardware.model_spec import ModelConfigError, ModelSpec
from node.backends import BackendName, resolve
from node.backends.base import Backend, BatchBackend
from node.backends.exllamav2_backend import CACHE_BITS, PAGE_TOKENS
from node.fetch import download, fetch_config
from node.runner import JobRunner
from node.settings import ModelSettings, NodeSettings
from node.templates import ChatTemplate, resolve_template
from protocol.errors import ConfigError, ConflictError, HearthError, ModelNotFound
from protocol.web import in_daemon_thread, log_unexpected

log = logging.getLogger("hearth.node.pool")

Phase = Literal["available", "loading", "ready", "failed"]
BackendLoader = Callable[[ModelSettings, NodeSettings], Backend | BatchBackend]

# The transformers backend holds fp32 weights and an fp32 cache on the CPU; Python, torch and the
# tokenizer need a little beyond that.
CPU_WEIGHT_BITS = 32
CPU_CACHE_BITS = 32
CPU_RESERVE_BYTES = 64 * 1024 * 1024
DISK_GB_PER_S = 1.0  # a cold load's cost estimate: reading the checkpoint from an ordinary SSD
SPEED_EMA = 0.3


@dataclass
class ModelSlot:
    settings: ModelSettings
    footprint_bytes: int
    context_length: int | None
    load_seconds: float
    phase: Phase = "available"
    runner: JobRunner | None = None
    template: ChatTemplate | None = None
    last_used: float = field(default_factory=time.monotonic)
    tokens_per_s: float = 0.0
    task: asyncio.Task[None] | None = None

    @property
    def id(self) -> str:
        return self.settings.model_id

    @property
    def busy(self) -> bool:
        return self.runner is not None and self.runner.load > 0

    def record_speed(self, tokens: int, seconds: float) -> None:
        if tokens >= 2 and seconds > 0:
            rate = tokens / seconds
            self.tokens_per_s = (
                rate if not self.tokens_per_s else (1 - SPEED_EMA) * self.tokens_per_s + SPEED_EMA * rate
            )

    def status(self) -> dict[str, object]:
        runner = self.runner
        cache = runner.backend.cache() if runner else None
        return {
            "id": self.id,
            "phase": self.phase,
            "context_length": runner.backend.context_length if runner else self.context_length,
            "footprint_bytes": self.footprint_bytes,
            "cache_tokens": cache.total_tokens if cache else 0,
            "cache_free_tokens": cache.free_tokens if cache else None,
            "page_tokens": cache.page_tokens if cache else 1,
            "max_sequences": cache.max_sequences if cache else 1,
            "default_max_tokens": self.settings.default_max_tokens,
            "active": runner.active if runner else 0,
            "queued": runner.queued if runner else 0,
            "tokens_per_s": round(self.tokens_per_s, 3),
            "load_seconds": round(self.load_seconds, 3),
            "idle_seconds": round(max(0.0, time.monotonic() - self.last_used), 3),
            "started": runner.started if runner else 0,
            "skipped": runner.skipped if runner else 0,
            "template": self.template.name if self.template else None,
        }


def estimate(
    model: ModelSettings, hf_cache: Path, backend: BackendName = "transformers"
) -> tuple[int, int | None, float]:
    """(footprint bytes, context length, load seconds) from the model's config.json, before loading it.
    Blocking (a Hugging Face model's config may be fetched).

    transformers (CPU): fp32 weights and an fp32 cache for one full context. exllamav2 (GPU): the weights as
    the checkpoint holds them (an EXL2 model's files are its VRAM), its cache of ``cache_tokens`` at the
    configured precision, and a reserve for activations."""
    if model.path is None:
        config = fetch_config(str(model.huggingface), hf_cache)
        size = None
    else:
        try:
            config = json.loads((model.path / "config.json").read_text())
            size = sum(p.stat().st_size for p in model.path.glob("*.safetensors"))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read the model in {model.path}: {type(exc).__name__}") from None
    try:
        spec = ModelSpec.from_hf_config(config, name=model.model_id)
    except ModelConfigError:
        if size is None:
            raise
        # An architecture the estimator does not describe: its checkpoint, widened to fp32, is the best
        # guess of its weights, and its cache is unknown.
        return 2 * size + CPU_RESERVE_BYTES, None, size / (DISK_GB_PER_S * 1e9)
    if size is None:  # not downloaded yet: the bf16 checkpoint it will be
        size = weight_bytes(spec, 16)
    load_s = size / (DISK_GB_PER_S * 1e9)
    context = spec.max_context
    if backend == "exllamav2":
        tokens = -(-(model.cache_tokens or context) // PAGE_TOKENS) * PAGE_TOKENS
        cache = tokens * kv_bytes_per_token(spec, CACHE_BITS[model.cache_quant])
        return size + cache + DEFAULT_RESERVE_BYTES, min(context, tokens), load_s
    fp = footprint(spec, CPU_WEIGHT_BITS, context, CPU_CACHE_BITS, CPU_RESERVE_BYTES)
    return fp.total_bytes, context, load_s


class ModelPool:
    def __init__(
        self, settings: NodeSettings, loader: BackendLoader, total_bytes: int, gpus: str = "cpu"
    ) -> None:
        self.settings = settings
        self.total_bytes = total_bytes
        self.gpus = gpus
        self._loader = loader
        self.slots: dict[str, ModelSlot] = {}
        self.on_change: Callable[[], None] = lambda: None
        self._stopping: set[asyncio.Future[None]] = set()  # runners of unloaded models, still stopping
        self.hf_cache = (settings.data_dir or Path(".")) / "hf"
        backends: set[str] = set()
        for model in settings.models:
            backend = resolve(settings, model)
            backends.add(backend)
            try:
                fp, context, load_s = estimate(model, self.hf_cache, backend)
            except ConfigError as exc:
                if model.path is not None:
                    raise
                # A Hugging Face model that cannot be reached now: listed as failed, the node serves the rest.
                log.error("model %s is unavailable: %s", model.model_id, exc.message)
                self.slots[model.model_id] = ModelSlot(model, 0, None, 0.0, phase="failed")
                continue
            self.slots[model.model_id] = ModelSlot(model, fp, context, load_s)
        self.backend = ", ".join(sorted(backends)) or settings.backend  # what runs the models, in words

    @property
    def used_bytes(self) -> int:
        return sum(s.footprint_bytes for s in self.slots.values() if s.phase in ("loading", "ready"))

    @property
    def free_bytes(self) -> int:
        return max(0, self.total_bytes - self.used_bytes)

    @property
    def load(self) -> int:
        return sum(s.runner.load for s in self.slots.values() if s.runner)

    def cancel_all(self) -> None:
        """Cancel every job on every model (the node yields to its owner)."""
        for slot in self.slots.values():
            if slot.runner is not None:
                slot.runner.cancel_all()

    def get(self, model_id: str) -> ModelSlot:
        slot = self.slots.get(model_id)
        if slot is None:
            raise ModelNotFound(f"this node does not serve the model '{model_id}'", param="model")
        return slot

    def start(self) -> None:
        for slot in self.slots.values():
            if slot.settings.preload:
                self.request_load(slot.id, ())

    def request_load(self, model_id: str, evict: tuple[str, ...]) -> str:
        """Begin loading ``model_id``, unloading idle models first if memory is short. Returns the phase
        it is now in; ConflictError when it cannot fit even after every idle model is gone."""
        slot = self.get(model_id)
        if slot.phase in ("loading", "ready"):
            return slot.phase
        if slot.footprint_bytes == 0 and slot.settings.path is None:
            raise ConflictError(
                f"{model_id} could not be reached at start; see the node's log", code="model_unavailable"
            )
        need = slot.footprint_bytes - self.free_bytes
        if need > 0:
            idle = sorted(
                (s for s in self.slots.values() if s.phase == "ready" and not s.busy and s is not slot),
                key=lambda s: (s.id not in evict, s.last_used),
            )
            if sum(s.footprint_bytes for s in idle) < need:
                raise ConflictError(
                    f"{model_id} needs {slot.footprint_bytes} bytes and only {self.free_bytes} are free "
                    "(the rest holds models that are busy)",
                    code="insufficient_memory",
                )
            for victim in idle:
                if need <= 0:
                    break
                self.unload(victim.id)
                need -= victim.footprint_bytes
        slot.phase = "loading"
        slot.task = asyncio.ensure_future(self._load(slot))
        self.on_change()
        return slot.phase

    async def _load(self, slot: ModelSlot) -> None:
        settings = self.settings
        started = time.monotonic()
        try:
            if self._stopping:  # models unloaded to make room: their memory must be free first
                await asyncio.gather(*self._stopping, return_exceptions=True)
            backend = await in_daemon_thread(
                lambda: self._loader(self._local(slot.settings), settings), f"hearth-load-{slot.id}"
            )
            slot.template = resolve_template(
                slot.settings.chat_template, backend.chat_template, bos_token=backend.bos_token,
                eos_token=backend.eos_token,
            )  # fmt: skip
        except HearthError as exc:
            slot.phase = "failed"
            log.error("model %s failed to load: %s", slot.id, exc.message)
        except Exception as exc:
            slot.phase = "failed"
            log_unexpected(f"loading model {slot.id}", exc)
        else:
            slot.runner = JobRunner(backend, max_queued=slot.settings.max_queued, name=slot.id)
            slot.runner.start()
            slot.phase = "ready"
            slot.last_used = time.monotonic()
            slot.load_seconds = time.monotonic() - started
            log.info("model %s ready (context %d tokens)", slot.id, backend.context_length)
        finally:
            slot.task = None
            self.on_change()

    def _local(self, model: ModelSettings) -> ModelSettings:
        """The model with a local path: a Hugging Face one is downloaded first (in the load thread)."""
        if model.path is not None:
            return model
        return model.model_copy(update={"path": download(str(model.huggingface), self.hf_cache)})

    def unload(self, model_id: str) -> None:
        slot = self.get(model_id)
        runner, slot.runner = slot.runner, None
        slot.phase = "available"
        if runner is not None:
            log.info("unloading %s", model_id)
            # Joining the generation thread may take a step's time: do it off the loop. A load that follows
            # (an eviction) waits for it, so the memory is free before another model takes it.
            stopping = asyncio.ensure_future(asyncio.to_thread(runner.stop))
            self._stopping.add(stopping)
            stopping.add_done_callback(self._stopped)
        self.on_change()

    def _stopped(self, stopping: asyncio.Future[None]) -> None:
        self._stopping.discard(stopping)
        failure = None if stopping.cancelled() else stopping.exception()
        if failure is not None:
            log_unexpected("unloading a model", failure)

    async def close(self) -> None:
        tasks = [s.task for s in self.slots.values() if s.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for slot in self.slots.values():
            if slot.runner is not None:
                await asyncio.to_thread(slot.runner.stop)
                slot.runner = None
