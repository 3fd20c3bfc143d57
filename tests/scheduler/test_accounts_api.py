"""Tokens, usage and the audit log through a real scheduler on 127.0.0.1: a token that expires, is revoked
or is rotated stops at its next request with a 401 that says which; the admin routes answer only admin
tokens, in their documented shapes; every change is audited with who and from where, and no secret is
ever written down."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from protocol.accounts import AuditLog, TokenList, TokenSecret, UsageReport
from protocol.responses import ErrorResponse
from scheduler.store import Store, TokenRecord, UsageRecord
from tests.support import LoopThread, Stack, start_scheduler, stop_stack

POLICY = """
[groups.students]
description = "Everyone in a course"

[groups.faculty]
description = "Staff"
"""
DAY = 86400.0


def _start(servers: LoopThread, data_dir: Path) -> Stack:
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / "policies.toml").write_text(POLICY)
    return servers.call(start_scheduler(data_dir))


@pytest.fixture(scope="module")
def sched(servers: LoopThread, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A scheduler with a policy of two groups besides the default, and no node (none is needed)."""
    stack = _start(servers, tmp_path_factory.mktemp("accounts"))
    yield stack
    servers.call(stop_stack(stack))


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _call(stack: Stack, method: str, path: str, token: str | None = None, **kw: Any) -> httpx.Response:
    headers = _auth(token if token is not None else stack.token)
    return httpx.request(method, stack.base_url + path, headers=headers, timeout=30, **kw)


def _store(stack: Stack) -> Store:
    return Store(stack.data_dir / "hearth.db")


def _admin_id(stack: Stack) -> str:
    store = _store(stack)
    try:
        record = store.verify_token(stack.token)
    finally:
        store.close()
    assert isinstance(record, TokenRecord)
    return record.id


def _create(stack: Stack, **body: Any) -> TokenSecret:
    r = _call(stack, "POST", "/admin/tokens", json={"name": "someone", **body})
    assert r.status_code == 201, r.text
    return TokenSecret.model_validate(r.json())


def _refused(r: httpx.Response, status: int, says: str, param: str | None = None) -> None:
    assert r.status_code == status, r.text
    err = ErrorResponse.model_validate(r.json()).error
    assert says in err.message, err.message
    if param is not None:
        assert err.param == param, r.text


def _db(stack: Stack, sql: str, *args: Any) -> None:
    """Change a row as time would (the scheduler's own clock is not the test's to move)."""
    with sqlite3.connect(stack.data_dir / "hearth.db") as db:
        db.execute(sql, args)


# ----- tokens stop at their next request -----


def _revoked_through_the_api(stack: Stack, created: TokenSecret) -> str:
    assert _call(stack, "POST", f"/admin/tokens/{created.token.id}/revoke").status_code == 200
    return created.secret


def _revoked_by_the_cli_store(stack: Stack, created: TokenSecret) -> str:
    store = _store(stack)  # another connection, as `hearth tokens revoke` has
    store.revoke_token(created.token.id)
    store.close()
    return created.secret


def _expired_meanwhile(stack: Stack, created: TokenSecret) -> str:
    _db(stack, "update tokens set expires = ? where id = ?", time.time() - 1, created.token.id)
    return created.secret


def _rotated_without_grace(stack: Stack, created: TokenSecret) -> str:
    r = _call(stack, "POST", f"/admin/tokens/{created.token.id}/rotate")
    assert r.status_code == 200, r.text
    new = TokenSecret.model_validate(r.json())
    assert new.token.id == created.token.id and new.secret != created.secret
    assert _call(stack, "GET", "/v1/models", new.secret).status_code == 200
    return created.secret


def _rotated_and_grace_over(stack: Stack, created: TokenSecret) -> str:
    r = _call(stack, "POST", f"/admin/tokens/{created.token.id}/rotate", json={"grace_seconds": 600})
    new = TokenSecret.model_validate(r.json())
    # Within the grace period both secrets work.
    assert _call(stack, "GET", "/v1/models", created.secret).status_code == 200
    assert _call(stack, "GET", "/v1/models", new.secret).status_code == 200
    _db(stack, "update tokens set prev_until = ? where id = ?", time.time() - 1, created.token.id)
    assert _call(stack, "GET", "/v1/models", new.secret).status_code == 200
    return created.secret


