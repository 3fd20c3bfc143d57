"""The policy file: inheritance, and a bad file refused with its name, line and field."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from policies import DEFAULT_GROUP, PolicyFile, resolve
from scheduler.rules import MAX_TERMS_BYTES, PolicyFileError, Rules, load_policy, parse_policy

CLUB = """\
[groups.students]
models = ["hearth-*"]
tokens_per_day = 20000
requests_per_minute = 10

[groups.course-6101]
parent = "students"
system_prompt = "Explain step by step; never hand over a full pset solution."
weight = 2

[groups.course-6101.total]
tokens_per_day = 500000

[groups.faculty]
max_tokens = 4096

[terms]
version = "2026-09"
text = "Use it fairly."
"""


def test_children_inherit_what_they_leave_unset() -> None:
    groups = parse_policy(CLUB, "policies.toml").groups
    course = groups["course-6101"]
    assert course.models == ("hearth-*",)  # from students
    assert course.each.tokens_per_day == 20000 and course.each.requests_per_minute == 10
    assert course.total.tokens_per_day == 500000  # its own pool, for the whole course
    assert course.weight == 2 and course.system_prompt is not None
    assert groups["students"].system_prompt is None  # a parent never takes its child's
    assert groups["faculty"].allows_model("anything") and groups["faculty"].max_tokens == 4096


def test_default_group_is_open_unless_defined() -> None:
    default = resolve(PolicyFile())[DEFAULT_GROUP]
    assert default.models is None and default.each.tokens_per_day is None
    defined = resolve(PolicyFile.model_validate({"groups": {"default": {"tokens_per_day": 5}}}))
    assert defined[DEFAULT_GROUP].each.tokens_per_day == 5


BAD = [
    # a limit of the wrong type: the line of the key, and the field's path
    ('[groups.students]\nmodels = ["a"]\ntokens_per_day = "lots"\n', "line 3, groups.students.tokens_per_day"),
    # a misspelt setting is not ignored
    ("[groups.students]\ntokens_per_dya = 5\n", "line 2, groups.students.tokens_per_dya: not a setting"),
    # a negative limit
    ("[groups.a]\n\nrequests_per_minute = -1\n", "line 3, groups.a.requests_per_minute"),
    # a parent that does not exist
    ('[groups.a]\nparent = "b"\n', "unknown parent 'b'"),
    # inheritance in a circle
    ('[groups.a]\nparent = "b"\n[groups.b]\nparent = "a"\n', "in a circle"),
    # terms need a text or a file
    ('[terms]\nversion = "1"\n', "terms: give the terms as text or as file"),
    # a group name that could not be typed on a command line
    ('[groups."Bad Name"]\n', "groups.Bad Name"),
    # not TOML at all: the parser's line
    ("[groups.a\n", "policies.toml: "),
]  # fmt: skip


@pytest.mark.parametrize(("text", "says"), BAD)
def test_bad_files_say_where(text: str, says: str) -> None:
    with pytest.raises(PolicyFileError) as caught:
        parse_policy(text, "policies.toml")
    assert says in caught.value.message
    assert caught.value.message.startswith("policies.toml")


def test_terms_from_a_file_beside_the_policy(tmp_path: Path) -> None:
    (tmp_path / "terms.md").write_text("Be kind.\n", encoding="utf-8")
    path = tmp_path / "policies.toml"
    path.write_text('[terms]\nversion = "3"\nfile = "terms.md"\n', encoding="utf-8")
    loaded = load_policy(path)
    assert (loaded.terms_version, loaded.terms_text) == ("3", "Be kind.\n")
    (tmp_path / "terms.md").unlink()
    with pytest.raises(PolicyFileError, match=r"line 3, terms.file: cannot read"):
        load_policy(path)


def test_reload_applies_a_good_file_and_keeps_the_policy_on_a_bad_one(tmp_path: Path) -> None:
    path = tmp_path / "policies.toml"
    path.write_text(CLUB, encoding="utf-8")
    seen: list[tuple[str, str]] = []
    rules = Rules(path=path, on_reload=lambda outcome, detail: seen.append((outcome, detail)))
    rules.load()
    assert rules.group("students") is not None
    path.write_text(CLUB.replace("tokens_per_day = 20000", 'tokens_per_day = "x"'), encoding="utf-8")
    assert rules.reload() is False
    assert seen[-1][0] == "refused" and "line 3, groups.students.tokens_per_day" in seen[-1][1]
    kept = rules.group("students")
    assert kept is not None and kept.each.tokens_per_day == 20000  # the old policy stays
    path.write_text(CLUB.replace("tokens_per_day = 20000", "tokens_per_day = 30000"), encoding="utf-8")
    assert rules.reload() is True and seen[-1][0] == "applied"
    now = rules.group("students")
    assert now is not None and now.each.tokens_per_day == 30000


@pytest.mark.parametrize(
    ("name", "says"),
    [
        ("/etc/passwd", "must be a file in the policy file's folder"),  # no publishing another file
        ("../secrets.txt", "must be a file in the policy file's folder"),  # nor one outside the folder
        ("/dev/zero", "must be a file in the policy file's folder"),  # nor a device that never ends
        ("fifo", "is not a regular file"),  # nor a pipe that would hang the reload
        ("big.md", "is larger than"),  # nor more text than anyone reads
        ("latin1.md", "not UTF-8 text"),
    ],
)
def test_a_terms_file_must_be_a_readable_text_file_beside_the_policy(
    tmp_path: Path, name: str, says: str
) -> None:
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "big.md").write_bytes(b"x" * (MAX_TERMS_BYTES + 1))
    (tmp_path / "latin1.md").write_bytes("caf\u00e9".encode("latin-1"))
    (tmp_path.parent / "secrets.txt").write_text("not for users", encoding="utf-8")
    path = tmp_path / "policies.toml"
    path.write_text(f'[terms]\nversion = "1"\nfile = "{name}"\n', encoding="utf-8")
    with pytest.raises(PolicyFileError) as caught:
        load_policy(path)
    assert says in caught.value.message and "line 3, terms.file" in caught.value.message
