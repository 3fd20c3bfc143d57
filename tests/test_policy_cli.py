"""`hearth policy check|show|apply` as an operator runs them, against a real scheduler."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from hearth.cli import main
from scheduler.store import Store
from tests.support import LoopThread, Stack, start_scheduler, stop_stack

GOOD = '[groups.students]\nmodels = ["hearth-*"]\ntokens_per_day = 20000\n'


@pytest.fixture
def scheduler(servers: LoopThread, tmp_path: Path) -> Iterator[Stack]:
    (tmp_path / "policies.toml").write_text(GOOD, encoding="utf-8")
    stack = servers.call(start_scheduler(tmp_path, discovery=False))
    yield stack
    servers.call(stop_stack(stack))


def _run(*args: str) -> tuple[int, str, str]:
    done = CliRunner().invoke(main, list(args), env={"HEARTH_TOKEN": "", "HEARTH_SCHEDULER_URL": ""})
    return done.exit_code, done.stdout, done.stderr


def test_check_validates_without_applying(tmp_path: Path) -> None:
    good, bad = tmp_path / "good.toml", tmp_path / "bad.toml"
    good.write_text(GOOD, encoding="utf-8")
    bad.write_text(GOOD.replace("20000", '"lots"'), encoding="utf-8")
    code, out, _ = _run("policy", "check", str(good))
    assert code == 0 and "valid: groups default, students; no terms of use" in out
    code, _, err = _run("policy", "check", str(bad))
    assert code == 1
    assert err.startswith(f"hearth: error: {bad}, line 3, groups.students.tokens_per_day: ")
    assert err.count("\n") == 1  # one line, no traceback


def test_show_and_apply_through_the_admin_api(scheduler: Stack, tmp_path: Path) -> None:
    url, token = scheduler.base_url, scheduler.token
    code, out, _ = _run("policy", "show", "--scheduler", url, "--token", token)
    assert code == 0 and "students" in out and "each:tokens_per_day=20000" in out
    new = tmp_path / "new.toml"
    new.write_text(GOOD.replace("20000", "30000"), encoding="utf-8")
    code, out, _ = _run("policy", "apply", str(new), "--scheduler", url, "--token", token)
    assert code == 0 and out.startswith("applied: 2 groups")
    assert (tmp_path / "policies.toml").read_text(encoding="utf-8") == new.read_text(encoding="utf-8")
    code, out, _ = _run("policy", "show", "--scheduler", url, "--token", token)
    assert "each:tokens_per_day=30000" in out


def test_a_user_token_is_told_it_needs_an_admin_one(scheduler: Stack) -> None:
    store = Store(scheduler.data_dir / "hearth.db")
    try:
        user, _ = store.create_token("someone", "user")
    finally:
        store.close()
    code, _, err = _run("policy", "show", "--scheduler", scheduler.base_url, "--token", user)
    assert code == 1 and "admin token" in err and err.count("\n") == 1
