"""Keys, certificates and signed calls, with real Ed25519: what is accepted, and every way a forgery fails."""

from __future__ import annotations

import copy
import errno
import json
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict

from protocol import federation
from protocol.errors import AuthenticationFailed, ConfigError, PermissionDenied, ProtocolError
from protocol.identity import (
    SIGNATURE_HEADERS,
    TIERS,
    Identity,
    RequestVerifier,
    b64d,
    b64e,
    default_authority_dir,
    encryption_public_b64,
    fingerprint,
    init_authority,
    issue_certificate,
    load_authority,
    load_or_create_encryption_key,
    load_or_create_identity,
    sign_request,
    valid_node_id,
    verify_certificate,
    verify_signature,
    write_private,
)

AUTHORITY = Identity.generate()
NODE = Identity.generate()
SCHEDULER = Identity.generate()
ENC = b64e(os.urandom(32))
T0 = 1_000_000.0


def cert(**overrides: Any) -> dict[str, Any]:
    fields = {"node_id": "gpu-1", "tier": "club", "identity_key": NODE.public_b64, "encryption_key": ENC,
              "scheduler_key": SCHEDULER.public_b64, **overrides}  # fmt: skip
    return issue_certificate(AUTHORITY, **fields)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ----- encodings -----


@given(st.binary(max_size=200))
def test_base64_round_trips(data: bytes) -> None:
    assert b64d(b64e(data), length=len(data)) == data
    assert "=" not in b64e(data)


# (text, expected length) — each must be a ProtocolError
# fmt: off
BAD_BASE64 = [
    ("AAAA=", None),  # padding: b64e never writes it
    ("AA+A", None),  # the standard alphabet, not the URL-safe one
    ("AA A", None),  # whitespace, which a lenient decoder skips
    ("AAAAA", None),  # a length no encoding has
    ("ÀAAA", None),  # not ASCII
    ("A" * 42 + "B", 32),  # unused low bits set: a second spelling of 32 zero bytes
    ("A" * 42, 32),  # too short for a key
    ("A" * 44, 32),  # too long for a key
    ("A" * 10_000, 32),  # huge: refused by its length before any decoding
    (b"AAAA", None),  # bytes, not text
    (None, None),  # nothing at all
]
# fmt: on


@pytest.mark.parametrize(("text", "length"), BAD_BASE64)
def test_malformed_base64_is_a_protocol_error(text: Any, length: int | None) -> None:
    with pytest.raises(ProtocolError):
        b64d(text, length=length)


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("gpu-1", True),  # the usual shape
        ("a", True),  # one character
        ("a" * 63, True),  # the longest
        ("0node", True),  # may start with a digit
        ("a" * 64, False),  # too long for a DNS label
        ("-gpu", False),  # must start with a letter or digit
        ("GPU-1", False),  # lowercase only, so ids compare plainly
        ("gpu_1", False),  # no underscores
        ("gpu.1", False),  # no dots
        ("gpu-1\n", False),  # a trailing newline, which "$" alone would let through
        ("", False),  # empty
    ],
)
def test_node_ids(value: str, ok: bool) -> None:
    assert valid_node_id(value) is ok


def test_a_fingerprint_is_the_first_ten_bytes_of_sha256_in_hex() -> None:
    assert fingerprint(bytes(32)) == "66687aadf862bd776c8f"  # sha256 of 32 zero bytes, pinned
    assert NODE.fingerprint == fingerprint(NODE.public_raw)
    assert len(NODE.fingerprint) == 20


@pytest.mark.parametrize(
    ("public", "data", "signature", "ok"),
    [
        (NODE.public_raw, b"hello", NODE.sign(b"hello"), True),  # the genuine signature
        (NODE.public_raw, b"hellO", NODE.sign(b"hello"), False),  # other data
        (SCHEDULER.public_raw, b"hello", NODE.sign(b"hello"), False),  # another key
        (NODE.public_raw, b"hello", NODE.sign(b"hello")[:63], False),  # truncated signature
        (NODE.public_raw[:31], b"hello", NODE.sign(b"hello"), False),  # a key of the wrong size
        (NODE.public_raw, b"hello", b"", False),  # no signature
    ],
)
def test_verify_signature(public: bytes, data: bytes, signature: bytes, ok: bool) -> None:
    assert verify_signature(public, data, signature) is ok


