"""Keys, certificates and signed calls, with real Ed25519: what is accepted, and every way a forgery fails."""

from __future__ import annotations

import copy
import os
import stat
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.errors import AuthenticationFailed, ConfigError, PermissionDenied, ProtocolError
from protocol.identity import (
    Identity,
    RequestVerifier,
    b64e,
    init_authority,
    issue_certificate,
    load_authority,
    load_or_create_encryption_key,
    load_or_create_identity,
    sign_request,
    verify_certificate,
)

AUTHORITY = Identity.generate()
NODE = Identity.generate()
SCHEDULER = Identity.generate()
ENC = b64e(os.urandom(32))


def cert(**overrides: Any) -> dict[str, Any]:
    fields = {"node_id": "gpu-1", "tier": "club", "identity_key": NODE.public_b64, "encryption_key": ENC,
              "scheduler_key": SCHEDULER.public_b64, **overrides}  # fmt: skip
    return issue_certificate(AUTHORITY, **fields)


# ----- key files -----


def test_keys_are_written_once_with_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "identity.key"
    first = load_or_create_identity(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_identity(path).public_raw == first.public_raw
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        Identity.generate().save(path)
    enc = tmp_path / "encryption.key"
    load_or_create_encryption_key(enc)
    assert stat.S_IMODE(enc.stat().st_mode) == 0o600


def test_a_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "identity.key"
    Identity.generate().save(path)
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        Identity.load(path)


@pytest.mark.parametrize(
    "content", [b"", b"not a key", b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"]
)
def test_a_damaged_key_file_is_one_clear_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "identity.key"
    path.write_bytes(content)
    path.chmod(0o600)
    with pytest.raises(ConfigError):
        Identity.load(path)


def test_the_authority_lives_in_its_own_folder(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="hearth authority init"):
        load_authority(tmp_path / "authority")
    made = init_authority(tmp_path / "authority")
    assert load_authority(tmp_path / "authority").public_b64 == made.public_b64
    assert stat.S_IMODE((tmp_path / "authority").stat().st_mode) == 0o700
    with pytest.raises(ConfigError, match="already exists"):
        init_authority(tmp_path / "authority")


# ----- certificates -----


def test_a_certificate_verifies_against_its_authority() -> None:
    got = verify_certificate(cert(), AUTHORITY.public_b64)
    assert (got.node_id, got.tier, got.identity_key) == ("gpu-1", "club", NODE.public_b64)
    assert got.identity_fingerprint == NODE.fingerprint


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("node_id", "gpu-2"),  # a certificate cannot be moved to another node
        ("tier", "community"),  # nor its tier changed
        ("identity_key", SCHEDULER.public_b64),  # nor its keys swapped
        ("encryption_key", NODE.public_b64),
        ("scheduler_key", NODE.public_b64),  # nor its scheduler
        ("issued_at", 1),
        ("serial", "0" * 32),
    ],
)
def test_every_field_is_signed(field: str, value: object) -> None:
    doc = cert()
    doc["certificate"][field] = value
    with pytest.raises(PermissionDenied):
        verify_certificate(doc, AUTHORITY.public_b64)


def test_another_authority_cannot_vouch() -> None:
    rogue = issue_certificate(Identity.generate(), node_id="gpu-1", tier="club", identity_key=NODE.public_b64,
                              encryption_key=ENC, scheduler_key=SCHEDULER.public_b64)  # fmt: skip
    with pytest.raises(PermissionDenied):
        verify_certificate(rogue, AUTHORITY.public_b64)
    # Claiming to be from our authority does not help: the signature is checked against the pinned key.
    rogue["certificate"]["authority_key"] = AUTHORITY.public_b64
    with pytest.raises(PermissionDenied):
        verify_certificate(rogue, AUTHORITY.public_b64)


# (how the document is broken) — each must be a ProtocolError, never a traceback
# fmt: off
MALFORMED = [
    None, [], "x", {"certificate": {}}, {"certificate": [], "signature": "x"},
    {"certificate": {"v": 2}, "signature": "x"},
]
# fmt: on


