"""Finding the model `hearth up` serves: the built-in demo, a local directory, or a Hugging Face download."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Literal

from node import smollm2
from node.demo import DEMO_MODEL_ID, build_demo_model
from node.fetch import HF_ID, download
from node.settings import ModelSettings
from protocol.errors import ConfigError


def demo_model(
    data_dir: Path,
    kind: Literal["smollm2", "random"] = "smollm2",
    *,
    out: Callable[[str], None] = print,
    distribution: str = smollm2.DISTRIBUTION,
) -> ModelSettings:
    """The demo model (blocking: its first start converts or builds it; run it off the loop).

    Either way it is served as ``hearth-demo``, so examples and clients need not know which one runs.
    """
    models = data_dir / "models"
    if kind == "smollm2":
        cached = models / smollm2.CACHE_NAME
        if smollm2.is_complete(cached):  # converted on an earlier start: the wheel is not needed any more
            return _demo(cached)
        gguf = smollm2.find_gguf(distribution)
        if gguf is not None:
            smollm2.verify(gguf)  # before the promise below: a file that is not the pinned one stops here
            out(
                f"Converting SmolLM2-135M-Instruct from the {distribution} wheel"
                " (once; later starts reuse it)…"
            )
            return _demo(smollm2.convert(gguf, cached))
        out(
            f"The demo serves a random-weight model that writes gibberish; for one that answers: "
            f"{smollm2.INSTALL_HINT}"
        )
    # A toy of a few MB with 16-dimensional heads: the CPU reference backend runs it, even on a GPU box.
    return _demo(build_demo_model(models / DEMO_MODEL_ID))


def _demo(path: Path) -> ModelSettings:
    # transformers on either demo: a GPU box's exllamav2 needs an EXL2 checkpoint, which neither is.
    return ModelSettings(path=path, id=DEMO_MODEL_ID, backend="transformers")


def resolve_model(spec: str, data_dir: Path) -> ModelSettings:
    """A local path if one exists, else a Hugging Face id to download (blocking; run it off the loop)."""
    path = Path(spec).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ConfigError(f"{path} is not a model directory in Hugging Face layout (no config.json)")
        return ModelSettings(path=path.resolve())
    if not HF_ID.match(spec):
        raise ConfigError(f"{spec} is neither a model directory nor a Hugging Face id like 'org/name'")
    return ModelSettings(path=download(spec, data_dir / "hf"), id=spec)
