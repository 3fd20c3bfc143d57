"""The federation commands refuse bad input with one line on stderr, never a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from hearth.cli import main


@pytest.fixture
def run(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> CliRunner:
    for key in ("HEARTH_TOKEN", "HEARTH_SCHEDULER_URL", "HEARTH_CONFIG"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("HEARTH_DATA_DIR", str(tmp_path / "data"))
    return CliRunner()


# (arguments, what the one line must say)
# fmt: off
CASES = [
    (["enroll", "list"], "needs an admin token"),  # no token anywhere
    (["enroll", "list", "--token", "t", "--scheduler", "ftp://x"], "not a scheduler URL"),
    (["enroll", "list", "--token", "t", "--scheduler", "http://127.0.0.1:9"], "cannot reach the scheduler"),  # nothing listens there
    (["node", "enroll", "--scheduler", "localhost:8000", "--code", "hec-xxxxxxxx"], "not a scheduler URL"),
    (["node", "enroll", "--scheduler", "http://127.0.0.1:9", "--code", "hec-xxxxxxxx", "--node-id", "Bad Name"], "not a valid node id"),
    (["node", "enroll", "--scheduler", "http://127.0.0.1:9", "--code", "hec-xxxxxxxx", "--node-id", "ok"], "cannot reach the scheduler"),
    (["node", "enroll", "--scheduler", "http://127.0.0.1:9", "--code", "short", "--node-id", "ok"], "not an enrollment code"),
    (["authority", "show"], "hearth authority init"),  # no authority yet
    (["enroll", "approve", "n1", "--token", "t"], "hearth authority init"),  # signing needs the key first
    (["node", "start"], "serves no model"),
]
# fmt: on


@pytest.mark.parametrize(("args", "says"), CASES, ids=[" ".join(c[0][:3]) for c in CASES])
def test_bad_input_is_one_line(run: CliRunner, args: list[str], says: str) -> None:
    result = run.invoke(main, args)
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hearth: error:") and says in lines[0], result.stderr
    assert "Traceback" not in result.output


def test_the_authority_is_made_once(run: CliRunner, tmp_path: Path) -> None:
    first = run.invoke(main, ["authority", "init"])
    assert first.exit_code == 0 and len(first.stdout.strip()) == 43
    assert run.invoke(main, ["authority", "show"]).stdout == first.stdout
    again = run.invoke(main, ["authority", "init"])
    assert again.exit_code == 1 and "already exists" in again.stderr


def test_a_memory_budget_must_be_a_size(run: CliRunner) -> None:
    result = run.invoke(main, ["node", "start", "--demo", "--memory-budget", "lots"])
    assert result.exit_code == 2 and "not a size" in result.stderr
