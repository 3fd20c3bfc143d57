"""Random-weight models of real architectures for the GPU tests and benchmark (no download anywhere).

Weight values do not change speed, so a Llama-3.2-1B- or Llama-3.1-8B-shaped model with random fp16 weights
runs at the speed of the real one. The tokenizer is the demo model's (trained on the shipped corpus), and
the vocabulary is that tokenizer's, so every id the model can sample decodes; the real models' larger
vocabularies would add their output layer's reads (4–6 % of an 8B model's bytes per token). Answers are
noise: the tests and the benchmark set ``ignore_eos`` where lengths matter.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

ARCHS: dict[str, dict[str, int]] = {
    # The real models' shapes (head_dim = hidden / heads: 64 and 128), with an 8k context.
    "llama-3.2-1b": {
        "hidden": 2048,
        "layers": 16,
        "heads": 32,
        "kv_heads": 8,
        "inter": 8192,
        "context": 8192,
    },
    "llama-3.1-8b": {
        "hidden": 4096,
        "layers": 32,
        "heads": 32,
        "kv_heads": 8,
        "inter": 14336,
        "context": 8192,
    },
}
SHARD_BYTES = 2 << 30


def exllamav2_missing() -> str | None:
    """Why exllamav2 cannot run here, or None. Under tests/gpu/run.sh (HEARTH_GPU_RUN set) a reason is an
    error, not a skip: a run that tested nothing must not pass."""
    from node.backends.exllamav2_backend import available

    why = available()
    if why is not None and os.environ.get("HEARTH_GPU_RUN"):
        raise RuntimeError(f"exllamav2 cannot run on this GPU machine: {why}")
    return why


def build_gpu_model(target: Path, arch: str = "llama-3.2-1b", *, seed: int = 0) -> Path:
    """Write a random fp16 model of ``arch`` to ``target`` (reused when already complete)."""
    import torch
    from safetensors.torch import save_file

    from node.demo import BOS_ID, CHATML_TEMPLATE, IM_END_ID, PAD_ID, write_tokenizer

    marker = target / ".complete"
    if marker.exists():
        return target
    target.mkdir(parents=True, exist_ok=True)
    vocab = write_tokenizer(target)
    a = ARCHS[arch]
    head_dim = a["hidden"] // a["heads"]
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab,
        "hidden_size": a["hidden"], "intermediate_size": a["inter"], "num_hidden_layers": a["layers"],
        "num_attention_heads": a["heads"], "num_key_value_heads": a["kv_heads"], "head_dim": head_dim,
        "hidden_act": "silu", "max_position_embeddings": a["context"], "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "float16",
        "bos_token_id": BOS_ID, "eos_token_id": IM_END_ID, "pad_token_id": PAD_ID,
    }  # fmt: skip
    (target / "config.json").write_text(json.dumps(config, indent=2))
    (target / "generation_config.json").write_text(json.dumps({"eos_token_id": [IM_END_ID]}))
    tokenizer_config = json.loads((target / "tokenizer_config.json").read_text())
    assert tokenizer_config["chat_template"] == CHATML_TEMPLATE
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=device).manual_seed(seed)

    def normal(*shape: int) -> Any:
        return torch.empty(*shape, dtype=torch.float16, device=device).normal_(0.0, 0.02, generator=gen).cpu()

    def ones(n: int) -> Any:
        return torch.ones(n, dtype=torch.float16)

    hidden, kv = a["hidden"], a["kv_heads"] * head_dim
    shard: dict[str, Any] = {}
    shards: list[dict[str, Any]] = [shard]
    size = 0

    def put(name: str, tensor: Any) -> None:
        nonlocal shard, size
        if size + tensor.numel() * 2 > SHARD_BYTES and shard:
            shard, size = {}, 0
            shards.append(shard)
        shard[name] = tensor
        size += tensor.numel() * 2

    put("model.embed_tokens.weight", normal(vocab, hidden))
    for i in range(a["layers"]):
        p = f"model.layers.{i}."
        put(p + "self_attn.q_proj.weight", normal(hidden, hidden))
        put(p + "self_attn.k_proj.weight", normal(kv, hidden))
        put(p + "self_attn.v_proj.weight", normal(kv, hidden))
        put(p + "self_attn.o_proj.weight", normal(hidden, hidden))
        put(p + "mlp.gate_proj.weight", normal(a["inter"], hidden))
        put(p + "mlp.up_proj.weight", normal(a["inter"], hidden))
        put(p + "mlp.down_proj.weight", normal(hidden, a["inter"]))
        put(p + "input_layernorm.weight", ones(hidden))
        put(p + "post_attention_layernorm.weight", ones(hidden))
    put("model.norm.weight", ones(hidden))
    put("lm_head.weight", normal(vocab, hidden))
    index: dict[str, str] = {}
    for n, tensors in enumerate(shards, 1):
        name = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, str(target / name), metadata={"format": "pt"})
        index.update({key: name for key in tensors})
    (target / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    marker.write_text(arch)
    return target


def decode_bytes(target: Path) -> int:
    """Bytes of weights one decode step reads: every tensor but the embedding table (one row of it)."""
    config = json.loads((target / "config.json").read_text())
    files = sum(p.stat().st_size for p in target.glob("*.safetensors"))
    return files - config["vocab_size"] * config["hidden_size"] * 2
