"""Memory and speed estimates for decoder-only transformers (Llama, Mistral, Qwen2, Gemma 2, Phi-3 shapes).

Placement must decide whether a cold load fits (weights + cache + reserve) and the planner must answer
"which GPUs for model M" before a single byte is loaded, so everything here is arithmetic on the numbers in
a model's config.json. Each rule is written next to the function that applies it. The efficiency factors
are rough and meant to be recalibrated with the GPU benchmark (batch-1 decode as a fraction of bandwidth).

Mixture-of-experts models are refused rather than estimated: their memory and their per-token reads differ
by the expert count, and a confident wrong answer would do more harm than an error.

`ModelSpec` lives in `hardware.model_spec` (the catalog builds specs without this arithmetic) and is
re-exported here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from hardware.model_spec import ModelConfigError, ModelSpec

__all__ = [
    "CACHE_BITS",
    "COMPUTE_EFFICIENCY",
    "DECODE_BANDWIDTH_EFFICIENCY",
    "DEFAULT_RESERVE_BYTES",
    "ENGINES",
    "Accelerator",
    "Engine",
    "Footprint",
    "ModelConfigError",
    "ModelSpec",
    "decode_tokens_per_s",
    "default_head_bits",
    "fits",
    "footprint",
    "kv_bytes_per_token",
    "load_seconds",
    "prefill_tokens_per_s",
    "split_footprint",
    "weight_bytes",
]

# EXL2 quantizes to between 2 and 8 bits per weight; 16 and 32 are plain fp16/bf16 and fp32 checkpoints.
# Anything else is no format we serve, so it is refused rather than silently estimated.
_MIN_QUANT_BITS, _MAX_QUANT_BITS = 2.0, 8.0
_UNQUANTIZED_BITS = (16.0, 32.0)

# exllamav2's converter quantizes the output head separately, at 6 bits unless told otherwise (`-hb`);
# 8.0 bpw conversions customarily use an 8-bit head too, so a head below the body would be unusual.
_HEAD_BITS, _HIGH_HEAD_BITS = 6.0, 8.0

# Cache element sizes: FP16, Q8, Q6, Q4 (exllamav2's choices) and fp32 for the CPU reference backend.
CACHE_BITS = (32, 16, 8, 6, 4)
# exllamav2's quantized caches (ExLlamaV2Cache_Q) keep one fp16 scale per 32 values: +0.5 bit per value.
_Q_CACHE_SCALE_BITS = 0.5

# What a loaded model needs beyond weights and cache: the CUDA context (~0.3-0.5 GiB), the backend's
# scratch buffers for a prefill chunk and the logits. 1 GiB is a rough, deliberately generous default.
DEFAULT_RESERVE_BYTES = 1 << 30

# Batch-1 decode is a stream of matrix-vector products, bounded by memory bandwidth. The weight stream itself
# reaches ~87% of the datasheet figure; what made older, single-factor estimates look like "60-80%" is the
# fixed per-step cost below, which a single factor cannot follow from 1B to 70B. Calibrated against
# published measurements (docs/planning.md, "Accuracy", tests/hardware/test_published.py).
DECODE_BANDWIDTH_EFFICIENCY = 0.87
# Large GEMMs reach 60-80% of dense tensor peak on paper; prefill also pays for attention, norms and, for
# quantized weights, dequantizing into fp16 before cuBLAS runs. Half of peak is a fair middle.
COMPUTE_EFFICIENCY = 0.5


class Accelerator(Protocol):
    """What a speed estimate needs from a device; `catalog.GpuSpec` is one, a measured device another."""

    @property
    def bandwidth_gbs(self) -> float: ...  # GB/s, 1e9 bytes

    @property
    def fp16_tflops(self) -> float: ...  # dense fp16 tensor TFLOPS with fp32 accumulation

    @property
    def boost_clock_ghz(self) -> float: ...  # the SM boost clock: small kernels run at its pace


@dataclass(frozen=True, slots=True)
class Engine:
    """The fixed cost an inference engine pays per decode step, in GPU clock cycles.

    At batch 1 a layer is a handful of small kernels (norm, qkv, rope, attention, output, gate/up, down)
    plus their launches; once the weights are small those take longer than streaming the weights, and
    their length follows the SM clock, not the memory. The host adds a per-step cost (sampling, the head,
    Python). Cycles rather than seconds, so one engine's constants carry across cards of any clock.
    """

    name: str
    cycles_per_layer: float
    cycles_per_step: float


# exllamav2: fitted to the 22 rows of its own README table (1.1B to 70B, RTX 3090 Ti and 4090) together
# with DECODE_BANDWIDTH_EFFICIENCY: 90k cycles (~36-48 us) a layer, 250k (~0.1 ms) a step, all rows within
# ±10%. transformers (eager PyTorch, SDPA, no CUDA graphs): one kernel launch per op from Python, ~0.45 ms
# a layer on an H100; from the arXiv 2605.30571 H100 row (27% of the memory floor), checked on its L4 row.
# llama.cpp (CUDA, CUDA graphs on, builds of May 2024): fitted by weighted least squares, per-step cycles held
# at zero or above (the unconstrained fit goes negative, which no engine can be), to the three L40S rows of
# XiongjieDai/GPU-Benchmarks-on-LLM-Inference (Llama 3 8B Q4_K_M and F16, 70B Q4_K_M): 205k a layer, 0 a
# step, rounded to 200k. Checked on that source's other cards (tests/hardware/test_published.py): GDDR cards
# fall within ±15%; on HBM cards (A100, H100) its kernels of that time reached a smaller share of the
# bandwidth than this model allows for, and several of those rows stay outside.
ENGINES: dict[str, Engine] = {
    "exllamav2": Engine("exllamav2", 90_000, 250_000),
    "transformers": Engine("transformers", 880_000, 250_000),
    "llama.cpp": Engine("llama.cpp", 200_000, 0),
}


def _check_bits(bits_per_weight: float) -> float:
    bits = float(bits_per_weight)
    if bits in _UNQUANTIZED_BITS or _MIN_QUANT_BITS <= bits <= _MAX_QUANT_BITS:
        return bits
    raise ValueError(
        f"bits per weight must be between {_MIN_QUANT_BITS:g} and {_MAX_QUANT_BITS:g} (quantized) "
        f"or 16/32 (unquantized), not {bits_per_weight!r}"
    )


def default_head_bits(bits_per_weight: float) -> float:
    """The output head's bits: the checkpoint's own when unquantized, else exllamav2's 6 (8 at 8 bpw)."""
    bits = _check_bits(bits_per_weight)
    if bits >= 16:
        return bits
    return _HIGH_HEAD_BITS if bits >= _HIGH_HEAD_BITS else _HEAD_BITS


