"""Terms of use through the real API and the real CLI: reading them, accepting them (once, idempotently,
only the version in force), a new version asking again after the policy file is rewritten, acceptances
kept across a restart, and the operator's view of who accepted.

The scheduler is a real one on 127.0.0.1 with a real policy file; no node is needed to talk about terms.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
from click.testing import CliRunner

from hearth.cli import main
from scheduler.openapi import openapi_document
from scheduler.store import Store
from tests.support import LoopThread, Stack, start_scheduler, stop_stack, wait_for

TERMS = "Be kind. Do not paste other people's data. Answers can be wrong."


def policy(version: str | None, text: str = TERMS) -> str:
    if version is None:
        return '[groups.default]\ndescription = "everyone"\n'
    return f'[terms]\nversion = "{version}"\ntext = {json.dumps(text)}\n'


@dataclass
class Club:
    stack: Stack
    policy_file: Path

    @property
    def url(self) -> str:
        return self.stack.base_url

    def user(self, name: str) -> str:
        """A fresh user token, made as `hearth tokens create` makes it."""
        store = Store(self.stack.data_dir / "hearth.db")
        try:
            token, _ = store.create_token(name, "user")
        finally:
            store.close()
        return token

    def call(self, method: str, path: str, token: str | None, **kw: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.request(method, self.url + path, headers=headers, timeout=30, **kw)


def start_club(servers: LoopThread, data: Path, version: str | None) -> Club:
    data.mkdir(parents=True, exist_ok=True)
    path = data / "policies.toml"
    path.write_text(policy(version), encoding="utf-8")
    return Club(servers.call(start_scheduler(data, policy_file=path)), path)


@pytest.fixture(scope="module")
def club(servers: LoopThread, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Club]:
    running = start_club(servers, tmp_path_factory.mktemp("terms"), "2026-09")
    yield running
    servers.call(stop_stack(running.stack))


@pytest.fixture
def fresh(servers: LoopThread, tmp_path: Path) -> Iterator[Club]:
    """A scheduler of this test's own, whose policy file the test may rewrite."""
    running = start_club(servers, tmp_path / "data", "1")
    yield running
    servers.call(stop_stack(running.stack))


def _valid(name: str, doc: Any) -> None:
    schema = {"$ref": f"#/components/schemas/{name}", "components": openapi_document()["components"]}
    jsonschema.Draft202012Validator(schema).validate(doc)


def _error(r: httpx.Response) -> tuple[int, str | None, str | None]:
    err = r.json()["error"]
    return r.status_code, err["code"], err["param"]


def test_a_new_token_sees_the_terms_it_has_not_accepted(club: Club) -> None:
    r = club.call("GET", "/v1/terms", club.user("ada"))
    assert r.status_code == 200
    _valid("TermsDocument", r.json())
    assert r.json() == {
        "version": "2026-09", "text": TERMS, "accepted": False, "accepted_version": None, "accepted_at": None,
    }  # fmt: skip


def test_accepting_is_recorded_once_and_again_changes_nothing(club: Club) -> None:
    token = club.user("grace")
    first = club.call("POST", "/v1/terms/accept", token, json={"version": "2026-09"})
    assert first.status_code == 200, first.text
    _valid("TermsDocument", first.json())
    doc = first.json()
    assert (doc["accepted"], doc["accepted_version"]) == (True, "2026-09")
    assert isinstance(doc["accepted_at"], float)
    again = club.call("POST", "/v1/terms/accept", token, json={"version": "2026-09"})
    assert again.status_code == 200 and again.json() == doc  # the first acceptance stands
    assert club.call("GET", "/v1/terms", token).json() == doc
    rows = _rows(club, token)
    assert [(r["version"], r["accepted_at"]) for r in rows] == [("2026-09", doc["accepted_at"])]
    assert rows[0]["origin"] == "127.0.0.1"


def test_accepts_at_once_record_one_acceptance(servers: LoopThread, club: Club) -> None:
    token = club.user("eager")

    async def at_once() -> list[httpx.Response]:
        headers = {"Authorization": f"Bearer {token}"}
        body = {"version": "2026-09"}
        async with httpx.AsyncClient(timeout=30) as client:
            sent = [client.post(club.url + "/v1/terms/accept", json=body, headers=headers) for _ in range(8)]
            return await asyncio.gather(*sent)

    answers = servers.call(at_once())
    assert [r.status_code for r in answers] == [200] * 8
    assert len({r.json()["accepted_at"] for r in answers}) == 1
    assert len(_rows(club, token)) == 1