# fmt: off
STOPS = [
    (_revoked_through_the_api, "this token was revoked"),  # POST /admin/tokens/{id}/revoke
    (_revoked_by_the_cli_store, "this token was revoked"),  # `hearth tokens revoke` in another process
    (_expired_meanwhile, "; ask an operator for a new one"),  # its expiry passed while it was in use
    (_rotated_without_grace, "was replaced (rotated); use the new one"),  # the old secret stops at once
    (_rotated_and_grace_over, "was replaced (rotated); use the new one"),  # … or when the grace ends
]
# fmt: on


@pytest.mark.parametrize(("stop", "says"), STOPS, ids=[f.__name__.strip("_") for f, _ in STOPS])
def test_a_token_stops_at_its_next_request_and_says_why(sched: Stack, stop: Any, says: str) -> None:
    created = _create(sched, group="students")
    assert _call(sched, "GET", "/v1/models", created.secret).status_code == 200
    secret = stop(sched, created)
    _refused(_call(sched, "GET", "/v1/models", secret), 401, says)


def test_the_expiry_message_names_the_moment(sched: Stack) -> None:
    store = _store(sched)
    secret, _ = store.create_token("late", expires=1_800_000_000.0)  # 2027-01-15 08:00 UTC
    store.close()
    if time.time() < 1_800_000_000.0:
        _db(sched, "update tokens set expires = 1000000000.0 where name = 'late'")  # 2001-09-09 01:46 UTC
        when = "2001-09-09 01:46 UTC"
    else:
        when = "2027-01-15 08:00 UTC"
    _refused(_call(sched, "GET", "/v1/models", secret), 401, f"this token expired at {when}")
    _refused(_call(sched, "GET", "/v1/models", "hth_never-issued"), 401, "invalid API token")


# ----- the admin routes -----

ROUTES = [
    ("POST", "/admin/tokens", {"name": "x"}),
    ("GET", "/admin/tokens", None),
    ("POST", "/admin/tokens/tok_000000000000/revoke", None),
    ("POST", "/admin/tokens/tok_000000000000/rotate", None),
    ("GET", "/admin/usage", None),
    ("GET", "/admin/audit", None),
]


@pytest.mark.parametrize(("method", "path", "body"), ROUTES, ids=[f"{m} {p}" for m, p, _ in ROUTES])
def test_admin_routes_answer_admin_tokens_only(sched: Stack, method: str, path: str, body: Any) -> None:
    store = _store(sched)
    user, _ = store.create_token("a user")
    store.close()
    r = httpx.request(method, sched.base_url + path, json=body, timeout=30)
    _refused(r, 401, "missing API token")
    _refused(_call(sched, method, path, user, json=body), 403, "admin token")


# (method, path, body, status, param, what the message says)
# fmt: off
MISTAKES = [
    ("POST", "/admin/tokens", {"name": "x", "group": "nobody"}, 400, "group", "groups: default, faculty, students"),  # not in the policy
    ("POST", "/admin/tokens", {"name": ""}, 400, "name", ""),  # a name to recognise it by
    ("POST", "/admin/tokens", {"name": "x", "scope": "root"}, 400, "scope", ""),  # user or admin
    ("POST", "/admin/tokens", {"name": "x", "expires_in_seconds": 0}, 400, "expires_in_seconds", ""),  # already expired
    ("POST", "/admin/tokens", {"name": "x", "expires_in_seconds": "30d"}, 400, "expires_in_seconds", ""),  # seconds, not a duration
    ("POST", "/admin/tokens", {"name": "x", "tiers": ["gold"]}, 400, None, ""),  # no such tier
    ("POST", "/admin/tokens/tok_000000000000/revoke", None, 404, None, "no token with id"),  # unknown id
    ("POST", "/admin/tokens/nonsense/rotate", None, 404, None, "no token with id"),  # not even an id
    ("POST", "/admin/tokens/tok_000000000000/rotate", {"grace_seconds": -1}, 400, "grace_seconds", ""),  # before now
    ("GET", "/admin/usage?by=color", None, 400, "by", "user, group, model, node, day"),  # no such dimension
    ("GET", "/admin/usage?since=last+week", None, 400, "since", "not a duration"),  # words
    ("GET", "/admin/usage?since=1e9", None, 400, "since", "not a duration"),  # no exponents
    ("GET", "/admin/audit?since=99999999999d", None, 400, "since", "at most"),  # before any time
    ("GET", "/admin/audit?limit=0", None, 400, "limit", "whole number"),  # nothing to show
    ("GET", "/admin/audit?limit=%C2%B2", None, 400, "limit", "whole number"),  # a digit, but not ASCII
]
# fmt: on


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "param", "says"),
    MISTAKES,
    ids=[str(i) for i in range(len(MISTAKES))],
)
def test_an_admins_mistake_is_a_4xx_naming_the_field(
    sched: Stack, method: str, path: str, body: Any, status: int, param: str | None, says: str
) -> None:
    _refused(_call(sched, method, path, json=body), status, says, param)


