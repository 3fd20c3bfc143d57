"""The GPU and model catalogs: lookups by any spelling, helpful errors, and figures that add up."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from hardware import catalog
from hardware.catalog import GPUS, MODELS, UnknownHardware
from hardware.probe import NodeProbe
from protocol.errors import NotFound

MIB = 1 << 20
FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "nodes"


@pytest.mark.parametrize(
    ("query", "name"),
    [
        ("RTX 3090", "RTX 3090"),  # the catalog's own spelling
        ("rtx-3090", "RTX 3090"),  # case and punctuation do not matter
        ("NVIDIA GeForce RTX 4090", "RTX 4090"),  # the name NVML reports
        ("3060", "RTX 3060 12GB"),  # a unique fragment is enough
        ("a6000", "RTX A6000"),  # workstation card by its model number
        ("NVIDIA A100-SXM4-80GB", "A100 80GB"),  # an SXM module's NVML name
        ("NVIDIA A100 80GB PCIe", "A100 80GB"),  # the PCIe card maps to the same entry
        ("h100", "H100 SXM"),  # the only H100 in the catalog
        ("L4", "L4"),  # an exact short name beats being a fragment of "L40S"
        ("l40s", "L40S"),  # and the longer one is still reachable
    ],
)
def test_gpu_lookup(query: str, name: str) -> None:
    assert catalog.gpu(query).name == name


@pytest.mark.parametrize(
    ("query", "name"),
    [
        ("Llama-3.1-8B", "Llama-3.1-8B"),  # the catalog's own spelling
        ("llama 3.1 70b", "Llama-3.1-70B"),  # case and separators do not matter
        ("meta-llama/Llama-3.1-8B-Instruct", "Llama-3.1-8B"),  # a Hugging Face id of the instruct release
        ("meta-llama/Meta-Llama-3.1-70B", "Llama-3.1-70B"),  # the id it was first published under
        ("QWEN2.5-32B", "Qwen2.5-32B"),  # upper case
        ("turboderp/Qwen2.5-32B-Instruct-exl2", "Qwen2.5-32B"),  # a quantized repository naming the model
        ("google/gemma-2-9b-it", "Gemma-2-9B"),  # Gemma's instruct suffix
        ("phi-3-mini", "Phi-3-mini-4k"),  # a unique fragment
    ],
)
def test_model_lookup(query: str, name: str) -> None:
    assert catalog.model(query).name == name


@pytest.mark.parametrize(
    ("kind", "query", "listed"),
    [
        ("gpu", "a100", ["A100 40GB", "A100 80GB"]),  # ambiguous: both A100s are named
        ("gpu", "RTX 3080", ["RTX 3090", "RTX 4090"]),  # unknown: the nearest names are offered
        ("model", "qwen2.5", ["Qwen2.5-7B", "Qwen2.5-14B", "Qwen2.5-32B"]),  # ambiguous family name
        ("model", "Llama-3.1-405B", ["Llama-3.1-8B", "Llama-3.1-70B"]),  # a size the catalog lacks
    ],
)
def test_lookup_errors_name_the_candidates(kind: str, query: str, listed: list[str]) -> None:
    lookup = catalog.gpu if kind == "gpu" else catalog.model
    with pytest.raises(UnknownHardware) as caught:
        lookup(query)
    assert all(name in caught.value.message for name in listed), caught.value.message
    # One hierarchy: the API maps it to 404, plain Python callers can catch LookupError.
    assert isinstance(caught.value, NotFound)
    assert isinstance(caught.value, LookupError)


def test_lookup_error_without_near_names_lists_everything() -> None:
    with pytest.raises(UnknownHardware, match="known: RTX 3060 12GB, "):
        catalog.gpu("Voodoo")


@pytest.mark.parametrize(
    ("nvml_name", "vram_bytes", "expected"),
    [
        ("NVIDIA GeForce RTX 3090", 24576 * MIB, "RTX 3090"),  # as NVML reports a 3090
        ("NVIDIA GeForce RTX 4090", 24564 * MIB, "RTX 4090"),  # a 4090 reports slightly under 24 GiB
        ("NVIDIA GeForce RTX 4060 Ti", 16380 * MIB, "RTX 4060 Ti 16GB"),  # the 16 GB model
        ("NVIDIA GeForce RTX 4060 Ti", 8188 * MIB, None),  # same name, 8 GB: a different card
        ("NVIDIA H100 80GB HBM3", 81559 * MIB, "H100 SXM"),  # HBM modules report a little less than nominal
        ("NVIDIA H200", 143771 * MIB, "H200"),  # 141 GB nominal
        ("Tesla T4", 15360 * MIB, None),  # not in the catalog
    ],
)
def test_gpu_for_probe(nvml_name: str, vram_bytes: int, expected: str | None) -> None:
    found = catalog.gpu_for_probe(nvml_name, vram_bytes)
    assert (found.name if found else None) == expected


@pytest.mark.parametrize("path", sorted(FIXTURES.glob("*.json")), ids=lambda p: p.stem)
def test_fixture_gpus_are_in_the_catalog(path: Path) -> None:
    node = NodeProbe.from_json(path.read_text(encoding="utf-8"))
    assert all(catalog.gpu_for_probe(g.name, g.vram_total_bytes) for g in node.gpus)


@pytest.mark.parametrize(
    ("name", "published"),
    [
        # Totals from each model's safetensors index / model card, which the architecture numbers must reproduce.
        ("Llama-3.1-8B", 8_030_261_248),
        ("Llama-3.1-70B", 70_553_706_496),
        ("Llama-3.2-3B", 3_212_749_824),  # tied embeddings: the matrix counts once
        ("Mistral-7B-v0.3", 7_248_023_552),
        ("Qwen2.5-7B", 7_615_616_512),  # q/k/v biases included
        ("Qwen2.5-14B", 14_770_033_664),
        ("Qwen2.5-32B", 32_763_876_352),
        ("Gemma-2-9B", 9_241_705_984),  # four norms per layer
        ("Phi-3-mini-4k", 3_821_079_552),
    ],
)
def test_catalog_models_match_published_parameter_counts(name: str, published: int) -> None:
    assert catalog.model(name).parameters == published


def test_every_catalog_model_has_a_hugging_face_id() -> None:
    assert all(re.fullmatch(r"[\w.-]+/[\w.-]+", a) for m in MODELS for a in catalog.model_aliases(m))
    assert all(catalog.model_aliases(m) for m in MODELS)


def test_gpu_figures_are_sane() -> None:
    keys = [re.sub(r"[^a-z0-9]", "", n.lower()) for g in GPUS for n in (g.name, *g.aliases)]
    assert len(keys) == len(set(keys)), "two entries answer to the same name"
    for g in GPUS:
        assert g.vram_gib > 0 and g.bandwidth_gbs > 0 and g.fp16_tflops > 0 and g.tdp_w > 0, g.name
        assert g.price_usd > 0 and re.fullmatch(r"20\d\d-\d\d", g.price_date), g.name
    # Datacenter parts out-run the desktop ones on both axes, as their datasheets say.
    bandwidth = [catalog.gpu(g).bandwidth_gbs for g in ("H100", "4090", "3060")]
    assert bandwidth == sorted(bandwidth, reverse=True)
    assert catalog.gpu("A6000").fp16_tflops > catalog.gpu("3090").fp16_tflops  # full-rate fp32 accumulate