@dataclass(frozen=True, slots=True)
class _Parts:
    """Weights in bits: the embedding table, one decoder layer, and the output head with the final norm."""

    embedding: float
    layer: float
    head: float


def _weight_parts(
    spec: ModelSpec, bits_per_weight: float, head_bits: float | None, embeddings_on_gpu: bool
) -> _Parts:
    # The storage rule. Quantized (EXL2): the decoder's linear layers at the target bpw (EXL2's figure
    # already includes its scales); norms and biases stay fp16; the head is quantized on its own at
    # `head_bits`, even when tied, because the converter writes a separate head tensor; the embedding
    # table stays fp16. Unquantized: every tensor at the checkpoint's width, a tied head stored once.
    bits = _check_bits(bits_per_weight)
    quantized = bits < 16
    hb = default_head_bits(bits) if head_bits is None else _check_bits(head_bits)
    small = 16.0 if quantized else bits
    # exllamav2 keeps the embedding table in system RAM (both its autosplit and its default device map put
    # it on the CPU), so the GPU needs it only under the transformers backend: `embeddings_on_gpu` says which.
    embedding = spec.embedding_params * small if embeddings_on_gpu else 0.0
    separate_head = quantized or not spec.tied_embeddings or not embeddings_on_gpu
    head = (spec.embedding_params * hb if separate_head else 0.0) + spec.hidden_size * small
    layer = spec.layer_matmul_params * bits + spec.layer_small_params * small
    return _Parts(embedding=embedding, layer=layer, head=head)


