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
# Llama 3 and 3.1 share every shape the estimator reads (they differ in RoPE scaling and trained positions).
LLAMA3_8B, LLAMA3_70B = model("Llama-3.1-8B"), LLAMA31_70B

# Not in the catalog (nobody buys one new now), but the exllamav2 table measured it: GA102, 1008 GB/s,
# 160 TFLOPS fp16 with fp16 accumulation (80 with fp32), 1.86 GHz boost, per NVIDIA's datasheet.
RTX_3090_TI = GpuSpec("RTX 3090 Ti", 24, 1008, 80.0, 450, 0, "2025-01", "test only", (), 1.86)
ADA_4090, L4, H100 = gpu("RTX 4090"), gpu("L4"), gpu("H100 SXM")
AMPERE_3090, A6000, L40S, A100_SXM = gpu("RTX 3090"), gpu("RTX A6000"), gpu("L40S"), gpu("A100 80GB")
# Also test only, measured by the llama.cpp source below. NVIDIA's datasheets: A100 80GB PCIe 1,935 GB/s,
# 312 TFLOPS, 1.41 GHz boost; H100 PCIe 2,000 GB/s, 756 TFLOPS dense, 1.755 GHz boost. The Ada whitepaper's
# appendix: RTX 6000 Ada 960 GB/s, 364.2 TFLOPS (fp16, fp32 accumulate), 2.505 GHz boost.
A100_PCIE = GpuSpec("A100 80GB PCIe", 80, 1935, 312.0, 300, 0, "2025-01", "test only", (), 1.41)
H100_PCIE = GpuSpec("H100 PCIe", 80, 2000, 756.0, 350, 0, "2025-01", "test only", (), 1.755)
RTX_6000_ADA = GpuSpec("RTX 6000 Ada", 48, 960, 364.2, 300, 0, "2025-01", "test only", (), 2.505)

# GPTQ stores a 16-bit scale and a 4-bit zero per group next to 4-bit weights: (g*4 + 20) / g bits per
# weight (turboderp, exllamav2 issue #3), and keeps the output head in fp16.
GPTQ_G128 = 4 + 20 / 128
GPTQ_G64 = 4 + 20 / 64
EXL2_README = "https://github.com/turboderp/exllamav2/blob/master/README.md (Performance table)"
PAPER = "https://arxiv.org/abs/2605.30571 (Chen 2026, batch-1 decode on H100/A100/L40S/L4; abstract)"
LLAMA_CPP_BENCH = (
    "https://github.com/XiongjieDai/GPU-Benchmarks-on-LLM-Inference (README, LLaMA 3 tables, tg 512 column;"
    " llama-bench logs in 'LLaMA 3/*/<card>_v3.ipynb')"
)
GIB, MIB = 2**30, 2**20

# GGUF k-quants: Q4_K stores 256 weights as 4-bit values with 6-bit scales and mins and two fp16 block
# factors, 4.5 bits a weight; Q6_K 6.5625. Q4_K_M mixes the two inside the decoder (more Q6_K in attn_v and
# ffn_down), writes the output head as Q6_K and the token embedding as Q4_K; llama.cpp keeps the embedding in
# system RAM, as exllamav2 does.
Q4_K, Q6_K = 4.5, 6.5625


def _gguf_body_bits(spec: ModelSpec, size_gib: float, embedding_bits: float, head_bits: float) -> float:
    """The decoder's mean bits per weight that make our storage rule give llama-bench's reported size.

    The rule is linear in the bits, so two evaluations solve it. llama-bench rounds the size to 0.01 GiB,
    under 0.2% of these models.
    """
    target = size_gib * GIB - spec.embedding_params * embedding_bits / 8

    def gpu_bytes(bits: float) -> int:
        return weight_bytes(spec, bits, head_bits=head_bits, embeddings_on_gpu=False)

    low, high = gpu_bytes(4.0), gpu_bytes(8.0)
    return 4.0 + 4.0 * (target - low) / (high - low)


# "llama 8B Q4_K - Medium | 4.58 GiB" and "llama 70B Q4_K - Medium | 39.59 GiB" in the llama-bench logs.
Q4_K_M_8B = _gguf_body_bits(LLAMA3_8B, 4.58, Q4_K, Q6_K)
Q4_K_M_70B = _gguf_body_bits(LLAMA3_70B, 39.59, Q4_K, Q6_K)


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


