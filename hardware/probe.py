"""What a node's GPUs report through NVML, as frozen values and as the JSON that travels to the scheduler.

`probe()` talks to the driver through pynvml (the `nvidia-ml-py` package), imported inside the call so a
CPU box, the scheduler and the tests import this module without it. NVML calls block (nvmlInit can take
a second on a cold driver), so callers on an event loop run `probe()` in a thread: `await
asyncio.to_thread(probe)`.

A box without pynvml, without a driver or without a GPU gets an empty probe whose `reason` says which, so
the node can report it instead of failing; a CPU node declares a memory budget that stands in for VRAM
(`memory_budget_probe`).

JSON format (version 1), also the format of the fixtures in tests/fixtures/nodes/: every field of
`NodeProbe` and `GpuProbe` by name, times in ISO 8601 UTC, memory in bytes. `from_json` validates every
field because the document crosses a trust boundary (node to scheduler) and fixtures are edited by hand.
"""

from __future__ import annotations

import contextlib
import importlib
import json
from collections.abc import Collection, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from protocol.errors import ProtocolError

__all__ = [
    "FORMAT_VERSION",
    "GpuProbe",
    "GpuProcess",
    "NodeProbe",
    "ProbeFormatError",
    "memory_budget_probe",
    "probe",
]

FORMAT_VERSION = 1


class ProbeFormatError(ProtocolError, ValueError):
    """A probe document that is not valid JSON of the expected format."""


@dataclass(frozen=True, slots=True)
class GpuProcess:
    pid: int
    # NVML cannot always attribute memory (Windows WDDM, some containers); None means "unknown", not 0.
    used_bytes: int | None
    name: str | None  # None when the process is in another PID namespace or not ours to inspect


@dataclass(frozen=True, slots=True)
class GpuProbe:
    # NVML's index follows the PCI bus; CUDA numbers GPUs fastest first unless CUDA_DEVICE_ORDER=PCI_BUS_ID,
    # so code that hands a GPU to a backend should match on `uuid`, not on `index`.
    index: int
    name: str
    uuid: str
    vram_total_bytes: int
    vram_free_bytes: int
    vram_used_bytes: int
    # Sensors some boards lack (NVML answers "not supported"); None rather than a made-up zero.
    utilization_percent: int | None
    temperature_c: int | None
    power_w: float | None
    processes: tuple[GpuProcess, ...]

    def other_processes(self, own_pids: Collection[int]) -> tuple[GpuProcess, ...]:
        """Processes that are not Hearth's own: on a volunteer's box, the owner's work that comes first."""
        return tuple(p for p in self.processes if p.pid not in own_pids)


@dataclass(frozen=True, slots=True)
class NodeProbe:
    gpus: tuple[GpuProbe, ...]
    driver_version: str | None
    cuda_version: str | None  # the newest CUDA the driver supports, e.g. "12.4"
    probed_at: datetime
    source: str  # where the figures come from: "nvml", "memory budget", or a note on a hand-made fixture
    reason: str | None = None  # why `gpus` is empty, in words for `hearth node status`
    memory_budget_bytes: int | None = None  # a CPU node's declared stand-in for VRAM

    @property
    def total_bytes(self) -> int:
        """Memory models may use: the GPUs' VRAM, or a CPU node's budget."""
        if self.memory_budget_bytes is not None:
            return self.memory_budget_bytes
        return sum(g.vram_total_bytes for g in self.gpus)

    @property
    def free_bytes(self) -> int:
        """Free VRAM over all GPUs; for a budget, the whole budget (the node subtracts what it loaded)."""
        if self.memory_budget_bytes is not None:
            return self.memory_budget_bytes
        return sum(g.vram_free_bytes for g in self.gpus)

    def to_json(self) -> str:
        # Format and source first: whoever opens the file should see what it is before the numbers.
        doc = {"format": FORMAT_VERSION, "source": self.source, **asdict(self)}
        doc["probed_at"] = self.probed_at.astimezone(UTC).isoformat(timespec="seconds")
        return json.dumps(doc, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes) -> NodeProbe:
        try:
            doc = json.loads(text)
        except ValueError as exc:
            raise ProbeFormatError(f"probe is not JSON: {exc}") from exc
        doc = _obj(doc, "probe")
        if doc.get("format") != FORMAT_VERSION:
            raise ProbeFormatError(f"probe format {doc.get('format')!r} is not {FORMAT_VERSION}")
        try:
            probed_at = datetime.fromisoformat(_get(doc, "probed_at", str))
        except ValueError as exc:
            raise ProbeFormatError(f"probed_at is not an ISO 8601 time: {exc}") from exc
        if probed_at.tzinfo is None:
            raise ProbeFormatError("probed_at must carry its time zone")
        return cls(
            gpus=tuple(_gpu(g) for g in _get(doc, "gpus", list)),
            driver_version=_get(doc, "driver_version", str, optional=True),
            cuda_version=_get(doc, "cuda_version", str, optional=True),
            probed_at=probed_at,
            source=_get(doc, "source", str),
            reason=_get(doc, "reason", str, optional=True),
            memory_budget_bytes=_get(doc, "memory_budget_bytes", int, optional=True),
        )


