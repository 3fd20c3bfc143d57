"""Hugging Face downloads for a node: a model's config (to estimate its memory before loading it) and its
files (when it is loaded). Blocking: call them off the event loop. Only the files a node loads are fetched
(configs, safetensors, tokenizer, templates), into the directory given, not the global cache.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from protocol.errors import ConfigError

HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]
# Only for repositories that ship no safetensors: pickled weights are the older, larger format.
_LEGACY_WEIGHTS = ["*.bin"]


@contextlib.contextmanager
def _hub_errors(repo_id: str) -> Iterator[None]:
    """The Hub's many exceptions as one line for the operator: not there, or not reachable."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
    )

    try:
        yield
    # LocalEntryNotFoundError is an EntryNotFoundError too: it must be caught first.
    except (LocalEntryNotFoundError, OfflineModeIsEnabled, HfHubHTTPError, OSError) as exc:
        if isinstance(exc, HfHubHTTPError) and isinstance(exc, RepositoryNotFoundError | GatedRepoError):
            raise ConfigError(f"Hugging Face has no model {repo_id} that this machine may download") from None
        raise ConfigError(
            f"cannot download {repo_id} from Hugging Face: this machine looks offline and has no cached copy "
            "(use --demo, or --model with a local directory)"
        ) from None
    except (RepositoryNotFoundError, GatedRepoError, EntryNotFoundError):
        raise ConfigError(f"Hugging Face has no model {repo_id} that this machine may download") from None


def fetch_config(repo_id: str, cache_dir: Path) -> dict[str, Any]:
    """The model's config.json (a few kilobytes), from the cache or the Hub."""
    from huggingface_hub import hf_hub_download

    with _hub_errors(repo_id):
        path = hf_hub_download(repo_id, "config.json", cache_dir=cache_dir)
    try:
        config: Any = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        raise ConfigError(f"the config.json of {repo_id} is not readable JSON") from None
    if not isinstance(config, dict):
        raise ConfigError(f"the config.json of {repo_id} is not a JSON object")
    return config


def download(repo_id: str, cache_dir: Path) -> Path:
    """The model's files, downloaded (or found in the cache) under ``cache_dir``; their directory."""
    from huggingface_hub import snapshot_download

    with _hub_errors(repo_id):
        path = Path(snapshot_download(repo_id, cache_dir=cache_dir, allow_patterns=_DOWNLOAD_PATTERNS))
        if not any(path.glob("*.safetensors")):
            patterns = _DOWNLOAD_PATTERNS + _LEGACY_WEIGHTS
            path = Path(snapshot_download(repo_id, cache_dir=cache_dir, allow_patterns=patterns))
    return path