def weight_bytes(
    spec: ModelSpec,
    bits_per_weight: float,
    *,
    head_bits: float | None = None,
    embeddings_on_gpu: bool = True,
) -> int:
    """Bytes of weights the GPU holds.

    By default the embedding table counts (the transformers backend holds it on the GPU, and the figure is
    then also the checkpoint's size on disk); pass `embeddings_on_gpu=False` for exllamav2.
    """
    parts = _weight_parts(spec, bits_per_weight, head_bits, embeddings_on_gpu)
    return round((parts.embedding + spec.num_layers * parts.layer + parts.head) / 8)


def _cache_bits(cache_bits: int) -> float:
    if cache_bits not in CACHE_BITS:
        raise ValueError(f"cache bits must be one of {', '.join(map(str, CACHE_BITS))}, not {cache_bits!r}")
    return cache_bits + (_Q_CACHE_SCALE_BITS if cache_bits < 16 else 0.0)


def kv_bytes_per_token(spec: ModelSpec, cache_bits: int = 16) -> int:
    """Cache bytes one token occupies: keys and values for every layer, 2 × layers × kv_heads × head_dim.

    Quantized caches (8, 6, 4 bits) add their fp16 scales, half a bit per value.
    """
    values = 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim
    return math.ceil(values * _cache_bits(cache_bits) / 8)


@dataclass(frozen=True, slots=True)
class Footprint:
    """GPU memory a loaded model needs, by purpose."""

    weights_bytes: int
    cache_bytes: int
    reserve_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.cache_bytes + self.reserve_bytes


def footprint(
    spec: ModelSpec,
    bits_per_weight: float,
    cache_tokens: int,
    cache_bits: int = 16,
    reserve_bytes: int = DEFAULT_RESERVE_BYTES,
    *,
    head_bits: float | None = None,
    embeddings_on_gpu: bool = True,
) -> Footprint:
    """Weights + a cache of `cache_tokens` tokens (all sequences together) + a fixed reserve."""
    if cache_tokens < 0 or reserve_bytes < 0:
        raise ValueError("cache tokens and reserve bytes cannot be negative")
    return Footprint(
        weights_bytes=weight_bytes(
            spec, bits_per_weight, head_bits=head_bits, embeddings_on_gpu=embeddings_on_gpu
        ),
        cache_bytes=cache_tokens * kv_bytes_per_token(spec, cache_bits),
        reserve_bytes=reserve_bytes,
    )


def fits(fp: Footprint, free_vram_bytes: int) -> bool:
    """Whether the whole footprint fits in one pool of free memory (one GPU, or a CPU node's budget)."""
    return fp.total_bytes <= free_vram_bytes


def split_footprint(
    spec: ModelSpec,
    bits_per_weight: float,
    cache_tokens: int,
    free_per_gpu: Sequence[int],
    *,
    cache_bits: int = 16,
    reserve_bytes: int = DEFAULT_RESERVE_BYTES,
    head_bits: float | None = None,
    embeddings_on_gpu: bool = True,
) -> tuple[int, ...] | None:
    """Bytes each GPU would hold when the model is split layer by layer, or None when it does not fit.

    Mirrors exllamav2's autosplit: GPUs fill in order, a layer never straddles two GPUs and its slice of
    the cache lives beside it, the head goes last, and every GPU used pays its own reserve (each has its
    own CUDA context). Summing free memory instead would accept splits that fail at the last layer.
    """
    parts = _weight_parts(spec, bits_per_weight, head_bits, embeddings_on_gpu)
    layer_cache = cache_tokens * kv_bytes_per_token(spec, cache_bits) / spec.num_layers
    items = [math.ceil(parts.layer / 8 + layer_cache)] * spec.num_layers + [math.ceil(parts.head / 8)]
    if parts.embedding:
        items.insert(0, math.ceil(parts.embedding / 8))
    used = [0] * len(free_per_gpu)
    gpu = 0
    for size in items:
        while gpu < len(used) and used[gpu] + size > free_per_gpu[gpu] - reserve_bytes:
            gpu += 1
        if gpu == len(used):
            return None
        used[gpu] += size
    return tuple(u + reserve_bytes if u else 0 for u in used)