def _obj(value: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise ProbeFormatError(f"{what} must be a JSON object")
    return value


def _get(doc: Mapping[str, Any], key: str, kind: type[Any], *, optional: bool = False) -> Any:
    value = doc.get(key)
    if value is None:
        if optional:
            return None
        raise ProbeFormatError(f"{key} is missing")
    # bool is an int subclass in Python, and a float where an int belongs is a bug upstream; an int is
    # fine where a float belongs (JSON writers drop ".0").
    if isinstance(value, bool) and kind is not bool:
        ok = False
    elif kind is float:
        ok = isinstance(value, int | float)
    else:
        ok = isinstance(value, kind)
    if not ok:
        raise ProbeFormatError(f"{key} must be {kind.__name__}, not {value!r}")
    # Every number in a probe is a size, a count, an id or a reading that cannot go below zero.
    if kind in (int, float) and value < 0:
        raise ProbeFormatError(f"{key} cannot be negative, not {value!r}")
    return float(value) if kind is float else value


def _gpu(value: Any) -> GpuProbe:
    g = _obj(value, "each GPU")
    return GpuProbe(
        index=_get(g, "index", int),
        name=_get(g, "name", str),
        uuid=_get(g, "uuid", str),
        vram_total_bytes=_get(g, "vram_total_bytes", int),
        vram_free_bytes=_get(g, "vram_free_bytes", int),
        vram_used_bytes=_get(g, "vram_used_bytes", int),
        utilization_percent=_get(g, "utilization_percent", int, optional=True),
        temperature_c=_get(g, "temperature_c", int, optional=True),
        power_w=_get(g, "power_w", float, optional=True),
        processes=tuple(
            GpuProcess(
                pid=_get(p, "pid", int),
                used_bytes=_get(p, "used_bytes", int, optional=True),
                name=_get(p, "name", str, optional=True),
            )
            for p in (_obj(p, "each process") for p in _get(g, "processes", list))
        ),
    )


def _now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def memory_budget_probe(budget_bytes: int) -> NodeProbe:
    """A CPU node's probe: no GPUs, and a declared memory budget that placement treats as its VRAM."""
    if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, int) or budget_bytes <= 0:
        raise ValueError(f"a memory budget must be a positive number of bytes, not {budget_bytes!r}")
    return NodeProbe(
        gpus=(),
        driver_version=None,
        cuda_version=None,
        probed_at=_now(),
        source="memory budget",
        reason="CPU node: a declared memory budget stands in for VRAM",
        memory_budget_bytes=budget_bytes,
    )


def _empty(reason: str) -> NodeProbe:
    return NodeProbe(
        gpus=(), driver_version=None, cuda_version=None, probed_at=_now(), source="nvml", reason=reason
    )


