"""Finding the model `hearth up` serves: the built-in demo, a local directory, or a Hugging Face download."""

from __future__ import annotations

import re
from pathlib import Path

from node.demo import DEMO_MODEL_ID, build_demo_model
from node.settings import ModelSettings
from protocol.errors import ConfigError

_HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]
# Only for repositories that ship no safetensors: pickled weights are the older, larger format.
_LEGACY_WEIGHTS = ["*.bin"]


def demo_model(data_dir: Path) -> ModelSettings:
    path = build_demo_model(data_dir / "models" / DEMO_MODEL_ID)
    return ModelSettings(path=path, id=DEMO_MODEL_ID)


def resolve_model(spec: str, data_dir: Path) -> ModelSettings:
    """A local path if one exists, else a Hugging Face id to download (blocking; run it off the loop)."""
    path = Path(spec).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ConfigError(f"{path} is not a model directory in Hugging Face layout (no config.json)")
        return ModelSettings(path=path.resolve())
    if not _HF_ID.match(spec):
        raise ConfigError(f"{spec} is neither a model directory nor a Hugging Face id like 'org/name'")
    return ModelSettings(path=download(spec, data_dir / "hf"), id=spec)


def download(repo_id: str, cache_dir: Path) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
    )

    try:
        path = Path(snapshot_download(repo_id, cache_dir=cache_dir, allow_patterns=_DOWNLOAD_PATTERNS))
        if not any(path.glob("*.safetensors")):
            path = Path(
                snapshot_download(
                    repo_id, cache_dir=cache_dir, allow_patterns=_DOWNLOAD_PATTERNS + _LEGACY_WEIGHTS
                )
            )
        return path
    except (RepositoryNotFoundError, GatedRepoError):
        raise ConfigError(f"Hugging Face has no model {repo_id} that this machine may download") from None
    except (LocalEntryNotFoundError, OfflineModeIsEnabled, HfHubHTTPError, OSError):
        raise ConfigError(
            f"cannot download {repo_id} from Hugging Face: this machine looks offline and has no cached copy "
            "(use --demo, or --model with a local directory)"
        ) from None
