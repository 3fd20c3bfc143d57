"""The policy's last reload and its error (`GET /admin/policy`: loaded_at, last_error), and a reload on the
operator's word (`POST /admin/policy/reload`), against a real scheduler on 127.0.0.1 and its policy file.

Each test starts from a good file it writes and reloads itself, so it passes alone and in any order; the
file's watcher runs meanwhile, as it does for users, and may read a change first: the tests hold either way.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from protocol.policy import PolicyState
from protocol.responses import ErrorResponse
from scheduler.openapi import openapi_document
from tests.support import LoopThread, Stack, start_scheduler, stop_stack

GOOD = '[groups.students]\nmodels = ["hearth-*"]\ntokens_per_day = 20000\n'
BAD = GOOD.replace("tokens_per_day = 20000", 'tokens_per_day = "lots"')  # line 3: not a number
OTHER = GOOD.replace("20000", "30000") + "weight = 2.0\n"  # good, and another size than GOOD and BAD


@pytest.fixture(scope="module")
def sched(servers: LoopThread, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    data = tmp_path_factory.mktemp("policy-reload")
    (data / "policies.toml").write_text(GOOD, encoding="utf-8")
    stack = servers.call(start_scheduler(data))
    yield stack
    servers.call(stop_stack(stack))


def _h(stack: Stack, token: str | None = None) -> dict[str, str]:
    return {"Authorization": f"Bearer {token or stack.token}"}


def policy_file(stack: Stack) -> Path:
    return stack.data_dir / "policies.toml"


def state(stack: Stack) -> PolicyState:
    r = httpx.get(stack.base_url + "/admin/policy", headers=_h(stack), timeout=10)
    assert r.status_code == 200, r.text
    return PolicyState.model_validate(r.json())


def reload(stack: Stack, token: str | None = None) -> httpx.Response:
    return httpx.post(stack.base_url + "/admin/policy/reload", headers=_h(stack, token), timeout=30)


def digest(text: str, terms: str = "") -> str:
    """A policy's digest: of its file, and of the terms file it names."""
    return hashlib.sha256((text + terms).encode()).hexdigest()


def in_force(stack: Stack, text: str, terms: str = "") -> PolicyState:
    """``text`` written and in force, whatever an earlier test left."""
    policy_file(stack).write_text(text, encoding="utf-8")
    r = reload(stack)
    assert r.status_code == 200, r.text
    now = PolicyState.model_validate(r.json())
    assert now.digest == digest(text, terms) and now.last_error is None
    return now


def tokens_per_day(doc: PolicyState) -> int | None:
    return next(g.each.tokens_per_day for g in doc.groups if g.name == "students")


def audit(stack: Stack, since: float) -> list[dict[str, Any]]:
    r = httpx.get(stack.base_url + "/admin/audit", headers=_h(stack), timeout=10)
    return [e for e in r.json()["entries"] if e["at"] >= since and e["action"].startswith("policy_")]


def admin_token_id(stack: Stack) -> str:
    tokens = httpx.get(stack.base_url + "/admin/tokens", headers=_h(stack), timeout=10).json()["tokens"]
    return str(next(t["id"] for t in tokens if t["name"] == "test"))


def wait_until(what: str, predicate: Any, within: float = 30.0) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.05)


def test_the_policy_says_when_it_was_put_in_force(sched: Stack) -> None:
    doc = state(sched)  # at start, or at an earlier test's reload
    assert doc.loaded_at is not None and 0 <= time.time() - doc.loaded_at < 3600


def test_a_bad_file_is_refused_with_its_line_and_shown_until_a_good_one_is_in_force(sched: Stack) -> None:
    before = in_force(sched, GOOD)
    since = time.time()
    policy_file(sched).write_text(BAD, encoding="utf-8")
    r = reload(sched)
    assert r.status_code == 400, r.text
    err = ErrorResponse.model_validate(r.json()).error
    assert err.code == "invalid_policy" and err.type == "invalid_request_error"
    assert "policies.toml, line 3, groups.students.tokens_per_day" in err.message
    assert "the policy in force stays" in err.message

    refused = state(sched)
    assert refused.last_error is not None and refused.last_error in err.message
    assert (refused.digest, refused.loaded_at) == (before.digest, before.loaded_at)  # the old one stays
    assert tokens_per_day(refused) == 20000

    policy_file(sched).write_text(OTHER, encoding="utf-8")
    r = reload(sched)
    assert r.status_code == 200, r.text
    fixed = PolicyState.model_validate(r.json())
    assert fixed.last_error is None and fixed.digest == digest(OTHER) and tokens_per_day(fixed) == 30000
    assert fixed.loaded_at is not None and before.loaded_at is not None and fixed.loaded_at > before.loaded_at
    assert state(sched) == fixed

    # The operator's reloads are audited as theirs (the watcher may have written its own rows too).
    mine = [(e["action"], e["actor"]) for e in audit(sched, since) if e["actor"] != "scheduler"]
    operator = admin_token_id(sched)
    assert ("policy_refused", operator) in mine and ("policy_applied", operator) in mine


