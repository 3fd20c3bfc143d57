"""The project's own rules on every test run: lint, types, import boundaries, no torch on the scheduler."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.mark.parametrize(
    "command",
    [
        ["ruff", "check", "."],  # lint rules of pyproject.toml
        ["ruff", "format", "--check", "."],  # one formatting
        ["lint-imports"],  # the dependency contracts of pyproject.toml
        ["mypy"],  # strict typing of every package
    ],
    ids=lambda c: c[0] if c[0] != "ruff" else f"ruff-{c[1]}",
)
def test_tool_passes(command: list[str]) -> None:
    r = subprocess.run(
        [str(BIN / command[0]), *command[1:]], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]


def test_scheduler_and_policies_import_without_torch() -> None:
    """The operator's server may have no torch: importing the scheduler must not pull it in."""
    code = (
        "import sys; import scheduler.app, scheduler.store, policies, protocol.web, hearth.config;"
        "bad = [m for m in ('torch', 'transformers', 'tokenizers', 'exllamav2') if m in sys.modules];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