# ----- key files -----


def test_keys_are_written_0600_in_new_0700_folders_and_load_back(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "identity.key"
    made = Identity.generate()
    made.save(path)
    assert (mode(tmp_path / "a"), mode(tmp_path / "a" / "b"), mode(path)) == (0o700, 0o700, 0o600)
    assert os.listdir(path.parent) == ["identity.key"]  # no temporary file left behind
    loaded = Identity.load(path)
    assert loaded.public_b64 == made.public_b64
    assert verify_signature(made.public_raw, b"x", loaded.sign(b"x"))
    assert made.fingerprint in repr(made) and "PRIVATE" not in repr(made)


def test_a_key_is_never_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "identity.key"
    Identity.generate().save(path)
    before = path.read_bytes()
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        Identity.generate().save(path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["identity.key"]


def test_load_or_create_makes_a_key_once(tmp_path: Path) -> None:
    first = load_or_create_identity(tmp_path / "identity.key")
    assert load_or_create_identity(tmp_path / "identity.key").public_raw == first.public_raw
    enc = load_or_create_encryption_key(tmp_path / "encryption.key")
    assert mode(tmp_path / "encryption.key") == 0o600
    again = load_or_create_encryption_key(tmp_path / "encryption.key")
    assert encryption_public_b64(again) == encryption_public_b64(enc)
    assert len(b64d(encryption_public_b64(enc), length=32)) == 32


def test_two_processes_creating_a_key_at_once_agree_on_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "identity.key"
    their_key = Ed25519PrivateKey.generate()
    real_link = os.link

    def link_after_the_other_process(src: Any, dst: Any) -> None:
        path.write_bytes(_pem(their_key))  # the other process wins the race, between our check and our write
        path.chmod(0o600)
        real_link(src, dst)

    monkeypatch.setattr(os, "link", link_after_the_other_process)
    assert load_or_create_identity(path).public_raw == Identity(their_key).public_raw


def test_keys_are_written_where_hard_links_are_not_supported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_links(src: Any, dst: Any) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    path = tmp_path / "identity.key"
    made = load_or_create_identity(path)
    assert mode(path) == 0o600 and Identity.load(path).public_raw == made.public_raw
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        Identity.generate().save(path)


def test_state_files_may_be_replaced_and_stay_private(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    write_private(path, b"1")
    write_private(path, b"2", replace=True)
    assert (path.read_bytes(), mode(path)) == (b"2", 0o600)


def test_an_unwritable_place_is_one_clear_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(ConfigError, match="cannot write"):
        load_or_create_identity(tmp_path / "file" / "identity.key")


@pytest.mark.parametrize(
    "loose",
    [
        0o644,  # readable by everyone
        0o640,  # readable by the group
        0o620,  # writable by the group: someone else could swap the key
        0o604,  # readable by others only
    ],
)
def test_a_key_open_to_other_users_is_refused(tmp_path: Path, loose: int) -> None:
    path = tmp_path / "identity.key"
    Identity.generate().save(path)
    path.chmod(loose)
    with pytest.raises(ConfigError, match=f"chmod 600 {path}"):
        Identity.load(path)
    with pytest.raises(ConfigError, match="chmod 600"):
        load_or_create_identity(path)


def _pem(key: Ed25519PrivateKey | X25519PrivateKey, password: bytes | None = None) -> bytes:
    encryption = serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)


# (what is at the key's path) — each must be one ConfigError line, never a traceback
# fmt: off
DAMAGED: list[tuple[str, Callable[[Path], object]]] = [
    ("missing", lambda p: None),
    ("empty", lambda p: p.write_bytes(b"")),
    ("not PEM", lambda p: p.write_bytes(b"not a key")),
    ("truncated PEM", lambda p: p.write_bytes(b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")),
    ("a password-protected key", lambda p: p.write_bytes(_pem(Ed25519PrivateKey.generate(), b"pw"))),
    ("an X25519 key where Ed25519 belongs", lambda p: p.write_bytes(_pem(X25519PrivateKey.generate()))),
    ("far too large", lambda p: p.write_bytes(b"A" * 100_000)),
    ("a folder", lambda p: p.mkdir()),
    ("a FIFO, which must not hang the start", lambda p: os.mkfifo(p)),
]
# fmt: on


@pytest.mark.parametrize(("what", "make"), DAMAGED)
def test_a_damaged_key_file_is_one_clear_error(
    tmp_path: Path, what: str, make: Callable[[Path], object]
) -> None:
    path = tmp_path / "identity.key"
    make(path)
    if os.path.lexists(path):
        path.chmod(0o700 if path.is_dir() else 0o600)
    with pytest.raises(ConfigError) as caught:
        Identity.load(path)
    assert "\n" not in caught.value.message


def test_an_identity_key_is_not_an_encryption_key(tmp_path: Path) -> None:
    Identity.generate().save(tmp_path / "encryption.key")
    with pytest.raises(ConfigError, match="not an X25519"):
        load_or_create_encryption_key(tmp_path / "encryption.key")


# ----- the authority -----


def test_the_authority_lives_in_its_own_folder(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="hearth authority init"):
        load_authority(tmp_path / "authority")
    made = init_authority(tmp_path / "authority")
    assert load_authority(tmp_path / "authority").public_b64 == made.public_b64
    assert (mode(tmp_path / "authority"), mode(tmp_path / "authority" / "authority.key")) == (0o700, 0o600)
    with pytest.raises(ConfigError, match="an authority already exists at"):
        init_authority(tmp_path / "authority")
    assert load_authority(tmp_path / "authority").public_b64 == made.public_b64


@pytest.mark.parametrize(
    ("xdg", "expected"),
    [
        ("/etc/xdg-home", "/etc/xdg-home/hearth/authority"),  # XDG_CONFIG_HOME is honoured
        ("relative/dir", "HOME/.config/hearth/authority"),  # a relative one is invalid by the spec: ignored
        ("", "HOME/.config/hearth/authority"),  # unset
    ],
)
def test_the_default_authority_folder(
    xdg: str, expected: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("XDG_CONFIG_HOME", xdg)
    assert default_authority_dir() == Path(expected.replace("HOME", str(tmp_path)))


# ----- certificates -----


def test_a_certificate_verifies_against_its_authority() -> None:
    doc = issue_certificate(AUTHORITY, node_id="gpu-1", tier="community", identity_key=NODE.public_b64,
                            encryption_key=ENC, scheduler_key=SCHEDULER.public_b64, now=T0 + 0.7)  # fmt: skip
    got = verify_certificate(doc, AUTHORITY.public_b64)
    assert (got.node_id, got.tier, got.identity_key, got.encryption_key) == (
        "gpu-1",
        "community",
        NODE.public_b64,
        ENC,
    )
    assert (got.scheduler_key, got.authority_key, got.issued_at) == (
        SCHEDULER.public_b64,
        AUTHORITY.public_b64,
        int(T0),
    )
    assert got.identity_fingerprint == NODE.fingerprint
    assert doc["certificate"]["v"] == 1 and len(got.serial) == 32
    assert cert()["certificate"]["serial"] != cert()["certificate"]["serial"]


def test_a_certificate_survives_any_json_spelling() -> None:
    doc = cert()
    # the signature covers the canonical form, so a reader's whitespace and key order do not matter
    respelled = json.loads(json.dumps(doc, indent=3, sort_keys=False, ensure_ascii=False))
    assert verify_certificate(respelled, AUTHORITY.public_b64).serial == doc["certificate"]["serial"]


# (field, new value) — every field is signed, so each change breaks the signature
@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("node_id", "gpu-2"),  # a certificate cannot be moved to another node
        ("tier", "community"),  # nor its tier raised
        ("identity_key", SCHEDULER.public_b64),  # nor its identity key swapped
        ("encryption_key", NODE.public_b64),  # nor the key prompts are sealed to
        ("scheduler_key", NODE.public_b64),  # nor its scheduler
        ("issued_at", 1),  # nor its date
        ("serial", "0" * 32),  # nor its serial
    ],
)
def test_every_field_is_signed(field: str, value: object) -> None:
    doc = cert()
    doc["certificate"][field] = value
    with pytest.raises(PermissionDenied, match="does not verify"):
        verify_certificate(doc, AUTHORITY.public_b64)


def test_a_damaged_signature_fails() -> None:
    doc = cert()
    raw = bytearray(b64d(doc["signature"], length=64))
    raw[10] ^= 1
    doc["signature"] = b64e(bytes(raw))
    with pytest.raises(PermissionDenied, match="does not verify"):
        verify_certificate(doc, AUTHORITY.public_b64)


def test_another_authority_cannot_vouch() -> None:
    rogue = issue_certificate(Identity.generate(), node_id="gpu-1", tier="club", identity_key=NODE.public_b64,
                              encryption_key=ENC, scheduler_key=SCHEDULER.public_b64)  # fmt: skip
    with pytest.raises(PermissionDenied, match="another authority"):
        verify_certificate(rogue, AUTHORITY.public_b64)
    # Claiming to be from our authority does not help: the signature is checked against the pinned key.
    rogue["certificate"]["authority_key"] = AUTHORITY.public_b64
    with pytest.raises(PermissionDenied, match="does not verify"):
        verify_certificate(rogue, AUTHORITY.public_b64)


def test_the_tiers_are_the_federation_tiers() -> None:
    assert TIERS == federation.TIERS


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("node_id", "Bad Id"),  # the issuer refuses to sign what no verifier would accept
        ("tier", "gold"),  # an unknown tier
        ("identity_key", "short"),  # not a key
    ],
)
def test_the_issuer_refuses_malformed_fields(field: str, value: str) -> None:
    with pytest.raises(ProtocolError):
        cert(**{field: value})


# (how the document is broken) — each must be a ProtocolError, never a traceback
# fmt: off
MALFORMED_DOCS: list[object] = [
    None,  # nothing
    [],  # a list
    "x",  # a string
    {"certificate": {}},  # no signature
    {"certificate": [], "signature": "x"},  # a certificate that is not an object
    {"certificate": {"v": 2}, "signature": "x"},  # a version from the future
    {**cert(), "extra": 1},  # a field beside the two
    {"certificate": cert()["certificate"], "signature": 5},  # a signature that is not text
]
# fmt: on


@pytest.mark.parametrize("doc", MALFORMED_DOCS)
def test_malformed_documents_are_protocol_errors(doc: object) -> None:
    with pytest.raises(ProtocolError):
        verify_certificate(doc, AUTHORITY.public_b64)


# (field, value; DROP removes it) — each a ProtocolError before any signature check
DROP = object()
# fmt: off
MALFORMED_FIELDS: list[tuple[str, object]] = [
    ("v", True),  # True == 1 in Python, but it is not version 1
    ("v", 1.0),  # nor is a float
    ("v", "1"),  # nor text
    ("v", DROP),  # no version at all
    ("node_id", DROP),  # a missing field
    ("comment", "hi"),  # an unknown field
    ("node_id", "Bad Id"),  # not a node id
    ("node_id", "gpu-1\n"),  # a node id with a trailing newline
    ("node_id", 7),  # not text
    ("tier", "gold"),  # an unknown tier
    ("tier", "Club"),  # tiers are lowercase
    ("identity_key", "short"),  # not a key
    ("encryption_key", b64e(bytes(31))),  # a key one byte short
    ("scheduler_key", "A" * 42 + "B"),  # a second spelling of a key
    ("authority_key", "x" * 300),  # past the size bound
    ("issued_at", "now"),  # not a number
    ("issued_at", 1.5),  # not an integer
    ("issued_at", True),  # a boolean posing as one
    ("issued_at", -1),  # before the epoch
    ("issued_at", 2**80),  # past what JSON readers hold exactly
    ("serial", "x" * 300),  # past the size bound
    ("serial", "AB" * 16),  # uppercase hex
    ("serial", "ab"),  # too short
]
# fmt: on


@pytest.mark.parametrize(("field", "value"), MALFORMED_FIELDS)
def test_malformed_fields_are_protocol_errors(field: str, value: object) -> None:
    doc = copy.deepcopy(cert())
    if value is DROP:
        del doc["certificate"][field]
    else:
        doc["certificate"][field] = value
    with pytest.raises(ProtocolError):
        verify_certificate(doc, AUTHORITY.public_b64)


@pytest.mark.parametrize(
    "signature",
    [
        "AAAA",  # far too short
        b64e(bytes(64)) + "=",  # padded
        "!" * 86,  # the right length, wrong alphabet
    ],
)
def test_malformed_signatures_are_protocol_errors(signature: str) -> None:
    doc = cert()
    doc["signature"] = signature
    with pytest.raises(ProtocolError):
        verify_certificate(doc, AUTHORITY.public_b64)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=50),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=6),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(JSON)
