"""Golden figures for the memory and speed estimator; each expected number is worked out in its comment."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest

from hardware import catalog
from hardware.estimator import (
    COMPUTE_EFFICIENCY,
    DECODE_BANDWIDTH_EFFICIENCY,
    DEFAULT_RESERVE_BYTES,
    ENGINES,
    ModelConfigError,
    ModelSpec,
    decode_tokens_per_s,
    default_head_bits,
    fits,
    footprint,
    kv_bytes_per_token,
    load_seconds,
    prefill_tokens_per_s,
    split_footprint,
    weight_bytes,
)

GIB = 1 << 30
L8 = catalog.model("Llama-3.1-8B")
L70 = catalog.model("Llama-3.1-70B")
L3 = catalog.model("Llama-3.2-3B")


@pytest.mark.parametrize(
    ("spec", "bits", "kwargs", "expected"),
    [
        # fp16: all 8,030,261,248 parameters at 2 bytes, untied head and embedding both on the GPU (≈16.06 GB).
        (L8, 16, {}, 16_060_522_496),
        # fp32 (the CPU reference backend): twice the fp16 figure.
        (L8, 32, {}, 32_121_044_992),
        # EXL2 4.0: 6,979,321,856 linear weights at 4 bits (3,489,660,928 B) + norms fp16 (532,480 B)
        # + head 525,336,576 at 6 bits (394,002,432 B) + embedding fp16 (1,050,673,152 B).
        (L8, 4.0, {}, 4_934_868_992),
        # The same under exllamav2, which keeps the embedding table in system RAM: minus 1,050,673,152 B.
        (L8, 4.0, {"embeddings_on_gpu": False}, 3_884_195_840),
        # EXL2 8.0 takes an 8-bit head: 6,979,321,856 + 532,480 + 525,336,576 + 1,050,673,152.
        (L8, 8.0, {}, 8_555_864_064),
        # An explicit head width wins over the default: 8B at 4.0 with an 8-bit head adds 525,336,576 × 2 bits.
        (L8, 4.0, {"head_bits": 8.0}, 4_934_868_992 + 131_334_144),
        # Tied fp16 model: the shared matrix is stored once, parameters × 2.
        (L3, 16, {}, 3_212_749_824 * 2),
        # Tied fp16 model with the table off the GPU: the GPU still needs the matrix once, as the head.
        (L3, 16, {"embeddings_on_gpu": False}, 3_212_749_824 * 2),
        # Tied model quantized: the converter writes a separate 6-bit head beside the fp16 embedding.
        # 2,818,572,288 × 0.5 + 350,208 + 394,002,432 × 0.75 + 394,002,432 × 2.
        (L3, 4.0, {}, 2_493_143_040),
        # 70B at 4.65: 68,451,041,280 × 4.65 / 8 + norms + 1,050,673,152 × 0.75 + 1,050,673,152 × 2 ≈ 42.7 GB.
        (L70, 4.65, {}, 42_679_156_736),
    ],
)
def test_weight_bytes(spec: ModelSpec, bits: float, kwargs: dict[str, Any], expected: int) -> None:
    assert weight_bytes(spec, bits, **kwargs) == expected


@pytest.mark.parametrize(
    ("bits", "head"),
    [
        (16, 16.0),  # unquantized: the head is the checkpoint's own width
        (4.0, 6.0),  # exllamav2's converter default (-hb 6)
        (6.5, 6.0),  # still the default below 8 bpw
        (8.0, 8.0),  # 8 bpw conversions customarily carry an 8-bit head
    ],
)
def test_default_head_bits(bits: float, head: float) -> None:
    assert default_head_bits(bits) == head


@pytest.mark.parametrize(
    "bits",
    [
        0,  # nothing stores weights in zero bits
        12,  # between EXL2's 8 and fp16 there is no format
        64,  # fp64 checkpoints are not served
        -4,  # negative
    ],
)
def test_impossible_bits_are_refused(bits: float) -> None:
    with pytest.raises(ValueError, match="bits per weight"):
        weight_bytes(L8, bits)


@pytest.mark.parametrize(
    ("spec", "cache_bits", "expected"),
    [
        (L8, 16, 131_072),  # 2 × 32 layers × 8 kv heads × 128 × 2 bytes
        (L8, 8, 69_632),  # 65,536 values × (8 + 0.5 scale bits) / 8
        (L8, 4, 36_864),  # 65,536 values × 4.5 / 8
        (L70, 16, 327_680),  # 2 × 80 × 8 × 128 × 2: GQA keeps 70B's cache only 2.5× 8B's
        (catalog.model("Qwen2.5-7B"), 16, 57_344),  # 2 × 28 × 4 × 128 × 2: only 4 kv heads
        (catalog.model("Gemma-2-9B"), 16, 344_064),  # 2 × 42 × 8 × 256 × 2: wide heads
        # 2 × 32 × 32 × 96 × 2: no grouped-query attention, the costliest per token.
        (catalog.model("Phi-3-mini-4k"), 16, 393_216),
    ],
)
def test_kv_bytes_per_token(spec: ModelSpec, cache_bits: int, expected: int) -> None:
    assert kv_bytes_per_token(spec, cache_bits) == expected


def test_unknown_cache_width_is_refused() -> None:
    with pytest.raises(ValueError, match="cache bits"):
        kv_bytes_per_token(L8, 5)


def test_footprint_adds_weights_cache_and_reserve() -> None:
    fp = footprint(L8, 4.0, cache_tokens=16_384, cache_bits=16)
    assert fp.weights_bytes == 4_934_868_992
    assert fp.cache_bytes == 16_384 * 131_072  # 2 GiB
    assert fp.reserve_bytes == DEFAULT_RESERVE_BYTES
    assert fp.total_bytes == 4_934_868_992 + 2 * GIB + GIB


@pytest.mark.parametrize(
    ("spec", "bits", "tokens", "gpu", "expected"),
    [
        (L8, 4.0, 16_384, "RTX 3060 12GB", True),  # ≈8.2 GB on a 12 GiB card
        (L8, 16, 8_192, "RTX 3060 12GB", False),  # 16 GB of fp16 weights alone exceed 12 GiB
        (L8, 16, 8_192, "RTX 4090", True),  # ≈18.2 GB in 24 GiB
        (L70, 4.65, 8_192, "RTX 4090", False),  # ≈46.4 GB cannot fit one 24 GiB card
        (L70, 4.65, 8_192, "RTX A6000", True),  # but fits one 48 GiB card
        (L70, 16, 8_192, "H200", True),  # fp16 70B (≈141 GB) + 8k cache squeezes into an H200
        (L70, 16, 8_192, "H100 SXM", False),  # and is twice an H100
    ],
)
def test_fits_one_gpu(spec: ModelSpec, bits: float, tokens: int, gpu: str, expected: bool) -> None:
    assert fits(footprint(spec, bits, tokens), catalog.gpu(gpu).vram_bytes) is expected


def test_70b_at_4_65_fits_two_48gb_cards_not_one_24gb_card() -> None:
    fp = footprint(L70, 4.65, 8_192)
    assert not fits(fp, catalog.gpu("RTX 3090").vram_bytes)
    assert fits(fp, 2 * catalog.gpu("RTX A6000").vram_bytes)


@pytest.mark.parametrize(
    ("spec", "bits", "tokens", "gpus", "used"),
    [
        # 70B at 4.65 with a 32k fp16 cache (≈54.5 GB) spills from one 48 GiB card onto the second.
        (L70, 4.65, 32_768, ["RTX A6000"] * 2, 2),
        # The same on 2 × 24 GiB: the layers run out of room before the head is placed.
        (L70, 4.65, 32_768, ["RTX 3090"] * 2, None),
        # fp16 70B over four A100-80GB uses the first two, in order, as exllamav2's autosplit would.
        (L70, 16, 8_192, ["A100 80GB"] * 4, 2),
        # A model that fits the first card leaves the others untouched (no reserve charged there).
        (L8, 4.0, 8_192, ["RTX 3090"] * 2, 1),
    ],
)
def test_split_footprint(
    spec: ModelSpec, bits: float, tokens: int, gpus: list[str], used: int | None
) -> None:
    free = [catalog.gpu(g).vram_bytes for g in gpus]
    split = split_footprint(spec, bits, tokens, free)
    if used is None:
        assert split is None
        return
    assert split is not None
    assert sum(1 for b in split if b) == used
    assert all(b <= f for b, f in zip(split, free, strict=True))
    # Everything is placed once, and each GPU in use pays its own reserve.
    total = footprint(spec, bits, tokens).total_bytes + (used - 1) * DEFAULT_RESERVE_BYTES
    assert sum(split) == pytest.approx(total, abs=spec.num_layers + 2)  # per-item rounding up


@pytest.mark.parametrize(
    "spec",
    [
        L8,  # the common volunteer model
        catalog.model("Qwen2.5-14B"),  # mid-size
        catalog.model("Phi-3-mini-4k"),  # small, cache-heavy (no GQA)
    ],
)
def test_decode_speed_follows_memory_bandwidth(spec: ModelSpec) -> None:
    gpus = ("4090", "3090", "3060", "H100", "H200")
    speed = {g: decode_tokens_per_s(spec, 4.0, catalog.gpu(g)) for g in gpus}
    assert speed["4090"] > speed["3090"] > speed["3060"]
    assert speed["H200"] > speed["H100"]  # same compute, 43% more bandwidth


def test_decode_golden_batch_one() -> None:
    # One step reads the weights the GPU holds under exllamav2 (3,884,195,840 B) plus 2,048 tokens of
    # cache (268,435,456 B) at 87% of the 4090's 1,008 GB/s, then pays exllamav2's fixed cost, 32 layers ×
    # 90k cycles + 250k cycles at 2.52 GHz (1.24 ms): ≈167 tokens/s.
    fixed = ENGINES["exllamav2"]
    overhead = (32 * fixed.cycles_per_layer + fixed.cycles_per_step) / 2.52e9
    expected = 1 / ((3_884_195_840 + 2048 * 131_072) / (1008e9 * DECODE_BANDWIDTH_EFFICIENCY) + overhead)
    assert decode_tokens_per_s(L8, 4.0, catalog.gpu("RTX 4090"), context=2048) == pytest.approx(expected)
    assert expected == pytest.approx(167.3, abs=0.1)


def test_small_models_are_not_bandwidth_bound() -> None:
    # A 1B model reads ~8x fewer bytes than an 8B one but runs nowhere near 8x faster: the fixed per-step
    # cost dominates it (exllamav2's own table: TinyLlama 770 t/s vs Llama-2-7B 257 t/s at 3 bpw on a 4090).
    gpu = catalog.gpu("RTX 4090")
    small = ModelSpec("TinyLlama-1.1B", 2048, 22, 32, 4, 64, 5632, 32000, False, 2048)
    ratio = decode_tokens_per_s(small, 4.0, gpu, context=0) / decode_tokens_per_s(L8, 4.0, gpu, context=0)
    read_ratio = weight_bytes(L8, 4.0, embeddings_on_gpu=False) / weight_bytes(
        small, 4.0, embeddings_on_gpu=False
    )
    assert ratio < 0.6 * read_ratio  # bandwidth alone would make them equal


def test_engines_differ_in_fixed_cost_only() -> None:
    gpu = catalog.gpu("H100 SXM")
    eager = decode_tokens_per_s(L8, 16, gpu, engine="transformers")
    assert eager < decode_tokens_per_s(L8, 16, gpu, engine="exllamav2")
    with pytest.raises(ValueError, match="unknown engine"):
        decode_tokens_per_s(L8, 16, gpu, engine="vllm")


@pytest.mark.parametrize(
    ("change", "faster"),
    [
        ({"bits_per_weight": 3.0}, True),  # fewer bytes of weights to read
        ({"context": 32_768}, False),  # a long cache is read every step too
        ({"cache_bits": 4}, True),  # a Q4 cache reads fewer bytes than FP16
        ({"batch": 8}, True),  # aggregate: eight sequences share one read of the weights
    ],
)
def test_decode_speed_moves_the_right_way(change: dict[str, Any], faster: bool) -> None:
    base: dict[str, Any] = {"bits_per_weight": 4.0, "batch": 1, "context": 4096, "cache_bits": 16}
    gpu = catalog.gpu("RTX 3090")
    before = decode_tokens_per_s(L8, gpu=gpu, **base)
    after = decode_tokens_per_s(L8, gpu=gpu, **(base | change))
    assert (after > before) is faster


def test_large_batches_become_compute_bound() -> None:
    # At batch 1024 the arithmetic, not the reads, sets the pace; per-sequence speed must fall well below batch 1.
    gpu = catalog.gpu("RTX 3060 12GB")
    single = decode_tokens_per_s(L8, 4.0, gpu, batch=1, context=0)
    aggregate = decode_tokens_per_s(L8, 4.0, gpu, batch=1024, context=0)
    compute_cap = gpu.fp16_tflops * 1e12 * COMPUTE_EFFICIENCY / (2 * (L8.parameters - L8.embedding_params))
    assert aggregate == pytest.approx(compute_cap, rel=0.01)
    assert aggregate / 1024 < single


def test_prefill_golden() -> None:
    # 165.2 TFLOPS × 0.5 / (2 × 6,979,321,856 matmul weights) ≈ 5,918 prompt tokens/s on a 4090.
    assert prefill_tokens_per_s(L8, catalog.gpu("RTX 4090")) == pytest.approx(5917.7, abs=1)
    h100, rtx4090 = catalog.gpu("H100 SXM"), catalog.gpu("RTX 4090")
    assert prefill_tokens_per_s(L8, h100) > prefill_tokens_per_s(L8, rtx4090)


@pytest.mark.parametrize(
    ("bits", "disk", "seconds"),
    [
        (16, 2.0, 8.03),  # 16.06 GB from an NVMe drive at 2 GB/s
        (4.0, 0.5, 9.87),  # 4.93 GB from a SATA SSD at 0.5 GB/s
    ],
)
def test_load_seconds(bits: float, disk: float, seconds: float) -> None:
    assert load_seconds(L8, bits, disk) == pytest.approx(seconds, abs=0.01)


LLAMA_31_8B_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "max_position_embeddings": 131072,
    "vocab_size": 128256,
    "tie_word_embeddings": False,
    "rope_theta": 500000.0,
}
GEMMA_2_9B_CONFIG = {  # no tie_word_embeddings key, as in google/gemma-2-9b
    "model_type": "gemma2",
    "hidden_size": 3584,
    "intermediate_size": 14336,
    "num_hidden_layers": 42,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 256,
    "max_position_embeddings": 8192,
    "vocab_size": 256000,
}
QWEN_25_7B_CONFIG = {  # no attention_bias key, as in Qwen/Qwen2.5-7B
    "model_type": "qwen2",
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "max_position_embeddings": 32768,
    "vocab_size": 152064,
    "tie_word_embeddings": False,
}


def without(config: dict[str, Any], key: str) -> dict[str, Any]:
    return {k: v for k, v in config.items() if k != key}


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        # Llama 3.1 8B's real config (no head_dim key): reads back as the catalog entry.
        (LLAMA_31_8B_CONFIG, {"parameters": 8_030_261_248, "head_dim": 128, "num_kv_heads": 8}),
        # No num_key_value_heads: plain multi-head attention, as transformers assumes.
        (LLAMA_31_8B_CONFIG | {"num_key_value_heads": None}, {"num_kv_heads": 32}),
        # An explicit head_dim wins over hidden / heads (Gemma 2: 256, not 3584 / 16).
        ({**LLAMA_31_8B_CONFIG, "head_dim": 256, "num_attention_heads": 16}, {"head_dim": 256}),
        # Gemma 2 without tie_word_embeddings: its config class ties by default, and it has four norms per layer.
        (GEMMA_2_9B_CONFIG, {"tied_embeddings": True, "parameters": 9_241_705_984}),
        # Qwen2 has q/k/v biases without saying so in its config.
        (QWEN_25_7B_CONFIG, {"attention_bias": True, "parameters": 7_615_616_512}),
        # A multimodal wrapper keeps the language model under text_config.
        ({"model_type": "llava", "text_config": LLAMA_31_8B_CONFIG}, {"hidden_size": 4096, "num_layers": 32}),
        # Missing tie_word_embeddings on a Llama means untied (LlamaConfig's default).
        (without(LLAMA_31_8B_CONFIG, "tie_word_embeddings"), {"tied_embeddings": False}),
    ],
)
def test_from_hf_config(config: dict[str, Any], expected: dict[str, Any]) -> None:
    spec = ModelSpec.from_hf_config(config, name="m")
    assert {k: getattr(spec, k) for k in expected} == expected


def test_from_hf_config_matches_the_catalog() -> None:
    spec = ModelSpec.from_hf_config(LLAMA_31_8B_CONFIG, name="Llama-3.1-8B")
    assert spec == L8


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (without(LLAMA_31_8B_CONFIG, "hidden_size"), "no hidden_size"),  # a required key is missing
        (LLAMA_31_8B_CONFIG | {"num_local_experts": 8}, "mixture-of-experts"),  # Mixtral-style MoE
        (LLAMA_31_8B_CONFIG | {"num_hidden_layers": True}, "must be an integer"),  # a bool is not a count
        (LLAMA_31_8B_CONFIG | {"num_hidden_layers": 32.0}, "must be an integer"),  # nor is a float
        (LLAMA_31_8B_CONFIG | {"num_key_value_heads": 7}, "cannot share"),  # heads must group evenly
        (LLAMA_31_8B_CONFIG | {"num_attention_heads": 30}, "not a multiple"),  # no head_dim, uneven split
        (LLAMA_31_8B_CONFIG | {"head_dim": 0}, "positive integer"),  # nonsense sizes
    ],
)
def test_from_hf_config_refuses(config: dict[str, Any], message: str) -> None:
    with pytest.raises(ModelConfigError, match=message):
        ModelSpec.from_hf_config(config)


def _safetensors_tensors(path: Path) -> dict[str, Any]:
    # The format's header: 8-byte little-endian length, then JSON naming each tensor's dtype and shape.
    with path.open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header: dict[str, Any] = json.loads(f.read(length))
    header.pop("__metadata__", None)
    return header


def test_demo_model_config_matches_its_weights(demo_model_dir: Path) -> None:
    """The real config.json and safetensors of the generated demo model agree with the estimator."""
    config = json.loads((demo_model_dir / "config.json").read_text(encoding="utf-8"))
    spec = ModelSpec.from_hf_config(config)
    tensors = _safetensors_tensors(demo_model_dir / "model.safetensors")
    numel = 0
    for t in tensors.values():
        n = 1
        for d in t["shape"]:
            n *= d
        numel += n
    assert spec.parameters == numel
    assert {t["dtype"] for t in tensors.values()} == {"F32"}
    stored = sum(end - start for start, end in (t["data_offsets"] for t in tensors.values()))
    assert weight_bytes(spec, 32) == stored  # a tied model stores its shared matrix once
    assert spec.tied_embeddings
    assert kv_bytes_per_token(spec, 32) == 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * 4
