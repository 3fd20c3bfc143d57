"""A client's mistake on the token, admin, enrollment and heartbeat routes is a 4xx in OpenAI's shape.

Never a 5xx, and for a token nobody could have been issued, not even a log line: an unauthenticated client
must not be able to fill the operator's log. Each test drives a real scheduler on 127.0.0.1 with httpx;
nodes enroll through the real `POST /v1/enroll` and are approved with certificates the real authority signs.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from protocol.federation import proof_message
from protocol.identity import (
    Identity,
    b64e,
    encryption_public_b64,
    issue_certificate,
    load_authority,
    sign_request,
)
from protocol.responses import ErrorResponse
from scheduler.store import Store
from tests.support import LoopThread, Stack, start_scheduler, stop_stack

MODELS = "/v1/models"


@pytest.fixture(scope="module")
def sched(servers: LoopThread, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A scheduler with no node of its own: these tests enroll their own."""
    stack = servers.call(start_scheduler(tmp_path_factory.mktemp("admin-errors")))
    yield stack
    servers.call(stop_stack(stack))


def _admin(stack: Stack) -> dict[str, str]:
    return {"Authorization": f"Bearer {stack.token}"}


def _error(r: httpx.Response, status: int, code: str | None = None, param: str | None = None) -> None:
    assert r.status_code == status, r.text
    assert r.headers["Content-Type"].startswith("application/json")
    err = ErrorResponse.model_validate(r.json()).error
    if code is not None:
        assert err.code == code, r.text
    if param is not None:
        assert err.param == param, r.text


@dataclass
class Volunteer:
    """A machine that enrolls: its identity and encryption keys, as `hearth node enroll` makes them."""

    node_id: str
    identity: Identity
    encryption_key: str

    @classmethod
    def make(cls, node_id: str) -> Volunteer:
        return cls(node_id, Identity.generate(), encryption_public_b64(X25519PrivateKey.generate()))

    def request(self, code: str, **changed: str) -> dict[str, Any]:
        doc = {
            "code": code,
            "node_id": self.node_id,
            "identity_key": self.identity.public_b64,
            "encryption_key": self.encryption_key,
            **changed,
        }
        proof = self.identity.sign(
            proof_message(doc["code"], doc["node_id"], doc["identity_key"], doc["encryption_key"])
        )
        return {**doc, "proof": b64e(proof)}


def _code(stack: Stack) -> str:
    r = httpx.post(stack.base_url + "/admin/enrollment-codes", json={"tier": "club"}, headers=_admin(stack))
    assert r.status_code == 201, r.text
    code: str = r.json()["code"]
    return code


def _enrolled(stack: Stack, name: str) -> Volunteer:
    node = Volunteer.make(f"{name}-{secrets.token_hex(3)}")
    r = httpx.post(stack.base_url + "/v1/enroll", json=node.request(_code(stack)))
    assert r.status_code == 201, r.text
    return node


def _certificate(stack: Stack, node: Volunteer) -> dict[str, Any]:
    assert stack.scheduler_identity is not None
    return issue_certificate(
        load_authority(stack.data_dir / "authority"), node_id=node.node_id, tier="club",
        identity_key=node.identity.public_b64, encryption_key=node.encryption_key,
        scheduler_key=stack.scheduler_identity.public_b64,
    )  # fmt: skip


def _approve(stack: Stack, node: Volunteer) -> httpx.Response:
    return httpx.post(
        f"{stack.base_url}/admin/enrollments/{node.node_id}/approve",
        json={"certificate": _certificate(stack, node)},
        headers=_admin(stack),
    )


def _post(stack: Stack, path: str, body: Any = None) -> httpx.Response:
    content = body if isinstance(body, bytes) else None if body is None else json.dumps(body).encode()
    return httpx.post(stack.base_url + path, content=content, headers=_admin(stack))


# ----- bearer tokens -----


