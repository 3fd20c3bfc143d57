"""Finding the model `hearth up` serves: the built-in demo, a local directory, or a Hugging Face download."""

from __future__ import annotations

from pathlib import Path

from node.demo import DEMO_MODEL_ID, build_demo_model
from node.fetch import HF_ID, download
from node.settings import ModelSettings
from protocol.errors import ConfigError


def demo_model(data_dir: Path) -> ModelSettings:
    path = build_demo_model(data_dir / "models" / DEMO_MODEL_ID)
    # A toy of a few MB with 16-dimensional heads: the CPU reference backend runs it, even on a GPU box.
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
