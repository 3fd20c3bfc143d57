"""Which backend runs a model: the model's own choice, else the node's, else (auto) exllamav2 where it can run.
A backend asked for by name that cannot run here stops the node at start with one line, not a failed model
found later."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from hearth.cli import main
from node.backends import resolve
from node.backends.exllamav2_backend import available
from node.settings import ModelSettings, NodeSettings
from protocol.errors import ConfigError

pytestmark = pytest.mark.skipif(available() is None, reason="this machine can run exllamav2")


def test_auto_runs_models_on_transformers_without_a_gpu(demo_model_dir: Path) -> None:
    model = ModelSettings(path=demo_model_dir)
    assert resolve(NodeSettings(), model) == "transformers"
    assert (
        resolve(NodeSettings(backend="exllamav2"), model.model_copy(update={"backend": "transformers"}))
        == "transformers"
    )


def test_asking_for_exllamav2_where_it_cannot_run_says_why(demo_model_dir: Path) -> None:
    with pytest.raises(ConfigError, match="exllamav2 backend cannot run here: no CUDA GPU"):
        resolve(NodeSettings(backend="exllamav2"), ModelSettings(path=demo_model_dir))


def test_node_start_refuses_in_one_line(demo_model_dir: Path, tmp_path: Path) -> None:
    args = [
        "node",
        "start",
        "--backend",
        "exllamav2",
        "--model",
        str(demo_model_dir),
        "--data-dir",
        str(tmp_path),
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        'hearth: error: the exllamav2 backend cannot run here: no CUDA GPU is visible to torch (or choose backend = "transformers")'
    ]