def _logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Hearth's log lines, and aiohttp's above its debug chatter (the test loop runs in debug mode)."""
    return [
        rec.getMessage()
        for rec in caplog.records
        if rec.name.startswith("hearth") or (rec.name.startswith("aiohttp") and rec.levelno > logging.DEBUG)
    ]


# fmt: off
TOKENS = [
    # (name, the Authorization header's bytes)
    ("byte 0xff", b"Bearer \xff"),                 # not UTF-8: the server decodes it to a lone surrogate
    ("token prefix, then 0x80", b"Bearer hth_\x80abc"),
    ("valid UTF-8, not ASCII", b"Bearer \xc3\xa9t\xc3\xa9"),  # no token is anything but ASCII
    ("a tab inside", b"Bearer hth_a\tb"),
]
# fmt: on


@pytest.mark.parametrize("path", [MODELS, "/v1/chat/completions", "/admin/nodes"])
@pytest.mark.parametrize(("name", "header"), TOKENS, ids=[t[0] for t in TOKENS])
def test_a_token_of_odd_bytes_is_401_and_logs_nothing(
    sched: Stack, caplog: pytest.LogCaptureFixture, path: str, name: str, header: bytes
) -> None:
    caplog.set_level(logging.DEBUG)
    method = "GET" if path != "/v1/chat/completions" else "POST"
    body = {"model": "hearth-demo", "messages": [{"role": "user", "content": "hi"}]}
    r = httpx.request(
        method,
        sched.base_url + path,
        headers={"Authorization": header},
        json=body if method == "POST" else None,
    )
    _error(r, 401, "invalid_api_key")
    assert _logged(caplog) == []


# aiohttp's parser refuses a control byte in a header before any middleware: protocol.server answers it.
def test_a_control_byte_in_the_token_is_answered_in_openais_shape_without_a_log_line(
    sched: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    r = httpx.get(sched.base_url + MODELS, headers={"Authorization": b"Bearer hth_a\x7fb"})
    assert r.status_code in (400, 401)
    ErrorResponse.model_validate(r.json())
    assert _logged(caplog) == []


# ----- enrollment codes -----

# fmt: off
CODE_BODIES: list[tuple[str, Any, str | None]] = [
    # (name, body (bytes = raw), the param named)
    ("lone surrogate in the note", b'{"tier": "club", "note": "a\\ud800b"}', "note"),
    ("note too long", {"tier": "club", "note": "x" * 201}, "note"),
    ("note not a string", {"tier": "club", "note": 5}, "note"),
    ("unknown tier", {"tier": "gold"}, "tier"),
    ("tier as a list", {"tier": ["club"]}, "tier"),
    ("no tier", {}, "tier"),
    ("ttl as a boolean", {"tier": "club", "ttl_seconds": True}, "ttl_seconds"),
    ("ttl as a string", {"tier": "club", "ttl_seconds": "600"}, "ttl_seconds"),
    ("ttl too short", {"tier": "club", "ttl_seconds": 59}, "ttl_seconds"),
    ("ttl not finite", b'{"tier": "club", "ttl_seconds": Infinity}', "ttl_seconds"),
    ("body is a list", [1], None),
    ("body is not JSON", b"{", None),
]
# fmt: on


@pytest.mark.parametrize(("name", "body", "param"), CODE_BODIES, ids=[c[0] for c in CODE_BODIES])
def test_a_bad_enrollment_code_request_is_400(sched: Stack, name: str, body: Any, param: str | None) -> None:
    _error(_post(sched, "/admin/enrollment-codes", body), 400, param=param)


def test_an_enrollment_code_is_created_with_201(sched: Stack) -> None:
    r = _post(sched, "/admin/enrollment-codes", {"tier": "community", "ttl_seconds": 600, "note": "Zoë"})
    assert r.status_code == 201
    assert r.json()["tier"] == "community" and r.json()["code"].startswith("hec-")


# ----- approvals and other decisions -----


def test_approving_an_enrollment_that_does_not_exist_is_404(sched: Stack) -> None:
    _error(_approve(sched, Volunteer.make("nobody-here")), 404, "not_found")


def test_approving_twice_is_409(sched: Stack) -> None:
    node = _enrolled(sched, "twice")
    assert _approve(sched, node).status_code == 200
    _error(_approve(sched, node), 409, "wrong_state")


@pytest.mark.parametrize("decision", ["reject", "revoke"])
def test_approving_a_rejected_or_revoked_node_is_409(sched: Stack, decision: str) -> None:
    node = _enrolled(sched, decision)
    path = "enrollments" if decision == "reject" else "nodes"
    assert _post(sched, f"/admin/{path}/{node.node_id}/{decision}").status_code == 200
    _error(_approve(sched, node), 409, "wrong_state")


def test_rejecting_an_approved_node_and_revoking_twice_are_409(sched: Stack) -> None:
    node = _enrolled(sched, "decided")
    assert _approve(sched, node).status_code == 200
    _error(_post(sched, f"/admin/enrollments/{node.node_id}/reject"), 409, "wrong_state")
    assert _post(sched, f"/admin/nodes/{node.node_id}/revoke").status_code == 200
    _error(_post(sched, f"/admin/nodes/{node.node_id}/revoke"), 409, "wrong_state")


# fmt: off
CERTIFICATES: list[tuple[str, Any]] = [
    # (name, body of the approval)
    ("no body", None),
    ("no certificate", {}),
    ("certificate is a number", {"certificate": 5}),
    ("certificate document is empty", {"certificate": {}}),
    ("certificate without its signature", {"certificate": {"certificate": {"v": 1}}}),
    ("certificate with a malformed signature", "bad-signature"),
    ("certificate of a lone surrogate", b'{"certificate": {"certificate": {}, "signature": "\\ud800"}}'),
]
# fmt: on


@pytest.mark.parametrize(("name", "body"), CERTIFICATES, ids=[c[0] for c in CERTIFICATES])
def test_approving_with_a_malformed_certificate_is_400(sched: Stack, name: str, body: Any) -> None:
    node = _enrolled(sched, "malformed")
    if body == "bad-signature":
        body = {"certificate": {**_certificate(sched, node), "signature": "!" * 86}}
    _error(_post(sched, f"/admin/enrollments/{node.node_id}/approve", body), 400, param="certificate")
    assert _approve(sched, node).status_code == 200  # still pending, and a good certificate approves it


def test_a_certificate_for_another_node_is_400(sched: Stack) -> None:
    node, other = _enrolled(sched, "this"), _enrolled(sched, "other")
    body = {"certificate": _certificate(sched, other)}
    _error(_post(sched, f"/admin/enrollments/{node.node_id}/approve", body), 400, param="certificate")


@pytest.mark.parametrize("body", [{"drain": "yes"}, {"drain": 1}, {"drain": None}, [True]])
def test_a_drain_flag_that_is_not_a_boolean_is_400(sched: Stack, body: Any) -> None:
    node = _enrolled(sched, "drain")
    _error(_post(sched, f"/admin/nodes/{node.node_id}/drain", body), 400)


@pytest.mark.parametrize(
    "path", ["/admin/enrollments/{}/reject", "/admin/nodes/{}/revoke", "/admin/nodes/{}/drain"]
)
def test_deciding_on_a_node_that_does_not_exist_is_404(sched: Stack, path: str) -> None:
    _error(_post(sched, path.format("nobody-here")), 404, "not_found")


# ----- enrollment -----


def _noncanonical(key: str) -> str:
    """The same 32 bytes spelled otherwise: the unused low bits of the last character set."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    return key[:-1] + alphabet[alphabet.index(key[-1]) | 1]


