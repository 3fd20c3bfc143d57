"""The GPU probe: its JSON format (the node fixtures), the no-pynvml path, and the mapping from NVML.

No GPU is available to the default test run, so the NVML mapping is exercised through a stand-in module
with nvidia-ml-py's function names and return shapes. The real library on a real GPU belongs in tests/gpu/,
which should also record the fixtures that replace the hand-written ones here.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest

from hardware.probe import GpuProbe, NodeProbe, ProbeFormatError, memory_budget_probe, probe
from protocol.errors import ProtocolError

GIB = 1 << 30
MIB = 1 << 20
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "nodes"
HAND_WRITTEN = "hand-written to match the probe format; replace with a recording from a real machine"


def fixture(name: str) -> NodeProbe:
    return NodeProbe.from_json((FIXTURES / name).read_text(encoding="utf-8"))


@pytest.mark.parametrize("path", sorted(FIXTURES.glob("*.json")), ids=lambda p: p.stem)
def test_fixture_is_exactly_the_probe_format(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    node = NodeProbe.from_json(text)
    assert node.to_json() == text  # byte for byte: the fixtures are what `to_json` writes
    # Honest about where it came from: recorded on a real machine through NVML, or written by hand.
    assert node.source == ("nvml" if path.stem.endswith("-recorded") else HAND_WRITTEN)
    for g in node.gpus:
        assert g.vram_free_bytes + g.vram_used_bytes == g.vram_total_bytes
        assert sum(p.used_bytes or 0 for p in g.processes) <= g.vram_used_bytes


@pytest.mark.parametrize(
    ("name", "gpus", "total_gib", "foreign"),
    [
        # A volunteer's box: the owner's Xorg and a training script hold GPU 0; GPU 1 is idle.
        ("volunteer-2x3090.json", 2, 48, {0: [1432, 23817], 1: []}),
        # A club server where Hearth (pid 90211) runs a model split over GPUs 0-1: nothing foreign anywhere.
        ("club-4xA100-80GB.json", 4, 320, {0: [], 1: [], 2: [], 3: []}),
        # A gaming desktop: only the desktop session uses the card.
        ("single-4090.json", 1, 23.98828125, {0: [2101, 2398]}),
        # Recorded on a rented H100 (the device machine, 2026-11-22): an idle card, the driver's own 480 MiB used.
        ("h100-x1-recorded.json", 1, 79.6474609375, {0: []}),
    ],
)
def test_fixture_contents(name: str, gpus: int, total_gib: float, foreign: dict[int, list[int]]) -> None:
    node = fixture(name)
    assert len(node.gpus) == gpus
    assert node.total_bytes == total_gib * GIB
    assert node.free_bytes == sum(g.vram_free_bytes for g in node.gpus)
    assert {g.index: [p.pid for p in g.other_processes({90211})] for g in node.gpus} == foreign


def test_owner_process_is_visible_with_its_memory() -> None:
    gpu0 = fixture("volunteer-2x3090.json").gpus[0]
    owner = {p.pid: p for p in gpu0.other_processes(own_pids=set())}[23817]
    assert owner.used_bytes == 6 * GIB
    assert owner.name == "/usr/bin/python3"


def test_probe_without_pynvml_is_empty_with_a_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` fail even where it is installed
    node = probe()
    assert node.gpus == ()
    assert node.reason is not None and "nvidia-ml-py" in node.reason
    assert NodeProbe.from_json(node.to_json()) == node


@pytest.mark.skipif(importlib.util.find_spec("pynvml") is not None, reason="pynvml is installed here")
def test_probe_on_this_machine_without_pynvml() -> None:
    # The CI and development machines have no pynvml: the real call must degrade, not raise.
    node = probe()
    assert node.gpus == () and node.reason == "pynvml is not installed (pip install nvidia-ml-py)"


class NVMLError(Exception):
    pass


def fake_nvml(
    gpus: list[dict[str, Any]], *, init_error: bool = False, names_as_bytes: bool = False
) -> ModuleType:
    """A stand-in for nvidia-ml-py: its function names, structs as attribute bags, NVMLError on 'unsupported'."""
    calls: list[str] = []

    def value(index: int, key: str) -> Any:
        v = gpus[index][key]
        if isinstance(v, Exception):
            raise v
        return v

    def init() -> None:
        calls.append("init")
        if init_error:
            raise NVMLError("Driver Not Loaded")

    def text(s: str) -> str | bytes:
        return s.encode() if names_as_bytes else s

    process_names = {1432: "/usr/lib/xorg/Xorg", 23817: "/usr/bin/python3"}

    def process_name(pid: int) -> str | bytes:
        if pid not in process_names:
            raise NVMLError("Not Found")  # a process in another PID namespace
        return text(process_names[pid])

    def procs(key: str) -> Callable[[int], list[SimpleNamespace]]:
        return lambda h: [SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in value(h, key)]

    m = ModuleType("pynvml")
    m.__dict__.update(
        NVMLError=NVMLError,
        NVML_TEMPERATURE_GPU=0,
        calls=calls,
        nvmlInit=init,
        nvmlShutdown=lambda: calls.append("shutdown"),
        nvmlDeviceGetCount=lambda: len(gpus),
        nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlSystemGetDriverVersion=lambda: text("550.120"),
        nvmlSystemGetCudaDriverVersion=lambda: 12040,
        nvmlSystemGetProcessName=process_name,
        nvmlDeviceGetName=lambda h: text(value(h, "name")),
        nvmlDeviceGetUUID=lambda h: text(f"GPU-{h}"),
        nvmlDeviceGetMemoryInfo=lambda h: SimpleNamespace(
            total=value(h, "total"), free=value(h, "free"), used=value(h, "total") - value(h, "free")
        ),
        nvmlDeviceGetUtilizationRates=lambda h: SimpleNamespace(gpu=value(h, "util"), memory=0),
        nvmlDeviceGetTemperature=lambda h, sensor: value(h, "temp"),
        nvmlDeviceGetPowerUsage=lambda h: value(h, "mw"),
        nvmlDeviceGetComputeRunningProcesses=procs("compute"),
        nvmlDeviceGetGraphicsRunningProcesses=procs("graphics"),
    )
    return m


DESKTOP_3090 = {
    "name": "NVIDIA GeForce RTX 3090",
    "total": 24 * GIB,
    "free": 17 * GIB,
    "util": 87,
    "temp": 71,
    "mw": 301_412,
    "compute": [(23817, 6 * GIB), (40001, None)],  # the owner's script; an unattributable process
    "graphics": [(1432, 256 * MIB), (23817, 6 * GIB)],  # Xorg; the script again (it also draws)
}


@pytest.mark.parametrize("names_as_bytes", [False, True], ids=["str", "bytes"])  # newer vs older nvidia-ml-py
def test_probe_maps_nvml(monkeypatch: pytest.MonkeyPatch, names_as_bytes: bool) -> None:
    nvml = fake_nvml([DESKTOP_3090], names_as_bytes=names_as_bytes)
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    node = probe()
    assert node.reason is None and node.source == "nvml"
    assert (node.driver_version, node.cuda_version) == ("550.120", "12.4")
    (gpu,) = node.gpus
    assert gpu == GpuProbe(
        index=0,
        name="NVIDIA GeForce RTX 3090",
        uuid="GPU-0",
        vram_total_bytes=24 * GIB,
        vram_free_bytes=17 * GIB,
        vram_used_bytes=7 * GIB,
        utilization_percent=87,
        temperature_c=71,
        power_w=301.4,  # milliwatts to watts
        processes=gpu.processes,
    )
    # Merged by pid over both lists; unknown memory and unknown names stay None, not 0 or "".
    assert [(p.pid, p.used_bytes, p.name) for p in gpu.processes] == [
        (1432, 256 * MIB, "/usr/lib/xorg/Xorg"),
        (23817, 6 * GIB, "/usr/bin/python3"),
        (40001, None, None),
    ]
    assert nvml.calls == ["init", "shutdown"]
    assert NodeProbe.from_json(node.to_json()) == node


@pytest.mark.parametrize(
    ("gpus", "init_error", "reason"),
    [
        ([], True, "NVML did not start: Driver Not Loaded"),  # pynvml installed, no driver
        ([], False, "the NVIDIA driver reports no GPU"),  # driver loaded, no device visible
        # A GPU that fell off the bus mid-probe.
        ([DESKTOP_3090 | {"name": NVMLError("GPU is lost")}], False, "NVML query failed: GPU is lost"),
    ],
)
def test_probe_failures_become_reasons(
    monkeypatch: pytest.MonkeyPatch, gpus: list[dict[str, Any]], init_error: bool, reason: str
) -> None:
    nvml = fake_nvml(gpus, init_error=init_error)
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    node = probe()
    assert (node.gpus, node.reason) == ((), reason)
    assert nvml.calls == (["init"] if init_error else ["init", "shutdown"])


def test_unsupported_sensors_are_none(monkeypatch: pytest.MonkeyPatch) -> None:
    # Passively cooled datacenter boards and some laptops report no power or temperature.
    unsupported = NVMLError("Not Supported")
    gpu = DESKTOP_3090 | dict.fromkeys(("util", "temp", "mw", "graphics"), unsupported)
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml([gpu]))
    (g,) = probe().gpus
    assert (g.utilization_percent, g.temperature_c, g.power_w) == (None, None, None)
    assert [p.pid for p in g.processes] == [23817, 40001]


def test_memory_budget_probe() -> None:
    node = memory_budget_probe(12 * GIB)
    assert (node.gpus, node.total_bytes, node.free_bytes) == ((), 12 * GIB, 12 * GIB)
    assert node.reason is not None and "budget" in node.reason
    assert NodeProbe.from_json(node.to_json()) == node


@pytest.mark.parametrize(
    "budget",
    [
        0,  # a node with no memory for models cannot serve
        -1,  # negative
        True,  # a bool is not a size
    ],
)
def test_memory_budget_must_be_positive(budget: int) -> None:
    with pytest.raises(ValueError, match="memory budget"):
        memory_budget_probe(budget)


def _doc(**changes: Any) -> str:
    doc = json.loads((FIXTURES / "single-4090.json").read_text(encoding="utf-8"))
    for path, value in changes.items():
        target = doc
        *parents, leaf = path.split("__")
        for p in parents:
            target = target[int(p)] if p.isdigit() else target[p]
        target[leaf] = value
    return json.dumps(doc)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "not JSON"),  # truncated or garbled
        ("[]", "JSON object"),  # the wrong shape at the top
        (_doc(format=2), "format 2"),  # a newer format this reader does not know
        (_doc(probed_at="yesterday"), "ISO 8601"),  # not a time
        (_doc(probed_at="2025-03-20T21:05:33"), "time zone"),  # a naive time is ambiguous across machines
        (_doc(source=None), "source is missing"),  # provenance is required
        (_doc(gpus__0__vram_free_bytes=True), "must be int"),  # a bool where bytes belong
        (_doc(gpus__0__vram_free_bytes=1.5), "must be int"),  # a fraction of a byte
        (_doc(gpus__0__vram_used_bytes=-1), "negative"),  # an impossible reading
        (_doc(gpus__0__processes__0__pid="2101"), "pid must be int"),  # a string id
        (_doc(gpus__0__processes=[7]), "each process"),  # not an object
        (_doc(gpus={}), "gpus must be list"),  # not a list
    ],
)
def test_from_json_refuses_malformed_documents(text: str, message: str) -> None:
    with pytest.raises(ProbeFormatError, match=message) as caught:
        NodeProbe.from_json(text)
    assert isinstance(caught.value, ProtocolError) and isinstance(caught.value, ValueError)


def test_time_zone_is_normalised_to_utc() -> None:
    node = NodeProbe(
        gpus=(),
        driver_version=None,
        cuda_version=None,
        probed_at=datetime.fromisoformat("2025-03-20T23:05:33+02:00"),
        source="test",
    )
    text = node.to_json()
    assert '"probed_at": "2025-03-20T21:05:33+00:00"' in text
    assert NodeProbe.from_json(text).probed_at == datetime(2025, 3, 20, 21, 5, 33, tzinfo=UTC)


# A node's memory pool, from each recorded or hand-written probe: (fixture, pool bytes, GPU summary)
# fmt: off
POOLS = [
    ("h100-x1-recorded.json", 85017493504, "1x NVIDIA H100 80GB HBM3"),  # a real NVML reading
    ("volunteer-2x3090.json", 18775801856 + 25486688256, "2x NVIDIA GeForce RTX 3090"),  # the owner's 6.5 GiB stays theirs
    ("club-4xA100-80GB.json", None, "4x NVIDIA A100-SXM4-80GB"),
]
# fmt: on


@pytest.mark.parametrize(("name", "pool", "summary"), POOLS)
def test_a_gpu_nodes_pool_is_its_free_vram(name: str, pool: int | None, summary: str) -> None:
    from node.heartbeat import pool_from_probe

    node = fixture(name)
    got_pool, got_summary = pool_from_probe(node)
    assert got_pool == (pool if pool is not None else node.free_bytes)
    assert got_summary == summary