def test_no_document_crashes_the_verifier(doc: object) -> None:
    with pytest.raises((ProtocolError, PermissionDenied)):
        verify_certificate(doc, AUTHORITY.public_b64)


VALID = cert()


@settings(max_examples=200, deadline=None)
@given(st.sampled_from([*VALID["certificate"], "signature"]), JSON)
def test_no_change_to_one_field_is_accepted(field: str, value: object) -> None:
    doc = copy.deepcopy(VALID)
    target = doc if field == "signature" else doc["certificate"]
    assume(value != target[field] or type(value) is not type(target[field]))
    target[field] = value
    with pytest.raises((ProtocolError, PermissionDenied)):
        verify_certificate(doc, AUTHORITY.public_b64)


# ----- signed calls -----


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


class Keys:
    """The signers a receiver trusts, counting lookups to show garbage is refused before them."""

    def __init__(self, *trusted: Identity) -> None:
        self.keys = {i.fingerprint: i.public_raw for i in trusted}
        self.lookups = 0

    def __call__(self, fp: str) -> bytes | None:
        self.lookups += 1
        return self.keys.get(fp)


def verifier(clock: Clock | None = None, keys: Keys | None = None, **kwargs: Any) -> RequestVerifier:
    return RequestVerifier("gpu-1", keys or Keys(SCHEDULER), clock=clock or Clock(), **kwargs)