# llama-bench's tg 512 generates 512 tokens from an empty prompt: the cache holds 256 tokens on average.
_HBM_WHY = (
    "streaming-bound on HBM: this llama.cpp build drew {share} of the datasheet bandwidth here (GDDR cards"
    " 75-82%), where the model assumes 87% for every engine; its fixed cost cannot make up a shortfall that"
    " grows with the weights"
)


def _llama_cpp(card: GpuSpec, spec: ModelSpec, bits: float, tps: float, what: str, share: str = "") -> Decode:
    head = 16.0 if bits == 16 else Q6_K
    source = f"{LLAMA_CPP_BENCH}, {card.name} {what} tg 512"
    why = _HBM_WHY.format(share=share) if share else ""
    return Decode(spec, bits, head, card, "llama.cpp", 256, tps, source, in_band=not share, why=why)


def _llama_cpp_card(
    card: GpuSpec, q4: float, f16: float, q4_70b: float | None, misses: dict[str, str]
) -> list[Decode]:
    rows = [
        _llama_cpp(card, LLAMA3_8B, Q4_K_M_8B, q4, "8B Q4_K_M", misses.get("8B Q4_K_M", "")),
        _llama_cpp(card, LLAMA3_8B, 16.0, f16, "8B F16", misses.get("8B F16", "")),
    ]
    if q4_70b is not None:
        rows.append(
            _llama_cpp(card, LLAMA3_70B, Q4_K_M_70B, q4_70b, "70B Q4_K_M", misses.get("70B Q4_K_M", ""))
        )
    return rows


# llama.cpp builds b2824-b2843 (May 2024, CUDA 12.1, CUDA graphs on), one card each, full offload. The three
# L40S rows set the engine's constants (hardware/estimator.py); every other row is a check.
LLAMA_CPP_ROWS: list[Decode] = [
    *_llama_cpp_card(AMPERE_3090, 115.42, 47.40, None, {}),
    *_llama_cpp_card(ADA_4090, 130.58, 54.84, None, {}),
    *_llama_cpp_card(A6000, 105.39, 40.71, 14.71, {}),
    *_llama_cpp_card(RTX_6000_ADA, 133.44, 52.32, 18.52, {}),
    *_llama_cpp_card(L40S, 115.55, 43.69, 15.46, {}),
    *_llama_cpp_card(A100_PCIE, 140.62, 54.84, 22.31, {"8B F16": "43%", "70B Q4_K_M": "48%"}),
    *_llama_cpp_card(A100_SXM, 135.04, 53.49, 24.61, {"8B F16": "39%", "70B Q4_K_M": "51%"}),
    *_llama_cpp_card(H100_PCIE, 145.55, 68.03, 25.03, {"8B F16": "51%", "70B Q4_K_M": "53%"}),
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
    *LLAMA_CPP_ROWS,
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
    architectures = {r.card.name for r in in_band}  # Ampere (desktop, datacenter), Ada, Hopper
    assert {"RTX 3090 Ti", "RTX 4090", "L4", "H100 SXM", "A100 80GB", "H100 PCIe"} <= architectures
    assert len(in_band) >= 8


def test_llama_cpp_constants_come_from_a_minority_of_its_rows() -> None:
    # The L40S rows fit the constants; the other cards' rows are the check, and most of them must hold.
    fitted = [r for r in LLAMA_CPP_ROWS if r.card is L40S]
    checks = [r for r in LLAMA_CPP_ROWS if r.card is not L40S]
    assert len(fitted) < len(checks) / 2
    assert all(r.in_band for r in fitted)
    assert sum(r.in_band for r in checks) > 2 * sum(not r.in_band for r in checks)


def test_q4_k_m_bits_derived_from_the_reported_sizes() -> None:
    # Between Q4_K and Q6_K, nearer Q4_K: the mix Q4_K_M names.
    for bits in (Q4_K_M_8B, Q4_K_M_70B):
        assert Q4_K < bits < (Q4_K + Q6_K) / 2


@dataclass(frozen=True, slots=True)
class Memory:
    published_bytes: float
    estimated_bytes: int
    source: str
    in_band: bool = True
    why: str = ""


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
    # llama-bench's report of an unquantized GGUF: "llama 8B F16 | 14.96 GiB | 8.03 B" (every tensor at fp16).
    Memory(14.96 * GIB, weight_bytes(LLAMA3_8B, 16), f"{LLAMA_CPP_BENCH}, llama 8B F16 size column"),
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