def _matmul_flops_per_token(spec: ModelSpec, *, with_head: bool) -> float:
    # Two FLOPs (multiply, add) per weight of every matrix the token passes through. The embedding is a
    # lookup, not a product. The head runs for every generated token but only once per prompt.
    params = spec.num_layers * spec.layer_matmul_params + (spec.embedding_params if with_head else 0)
    return 2.0 * params


def decode_tokens_per_s(
    spec: ModelSpec,
    bits_per_weight: float,
    gpu: Accelerator,
    batch: int = 1,
    context: int = 2048,
    *,
    cache_bits: int = 16,
    head_bits: float | None = None,
    engine: str = "exllamav2",
) -> float:
    """Generated tokens per second, summed over `batch` sequences that each hold `context` tokens.

    A step reads every weight once for the whole batch, plus each sequence's own cache, at
    DECODE_BANDWIDTH_EFFICIENCY of the datasheet bandwidth; at large batches the arithmetic catches up, so
    the streaming part takes the longer of the memory and compute times. On top comes the engine's fixed
    cost, layers × cycles per layer + cycles per step, at the card's boost clock: it is what keeps a 1B
    model from running 20× faster than an 8B one. A model split over several GPUs runs its layers one GPU
    after another: estimate with the slowest card.
    """
    if batch < 1 or context < 0:
        raise ValueError("batch must be at least 1 and context cannot be negative")
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; known: {', '.join(ENGINES)}")
    fixed = ENGINES[engine]
    read = weight_bytes(spec, bits_per_weight, head_bits=head_bits, embeddings_on_gpu=False)
    read += batch * context * kv_bytes_per_token(spec, cache_bits)
    memory_s = read / (gpu.bandwidth_gbs * 1e9 * DECODE_BANDWIDTH_EFFICIENCY)
    attention_flops = 4.0 * spec.num_layers * spec.num_heads * spec.head_dim * context
    flops = batch * (_matmul_flops_per_token(spec, with_head=True) + attention_flops)
    compute_s = flops / (gpu.fp16_tflops * 1e12 * COMPUTE_EFFICIENCY)
    overhead_s = (spec.num_layers * fixed.cycles_per_layer + fixed.cycles_per_step) / (
        gpu.boost_clock_ghz * 1e9
    )
    return batch / (max(memory_s, compute_s) + overhead_s)


def prefill_tokens_per_s(spec: ModelSpec, gpu: Accelerator) -> float:
    """Prompt tokens per second: compute-bound, 2 × matmul parameters FLOPs per token.

    Attention's own FLOPs grow with the prompt and are left out: below ~4k tokens they add under ~10%
    for 7-8B models, inside the slack of the efficiency factor.
    """
    return gpu.fp16_tflops * 1e12 * COMPUTE_EFFICIENCY / _matmul_flops_per_token(spec, with_head=False)


def load_seconds(
    spec: ModelSpec, bits_per_weight: float, disk_gb_per_s: float, *, head_bits: float | None = None
) -> float:
    """Seconds to read the checkpoint from disk at `disk_gb_per_s` gigabytes (1e9 bytes) per second.

    Reading dominates a cold load on a node whose CUDA context is already up; a warm page cache makes it
    faster, a first-time kernel build slower.
    """
    if disk_gb_per_s <= 0:
        raise ValueError("disk speed must be positive")
    return weight_bytes(spec, bits_per_weight, head_bits=head_bits) / (disk_gb_per_s * 1e9)