def signed(
    body: bytes = b"{}",
    *,
    now: float = T0,
    audience: str = "gpu-1",
    by: Identity = SCHEDULER,
    path: str = "/jobs",
) -> dict[str, str]:
    return sign_request(by, "POST", path, body, audience=audience, now=now)


def test_a_signed_call_is_accepted_once() -> None:
    v = verifier()
    headers = signed()
    assert set(headers) == set(SIGNATURE_HEADERS)
    assert headers["X-Hearth-Key"] == SCHEDULER.fingerprint
    assert v.verify("POST", "/jobs", headers, b"{}") == SCHEDULER.fingerprint
    with pytest.raises(AuthenticationFailed, match="replayed request"):
        v.verify("POST", "/jobs", headers, b"{}")
    assert v.verify("post", "/jobs", signed(), b"{}") == SCHEDULER.fingerprint  # methods compare uppercased


def without(name: str) -> Callable[[dict[str, str]], dict[str, str]]:
    return lambda h: {k: v for k, v in h.items() if k != name}


# (what the attacker changed, the error it earns)
# fmt: off
FORGERIES: list[tuple[Callable[[dict[str, str]], tuple[str, str, dict[str, str], bytes]], str]] = [
    (lambda h: ("POST", "/jobs", h, b'{"x":1}'), "bad signature"),  # another body
    (lambda h: ("POST", "/status", h, b"{}"), "bad signature"),  # another path
    (lambda h: ("POST", "/jobs?all=1", h, b"{}"), "bad signature"),  # a query string added
    (lambda h: ("GET", "/jobs", h, b"{}"), "bad signature"),  # another method
    (lambda h: ("POST", "/jobs", {**h, "X-Hearth-Audience": "gpu-2"}, b"{}"), "another audience"),  # redirected
    (lambda h: ("POST", "/jobs", {**h, "X-Hearth-Nonce": "A" * 22}, b"{}"), "bad signature"),  # fresh nonce, old signature
    (lambda h: ("POST", "/jobs", {**h, "X-Hearth-Time": str(int(T0) + 1)}, b"{}"), "bad signature"),  # another time
    (lambda h: ("POST", "/jobs", {**h, "X-Hearth-Signature": "!!"}, b"{}"), "bad signature"),  # not a signature
    (lambda h: ("POST", "/jobs", {**h, "X-Hearth-Signature": b64e(bytes(64))}, b"{}"), "bad signature"),  # a zero one
    (lambda h: ("POST", "/jobs", without("X-Hearth-Signature")(h), b"{}"), "missing signature headers"),
    (lambda h: ("POST", "/jobs", without("X-Hearth-Key")(h), b"{}"), "missing signature headers"),
    (lambda h: ("POST", "/jobs", without("X-Hearth-Audience")(h), b"{}"), "missing signature headers"),
    (lambda h: ("POST", "/jobs", without("X-Hearth-Time")(h), b"{}"), "missing signature headers"),
    (lambda h: ("POST", "/jobs", without("X-Hearth-Nonce")(h), b"{}"), "missing signature headers"),
    (lambda h: ("POST", "/jobs", {**h, "X-Hearth-Time": ""}, b"{}"), "missing signature headers"),  # empty
    (lambda h: ("POST", "/jobs", {**h, "X-Hearth-Time": "soon"}, b"{}"), "malformed"),  # not a time
    (lambda h: ("POST", "/jobs", {**h, "X-Hearth-Time": f" {int(T0)}"}, b"{}"), "malformed"),  # int() would take it
    (lambda h: ("POST", "/jobs", {**h, "X-Hearth-Time": "9" * 100}, b"{}"), "malformed"),  # absurdly long
    (lambda h: ("POST", "/jobs", {**h, "X-Hearth-Key": "f" * 10_000}, b"{}"), "malformed"),  # oversized key id
    (lambda h: ("POST", "/jobs", {**h, "X-Hearth-Nonce": "x" * 10_000}, b"{}"), "malformed"),  # oversized nonce
    (lambda h: ("POST", "/jobs", {**h, "X-Hearth-Audience": "g" * 10_000}, b"{}"), "malformed"),  # oversized audience
    (lambda h: ("POST", "/jobs", {**h, "X-Hearth-Signature": "A" * 10_000}, b"{}"), "malformed"),  # oversized signature
    (lambda h: ("POST", "/jobs\n", h, b"{}"), "malformed"),  # a newline that could shift the signed fields
]
# fmt: on