def test_rotating_a_revoked_token_is_a_conflict(sched: Stack) -> None:
    created = _create(sched)
    _call(sched, "POST", f"/admin/tokens/{created.token.id}/revoke")
    r = _call(sched, "POST", f"/admin/tokens/{created.token.id}/rotate")
    _refused(r, 409, "create a new one")
    assert ErrorResponse.model_validate(r.json()).error.code == "wrong_state"


def test_a_token_is_created_listed_and_shows_its_use(sched: Stack) -> None:
    created = _create(sched, name="ada", group="faculty", scope="admin", expires_in_seconds=30 * DAY)
    token = created.token
    assert (token.name, token.group, token.scope, token.state) == ("ada", "faculty", "admin", "active")
    assert token.expires is not None and abs(token.expires - (time.time() + 30 * DAY)) < 3600
    assert (token.last_used, token.tokens_this_month) == (None, 0)
    assert _call(sched, "GET", "/admin/tokens", created.secret).status_code == 200  # an admin token, at once
    store = _store(sched)
    used = time.time() - 5
    store.record_usage(
        [UsageRecord("ada-1", token.id, "m", "chat", "n", "ok", 30, 12, used, used + 1, "faculty")]
    )
    store.close()
    listed = TokenList.model_validate(_call(sched, "GET", "/admin/tokens").json())
    mine = next(t for t in listed.tokens if t.id == token.id)
    assert (mine.last_used, mine.tokens_this_month) == (used, 42)
    assert created.secret not in _call(sched, "GET", "/admin/tokens").text


# ----- usage -----


@pytest.fixture
def quiet(servers: LoopThread, tmp_path: Path) -> Iterator[Stack]:
    """A scheduler of its own: its usage report holds only what the test wrote."""
    stack = _start(servers, tmp_path / "data")
    yield stack
    servers.call(stop_stack(stack))


# (by, the rows a report over the last 7 days shows: key, name, requests, errors, prompt, completion)
# fmt: off
REPORTS = [
    ("user", [("B", "bob", 1, 0, 100, 1), ("A", "alice", 3, 1, 16, 27)]),
    ("group", [("faculty", None, 1, 0, 100, 1), ("students", None, 3, 1, 16, 27)]),
    ("model", [("m", None, 3, 1, 111, 23), ("big", None, 1, 0, 5, 5)]),
    ("node", [("n2", None, 1, 0, 100, 1), ("n1", None, 3, 1, 16, 27)]),
]
# fmt: on


@pytest.mark.parametrize(("by", "expected"), REPORTS, ids=[b for b, _ in REPORTS])
def test_usage_by_every_dimension_counts_folded_days(quiet: Stack, by: str, expected: list[Any]) -> None:
    store = _store(quiet)
    _, alice = store.create_token("alice", group="students")
    _, bob = store.create_token("bob", group="faculty")
    now = time.time()
    rows = [
        UsageRecord("a1", alice.id, "m", "chat", "n1", "ok", 10, 20, now - 3 * DAY, now - 3 * DAY + 1, "students"),
        UsageRecord("a2", alice.id, "m", "chat", "n1", "node_failed", 1, 2, now - 3 * DAY, now - 3 * DAY, "students"),
        UsageRecord("a3", alice.id, "big", "chat", "n1", "ok", 5, 5, now - 60, now - 59, "students", 80.0),
        UsageRecord("b1", bob.id, "m", "chat", "n2", "ok", 100, 1, now - 60, now - 58, "faculty", 90.0),
        UsageRecord("old", bob.id, "m", "chat", "n2", "ok", 9, 9, now - 30 * DAY, now - 30 * DAY, "faculty"),
    ]  # fmt: skip
    store.record_usage(rows)
    assert store.fold_usage(now - 2 * DAY) == 3  # the three oldest are daily totals now
    store.close()
    ids = {alice.id: "A", bob.id: "B"}
    r = _call(quiet, "GET", f"/admin/usage?by={by}&since=7d")
    assert r.status_code == 200, r.text
    report = UsageReport.model_validate(r.json())
    assert report.by == by and abs(report.since - (now - 7 * DAY)) < 600
    got = [(ids.get(u.key, u.key), u.name, u.requests, u.errors, u.prompt_tokens, u.completion_tokens)
           for u in report.rows]  # fmt: skip
    assert got == expected
    assert all(u.total_tokens == u.prompt_tokens + u.completion_tokens for u in report.rows)