def probe() -> NodeProbe:
    """Read every GPU through NVML. Blocking: run it off the event loop (`asyncio.to_thread(probe)`)."""
    try:
        # Imported by name at call time so importing this module never needs pynvml (see the docstring).
        nvml: Any = importlib.import_module("pynvml")
    except ImportError:
        return _empty("pynvml is not installed (pip install nvidia-ml-py)")
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as exc:  # no driver, driver/library mismatch, no permission
        return _empty(f"NVML did not start: {exc}")
    try:
        gpus = tuple(_probe_gpu(nvml, i) for i in range(nvml.nvmlDeviceGetCount()))
        return NodeProbe(
            gpus=gpus,
            driver_version=_text(nvml.nvmlSystemGetDriverVersion()),
            cuda_version=_cuda_version(_optional(nvml, nvml.nvmlSystemGetCudaDriverVersion)),
            probed_at=_now(),
            source="nvml",
            reason=None if gpus else "the NVIDIA driver reports no GPU",
        )
    except nvml.NVMLError as exc:  # a GPU fell off the bus or the driver is being reloaded
        return _empty(f"NVML query failed: {exc}")
    finally:
        # A failing shutdown must not turn a good probe into an exception; the next init starts afresh.
        with contextlib.suppress(nvml.NVMLError):
            nvml.nvmlShutdown()


def _probe_gpu(nvml: Any, index: int) -> GpuProbe:
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    memory = nvml.nvmlDeviceGetMemoryInfo(handle)
    utilization = _optional(nvml, nvml.nvmlDeviceGetUtilizationRates, handle)
    milliwatts = _optional(nvml, nvml.nvmlDeviceGetPowerUsage, handle)
    return GpuProbe(
        index=index,
        name=_text(nvml.nvmlDeviceGetName(handle)),
        uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
        vram_total_bytes=int(memory.total),
        vram_free_bytes=int(memory.free),
        vram_used_bytes=int(memory.used),
        utilization_percent=None if utilization is None else int(utilization.gpu),
        temperature_c=_optional(nvml, nvml.nvmlDeviceGetTemperature, handle, nvml.NVML_TEMPERATURE_GPU),
        power_w=None if milliwatts is None else round(milliwatts / 1000, 1),
        processes=_processes(nvml, handle),
    )


def _processes(nvml: Any, handle: Any) -> tuple[GpuProcess, ...]:
    # Compute processes are CUDA programs (a training run, another server); graphics processes are the
    # desktop and games. Both are the owner's use of the card, and a process may appear in both lists.
    used: dict[int, int | None] = {}
    for query in (nvml.nvmlDeviceGetComputeRunningProcesses, nvml.nvmlDeviceGetGraphicsRunningProcesses):
        for p in _optional(nvml, query, handle) or ():
            # nvidia-ml-py reports memory NVML cannot attribute as None; a raw "not available" marker
            # (2**64 - 1) from other bindings means the same.
            amount = p.usedGpuMemory if isinstance(p.usedGpuMemory, int) and p.usedGpuMemory < 2**63 else None
            known = [a for a in (used.get(p.pid), amount) if a is not None]
            used[p.pid] = max(known) if known else None
    return tuple(
        GpuProcess(pid=pid, used_bytes=amount, name=_process_name(nvml, pid))
        for pid, amount in sorted(used.items())
    )


def _process_name(nvml: Any, pid: int) -> str | None:
    name = _optional(nvml, nvml.nvmlSystemGetProcessName, pid)
    return None if name is None else _text(name)


def _optional(nvml: Any, call: Any, *args: Any) -> Any:
    """A query some GPUs or drivers do not support; its absence is data, not a failed probe."""
    try:
        return call(*args)
    except nvml.NVMLError:
        return None


def _text(value: str | bytes) -> str:
    # Recent nvidia-ml-py releases return str; older ones returned bytes.
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _cuda_version(value: int | None) -> str | None:
    # NVML encodes CUDA 12.4 as 12040: major * 1000 + minor * 10.
    return None if value is None else f"{value // 1000}.{value % 1000 // 10}"