def test_the_watcher_shows_a_bad_file_and_clears_it_once_fixed(sched: Stack) -> None:
    before = in_force(sched, GOOD)
    policy_file(sched).write_text(BAD, encoding="utf-8")
    wait_until("the watcher refuses the file", lambda: state(sched).last_error is not None)
    error = state(sched).last_error
    assert error is not None and "line 3, groups.students.tokens_per_day" in error
    assert state(sched).digest == before.digest
    policy_file(sched).write_text(OTHER, encoding="utf-8")
    wait_until("the watcher applies the fixed file", lambda: state(sched).digest == digest(OTHER))
    after = state(sched)
    assert after.last_error is None
    assert after.loaded_at is not None and before.loaded_at is not None and after.loaded_at > before.loaded_at


def test_reverting_to_the_policy_in_force_clears_the_error_and_changes_nothing_else(sched: Stack) -> None:
    before = in_force(sched, GOOD)
    policy_file(sched).write_text(BAD, encoding="utf-8")
    assert reload(sched).status_code == 400
    policy_file(sched).write_text(GOOD, encoding="utf-8")
    r = reload(sched)
    assert r.status_code == 200, r.text
    after = PolicyState.model_validate(r.json())
    assert after.last_error is None
    assert (after.digest, after.loaded_at) == (before.digest, before.loaded_at)  # nothing new was applied


def test_a_reload_with_nothing_new_changes_nothing(sched: Stack) -> None:
    before = in_force(sched, GOOD)
    since = time.time()
    r = reload(sched)
    assert r.status_code == 200, r.text
    assert PolicyState.model_validate(r.json()) == before
    assert [e for e in audit(sched, since) if e["actor"] != "scheduler"] == []  # nothing changed: no row


def test_a_reload_reads_the_terms_file_the_watcher_does_not_watch(sched: Stack) -> None:
    terms = sched.data_dir / "terms.md"
    terms.write_text("Be kind.\n", encoding="utf-8")
    text = GOOD + '[terms]\nversion = "1"\nfile = "terms.md"\n'
    before = in_force(sched, text, "Be kind.\n")
    terms.write_text("Be kind, and brief.\n", encoding="utf-8")
    r = reload(sched)
    assert r.status_code == 200, r.text
    after = PolicyState.model_validate(r.json())
    assert after.digest == digest(text, "Be kind, and brief.\n")  # the new terms are in force
    assert after.loaded_at is not None and before.loaded_at is not None and after.loaded_at > before.loaded_at
    in_force(sched, GOOD)


def test_a_put_clears_the_error_of_a_refused_reload(sched: Stack) -> None:
    before = in_force(sched, GOOD)
    policy_file(sched).write_text(BAD, encoding="utf-8")
    assert reload(sched).status_code == 400
    r = httpx.put(sched.base_url + "/admin/policy", json={"text": OTHER}, headers=_h(sched), timeout=30)
    assert r.status_code == 200, r.text
    put = PolicyState.model_validate(r.json())
    assert put.last_error is None and put.digest == digest(OTHER)
    assert put.loaded_at is not None and before.loaded_at is not None and put.loaded_at > before.loaded_at


def test_only_operators_reload(sched: Stack) -> None:
    r = httpx.post(sched.base_url + "/admin/tokens", json={"name": "a-user"}, headers=_h(sched))
    user = r.json()["secret"]
    refused = reload(sched, user)
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "permission_denied"
    anonymous = httpx.post(sched.base_url + "/admin/policy/reload", timeout=10)
    assert anonymous.status_code == 401 and anonymous.json()["error"]["code"] == "invalid_api_key"


def test_every_status_a_reload_answers_is_documented() -> None:
    answers = openapi_document()["paths"]["/admin/policy/reload"]["post"]["responses"]
    assert {"200", "400", "401", "403", "409"} <= set(answers)