@pytest.mark.parametrize("doc", MALFORMED)
def test_malformed_documents_are_protocol_errors(doc: object) -> None:
    with pytest.raises(ProtocolError):
        verify_certificate(doc, AUTHORITY.public_b64)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("node_id", "Bad Id"),
        ("tier", "gold"),
        ("identity_key", "short"),
        ("issued_at", "now"),
        ("serial", "x" * 300),
    ],
)
def test_malformed_fields_are_protocol_errors(field: str, value: object) -> None:
    doc = copy.deepcopy(cert())
    doc["certificate"][field] = value
    with pytest.raises(ProtocolError):
        verify_certificate(doc, AUTHORITY.public_b64)


@settings(max_examples=200, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=50),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=6),
                    max_leaves=20))  # fmt: skip
def test_no_document_crashes_the_verifier(doc: object) -> None:
    with pytest.raises((ProtocolError, PermissionDenied)):
        verify_certificate(doc, AUTHORITY.public_b64)


# ----- signed calls -----


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def verifier(clock: Clock | None = None, **kwargs: Any) -> RequestVerifier:
    keys = {SCHEDULER.fingerprint: SCHEDULER.public_raw}
    return RequestVerifier("gpu-1", keys.get, clock=clock or Clock(), **kwargs)


def signed(
    body: bytes = b"{}", *, now: float = 1_000_000.0, audience: str = "gpu-1", by: Identity = SCHEDULER
) -> dict[str, str]:
    return sign_request(by, "POST", "/jobs", body, audience=audience, now=now)


def test_a_signed_call_is_accepted_once() -> None:
    v = verifier()
    headers = signed()
    assert v.verify("POST", "/jobs", headers, b"{}") == SCHEDULER.fingerprint
    with pytest.raises(AuthenticationFailed, match="replayed"):
        v.verify("POST", "/jobs", headers, b"{}")


# (what the attacker changed, the error it earns)
# fmt: off
FORGERIES = [
    (lambda h: ("POST", "/jobs", h, b'{"x":1}'), "bad signature"),  # another body
    (lambda h: ("POST", "/status", h, b"{}"), "bad signature"),  # another path
    (lambda h: ("GET", "/jobs", h, b"{}"), "bad signature"),  # another method
    (lambda h: ("POST", "/jobs", {**h, "X-Hearth-Audience": "gpu-2"}, b"{}"), "another audience"),  # redirected
    (lambda h: ("POST", "/jobs", {**h, "X-Hearth-Nonce": "AAAA"}, b"{}"), "bad signature"),  # fresh nonce, old signature
    (lambda h: ("POST", "/jobs", {k: v for k, v in h.items() if k != "X-Hearth-Signature"}, b"{}"), "missing"),
    (lambda h: ("POST", "/jobs", {**h, "X-Hearth-Time": "soon"}, b"{}"), "malformed"),
    (lambda h: ("POST", "/jobs", {**h, "X-Hearth-Signature": "!!"}, b"{}"), "bad signature"),
]
# fmt: on


@pytest.mark.parametrize(("forge", "error"), FORGERIES)
def test_forgeries_are_refused(forge: Any, error: str) -> None:
    with pytest.raises(AuthenticationFailed, match=error):
        verifier().verify(*forge(signed()))


def test_a_signer_we_do_not_know_is_refused() -> None:
    with pytest.raises(AuthenticationFailed, match="unknown signer"):
        verifier().verify("POST", "/jobs", signed(by=Identity.generate()), b"{}")


@pytest.mark.parametrize("skew", [-61.0, 61.0])
def test_old_and_future_calls_are_refused(skew: float) -> None:
    with pytest.raises(AuthenticationFailed, match="check the clocks"):
        verifier().verify("POST", "/jobs", signed(now=1_000_000.0 + skew), b"{}")


def test_headers_are_found_in_any_case() -> None:
    lowered = {k.lower(): v for k, v in signed().items()}
    assert verifier().verify("POST", "/jobs", lowered, b"{}") == SCHEDULER.fingerprint


def test_the_replay_memory_is_pruned_by_time_and_bounded() -> None:
    clock = Clock()
    v = verifier(clock, max_nonces=3)
    for _ in range(3):
        v.verify("POST", "/jobs", signed(now=clock.now), b"{}")
    with pytest.raises(AuthenticationFailed, match="too many"):
        v.verify("POST", "/jobs", signed(now=clock.now), b"{}")
    clock.now += 121  # two windows later the old nonces can no longer be replayed, so they are forgotten
    v.verify("POST", "/jobs", signed(now=clock.now), b"{}")