def test_usage_by_day_reads_utc_days(quiet: Stack) -> None:
    store = _store(quiet)
    _, alice = store.create_token("alice")
    now = time.time()
    store.record_usage([UsageRecord("a", alice.id, "m", "chat", "n", "ok", 1, 2, now - 60, now - 59)])
    store.close()
    report = UsageReport.model_validate(_call(quiet, "GET", "/admin/usage?by=day&since=3600").json())
    assert [(u.key, u.requests, u.total_tokens) for u in report.rows] == [
        (time.strftime("%Y-%m-%d", time.gmtime(now - 60)), 1, 3)
    ]


# ----- the audit log -----


def test_admin_actions_are_audited_with_who_and_where(sched: Stack) -> None:
    admin = _admin_id(sched)
    since = time.time()  # the same clock as the scheduler's
    assert _call(sched, "POST", "/admin/enrollment-codes", json={"tier": "community"}).status_code == 201
    created = _create(sched, name="grace", group="students")
    rotated = TokenSecret.model_validate(
        _call(sched, "POST", f"/admin/tokens/{created.token.id}/rotate", json={"grace_seconds": 60}).json()
    )
    _call(sched, "POST", f"/admin/tokens/{created.token.id}/revoke")
    r = _call(sched, "GET", "/admin/audit?since=3600&limit=50")
    entries = [e for e in AuditLog.model_validate(r.json()).entries if e.at >= since]
    assert [(e.action, e.actor, e.origin) for e in entries] == [
        ("code_created", admin, "127.0.0.1"),
        ("token_created", admin, "127.0.0.1"),
        ("token_rotated", admin, "127.0.0.1"),
        ("token_revoked", admin, "127.0.0.1"),
    ]
    assert entries[1].subject == created.token.id and "group=students" in entries[1].detail
    for secret in (created.secret, rotated.secret, sched.token):
        assert secret not in r.text
    raw = b"".join(p.read_bytes() for p in sched.data_dir.iterdir() if p.name.startswith("hearth.db"))
    assert created.secret.encode() not in raw and rotated.secret.encode() not in raw


# ----- a real request's row -----


def test_a_requests_usage_row_has_its_group_time_to_first_token_and_duration(stack: Stack) -> None:
    body = {"model": "hearth-demo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
            "stream": True}  # fmt: skip
    started = time.time()
    with httpx.stream(
        "POST", stack.api + "/chat/completions", json=body, headers=_auth(stack.token), timeout=60
    ) as r:
        assert r.status_code == 200
        text = "".join(r.iter_text())
    assert text.rstrip().endswith("data: [DONE]")
    deadline = time.monotonic() + 30  # the usage writer commits in batches, off the request path
    found: list[tuple[Any, ...]] = []
    while not found and time.monotonic() < deadline:
        time.sleep(0.05)
        with sqlite3.connect(stack.data_dir / "hearth.db") as db:
            found = db.execute(
                'select "group", ttft_ms, started, ended, status, completion_tokens from usage '
                "where started >= ? order by started desc limit 1",
                [started - 1],
            ).fetchall()
    assert found, "no usage row was written"
    group, ttft_ms, begun, ended, status, completion = found[0]
    assert (group, status) == ("default", "ok") and completion > 0
    assert ttft_ms is not None and 0 < ttft_ms <= (ended - begun) * 1000
