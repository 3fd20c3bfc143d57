"""Measured speeds as calibration samples, and a live cluster's cards as a fleet.

Two sources, each read into `calibration.Sample`s (a measured figure and the estimate for the same card,
model, batch and context) or `calibration.Skipped` (what could not be read, and why):

- **the GPU benchmark's JSON** (`tests/bench/bench_exl2.py --json`, `tests/gpu/run.sh --bench`): one card
  (`gpu`, as CUDA names it), one random-weight fp16 model of a real shape (`arch`, with the demo
  tokenizer's vocabulary, recovered from `decode_bytes`), and per ``PROMPTxSTREAMS`` level the aggregate
  tokens/s through the node (`node.rate`; the library alone, `raw.rate`, where the node's is missing),
  prompt reading included. The estimate is the same run: the prompts' prefill, then `tokens` decode steps
  at a batch of STREAMS. A level with several streams that ran no faster than one stream measured a queue
  (exllamav2 without flash-attn runs one sequence at a time), not a batch, and is skipped.
- **the admin API's node list** (`GET /admin/nodes`): each approved node's GPU summary ("2x NVIDIA GeForce
  RTX 3090", from `node.heartbeat.pool_from_probe`) mapped to catalog cards by their exact NVML names, and
  each ready model's `tokens_per_s`, the node's running average of one answer's tokens over its whole time.
  The model id is resolved as `hearth plan --model` resolves it; bits per weight are what the footprint
  leaves for weights (footprint − fp16 cache of `cache_tokens` − the 1 GiB reserve), solved against the
  estimator's storage rule; the batch is the jobs active at the heartbeat (at least 1) and the context an
  assumed HEARTBEAT_CONTEXT tokens. These samples are rougher than the benchmark's (the average includes
  each prompt's reading and any wait for a batch slot); a node with two kinds of card gives none, since its
  speed cannot be put on one card.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

from hardware.calibration import Sample, Skipped
from hardware.catalog import GpuSpec, gpu_named
from hardware.estimator import (
    DEFAULT_RESERVE_BYTES,
    decode_tokens_per_s,
    kv_bytes_per_token,
    prefill_tokens_per_s,
    weight_bytes,
)
from hardware.model_spec import ModelSpec
from hardware.plan_inputs import FleetEntry
from protocol.admin import Node, NodeList

__all__ = ["BENCH_SHAPES", "bench_samples", "cluster_fleet", "cluster_samples", "infer_bits", "node_cards"]

# The benchmark's model shapes (tests/gpu/gpu_model.py ARCHS; a test keeps the two in step), without the
# vocabulary, which is the demo tokenizer's and is read back from the benchmark's `decode_bytes`.
BENCH_SHAPES: dict[str, dict[str, int]] = {
    "llama-3.2-1b": dict(hidden=2048, layers=16, heads=32, kv_heads=8, inter=8192, context=8192),
    "llama-3.1-8b": dict(hidden=4096, layers=32, heads=32, kv_heads=8, inter=14336, context=8192),
}
QUEUE_SPEEDUP = 1.25  # several streams under this many times one stream's rate: they ran one at a time
HEARTBEAT_CONTEXT = 1024  # tokens per sequence assumed for a heartbeat's speed (a prompt and half an answer)
_SUMMARY_ITEM = re.compile(r"^\s*(?P<count>\d+)\s*x\s+(?P<name>.+?)\s*$")
_BPW_BAND = 0.05  # a footprint within 5% of the fp16 checkpoint's weights is read as 16 bits


def _bench_spec(arch: str, decode_bytes: int) -> ModelSpec:
    a = BENCH_SHAPES[arch]
    head_dim = a["hidden"] // a["heads"]
    base = ModelSpec(
        f"{arch} (benchmark)", a["hidden"], a["layers"], a["heads"], a["kv_heads"], head_dim, a["inter"], 1,
        False, a["context"],
    )  # fmt: skip
    # decode_bytes = every layer, the final norm and the head at fp16 (the embedding table left out).
    rest = decode_bytes - 2 * (base.num_layers * (base.layer_matmul_params + base.layer_small_params))
    vocab = round((rest - 2 * base.hidden_size) / (2 * base.hidden_size))
    if vocab < 1:
        raise ValueError("decode_bytes is smaller than the model's layers")
    return ModelSpec(
        base.name, base.hidden_size, base.num_layers, base.num_heads, base.num_kv_heads, head_dim,
        base.intermediate_size, vocab, False, base.max_context,
    )  # fmt: skip


def _level_rate(level: Any) -> float | None:
    for side in ("node", "raw"):
        rate = level.get(side, {}).get("rate") if isinstance(level.get(side), dict) else None
        if isinstance(rate, int | float) and rate > 0:
            return float(rate)
    return None


def bench_samples(doc: Any, source: str) -> tuple[list[Sample], list[Skipped]]:
    """Samples from the benchmark's JSON document (already parsed); `source` names it in messages."""
    if not isinstance(doc, dict) or not isinstance(doc.get("levels"), dict):
        return [], [Skipped(source, "not the GPU benchmark's JSON (no `levels`)")]
    name = doc.get("gpu")
    if not isinstance(name, str):
        return [], [Skipped(source, "no GPU in it (a --cpu-smoke run measures CPU stand-ins, not a card)")]
    card = gpu_named(name)
    if card is None:
        return [], [Skipped(source, f"its GPU {name!r} is not a card the catalog knows")]
    arch, decode_bytes, tokens = doc.get("arch"), doc.get("decode_bytes"), doc.get("tokens")
    if arch not in BENCH_SHAPES:
        return [], [Skipped(source, f"model shape {arch!r} is not one the benchmark builds")]
    if not isinstance(decode_bytes, int) or not isinstance(tokens, int) or tokens < 1:
        return [], [Skipped(source, "no `decode_bytes` or `tokens`: not the GPU benchmark's layout")]
    try:
        spec = _bench_spec(str(arch), decode_bytes)
    except ValueError as exc:
        return [], [Skipped(source, str(exc))]
    levels: dict[tuple[int, int], float | None] = {}
    skipped: list[Skipped] = []
    for key, level in doc["levels"].items():
        m = re.fullmatch(r"(\d+)x(\d+)", str(key))
        if not m or not isinstance(level, dict):
            skipped.append(Skipped(f"{source} level {key!r}", "not PROMPTxSTREAMS with a rate"))
            continue
        levels[int(m[1]), int(m[2])] = _level_rate(level)
    samples: list[Sample] = []
    for (prompt, streams), rate in sorted(levels.items()):
        what = f"{spec.name} at 16 bpw on {card.name}, {prompt}-token prompts × {streams} streams"
        if rate is None:
            skipped.append(Skipped(what, "no tokens/s measured"))
            continue
        alone = levels.get((prompt, 1))
        if streams > 1 and alone is not None and rate < QUEUE_SPEEDUP * alone:
            skipped.append(
                Skipped(what, f"ran at {rate / alone:.2f}× one stream's rate: the streams took turns (no "
                        "flash-attn?), a queue rather than a batch")
            )  # fmt: skip
            continue
        context = min(spec.max_context, prompt + tokens // 2)
        decode_s = tokens * streams / decode_tokens_per_s(spec, 16, card, streams, context)
        prefill_s = prompt * streams / prefill_tokens_per_s(spec, card)
        estimate = tokens * streams / (prefill_s + decode_s)
        samples.append(Sample(card.name, what, streams, context, round(rate, 3), round(estimate, 3)))
    return samples, skipped


def node_cards(node: Node) -> dict[GpuSpec, int] | str:
    """The node's cards by catalog entry, or why they cannot be read."""
    summary = node.gpus
    if summary is None:
        return "not heard from yet (no GPU summary)"
    if summary.strip().lower() == "cpu":
        return "a CPU node (no GPU)"
    cards: dict[GpuSpec, int] = {}
    for item in summary.split(","):
        m = _SUMMARY_ITEM.match(item)
        if not m:
            return f"GPU summary {summary!r} is not COUNTx NAME, ..."
        card = gpu_named(m["name"])
        if card is None:
            return f"{m['name']!r} is not a card the catalog knows"
        cards[card] = cards.get(card, 0) + int(m["count"])
    memory = node.memory_total_bytes
    if memory is not None and memory > 1.15 * sum(c.vram_bytes * n for c, n in cards.items()):
        # The pool is the cards' free memory at start: more than the catalog's cards hold means other cards.
        return f"reports {memory / 2**30:.0f} GiB, more than the catalog's {summary} hold"
    return cards


def _approved_cards(nodes: NodeList, skipped: list[Skipped]) -> Iterator[tuple[Node, dict[GpuSpec, int]]]:
    """Each approved node with its cards; a node whose cards cannot be counted goes to ``skipped``."""
    for node in nodes.nodes:
        if node.state != "approved":
            continue
        cards = node_cards(node)
        if isinstance(cards, str):
            skipped.append(Skipped(f"node {node.node_id}", cards))
        else:
            yield node, cards


def cluster_fleet(nodes: NodeList) -> tuple[tuple[FleetEntry, ...], list[Skipped]]:
    """The approved nodes' cards as a fleet, and the nodes left out (CPU nodes, unknown cards)."""
    counts: dict[str, FleetEntry] = {}
    skipped: list[Skipped] = []
    for _, cards in _approved_cards(nodes, skipped):
        for card, n in cards.items():
            prior = counts.get(card.name)
            counts[card.name] = FleetEntry(card, n + (prior.count if prior else 0))
    return tuple(counts.values()), skipped


def infer_bits(spec: ModelSpec, footprint_bytes: int, cache_tokens: int) -> float | None:
    """Bits per weight that leave the footprint's weights (an EXL2 or fp16 checkpoint's files), or None."""
    weights = footprint_bytes - cache_tokens * kv_bytes_per_token(spec, 16) - DEFAULT_RESERVE_BYTES
    fp16 = weight_bytes(spec, 16)
    if abs(weights - fp16) <= _BPW_BAND * fp16:
        return 16.0
    lo, hi = 2.0, 8.0
    if not weight_bytes(spec, lo) <= weights <= weight_bytes(spec, hi):
        return None
    for _ in range(40):  # the storage rule is increasing in bits: bisect
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if weight_bytes(spec, mid) <= weights else (lo, mid)
    return round(lo, 2)


def cluster_samples(
    nodes: NodeList, resolve: Callable[[str], ModelSpec | str]
) -> tuple[list[Sample], list[Skipped]]:
    """Samples from the node list; `resolve(model_id)` gives the model's spec or why it has none."""
    samples: list[Sample] = []
    skipped: list[Skipped] = []
    specs: dict[str, ModelSpec | str] = {}
    for node, cards in _approved_cards(nodes, skipped):
        if len(cards) > 1:
            names = " and ".join(c.name for c in cards)
            skipped.append(Skipped(f"node {node.node_id}", f"mixes {names}: its speed is no one card's"))
            continue
        card = next(iter(cards))
        for m in node.models:
            what = f"{m.id} on {node.node_id} ({card.name})"
            if m.phase != "ready" or m.tokens_per_s <= 0:
                skipped.append(Skipped(what, "no speed measured yet (not ready, or no answer finished)"))
                continue
            if m.id not in specs:
                specs[m.id] = resolve(m.id)
            spec = specs[m.id]
            if isinstance(spec, str):
                skipped.append(Skipped(what, spec))
                continue
            bits = infer_bits(spec, m.footprint_bytes, m.cache_tokens)
            if bits is None:
                skipped.append(
                    Skipped(what, f"its footprint ({m.footprint_bytes / 2**30:.1f} GiB with {m.cache_tokens} "
                            f"cache tokens) is no quantization of {spec.name} between 2 and 8 or 16 bits")
                )  # fmt: skip
                continue
            batch = max(1, min(m.active, m.max_sequences))
            context = max(1, min(HEARTBEAT_CONTEXT, m.cache_tokens or HEARTBEAT_CONTEXT, spec.max_context))
            per_stream = decode_tokens_per_s(spec, bits, card, batch, context) / batch
            samples.append(
                Sample(
                    card.name, f"{spec.name} at {bits:g} bpw on {node.node_id}, {batch} active", batch,
                    context, round(m.tokens_per_s, 3), round(per_stream, 3),
                )
            )  # fmt: skip
    return samples, skipped