@pytest.mark.parametrize("field", ["identity_key", "encryption_key"])
def test_enrolling_with_a_malformed_key_is_400(sched: Stack, field: str) -> None:
    node = Volunteer.make(f"malformed-{secrets.token_hex(3)}")
    key = node.identity.public_b64 if field == "identity_key" else node.encryption_key
    r = httpx.post(
        sched.base_url + "/v1/enroll", json=node.request(_code(sched), **{field: _noncanonical(key)})
    )
    _error(r, 400, param=field)


@pytest.mark.parametrize("url", ["http://bücher.example:9100", "http://a\x1cb:9100", "ftp://node:9100"])
def test_enrolling_with_a_url_of_other_than_printable_ascii_is_400(sched: Stack, url: str) -> None:
    """A host goes in IDNA form; "\\s" once meant other characters to the document's readers than to
    pydantic, so the pattern now names the characters it takes."""
    node = Volunteer.make(f"url-{secrets.token_hex(3)}")
    body = {**node.request(_code(sched)), "url": url}
    _error(httpx.post(sched.base_url + "/v1/enroll", json=body), 400, param="url")


def test_enrolling_with_a_lone_surrogate_in_the_code_is_400(sched: Stack) -> None:
    node = Volunteer.make("surrogate")
    body = json.dumps({**node.request("x" * 10), "code": "\ud800" * 10}).encode()
    _error(httpx.post(sched.base_url + "/v1/enroll", content=body), 400, param="code")


# ----- heartbeats -----


def test_a_signed_heartbeat_with_a_malformed_status_is_400(sched: Stack) -> None:
    """The node is the client here: a status the scheduler cannot read is the node's mistake, not a bad
    gateway."""
    node = _enrolled(sched, "beats")
    assert _approve(sched, node).status_code == 200
    assert sched.scheduler_identity is not None
    body = json.dumps({"node_id": node.node_id, "memory_total_bytes": -1}).encode()
    headers = sign_request(
        node.identity, "POST", "/v1/nodes/heartbeat", body, audience=sched.scheduler_identity.fingerprint
    )
    r = httpx.post(sched.base_url + "/v1/nodes/heartbeat", content=body, headers=headers)
    _error(r, 400)


def test_a_refused_approval_changes_nothing(sched: Stack) -> None:
    """The node stays pending, in the scheduler's memory and in its database."""
    node = _enrolled(sched, "stays")
    _error(_post(sched, f"/admin/enrollments/{node.node_id}/approve", {"certificate": {}}), 400)
    listed = httpx.get(sched.base_url + "/admin/enrollments", headers=_admin(sched)).json()["enrollments"]
    assert next(e for e in listed if e["node_id"] == node.node_id)["state"] == "pending"
    store = Store(sched.data_dir / "hearth.db")
    try:
        record = store.node(node.node_id)
    finally:
        store.close()
    assert record is not None and record.state == "pending" and record.certificate is None


# ----- queries -----


@pytest.mark.parametrize(
    ("path", "param"),
    [
        ("/admin/enrollments?state=approvedd", "state"),  # a typo once listed nothing, silently
        ("/v1/directory?since=%C2%B2", "since"),  # "²": a digit to str.isdigit(), not to int()
        ("/v1/directory?since=-1", "since"),
        ("/v1/directory?since=1000000000000000", "since"),
    ],
)
def test_a_bad_query_is_400(sched: Stack, path: str, param: str) -> None:
    _error(httpx.get(sched.base_url + path, headers=_admin(sched)), 400, param=param)