def _rows(club: Club, token: str) -> list[dict[str, Any]]:
    store = Store(club.stack.data_dir / "hearth.db")
    try:
        record = store.verify_token(token)
        assert record is not None
        return list(store.db.table("terms_acceptances").rows_where("token_id = ?", [record.id]))
    finally:
        store.close()


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        # another version than the one in force: named in the message, nothing recorded
        ({"version": "2026-01"}, (409, "terms_version_changed", "version")),
        # not a version any policy file can hold
        ({"version": "two words"}, (400, None, "version")),
        # a number, not a string
        ({"version": 2026}, (400, None, "version")),
        # no version at all
        ({}, (400, None, "version")),
        # not an object
        ([], (400, None, None)),
    ],
)
def test_what_cannot_be_accepted_is_refused_and_nothing_is_recorded(
    club: Club, body: Any, expected: tuple[int, str | None, str | None]
) -> None:
    token = club.user("mallory")
    r = club.call("POST", "/v1/terms/accept", token, json=body)
    assert _error(r) == expected, r.text
    _valid("ErrorResponse", r.json())
    if expected[1] == "terms_version_changed":
        assert "2026-09" in r.json()["error"]["message"]
    assert club.call("GET", "/v1/terms", token).json()["accepted"] is False
    assert _rows(club, token) == []


def test_a_body_that_is_not_json_is_a_400(club: Club) -> None:
    r = club.call("POST", "/v1/terms/accept", club.user("x"), content=b"version=1")
    assert _error(r) == (400, None, None)
    r = club.call("POST", "/v1/terms/accept", club.user("y"))
    assert _error(r) == (400, None, "version")


@pytest.mark.parametrize(
    ("method", "path"), [("GET", "/v1/terms"), ("POST", "/v1/terms/accept"), ("GET", "/admin/terms")]
)
@pytest.mark.parametrize("token", [None, "hth_not-a-token"])
def test_without_a_valid_token_it_is_a_401(club: Club, method: str, path: str, token: str | None) -> None:
    r = club.call(method, path, token, json={"version": "2026-09"})
    assert _error(r) == (401, "invalid_api_key", None)


def test_the_operator_sees_who_accepted_and_a_user_may_not(club: Club) -> None:
    yes = club.user("accepts")
    club.user("hesitates")
    assert club.call("POST", "/v1/terms/accept", yes, json={"version": "2026-09"}).status_code == 200
    assert _error(club.call("GET", "/admin/terms", yes)) == (403, "permission_denied", None)
    r = club.call("GET", "/admin/terms", club.stack.token)
    assert r.status_code == 200
    _valid("TermsStatusList", r.json())
    rows = {row["name"]: row for row in r.json()["tokens"]}
    assert r.json()["version"] == "2026-09"
    assert (rows["accepts"]["current"], rows["accepts"]["accepted_version"]) == (True, "2026-09")
    assert rows["hesitates"] == {
        "token_id": rows["hesitates"]["token_id"], "name": "hesitates", "accepted_version": None,
        "accepted_at": None, "current": False,
    }  # fmt: skip


def test_a_new_version_asks_again(servers: LoopThread, fresh: Club) -> None:
    token = fresh.user("lin")
    assert fresh.call("POST", "/v1/terms/accept", token, json={"version": "1"}).json()["accepted"] is True
    fresh.policy_file.write_text(policy("2", TERMS + " Version two adds a line."), encoding="utf-8")

    async def reloaded() -> bool:
        r = await _aget(fresh, token)
        return bool(r["version"] == "2")

    servers.call(wait_for(reloaded, within=60, interval=0.2))
    doc = fresh.call("GET", "/v1/terms", token).json()
    assert (doc["accepted"], doc["accepted_version"]) == (False, "1")
    assert doc["text"].endswith("Version two adds a line.")
    stale = fresh.call("POST", "/v1/terms/accept", token, json={"version": "1"})
    assert _error(stale) == (409, "terms_version_changed", "version")
    assert "version 2" in stale.json()["error"]["message"]
    accepted = fresh.call("POST", "/v1/terms/accept", token, json={"version": "2"}).json()
    assert (accepted["accepted"], accepted["accepted_version"]) == (True, "2")
    assert [r["version"] for r in _rows(fresh, token)] == ["1", "2"]  # appended, never rewritten


async def _aget(club: Club, token: str) -> Any:
    async with httpx.AsyncClient(timeout=30) as client:
        r = await client.get(club.url + "/v1/terms", headers={"Authorization": f"Bearer {token}"})
        return r.json()


