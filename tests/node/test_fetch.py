"""Hugging Face models a node may fetch: the config read before loading, the files at load time, from a
Hub cache laid out as huggingface_hub lays it out (offline: nothing here reaches the network)."""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path

import huggingface_hub.constants
import pytest

from node.app import load_transformers
from node.fetch import download, fetch_config
from node.pool import ModelPool
from node.settings import ModelSettings, NodeSettings
from protocol.errors import ConfigError

REVISION = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def hub_cache(root: Path, demo: Path, repo: str = "club/tiny") -> Path:
    """A Hub cache holding ``demo`` as ``repo`` (refs/main → a snapshot of its files)."""
    entry = root / f"models--{repo.replace('/', '--')}"
    (entry / "refs").mkdir(parents=True)
    (entry / "refs" / "main").write_text(REVISION)
    shutil.copytree(demo, entry / "snapshots" / REVISION)
    return root


def test_the_config_and_the_files_come_from_the_cache(
    offline: None, tmp_path: Path, demo_model_dir: Path
) -> None:
    cache = hub_cache(tmp_path / "hf", demo_model_dir)
    assert fetch_config("club/tiny", cache)["model_type"] == "llama"
    path = download("club/tiny", cache)
    assert (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def test_offline_without_a_copy_is_one_clear_error_at_once(offline: None, tmp_path: Path) -> None:
    started = time.monotonic()
    with pytest.raises(ConfigError, match="looks offline"):
        fetch_config("club/absent", tmp_path / "hf")
    with pytest.raises(ConfigError, match="looks offline"):
        download("club/absent", tmp_path / "hf")
    assert time.monotonic() - started < 5


def test_a_model_needs_a_path_or_a_hugging_face_id() -> None:
    with pytest.raises(ValueError, match="either"):
        ModelSettings()
    with pytest.raises(ValueError, match="either"):
        ModelSettings(path=Path("/x"), huggingface="club/tiny")
    assert ModelSettings(huggingface="club/tiny").model_id == "club/tiny"


async def test_a_node_lists_a_hub_model_and_loads_it_on_demand(
    offline: None, tmp_path: Path, demo_model_dir: Path
) -> None:
    hub_cache(tmp_path / "node" / "hf", demo_model_dir)
    settings = NodeSettings(
        data_dir=tmp_path / "node",
        models=[
            ModelSettings(huggingface="club/tiny", preload=False),
            ModelSettings(huggingface="club/absent", preload=False),  # unreachable: failed, the rest serve
        ],
    )
    pool = await asyncio.to_thread(ModelPool, settings, load_transformers, 1 << 30)
    tiny, absent = pool.slots["club/tiny"], pool.slots["club/absent"]
    assert tiny.phase == "available" and tiny.footprint_bytes > 0 and tiny.context_length == 2048
    assert absent.phase == "failed"
    assert pool.request_load("club/tiny", ()) == "loading"
    assert tiny.task is not None
    await asyncio.wait_for(asyncio.shield(tiny.task), 60)  # the download from the cache, then the load
    assert tiny.phase == "ready"
    await pool.close()