@pytest.mark.parametrize(("forge", "error"), FORGERIES)
def test_forgeries_are_refused(
    forge: Callable[[dict[str, str]], tuple[str, str, dict[str, str], bytes]], error: str
) -> None:
    keys = Keys(SCHEDULER)
    with pytest.raises(AuthenticationFailed, match=error):
        verifier(keys=keys).verify(*forge(signed()))
    if error != "bad signature":
        assert keys.lookups == 0  # refused before the signer is even looked up


def test_a_signer_we_do_not_know_is_refused() -> None:
    with pytest.raises(AuthenticationFailed, match="unknown signer"):
        verifier().verify("POST", "/jobs", signed(by=Identity.generate()), b"{}")


@pytest.mark.parametrize(
    ("skew", "accepted"),
    [
        (-61.0, False),  # a minute and a second old
        (61.0, False),  # a minute and a second in the future
        (-60.0, True),  # just inside the window
        (60.0, True),  # just inside, ahead
    ],
)
def test_the_time_window(skew: float, accepted: bool) -> None:
    keys = Keys(SCHEDULER)
    call = ("POST", "/jobs", signed(now=T0 + skew), b"{}")
    if accepted:
        assert verifier(keys=keys).verify(*call) == SCHEDULER.fingerprint
    else:
        with pytest.raises(AuthenticationFailed, match="check the clocks"):
            verifier(keys=keys).verify(*call)
        assert keys.lookups == 0


