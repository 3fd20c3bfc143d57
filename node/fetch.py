"""Hugging Face downloads for a node: a model's config (to estimate its memory before loading it) and its
files (when it is loaded). Blocking: call them off the event loop. Only the files a node loads are fetched
(configs, safetensors, tokenizer, templates), into the directory given, not the global cache.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from protocol.errors import ConfigError

HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]
# Only for repositories that ship no safetensors: pickled weights are the older, larger format.
_LEGACY_WEIGHTS = ["*.bin"]


def _offline(repo_id: str) -> ConfigError:
    return ConfigError(
        f"cannot download {repo_id} from Hugging Face: this machine looks offline and has no cached copy "
        "(use --demo, or --model with a local directory)"
    )


def fetch_config(repo_id: str, cache_dir: Path) -> dict[str, Any]:
    """The model's config.json (a few kilobytes), from the cache or the Hub."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
    )

    try:
        path = hf_hub_download(repo_id, "config.json", cache_dir=cache_dir)
        config: Any = json.loads(Path(path).read_text())
    except (LocalEntryNotFoundError, OfflineModeIsEnabled):  # LocalEntryNotFound is an EntryNotFound: first
        raise _offline(repo_id) from None
    except (RepositoryNotFoundError, GatedRepoError, EntryNotFoundError):
        raise ConfigError(f"Hugging Face has no model {repo_id} that this machine may download") from None
    except (HfHubHTTPError, OSError):
        raise _offline(repo_id) from None
    except ValueError:
        raise ConfigError(f"the config.json of {repo_id} is not valid JSON") from None
    if not isinstance(config, dict):
        raise ConfigError(f"the config.json of {repo_id} is not a JSON object")
    return config


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
        raise _offline(repo_id) from None
