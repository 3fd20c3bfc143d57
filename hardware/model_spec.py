"""The shape of a decoder-only transformer, as far as memory and speed depend on it.

Kept apart from the estimator so the catalog can build specs without the arithmetic, and re-exported by
`hardware.estimator`, where callers expect it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from protocol.errors import ConfigError

# Keys that mark a mixture-of-experts config (Mixtral, Qwen2-MoE, DeepSeek); see the estimator's docstring.
_MOE_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")
# transformers' own default for tie_word_embeddings is True, but the Llama, Mistral, Qwen2 and Phi-3 config
# classes override it to False; Gemma's keep True. A config.json that omits the key means its class default.
_TIED_BY_DEFAULT = frozenset({"gemma", "gemma2", "gemma3_text"})
# Gemma 2 and 3 wrap both attention and MLP in a norm before and after: four per layer instead of two.
_FOUR_NORMS = frozenset({"gemma2", "gemma3_text"})
# Qwen2 always has q/k/v biases and its config has no key for them; Llama-style configs say attention_bias.
_QKV_BIAS_BY_DEFAULT = frozenset({"qwen2"})


class ModelConfigError(ConfigError, ValueError):
    """A config.json this estimator cannot describe (missing keys, odd values, mixture of experts)."""


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """Architecture numbers of a decoder-only transformer with grouped-query attention and a gated MLP."""

    name: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tied_embeddings: bool
    max_context: int
    # Tiny tensors, counted so parameter totals match the published ones exactly.
    attention_bias: bool = False  # q/k/v biases (Qwen2)
    norms_per_layer: int = 2  # Gemma 2: 4

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "int" and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ModelConfigError(f"{self.name}: {f.name} must be a positive integer, not {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ModelConfigError(
                f"{self.name}: {self.num_heads} attention heads cannot share {self.num_kv_heads} kv heads"
            )

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any], *, name: str | None = None) -> ModelSpec:
        """Read a Hugging Face config.json (already parsed) of a Llama, Mistral, Qwen2, Gemma or Phi-3."""
        # Multimodal wrappers (Llava, Gemma 3) keep the language model's numbers one level down.
        text = config.get("text_config")
        if "hidden_size" not in config and isinstance(text, Mapping):
            config = text
        model_type = str(config.get("model_type", ""))
        label = name or str(config.get("_name_or_path") or model_type or "model")
        moe = [k for k in _MOE_KEYS if config.get(k)]
        if moe:
            raise ModelConfigError(f"{label}: mixture-of-experts models ({moe[0]}) are not estimated")
        hidden = _int(config, "hidden_size", label)
        heads = _int(config, "num_attention_heads", label)
        # Older configs omit head_dim (it is hidden / heads); Gemma sets it larger than that.
        head_dim = config.get("head_dim")
        if head_dim is None:
            if hidden % heads:
                raise ModelConfigError(f"{label}: hidden_size {hidden} is not a multiple of {heads} heads")
            head_dim = hidden // heads
        tied = config.get("tie_word_embeddings")
        bias = config.get("attention_bias")
        return cls(
            name=label,
            hidden_size=hidden,
            num_layers=_int(config, "num_hidden_layers", label),
            num_heads=heads,
            # Absent means plain multi-head attention: one kv head per query head (transformers' rule).
            num_kv_heads=_int(config, "num_key_value_heads", label, default=heads),
            head_dim=head_dim,
            intermediate_size=_int(config, "intermediate_size", label),
            vocab_size=_int(config, "vocab_size", label),
            tied_embeddings=model_type in _TIED_BY_DEFAULT if tied is None else bool(tied),
            max_context=_int(config, "max_position_embeddings", label),
            attention_bias=model_type in _QKV_BIAS_BY_DEFAULT if bias is None else bool(bias),
            norms_per_layer=4 if model_type in _FOUR_NORMS else 2,
        )

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def layer_matmul_params(self) -> int:
        """Weights of one layer's matrices: q and o (heads), k and v (kv heads), gate, up and down."""
        attention = self.hidden_size * self.head_dim * 2 * (self.num_heads + self.num_kv_heads)
        return attention + 3 * self.hidden_size * self.intermediate_size

    @property
    def layer_small_params(self) -> int:
        """One layer's vectors: its RMS norms and any q/k/v biases."""
        bias = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim if self.attention_bias else 0
        return self.norms_per_layer * self.hidden_size + bias

    @property
    def parameters(self) -> int:
        head = 0 if self.tied_embeddings else self.embedding_params
        layers = self.num_layers * (self.layer_matmul_params + self.layer_small_params)
        return self.embedding_params + head + layers + self.hidden_size  # the last term: the final norm


def _int(config: Mapping[str, Any], key: str, label: str, *, default: int | None = None) -> int:
    value = config.get(key)
    if value is None:
        if default is None:
            raise ModelConfigError(f"{label}: config.json has no {key}")
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise ModelConfigError(f"{label}: {key} must be an integer, not {value!r}")
    return value
