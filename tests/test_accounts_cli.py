"""`hearth tokens`, `hearth usage` and `hearth audit` on a real database, through click as a user runs them:
secrets alone on stdout, groups checked against the policy file, exports that parse, every change
audited as the operator who made it, and bad input refused in one line."""

from __future__ import annotations

import csv
import getpass
import io
import json
import time
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from hearth.cli import main
from scheduler.store import Store, TokenRecord, TokenRefusal, UsageRecord

POLICY = """
[groups.students]
[groups.faculty]
"""


@pytest.fixture
def data(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    for key in ("HEARTH_TOKEN", "HEARTH_SCHEDULER_URL", "HEARTH_CONFIG"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setenv("HEARTH_DATA_DIR", str(tmp_path / "data"))
    (tmp_path / "data").mkdir()
    return tmp_path / "data"


def hearth(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def _ok(result: Result) -> Result:
    assert result.exit_code == 0, result.output
    return result


def _verify(data: Path, secret: str) -> TokenRecord | TokenRefusal:
    store = Store(data / "hearth.db")
    try:
        return store.verify_token(secret)
    finally:
        store.close()


# (arguments, what the one line says) -- each on a data directory with the two-group policy
# fmt: off
MISTAKES = [
    (["tokens", "create", "--group", "staff"], "groups: default, faculty, students"),  # not in the policy
    (["tokens", "create", "--expires", "soon"], "--expires: 'soon' is not a duration"),  # words
    (["tokens", "create", "--expires", "0d"], "no time at all"),  # expired on arrival
    (["tokens", "create", "--admin", "--scope", "user"], "contradict"),  # two answers to one question
    (["tokens", "revoke", "tok_000000000000"], "no token with id tok_000000000000"),  # unknown id
    (["tokens", "rotate", "tok_000000000000"], "no token with id"),  # unknown id
    (["tokens", "rotate", "tok_000000000000", "--grace", "10 minutes"], "--grace: '10 minutes'"),  # words
    (["usage", "--since", "-7d"], "--since"),  # the future
    (["audit", "--since", "7 days"], "--since"),  # words
]
# fmt: on


@pytest.mark.parametrize(("args", "says"), MISTAKES, ids=[" ".join(a[:3]) for a, _ in MISTAKES])
def test_bad_input_is_one_line(data: Path, args: list[str], says: str) -> None:
    (data / "policies.toml").write_text(POLICY)
    result = hearth(*args)
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hearth: error:") and says in lines[0], result.stderr
    assert result.stdout == ""


def test_without_a_policy_file_only_the_default_group_exists(data: Path) -> None:
    result = hearth("tokens", "create", "--group", "students")
    assert result.exit_code == 1 and "(built in); groups: default" in result.stderr
    _ok(hearth("tokens", "create", "--group", "default"))


def test_a_broken_policy_file_is_named_and_the_default_group_still_works(data: Path) -> None:
    (data / "policies.toml").write_text("[groups.students]\nweight = -1\n")
    result = hearth("tokens", "create", "--group", "students")
    assert result.exit_code == 1 and "policies.toml, line 2, groups.students.weight" in result.stderr
    _ok(hearth("tokens", "create"))


def test_create_prints_the_secret_alone_and_stores_the_group_scope_and_expiry(data: Path) -> None:
    (data / "policies.toml").write_text(POLICY)
    result = _ok(hearth("tokens", "create", "--name", "ann", "--group", "students", "--expires", "30d"))
    secret = result.stdout.strip()
    assert result.stdout == secret + "\n" and secret.startswith("hth_")
    record = _verify(data, secret)
    assert isinstance(record, TokenRecord)
    assert (record.name, record.group, record.scope) == ("ann", "students", "user")
    assert record.expires is not None and abs(record.expires - (time.time() + 30 * 86400)) < 600
    # --admin is kept as the alias of --scope admin
    for flags in (["--admin"], ["--scope", "admin"]):
        admin = _verify(data, _ok(hearth("tokens", "create", *flags)).stdout.strip())
        assert isinstance(admin, TokenRecord) and admin.scope == "admin"
    tiered = _verify(data, _ok(hearth("tokens", "create", "--tier", "club")).stdout.strip())
    assert isinstance(tiered, TokenRecord) and tiered.tiers == ("club",)


def test_rotate_prints_the_new_secret_alone_and_the_old_one_stops(data: Path) -> None:
    old = _ok(hearth("tokens", "create", "--name", "bo")).stdout.strip()
    record = _verify(data, old)
    assert isinstance(record, TokenRecord)
    result = _ok(hearth("tokens", "rotate", record.id))
    new = result.stdout.strip()
    assert result.stdout == new + "\n" and new != old and "stopped working" in result.stderr
    assert _verify(data, old) == TokenRefusal("replaced")
    assert _verify(data, new) == record  # same id and everything else
    graced = _ok(hearth("tokens", "rotate", record.id, "--grace", "10m"))
    assert "works until" in graced.stderr
    assert _verify(data, new) == record and _verify(data, graced.stdout.strip()) == record


def test_list_shows_group_expiry_last_use_and_this_months_tokens(data: Path) -> None:
    (data / "policies.toml").write_text(POLICY)
    secret = _ok(hearth("tokens", "create", "--name", "cy", "--group", "faculty", "--expires", "12h")).stdout
    record = _verify(data, secret.strip())
    assert isinstance(record, TokenRecord)
    store = Store(data / "hearth.db")
    now = time.time()
    store.record_usage(
        [UsageRecord("r", record.id, "m", "chat", "n", "ok", 40, 2, now - 5, now - 4, "faculty")]
    )
    store.close()
    _ok(hearth("tokens", "create", "--name", "idle"))
    _ok(hearth("tokens", "revoke", record.id))
    lines = _ok(hearth("tokens", "list")).stdout.splitlines()
    header = lines[0].split()
    assert header == [
        "ID",
        "SCOPE",
        "GROUP",
        "STATE",
        "EXPIRES",
        "LAST",
        "USED",
        "MONTH",
        "TOKENS",
        "TIERS",
        "NAME",
    ]
    row = next(line for line in lines if record.id in line)
    assert " faculty " in row and " revoked " in row and " 42 " in row
    assert time.strftime("%Y-%m-%d", time.gmtime(now - 5)) in row  # last used
    idle = next(line for line in lines if line.endswith(" idle"))
    assert " active " in idle and " 0 " in idle


def _usage(data: Path) -> str:
    """Two tokens' requests; returns alice's token id."""
    store = Store(data / "hearth.db")
    _, alice = store.create_token("alice", group="students")
    _, bob = store.create_token("bob", group="faculty")
    now = time.time()
    store.record_usage(
        [
            UsageRecord("a1", alice.id, "m", "chat", "n1", "ok", 10, 5, now - 3 * 86400, now, "students"),
            UsageRecord("a2", alice.id, "m", "chat", "n1", "node_failed", 1, 0, now - 60, now, "students"),
            UsageRecord("b1", bob.id, "big", "chat", "n2", "ok", 2, 2, now - 60, now, "faculty"),
        ]
    )
    store.fold_usage(now - 86400)  # a1 is a daily total now
    store.close()
    return alice.id


# (by, the key column of csv and json, total tokens per key: by name for users)
BY = [
    ("user", "token_id", {"alice": 16, "bob": 4}),  # keyed by token id, named
    ("group", "group", {"students": 16, "faculty": 4}),
    ("model", "model", {"m": 16, "big": 4}),
    ("node", "node_id", {"n1": 16, "n2": 4}),
]


@pytest.mark.parametrize(("by", "column", "totals"), BY, ids=[b for b, _, _ in BY])
def test_usage_exports_parse_and_agree(data: Path, by: str, column: str, totals: dict[str, int]) -> None:
    _usage(data)
    as_json = json.loads(_ok(hearth("usage", "--by", by, "--since", "7d", "--format", "json")).stdout)
    as_csv = list(csv.DictReader(io.StringIO(_ok(hearth("usage", "--by", by, "--format", "csv")).stdout)))
    label = "name" if by == "user" else column
    assert {r[label]: r["total_tokens"] for r in as_json} == totals
    assert {r[label]: int(r["total_tokens"]) for r in as_csv} == totals
    assert all(column in r for r in as_json)
    errors = {r[label]: r["errors"] for r in as_json}
    assert max(errors.values()) == 1 and min(errors.values()) == 0
    table = _ok(hearth("usage", "--by", by)).stdout.splitlines()
    assert table[0].split()[0] == column.upper().replace("_", " ").split()[0]
    assert len(table) == 3


def test_usage_by_day_and_a_window_that_leaves_folded_days_out(data: Path) -> None:
    _usage(data)
    days = json.loads(_ok(hearth("usage", "--by", "day", "--since", "7d", "--format", "json")).stdout)
    assert sorted(d["requests"] for d in days) == [1, 2]
    recent = json.loads(_ok(hearth("usage", "--by", "day", "--since", "1h", "--format", "json")).stdout)
    assert [(d["requests"], d["total_tokens"]) for d in recent] == [(2, 5)]


def test_token_commands_are_audited_as_the_operator_from_local(data: Path) -> None:
    secret = _ok(hearth("tokens", "create", "--name", "dee")).stdout.strip()
    record = _verify(data, secret)
    assert isinstance(record, TokenRecord)
    rotated = _ok(hearth("tokens", "rotate", record.id, "--grace", "90s")).stdout.strip()
    _ok(hearth("tokens", "revoke", record.id))
    out = _ok(hearth("audit", "--format", "json")).stdout
    entries = json.loads(out)
    assert [(e["action"], e["subject"], e["actor"], e["origin"]) for e in entries] == [
        ("token_created", record.id, f"cli:{getpass.getuser()}", "local"),
        ("token_rotated", record.id, f"cli:{getpass.getuser()}", "local"),
        ("token_revoked", record.id, f"cli:{getpass.getuser()}", "local"),
    ]
    assert secret not in out and rotated not in out
    table = _ok(hearth("audit", "--since", "1h", "--limit", "2")).stdout.splitlines()
    assert table[0].split() == ["AT", "ACTOR", "ORIGIN", "ACTION", "SUBJECT", "DETAIL"] and len(table) == 3
    rows = list(csv.DictReader(io.StringIO(_ok(hearth("audit", "--format", "csv")).stdout)))
    assert [r["action"] for r in rows] == ["token_created", "token_rotated", "token_revoked"]
