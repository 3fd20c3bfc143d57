"""GPUs and open models the planner and placement know by name.

GPU figures come from NVIDIA's product datasheets and architecture whitepapers (GA102/GA106, AD102/AD106,
GB202, A100, H100, H200, L4, L40S), boost clocks included; the 4090 and 5090 tensor figures were
cross-checked against published spec tables. `fp16_tflops` is the dense fp16 tensor rate with fp32
accumulation, the mode PyTorch and exllamav2 GEMMs run in: GeForce cards do it at half their
fp16-accumulate rate, the pro and datacenter cards at full rate, which is why an A6000 out-computes a 3090
on paper. Memory sizes are the nominal ones
(GDDR sizes are binary: "24 GB" is 24 GiB); a node's probe reports what is really usable.

Prices are rough street figures in US dollars, each with the month it refers to and whether new or used.
They are not quotes: they move monthly and differ by country. Replace them before a budget depends on them.

Model numbers are copied from each model's config.json on Hugging Face; a test checks that the parameter
totals they imply match the published counts.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from hardware.model_spec import ModelSpec
from protocol.errors import NotFound

__all__ = [
    "GPUS",
    "MODELS",
    "GpuSpec",
    "UnknownHardware",
    "gpu",
    "gpu_for_probe",
    "gpu_named",
    "model",
    "model_aliases",
]

T = TypeVar("T")


class UnknownHardware(NotFound, LookupError):
    """A GPU or model name the catalog does not know; the message lists the closest names."""


@dataclass(frozen=True, slots=True)
class GpuSpec:
    name: str
    vram_gib: float
    bandwidth_gbs: float  # GB/s, 1e9 bytes
    fp16_tflops: float  # dense, fp32 accumulate
    tdp_w: int
    price_usd: int
    price_date: str  # the month the price refers to, YYYY-MM
    price_note: str  # new / used / MSRP, so nobody mistakes the figure for a quote
    aliases: tuple[str, ...] = ()  # other spellings, including the names NVML reports
    # The SM boost clock from the datasheet: a decode step's fixed cost (small kernels, launches) runs at
    # its pace (see estimator.Engine). 1.8 GHz, a middling figure, for cards built without one.
    boost_clock_ghz: float = 1.8

    @property
    def vram_bytes(self) -> int:
        return round(self.vram_gib * 2**30)


GPUS: tuple[GpuSpec, ...] = (
    # Volunteers' and clubs' desktop cards.
    GpuSpec("RTX 3060 12GB", 12, 360, 25.5, 170, 290, "2025-01", "new", ("NVIDIA GeForce RTX 3060",), 1.78),
    GpuSpec("RTX 3090", 24, 936, 71.0, 350, 850, "2025-01", "used", ("NVIDIA GeForce RTX 3090",), 1.7),
    GpuSpec(
        "RTX 4060 Ti 16GB", 16, 288, 44.1, 165, 450, "2025-01", "new", ("NVIDIA GeForce RTX 4060 Ti",), 2.54
    ),
    GpuSpec("RTX 4090", 24, 1008, 165.2, 450, 2000, "2025-01", "new", ("NVIDIA GeForce RTX 4090",), 2.52),
    GpuSpec(
        "RTX 5090", 32, 1792, 209.5, 575, 2000, "2025-01", "launch MSRP; street higher",
        ("NVIDIA GeForce RTX 5090",), 2.41,
    ),
    # Workstation cards, common in labs.
    GpuSpec("RTX A4000", 16, 448, 76.7, 140, 1000, "2025-01", "new", ("NVIDIA RTX A4000",), 1.56),
    GpuSpec("RTX A6000", 48, 768, 154.8, 300, 4500, "2025-01", "new", ("NVIDIA RTX A6000",), 1.8),
    # Datacenter cards. A100 figures are for the SXM4 modules; the PCIe cards have less bandwidth.
    GpuSpec("L4", 24, 300, 121.0, 72, 2500, "2025-01", "new", ("NVIDIA L4",), 2.04),
    GpuSpec("L40S", 48, 864, 362.05, 350, 8000, "2025-01", "new", ("NVIDIA L40S",), 2.52),
    GpuSpec(
        "A100 40GB", 40, 1555, 312.0, 400, 8000, "2025-01", "used",
        ("NVIDIA A100-SXM4-40GB", "NVIDIA A100-PCIE-40GB"), 1.41,
    ),
    GpuSpec(
        "A100 80GB", 80, 2039, 312.0, 400, 15000, "2025-01", "used",
        ("NVIDIA A100-SXM4-80GB", "NVIDIA A100 80GB PCIe"), 1.41,
    ),
    GpuSpec("H100 SXM", 80, 3350, 989.0, 700, 30000, "2025-01", "new", ("NVIDIA H100 80GB HBM3",), 1.98),
    GpuSpec("H200", 141, 4800, 989.0, 700, 35000, "2025-01", "new", ("NVIDIA H200",), 1.98),
)  # fmt: skip

# Instruct-tuned releases share the base model's architecture, so one spec serves both spellings.
_MODELS: tuple[tuple[ModelSpec, tuple[str, ...]], ...] = (
    (
        ModelSpec("Llama-3.1-8B", 4096, 32, 32, 8, 128, 14336, 128256, False, 131072),
        ("meta-llama/Llama-3.1-8B", "meta-llama/Llama-3.1-8B-Instruct", "meta-llama/Meta-Llama-3.1-8B"),
    ),
    (
        ModelSpec("Llama-3.1-70B", 8192, 80, 64, 8, 128, 28672, 128256, False, 131072),
        ("meta-llama/Llama-3.1-70B", "meta-llama/Llama-3.1-70B-Instruct", "meta-llama/Meta-Llama-3.1-70B"),
    ),
    (
        ModelSpec("Llama-3.2-3B", 3072, 28, 24, 8, 128, 8192, 128256, True, 131072),
        ("meta-llama/Llama-3.2-3B", "meta-llama/Llama-3.2-3B-Instruct"),
    ),
    (
        ModelSpec("Mistral-7B-v0.3", 4096, 32, 32, 8, 128, 14336, 32768, False, 32768),
        ("mistralai/Mistral-7B-v0.3", "mistralai/Mistral-7B-Instruct-v0.3"),
    ),
    # Qwen2.5 configs say 32768 positions; 128k needs YaRN scaling, which serving stacks enable per model.
    (
        ModelSpec("Qwen2.5-7B", 3584, 28, 28, 4, 128, 18944, 152064, False, 32768, attention_bias=True),
        ("Qwen/Qwen2.5-7B", "Qwen/Qwen2.5-7B-Instruct"),
    ),
    (
        ModelSpec("Qwen2.5-14B", 5120, 48, 40, 8, 128, 13824, 152064, False, 32768, attention_bias=True),
        ("Qwen/Qwen2.5-14B", "Qwen/Qwen2.5-14B-Instruct"),
    ),
    (
        ModelSpec("Qwen2.5-32B", 5120, 64, 40, 8, 128, 27648, 152064, False, 32768, attention_bias=True),
        ("Qwen/Qwen2.5-32B", "Qwen/Qwen2.5-32B-Instruct"),
    ),
    # Gemma 2's head_dim (256) times its 16 heads exceeds hidden_size (3584): the reason head_dim is a field.
    (
        ModelSpec("Gemma-2-9B", 3584, 42, 16, 8, 256, 14336, 256000, True, 8192, norms_per_layer=4),
        ("google/gemma-2-9b", "google/gemma-2-9b-it"),
    ),
    (
        ModelSpec("Phi-3-mini-4k", 3072, 32, 32, 32, 96, 8192, 32064, False, 4096),
        ("microsoft/Phi-3-mini-4k-instruct",),
    ),
)
MODELS: tuple[ModelSpec, ...] = tuple(spec for spec, _ in _MODELS)


def model_aliases(spec: ModelSpec) -> tuple[str, ...]:
    """The Hugging Face ids a catalog model is published under (empty for specs not from the catalog)."""
    return next((aliases for s, aliases in _MODELS if s == spec), ())


def _key(name: str) -> str:
    # Spellings differ in case, punctuation and vendor words ("NVIDIA GeForce RTX 3090" vs "rtx-3090").
    return re.sub(r"[^a-z0-9]", "", re.sub(r"\b(nvidia|geforce)\b", "", name.lower()))


def _find(kind: str, query: str, entries: Sequence[tuple[T, str, Iterable[str]]]) -> T:
    """An exact match on any spelling, else a unique partial one ("3090", "Qwen2.5-32B-Instruct-exl2")."""
    q = _key(query)
    keyed = [(value, name, {_key(n) for n in (name, *aliases)}) for value, name, aliases in entries]
    for value, _, keys in keyed:
        if q in keys:
            return value
    partial = [(value, name) for value, name, keys in keyed if q and any(q in k or k in q for k in keys)]
    if len(partial) == 1:
        return partial[0][0]
    names = [name for _, name, _ in keyed]
    close = [name for _, name in partial] or difflib.get_close_matches(query, names, n=5, cutoff=0.4)
    hint = f"did you mean {', '.join(close)}?" if close else f"known: {', '.join(names)}"
    raise UnknownHardware(f"unknown {kind} {query!r}; {hint}", param=kind)


def gpu(name: str) -> GpuSpec:
    """The catalog GPU called `name` (case, spaces, dashes and vendor words ignored)."""
    return _find("GPU", name, [(g, g.name, g.aliases) for g in GPUS])


def model(name: str) -> ModelSpec:
    """The catalog model called `name`, by its short name or a Hugging Face id."""
    return _find("model", name, [(spec, spec.name, aliases) for spec, aliases in _MODELS])


def gpu_named(name: str) -> GpuSpec | None:
    """The catalog entry whose name or an alias is `name` exactly (case, spaces, dashes and vendor words
    aside), or None: no partial match, since a card NVML names "RTX 4060" is not the catalog's 4060 Ti."""
    key = _key(name)
    return next((g for g in GPUS if key in {_key(n) for n in (g.name, *g.aliases)}), None)


def gpu_for_probe(name: str, vram_total_bytes: int) -> GpuSpec | None:
    """The catalog entry for a GPU as NVML names it, or None for a card the catalog does not know.

    NVML gives one name to cards sold with different memory (the 4060 Ti comes with 8 or 16 GiB), so an
    entry whose memory is more than 15% off the probed total is not taken for the same card.
    """
    key = _key(name)
    for g in GPUS:
        if key in {_key(n) for n in (g.name, *g.aliases)}:
            return g if abs(vram_total_bytes - g.vram_bytes) <= 0.15 * g.vram_bytes else None
    return None
