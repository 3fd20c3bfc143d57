"""Golden reports: three planners' questions, answered by `hearth plan` and kept as JSON in tests/plan_golden/.

Each scenario is the command a planner would type; its whole JSON document must match the golden file
(numbers to a relative 1e-9, so only a change of method moves them, not the platform's last bit). A change
that moves the answers on purpose (an estimator constant, the simulator, a price) regenerates them:

    HEARTH_UPDATE_GOLDEN=1 .venv/bin/pytest tests/test_plan_golden.py

and the diff of tests/plan_golden/ is then read and explained in the commit, like any other change of
result. The scenarios use the built-in Poisson demand or a CSV kept beside the goldens, never the shared
Azure traces (a fresh clone may not have them), and an empty data directory (no calibration applies).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from hearth.cli import main

GOLDEN = Path(__file__).resolve().parent / "plan_golden"
UPDATE = os.environ.get("HEARTH_UPDATE_GOLDEN") == "1"

SCENARIOS: dict[str, list[str]] = {
    # The seed's question: a 65-70B model on a club's budget, for a few hundred to a few thousand users.
    # Which cards to buy, from second-hand 3090s, new 4090s and a pair of A100s, for 1,000 users?
    "club-70b-search": [
        "--model", "Llama-3.1-70B", "--bits", "4.0", "--gpus", "3090x8,4090x4,A100-80GBx2",
        "--users", "1000", "--search", "--prompt-tokens", "400", "--output-tokens", "300",
        "--requests", "1000",
    ],
    # The club's present fleet for the same model, swept from a few users to a few thousand.
    "club-70b-fleet": [
        "--model", "Llama-3.1-70B", "--bits", "4.0", "--gpus", "3090x4,4090x2,A100-80GBx2",
        "--users", "500", "--prompt-tokens", "400", "--output-tokens", "300", "--requests", "1000",
    ],
    # A course's coding assistant: an 8B model on two volunteers' cards, the course's own request log.
    "course-8b-csv": [
        "--model", "Llama-3.1-8B", "--bits", "6.0", "--gpus", "4090x1,3090x1", "--users", "150",
        "--rate", "12", "--trace", "course-requests.csv", "--slo-ttft", "3",
        "--slo-tps", "20", "--requests", "1000",
    ],
}  # fmt: skip


def _close(got: Any, want: Any, where: str = "$") -> str | None:
    """Where ``got`` first differs from ``want`` (None when they agree)."""
    if isinstance(want, dict):
        if not isinstance(got, dict) or sorted(got) != sorted(want):
            return f"{where}: keys {sorted(got) if isinstance(got, dict) else got!r} != {sorted(want)}"
        return next((d for k in want if (d := _close(got[k], want[k], f"{where}.{k}"))), None)
    if isinstance(want, list):
        if not isinstance(got, list) or len(got) != len(want):
            return f"{where}: {got!r} != {want!r}"
        pairs = enumerate(zip(got, want, strict=True))
        return next((d for i, (g, w) in pairs if (d := _close(g, w, f"{where}[{i}]"))), None)
    if isinstance(want, float) and isinstance(got, int | float) and not isinstance(got, bool):
        return (
            None if math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-12) else f"{where}: {got!r} != {want!r}"
        )
    return None if got == want and type(got) is type(want) else f"{where}: {got!r} != {want!r}"


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_golden_report(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(GOLDEN)  # the CSV is named as a planner in its own folder would name it
    out = tmp_path / "plan.json"
    env = {"HEARTH_DATA_DIR": str(tmp_path / "data"), "XDG_DATA_HOME": str(tmp_path / "xdg")}
    done = CliRunner().invoke(main, ["plan", *SCENARIOS[name], "--json", str(out)], env=env)
    assert done.exit_code == 0, done.stderr
    doc = json.loads(out.read_text(encoding="utf-8"))
    # What the planner reads first is the verdict (the search's, when searching), also the terminal's first line.
    assert done.stdout.splitlines()[0] == doc.get("search", doc)["verdict"]
    golden = GOLDEN / f"{name}.json"
    if UPDATE:
        golden.write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    want = json.loads(golden.read_text(encoding="utf-8"))
    assert (diff := _close(doc, want)) is None, f"{name} moved: {diff}"
