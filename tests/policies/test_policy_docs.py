"""docs/policies.md is complete and true: every setting of the policy file is in its tables, every refusal
code the engine gives is in its table, and its example club validates."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from policies.schema import Group, Retention, Terms
from protocol.policy import Limits
from scheduler.rules import parse_policy

DOC = Path(__file__).resolve().parents[2] / "docs" / "policies.md"
ENGINE = Path(__file__).resolve().parents[2] / "policies" / "engine.py"


def _text() -> str:
    return DOC.read_text(encoding="utf-8")


@pytest.mark.parametrize("model", [Group, Limits, Terms, Retention])
def test_every_setting_is_in_a_table(model: type) -> None:
    rows = set(re.findall(r"^\| `([a-z0-9_]+)` \|", _text(), re.MULTILINE))
    missing = set(model.model_fields) - rows
    assert not missing, f"docs/policies.md does not describe {sorted(missing)}"


def test_every_refusal_code_is_explained() -> None:
    codes = set(
        re.findall(
            r'"([a-z_]+(?:_exceeded|_required|_not_allowed|_not_accepted|_over_cap|_over_limit|_too_long))"',
            ENGINE.read_text(),
        )
    )
    assert codes, "the engine's codes were not found"
    table = set(re.findall(r"^\| \d{3} \| `([a-z_]+)` \|", _text(), re.MULTILINE))
    assert codes <= table, sorted(codes - table)


def test_the_example_club_validates(tmp_path: Path) -> None:
    example = re.search(r"```toml\n(.*?)```", _text(), re.DOTALL)
    assert example is not None
    (tmp_path / "terms.md").write_text("Use it fairly.\n", encoding="utf-8")
    loaded = parse_policy(example.group(1), "policies.toml", tmp_path)
    assert {"students", "faculty", "course-6101", "sensitive-research", "admins", "default"} <= set(
        loaded.groups
    )
    research = loaded.groups["sensitive-research"]
    assert research.tiers == frozenset({"club"}) and research.require_e2e
    assert loaded.groups["course-6101"].system_prompt is not None