def test_the_audience_may_change_at_run_time() -> None:
    name = ["gpu-1"]
    v = RequestVerifier(lambda: name[0], Keys(SCHEDULER), clock=Clock())
    assert v.verify("POST", "/jobs", signed(), b"{}") == SCHEDULER.fingerprint
    name[0] = "gpu-9"  # the node was renamed: calls for its old name no longer land
    with pytest.raises(AuthenticationFailed, match="another audience"):
        v.verify("POST", "/jobs", signed(), b"{}")
    assert v.verify("POST", "/jobs", signed(audience="gpu-9"), b"{}") == SCHEDULER.fingerprint


@pytest.mark.parametrize(
    "spell",
    [
        lambda h: {k.lower(): v for k, v in h.items()},  # lowercase, as HTTP/2 sends them
        lambda h: {k.upper(): v for k, v in h.items()},  # uppercase
        lambda h: CIMultiDict({k.lower(): v for k, v in h.items()}),  # aiohttp's request headers
        lambda h: CIMultiDict({"Content-Type": "application/json", **h}),  # among others
    ],
)
def test_headers_are_found_in_any_case(spell: Callable[[dict[str, str]], Any]) -> None:
    assert verifier().verify("POST", "/jobs", spell(signed()), b"{}") == SCHEDULER.fingerprint


