"""The estimator against published measurements: batch-1 decode within ±15%, memory within ±5%.

Every row names its source (URL and which table/row) and the exact conditions. The constants that explain
these rows are few and global (DECODE_BANDWIDTH_EFFICIENCY, the engines' cycles per layer and per step,
each card's datasheet bandwidth and boost clock); no row has a constant of its own. Rows that the model
cannot meet honestly stay in the table, marked `in_band=False` with the reason, and the test checks they are
still outside, so fixing the model means updating the table (and docs/planning.md, "Accuracy") on purpose.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from hardware.catalog import GpuSpec, gpu, model
from hardware.estimator import ModelSpec, decode_tokens_per_s, footprint, kv_bytes_per_token, weight_bytes

DECODE_BAND, MEMORY_BAND = 0.15, 0.05

# Architectures from each model's config.json on Hugging Face (hidden, layers, heads, kv heads, head_dim,
# intermediate, vocab, tied, positions).
TINYLLAMA = ModelSpec("TinyLlama-1.1B", 2048, 22, 32, 4, 64, 5632, 32000, False, 2048)
OPENLLAMA_3B = ModelSpec("OpenLlama-3B", 3200, 26, 32, 32, 100, 8640, 32000, False, 2048)
LLAMA_7B = ModelSpec("Llama-2-7B", 4096, 32, 32, 32, 128, 11008, 32000, False, 4096)
LLAMA_13B = ModelSpec("Llama-13B", 5120, 40, 40, 40, 128, 13824, 32000, False, 4096)
CODELLAMA_13B = ModelSpec("CodeLlama-13B", 5120, 40, 40, 40, 128, 13824, 32016, False, 16384)
LLAMA_33B = ModelSpec("Llama-33B", 6656, 60, 52, 52, 128, 17920, 32000, False, 2048)
CODELLAMA_34B = ModelSpec("CodeLlama-34B", 8192, 48, 64, 8, 128, 22016, 32000, False, 16384)
LLAMA2_70B = ModelSpec("Llama-2-70B", 8192, 80, 64, 8, 128, 28672, 32000, False, 4096)
LLAMA31_70B = model("Llama-3.1-70B")
QWEN25_7B = model("Qwen2.5-7B")

# Not in the catalog (nobody buys one new now), but the exllamav2 table measured it: GA102, 1008 GB/s,
# 160 TFLOPS fp16 with fp16 accumulation (80 with fp32), 1.86 GHz boost, per NVIDIA's datasheet.
RTX_3090_TI = GpuSpec("RTX 3090 Ti", 24, 1008, 80.0, 450, 0, "2025-01", "test only", (), 1.86)
ADA_4090, L4, H100 = gpu("RTX 4090"), gpu("L4"), gpu("H100 SXM")

# GPTQ stores a 16-bit scale and a 4-bit zero per group next to 4-bit weights: (g*4 + 20) / g bits per
# weight (turboderp, exllamav2 issue #3), and keeps the output head in fp16.
GPTQ_G128 = 4 + 20 / 128
GPTQ_G64 = 4 + 20 / 64
EXL2_README = "https://github.com/turboderp/exllamav2/blob/master/README.md (Performance table)"
PAPER = "https://arxiv.org/abs/2605.30571 (Chen 2026, batch-1 decode on H100/A100/L40S/L4; abstract)"


@dataclass(frozen=True, slots=True)
class Decode:
    spec: ModelSpec
    bits: float
    head_bits: float
    card: GpuSpec
    engine: str
    context: int
    published_tps: float
    source: str
    in_band: bool = True
    why: str = ""


def _exl2(spec: ModelSpec, bits: float, head: float, ti: float, ada: float, row: str) -> list[Decode]:
    # The README's "quick tests": exllamav2's own speed test, batch 1, short context (not stated; 256 here,
    # the cache read is then under 3% of a step for every row).
    source = f"{EXL2_README}, row {row}"
    return [
        Decode(spec, bits, head, RTX_3090_TI, "exllamav2", 256, ti, source),
        Decode(spec, bits, head, ADA_4090, "exllamav2", 256, ada, source),
    ]


DECODE: list[Decode] = [
    *_exl2(TINYLLAMA, 3.0, 6.0, 656, 770, "TinyLlama EXL2 3.0 bpw 1.1B"),
    *_exl2(TINYLLAMA, 4.0, 6.0, 602, 700, "TinyLlama EXL2 4.0 bpw 1.1B"),
    *_exl2(OPENLLAMA_3B, GPTQ_G128, 16.0, 259, 296, "OpenLlama GPTQ 3B g128 act-order"),
    *_exl2(LLAMA_7B, GPTQ_G128, 16.0, 181, 205, "Llama GPTQ 7B g128"),
    *_exl2(LLAMA_7B, 3.0, 6.0, 217, 257, "Llama2 EXL2 3.0 bpw 7B"),
    *_exl2(LLAMA_7B, 4.0, 6.0, 185, 211, "Llama2 EXL2 4.0 bpw 7B"),
    *_exl2(LLAMA_7B, 5.0, 6.0, 164, 179, "Llama2 EXL2 5.0 bpw 7B"),
    *_exl2(LLAMA_13B, GPTQ_G128, 16.0, 110, 114, "Llama GPTQ 13B g128"),
    *_exl2(LLAMA_33B, GPTQ_G128, 16.0, 44, 48, "Llama GPTQ 33B g128 act-order"),
    *_exl2(CODELLAMA_34B, 4.0, 6.0, 44, 50, "CodeLlama EXL2 4.0 bpw 34B"),
    *_exl2(LLAMA2_70B, 2.5, 6.0, 33, 38, "Llama2 EXL2 2.5 bpw 70B"),
    # bf16 under transformers (SDPA, eager, no CUDA graphs), context 2048. The paper gives the L4 step as
    # 62.32 ms; the H100 as 27% of the analytic memory floor, (weights + cache) / peak bandwidth, which is
    # 4.58 ms here, so 1 / (4.58 ms / 0.27) = 59 tokens/s.
    Decode(QWEN25_7B, 16.0, 16.0, L4, "transformers", 2048, 1000 / 62.32, f"{PAPER}: L4 bf16 62.32 ms/step"),
    Decode(QWEN25_7B, 16.0, 16.0, H100, "transformers", 2048, 59.0, f"{PAPER}: H100 at 27% of floor"),
    # GPTQ int4 through ExLlamaV2's kernels on the L4 (group size not stated in the abstract; 128 assumed).
    Decode(QWEN25_7B, GPTQ_G128, 16.0, L4, "exllamav2", 2048, 1000 / 17.36, f"{PAPER}: L4 GPTQ+ExLlamaV2"),
]


def _decode_estimate(row: Decode) -> float:
    return decode_tokens_per_s(
        row.spec, row.bits, row.card, context=row.context, head_bits=row.head_bits, engine=row.engine
    )


@pytest.mark.parametrize("row", DECODE, ids=lambda r: f"{r.spec.name}-{r.bits:.2f}-{r.card.name}-{r.engine}")
def test_batch_one_decode_matches_published(row: Decode) -> None:
    error = _decode_estimate(row) / row.published_tps - 1
    assert (abs(error) <= DECODE_BAND) == row.in_band, f"{error:+.1%} against {row.source}"


def test_the_decode_table_spans_what_the_issue_asks() -> None:
    in_band = [r for r in DECODE if r.in_band]
    sizes = {r.spec.parameters for r in in_band}
    assert min(sizes) < 1.5e9 and max(sizes) > 65e9
    architectures = {r.card.name for r in in_band}  # Ampere, Ada (desktop and datacenter), Hopper
    assert {"RTX 3090 Ti", "RTX 4090", "L4", "H100 SXM"} <= architectures
    assert len(in_band) >= 8


@dataclass(frozen=True, slots=True)
class Memory:
    published_bytes: float
    estimated_bytes: int
    source: str
    in_band: bool = True
    why: str = ""


GIB, MIB = 2**30, 2**20

MEMORY: list[Memory] = [
    # llama.cpp's own report of the weights it loaded: Llama 3.1 70B Q4_0, "model size = 37.22 GiB". Q4_0
    # is 4.5 bits per weight (32 4-bit values + a 16-bit scale); llama.cpp writes the output head as Q6_K
    # (6.5625 bits) and the token embedding as Q4_0, where our rule counts it at fp16 (+1.4 GiB here).
    Memory(
        37.22 * GIB,
        weight_bytes(LLAMA31_70B, 4.5, head_bits=6.5625),
        "https://github.com/ollama/ollama/pull/6279 (server log: model ftype Q4_0, model size 37.22 GiB)",
    ),
    # bf16 checkpoints as published: Qwen2.5-7B has 7.62 B parameters (model card), 2 bytes each.
    Memory(7.61e9 * 2, weight_bytes(QWEN25_7B, 16), "https://huggingface.co/Qwen/Qwen2.5-7B (7.61B params)"),
    # Whole-process VRAM. exllamav2's author measured CodeLlama-13B-instruct 2.65 bpw (h6) at a 2048-token
    # context: 7968 MiB "with all the overhead from Torch and CUDA".
    Memory(
        7968 * MIB,
        footprint(CODELLAMA_13B, 2.65, 2048, embeddings_on_gpu=False).total_bytes,
        "https://github.com/turboderp-org/exllamav2/issues/3 (turboderp, 2023-09-12)",
        in_band=False,
        why="the 1 GiB reserve is short of the ~2.2 GiB that scratch buffers (a 2048-token prefill chunk,"
        " fp32 logits, attention without flash-attn) and the CUDA context took in that 2023 build",
    ),
    # ExLlama (v1) with Llama-2-70B-chat GPTQ 4-bit g64 act-order on 2 × 24 GB, native 4096-token context:
    # 43.5 GB in all. Two GPUs, so two reserves; the cache is fp16 and the embedding stays in system RAM.
    Memory(
        43.5 * GIB,
        footprint(LLAMA2_70B, GPTQ_G64, 4096, head_bits=16, embeddings_on_gpu=False).total_bytes + GIB,
        "https://github.com/turboderp/exllama/issues/165 (alain40, 2023-07-19)",
        in_band=False,
        why="same cause as the row above: two processes' worth of scratch and context beyond the reserve",
    ),
]


@pytest.mark.parametrize("row", MEMORY, ids=lambda r: r.source.split()[0].rsplit("/", 2)[-2])
def test_memory_matches_published(row: Memory) -> None:
    error = row.estimated_bytes / row.published_bytes - 1
    assert (abs(error) <= MEMORY_BAND) == row.in_band, f"{error:+.1%} against {row.source}"


def test_the_paper_floor_quoted_above() -> None:
    # The H100 row's figure is derived from the paper's 27%. Its floor counts every parameter (embedding
    # included) plus the cache: with that definition the L4 row's 62.32 ms is the "roughly 81%" it reports.
    read = weight_bytes(QWEN25_7B, 16) + 2048 * kv_bytes_per_token(QWEN25_7B)
    assert read / (L4.bandwidth_gbs * 1e9) / 62.32e-3 == pytest.approx(0.81, abs=0.015)
    assert 0.27 / (read / (H100.bandwidth_gbs * 1e9)) == pytest.approx(59.0, rel=0.01)