def test_without_terms_everyone_is_through_and_nothing_can_be_accepted(
    servers: LoopThread, tmp_path: Path
) -> None:
    club = start_club(servers, tmp_path / "data", None)
    try:
        token = club.user("ben")
        assert club.call("GET", "/v1/terms", token).json() == {
            "version": None, "text": None, "accepted": True, "accepted_version": None, "accepted_at": None,
        }  # fmt: skip
        r = club.call("POST", "/v1/terms/accept", token, json={"version": "1"})
        assert _error(r) == (409, "no_terms", None)
        rows = club.call("GET", "/admin/terms", club.stack.token).json()
        assert rows["version"] is None and all(row["current"] for row in rows["tokens"])
    finally:
        servers.call(stop_stack(club.stack))


def test_acceptances_outlive_a_restart(servers: LoopThread, fresh: Club) -> None:
    token = fresh.user("kim")
    accepted = fresh.call("POST", "/v1/terms/accept", token, json={"version": "1"}).json()
    servers.call(stop_stack(fresh.stack))
    fresh.stack = servers.call(start_scheduler(fresh.stack.data_dir, policy_file=fresh.policy_file))
    assert fresh.call("GET", "/v1/terms", token).json() == accepted


# ----- the CLI: `hearth terms show|accept` against the real scheduler -----


def _hearth(club: Club, token: str, *args: str, given: str | None = None) -> Any:
    return CliRunner().invoke(
        main,
        ["terms", *args, "--scheduler", club.url, "--token", token],
        input=given,
        env={"HEARTH_TOKEN": ""},
    )


def test_hearth_terms_show_prints_the_version_the_text_and_where_the_user_stands(club: Club) -> None:
    token = club.user("show")
    done = _hearth(club, token, "show")
    assert done.exit_code == 0, done.output
    assert (
        done.stdout.splitlines()[0]
        == "Terms of use, version 2026-09 (not accepted yet: run `hearth terms accept`)"
    )
    assert TERMS in done.stdout
    club.call("POST", "/v1/terms/accept", token, json={"version": "2026-09"})
    assert "(you accepted it on " in _hearth(club, token, "show").stdout


def test_hearth_terms_accept_asks_and_a_no_records_nothing(club: Club) -> None:
    token = club.user("no")
    done = _hearth(club, token, "accept", given="n\n")
    assert done.exit_code == 1
    assert TERMS in done.stdout and "Do you accept version 2026-09 of these terms?" in done.stdout
    assert done.stderr == "hearth: error: not accepted: nothing was recorded\n"
    assert club.call("GET", "/v1/terms", token).json()["accepted"] is False
    # End of input is no answer, and no answer is no.
    assert _hearth(club, token, "accept", given="").exit_code == 1
    assert club.call("GET", "/v1/terms", token).json()["accepted"] is False


def test_hearth_terms_accept_records_a_yes(club: Club) -> None:
    token = club.user("yes")
    done = _hearth(club, token, "accept", given="y\n")
    assert done.exit_code == 0, done.output
    assert done.stdout.endswith("Accepted version 2026-09 of the terms of use.\n")
    assert club.call("GET", "/v1/terms", token).json()["accepted_version"] == "2026-09"
    again = _hearth(club, token, "accept", "--yes")
    assert again.exit_code == 0 and again.stdout.startswith("You accepted version 2026-09 of the terms")


def test_hearth_terms_accept_yes_and_version(club: Club) -> None:
    token = club.user("scripted")
    wrong = _hearth(club, token, "accept", "--yes", "--version", "2025-01")
    assert wrong.exit_code == 1
    assert wrong.stderr == (
        "hearth: error: the terms in force are version 2026-09, not 2025-01: read them with `hearth terms show`\n"
    )
    done = _hearth(club, token, "accept", "--yes", "--version", "2026-09")
    assert done.exit_code == 0, done.output
    assert TERMS not in done.stdout  # --yes: not shown, not asked
    assert club.call("GET", "/v1/terms", token).json()["accepted"] is True


def test_hearth_terms_errors_are_one_line(club: Club) -> None:
    done = _hearth(club, "hth_not-a-token", "show")
    assert done.exit_code == 1
    assert done.stderr == "hearth: error: invalid API token\n"
    gone = CliRunner().invoke(
        main, ["terms", "show", "--scheduler", "http://127.0.0.1:9", "--token", "t"], env={"HEARTH_TOKEN": ""}
    )
    assert gone.exit_code == 1 and gone.stderr.startswith("hearth: error: cannot reach the scheduler at ")
    assert len(gone.stderr.splitlines()) == 1
    missing = CliRunner().invoke(main, ["terms", "show", "--scheduler", club.url], env={"HEARTH_TOKEN": ""})
    assert missing.stderr == "hearth: error: this needs your API token: pass --token or set HEARTH_TOKEN\n"