def test_a_call_with_a_query_string_is_bound_to_it() -> None:
    headers = signed(path="/jobs?stream=1")
    with pytest.raises(AuthenticationFailed, match="bad signature"):
        verifier().verify("POST", "/jobs?stream=0", headers, b"{}")
    assert verifier().verify("POST", "/jobs?stream=1", headers, b"{}") == SCHEDULER.fingerprint


def test_a_forgery_does_not_use_up_the_nonce_it_copied() -> None:
    v = verifier(max_nonces=1)
    headers = signed()
    for _ in range(5):  # forged bodies under the genuine headers: refused, and not remembered
        with pytest.raises(AuthenticationFailed, match="bad signature"):
            v.verify("POST", "/jobs", headers, b"forged")
    assert v.verify("POST", "/jobs", headers, b"{}") == SCHEDULER.fingerprint


def test_the_replay_memory_is_bounded_and_refuses_rather_than_forgets() -> None:
    clock = Clock()
    v = verifier(clock, max_nonces=3)
    kept = [signed() for _ in range(3)]
    for headers in kept:
        v.verify("POST", "/jobs", headers, b"{}")
    with pytest.raises(AuthenticationFailed, match="too many requests"):
        v.verify("POST", "/jobs", signed(), b"{}")
    with pytest.raises(AuthenticationFailed, match="replayed request"):
        v.verify("POST", "/jobs", kept[0], b"{}")  # full, yet still remembering every nonce


def test_the_replay_memory_forgets_a_nonce_only_when_its_time_leaves_the_window() -> None:
    clock = Clock()
    v = verifier(clock, max_nonces=2)
    early, late = signed(now=T0 - 30), signed(now=T0 + 30)  # clocks a little apart either way
    v.verify("POST", "/jobs", early, b"{}")
    v.verify("POST", "/jobs", late, b"{}")
    clock.now = T0 + 30  # `early` is at the window's edge: still acceptable by time, so still remembered
    with pytest.raises(AuthenticationFailed, match="replayed request"):
        v.verify("POST", "/jobs", early, b"{}")
    clock.now = T0 + 31  # `early` is past the window and forgotten, making room; the clock check guards it
    with pytest.raises(AuthenticationFailed, match="check the clocks"):
        v.verify("POST", "/jobs", early, b"{}")
    v.verify("POST", "/jobs", signed(now=clock.now), b"{}")
    with pytest.raises(AuthenticationFailed, match="replayed request"):
        v.verify("POST", "/jobs", late, b"{}")  # `late` is kept until T0 + 90
    clock.now = T0 + 200  # everything old is forgotten
    for _ in range(2):
        v.verify("POST", "/jobs", signed(now=clock.now), b"{}")


def test_a_signer_refuses_fields_that_would_be_ambiguous() -> None:
    with pytest.raises(ValueError, match="newlines"):
        sign_request(SCHEDULER, "POST", "/jobs\nX", b"", "gpu-1")


HEADER_TEXT = st.text(max_size=40) | st.sampled_from([SCHEDULER.fingerprint, "gpu-1", str(int(T0)), "A" * 22])


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(st.sampled_from([*SIGNATURE_HEADERS, "x-hearth-key", "Other"]), HEADER_TEXT, max_size=7)
)
def test_no_headers_crash_the_verifier(headers: dict[str, str]) -> None:
    with pytest.raises(AuthenticationFailed):
        verifier().verify("POST", "/jobs", headers, b"{}")
