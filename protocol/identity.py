"""Identities, node certificates and signed calls: who may talk to whom in a federation.

Three kinds of Ed25519 key exist. The **federation authority** key stays with the operator (outside the
scheduler's data dir) and signs a certificate for each node the operator approves. The **scheduler** key
signs every call the scheduler makes to a node. Each **node** has an identity key that signs its heartbeats,
and an X25519 key that prompts are sealed to.

A certificate binds a node id and tier to the node's keys and to the one scheduler it serves. A node or a
client that pinned the authority key can check it alone; the scheduler stores and serves certificates but
cannot mint them, so a compromised scheduler cannot slip in a node of its own to read prompts.

Calls between the scheduler and its nodes are signed over the method, path (with query), audience (the
receiver), time, a random nonce and the body's hash, behind a domain-separation tag so a signature made for
one purpose never verifies for another. The receiver accepts a call only from a key it trusts, addressed to
itself, inside a time window, and only once: a captured call cannot be replayed, redirected to another node,
or altered. The network is not trusted; keeping prompts confidential is the E2E envelope's job, not this.

Private keys live in PKCS8 PEM files that only their owner may read: written 0600 in one atomic step and
never overwritten, and refused on load when other users could read or change them.
"""

from __future__ import annotations

import base64
import hashlib
import heapq
import json
import os
import re
import secrets
import stat
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from protocol.errors import AuthenticationFailed, ConfigError, PermissionDenied, ProtocolError

NODE_ID_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
TIERS = ("club", "community")  # the same as protocol.federation.TIERS; a test keeps them equal
KEY_BYTES = 32
SIGNATURE_BYTES = 64
MAX_FIELD = 256
AUTHORITY_FILE = "authority.key"

_CERT_TAG = b"hearth-cert-v1\n"
_REQ_TAG = b"hearth-req-v1\n"
_B64_RE = re.compile(r"[A-Za-z0-9_-]*")
_HEX_SERIAL_RE = re.compile(r"[0-9a-f]{32}")
_MAX_ISSUED_AT = 2**53  # what every JSON reader holds exactly
_MAX_KEY_FILE = 64 * 1024  # a PEM key is a few hundred bytes; a huge file is a mistake, not a key


def valid_node_id(value: str) -> bool:
    # fullmatch: with match, "$" would also accept a trailing newline
    return isinstance(value, str) and NODE_ID_RE.fullmatch(value) is not None


def b64e(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64d(text: str, *, length: int | None = None) -> bytes:
    """Strict inverse of `b64e`: exactly one spelling per value, so two strings never name the same key."""
    if not isinstance(text, str):
        raise ProtocolError("malformed base64: expected a string")
    # the length is checked before decoding, so an oversized field costs nothing
    if length is not None and len(text) != (4 * length + 2) // 3:
        raise ProtocolError(f"expected base64 of {length} bytes")
    if len(text) % 4 == 1 or _B64_RE.fullmatch(text) is None:
        raise ProtocolError("malformed base64")
    raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    if b64e(raw) != text:  # unused low bits set: another spelling of the same bytes
        raise ProtocolError("malformed base64")
    return raw


def fingerprint(public_raw: bytes) -> str:
    return hashlib.sha256(public_raw).digest()[:10].hex()


def verify_signature(public_raw: bytes, data: bytes, signature: bytes) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(public_raw).verify(signature, data)
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


# ----- private files -----


def _make_private_dirs(directory: Path) -> None:
    # Path.mkdir(parents=True) gives only the last folder the mode; every folder we create is ours alone.
    missing: list[Path] = []
    while not directory.exists() and directory != directory.parent:
        missing.append(directory)
        directory = directory.parent
    for folder in reversed(missing):
        folder.mkdir(mode=0o700, exist_ok=True)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_private(path: Path, data: bytes, *, replace: bool) -> None:
    """Raises FileExistsError (refusing to overwrite) or another OSError."""
    if not replace and os.path.lexists(path):
        raise FileExistsError(path)
    _make_private_dirs(path.parent)
    # the file is 0600 from its first byte, and appears under its name only when complete
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # atomic, and fails rather than replace a key created meanwhile
            except OSError as exc:
                if isinstance(exc, FileExistsError) or os.path.lexists(path):
                    raise FileExistsError(path) from None
                os.replace(tmp, path)  # a filesystem without hard links: a narrow race instead of none
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)  # a key that vanished in a crash would silently become a new identity


def write_private(path: Path, data: bytes, *, replace: bool = False) -> None:
    """Write a file only its owner can read (0600, new folders 0700), atomically. ``replace=False`` (keys)
    refuses an existing file, also one created meanwhile; state files pass ``replace=True``."""
    try:
        _write_private(path, data, replace=replace)
    except FileExistsError:
        raise ConfigError(f"{path} exists already; refusing to overwrite a key") from None
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc.strerror or exc}") from None


def _read_private(path: Path) -> bytes:
    try:
        # O_NONBLOCK: a FIFO planted at the key's path must not hang start-up; it is refused below
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ConfigError(f"no key at {path}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "rb") as f:
            # fstat of the open file, so the file checked is the file read
            mode = os.fstat(f.fileno()).st_mode
            if not stat.S_ISREG(mode):
                raise ConfigError(f"{path} is not a regular file")
            if mode & (stat.S_IRWXG | stat.S_IRWXO):
                raise ConfigError(f"{path} is open to other users; run: chmod 600 {path}")
            data = f.read(_MAX_KEY_FILE + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
    if len(data) > _MAX_KEY_FILE:
        raise ConfigError(f"{path} is too large to be a key")
    return data


def _pem(key: Ed25519PrivateKey | X25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _load_pem(path: Path) -> PrivateKeyTypes:
    data = _read_private(path)
    try:
        return serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ConfigError(f"{path} is not a readable private key") from None


def _create_key_file(path: Path, key: Ed25519PrivateKey | X25519PrivateKey) -> bool:
    """Write a new key file; False when one exists, also one another process created meanwhile."""
    try:
        _write_private(path, _pem(key), replace=False)
    except FileExistsError:
        return False
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc.strerror or exc}") from None
    return True


class Identity:
    """An Ed25519 signing key."""

    __slots__ = ("_fingerprint", "_private", "_public_b64", "_public_raw")

    def __init__(self, private: Ed25519PrivateKey) -> None:
        self._private = private
        raw = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self._public_raw = raw
        self._public_b64 = b64e(raw)
        self._fingerprint = fingerprint(raw)

    def __repr__(self) -> str:
        return f"Identity(fingerprint={self._fingerprint!r})"

    @classmethod
    def generate(cls) -> Identity:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load(cls, path: Path) -> Identity:
        key = _load_pem(path)
        if not isinstance(key, Ed25519PrivateKey):
            raise ConfigError(f"{path} is not an Ed25519 private key")
        return cls(key)

    def save(self, path: Path) -> None:
        write_private(path, _pem(self._private))

    @property
    def public_raw(self) -> bytes:
        return self._public_raw

    @property
    def public_b64(self) -> str:
        return self._public_b64

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    def sign(self, data: bytes) -> bytes:
        return self._private.sign(data)


def load_or_create_identity(path: Path) -> Identity:
    if not os.path.lexists(path):
        key = Ed25519PrivateKey.generate()
        if _create_key_file(path, key):
            return Identity(key)
    # it existed, or another process made it first: use that one, as every later start will
    return Identity.load(path)


def load_or_create_encryption_key(path: Path) -> X25519PrivateKey:
    if not os.path.lexists(path):
        new = X25519PrivateKey.generate()
        if _create_key_file(path, new):
            return new
    key = _load_pem(path)
    if not isinstance(key, X25519PrivateKey):
        raise ConfigError(f"{path} is not an X25519 private key")
    return key


def encryption_public_b64(key: X25519PrivateKey) -> str:
    return b64e(key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))


# ----- certificates -----


@dataclass(frozen=True, slots=True)
class Certificate:
    node_id: str
    tier: str
    identity_key: str
    encryption_key: str
    scheduler_key: str
    issued_at: int
    serial: str
    authority_key: str

    @property
    def identity_fingerprint(self) -> str:
        return fingerprint(b64d(self.identity_key, length=KEY_BYTES))


_KEY_FIELDS = ("identity_key", "encryption_key", "scheduler_key", "authority_key")
_TEXT_FIELDS = ("node_id", "tier", "serial", *_KEY_FIELDS)
_CERT_KEYS = frozenset({"v", "issued_at", *_TEXT_FIELDS})


def canonical(obj: Any) -> bytes:
    """The one JSON spelling every Hearth signature and hash covers: sorted keys, no spaces, ASCII."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def _parse_certificate(body: Mapping[str, Any]) -> Certificate:
    version = body.get("v")
    # type(...) is int: True == 1 and 1.0 == 1 in Python, but neither is version 1
    if type(version) is not int or version != 1:
        raise ProtocolError("unknown certificate version")
    if set(body) != _CERT_KEYS:
        raise ProtocolError("a certificate has exactly the known fields")
    for name in _TEXT_FIELDS:
        value = body[name]
        if not isinstance(value, str) or len(value) > MAX_FIELD:
            raise ProtocolError(f"certificate field {name} is malformed")
    issued = body["issued_at"]
    if type(issued) is not int or not 0 <= issued <= _MAX_ISSUED_AT:
        raise ProtocolError("certificate field issued_at is malformed")
    if not valid_node_id(body["node_id"]):
        raise ProtocolError("certificate node id is malformed")
    if body["tier"] not in TIERS:
        raise ProtocolError("certificate tier is unknown")
    if _HEX_SERIAL_RE.fullmatch(body["serial"]) is None:
        raise ProtocolError("certificate field serial is malformed")
    for name in _KEY_FIELDS:
        b64d(body[name], length=KEY_BYTES)
    return Certificate(**{name: body[name] for name in _CERT_KEYS - {"v"}})


def issue_certificate(
    authority: Identity,
    *,
    node_id: str,
    tier: str,
    identity_key: str,
    encryption_key: str,
    scheduler_key: str,
    now: float | None = None,
) -> dict[str, Any]:
    body = {
        "v": 1,
        "node_id": node_id,
        "tier": tier,
        "identity_key": identity_key,
        "encryption_key": encryption_key,
        "scheduler_key": scheduler_key,
        "issued_at": int(time.time() if now is None else now),
        "serial": secrets.token_hex(16),
        "authority_key": authority.public_b64,
    }
    _parse_certificate(body)  # never sign what no verifier would accept
    return {"certificate": body, "signature": b64e(authority.sign(_CERT_TAG + canonical(body)))}


def verify_certificate(doc: Any, authority_key: str) -> Certificate:
    """Check a certificate document against the pinned authority key. The signature covers the canonical
    re-encoding of the fields as parsed: what is checked is what is used, however the JSON was spelled."""
    if not isinstance(doc, dict) or set(doc) != {"certificate", "signature"}:
        raise ProtocolError("a certificate document is {certificate, signature}")
    body, signature = doc["certificate"], doc["signature"]
    if not isinstance(body, dict) or not isinstance(signature, str):
        raise ProtocolError("a certificate document is {certificate, signature}")
    cert = _parse_certificate(body)
    sig = b64d(signature, length=SIGNATURE_BYTES)
    if cert.authority_key != authority_key:
        raise PermissionDenied("the certificate was issued by another authority")
    # checked against the pinned key (equal to the certificate's, so already known to be well formed)
    if not verify_signature(b64d(authority_key, length=KEY_BYTES), _CERT_TAG + canonical(body), sig):
        raise PermissionDenied("the certificate's signature does not verify")
    return cert


# ----- signed requests -----

H_KEY = "X-Hearth-Key"
H_AUDIENCE = "X-Hearth-Audience"
H_TIME = "X-Hearth-Time"
H_NONCE = "X-Hearth-Nonce"
H_SIGNATURE = "X-Hearth-Signature"
SIGNATURE_HEADERS = (H_KEY, H_AUDIENCE, H_TIME, H_NONCE, H_SIGNATURE)

_FINGERPRINT_RE = re.compile(r"[0-9a-f]{20}")
_TIME_RE = re.compile(r"[0-9]{1,12}")  # int() would also take " 1", "+1" and "1_0"
_NONCE_RE = re.compile(r"[A-Za-z0-9_-]{22}")  # 16 bytes, as sign_request makes them


def _request_message(method: str, path: str, audience: str, ts: str, nonce: str, body: bytes) -> bytes:
    digest = hashlib.sha256(body).hexdigest()
    return _REQ_TAG + "\n".join((method.upper(), path, audience, ts, nonce, digest)).encode()


def sign_request(
    identity: Identity, method: str, path: str, body: bytes, audience: str, *, now: float | None = None
) -> dict[str, str]:
    # fields are joined by newlines, so a newline inside one could make two calls sign the same bytes
    if any("\n" in field for field in (method, path, audience)):
        raise ValueError("method, path and audience must not contain newlines")
    ts = str(int(time.time() if now is None else now))
    nonce = b64e(secrets.token_bytes(16))
    signature = identity.sign(_request_message(method, path, audience, ts, nonce, body))
    return {
        H_KEY: identity.fingerprint,
        H_AUDIENCE: audience,
        H_TIME: ts,
        H_NONCE: nonce,
        H_SIGNATURE: b64e(signature),
    }


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)  # case-insensitive already for aiohttp's CIMultiDict
    if value is None:
        # a plain mapping: scan it; only reached for a header with another spelling or none at all
        lowered = name.lower()
        value = next((v for k, v in headers.items() if isinstance(k, str) and k.lower() == lowered), None)
    return value if isinstance(value, str) else None


class RequestVerifier:
    """Checks signed calls: a trusted signer, this audience, fresh, never seen before.

    Checks run cheapest first, so garbage costs little: headers, their shapes, the audience, the clock,
    the signer, the signature (the one expensive step), and only then the replay memory. A nonce is
    remembered only once its signature verified, so nobody without a trusted key can fill the memory.
    """

    def __init__(
        self,
        audience: str | Callable[[], str],
        lookup: Callable[[str], bytes | None],
        *,
        window_s: float = 60.0,
        max_nonces: int = 200_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._audience = audience
        self._lookup = lookup
        self._window = window_s
        self._max = max_nonces
        self._clock = clock
        # (expiry, (fingerprint, nonce)) in a heap for pruning by time, and the same pairs in a set
        self._expiries: list[tuple[float, tuple[str, str]]] = []
        self._seen: set[tuple[str, str]] = set()
        self._lock = threading.Lock()  # check-then-record must be one step, or a racing replay slips in

    @property
    def audience(self) -> str:
        return self._audience() if callable(self._audience) else self._audience

    def verify(self, method: str, path: str, headers: Mapping[str, str], body: bytes) -> str:
        """Return the signer's fingerprint, or raise AuthenticationFailed with a short reason."""
        values = [_header(headers, name) for name in SIGNATURE_HEADERS]
        key_fp, audience, ts, nonce, signature = (v or "" for v in values)
        if not all(values):
            raise AuthenticationFailed("missing signature headers: this API accepts signed calls only")
        if (
            _FINGERPRINT_RE.fullmatch(key_fp) is None
            or _TIME_RE.fullmatch(ts) is None
            or _NONCE_RE.fullmatch(nonce) is None
            or len(audience) > MAX_FIELD
            or len(signature) > 2 * SIGNATURE_BYTES
            or "\n" in method
            or "\n" in path
        ):
            raise AuthenticationFailed("malformed signature headers")
        if audience != self.audience:
            raise AuthenticationFailed("request meant for another audience")
        now = self._clock()
        when = int(ts)
        if abs(now - when) > self._window:
            raise AuthenticationFailed("request too old or from the future — check the clocks")
        public = self._lookup(key_fp)
        if public is None:
            raise AuthenticationFailed("unknown signer")
        try:
            sig = b64d(signature, length=SIGNATURE_BYTES)
        except ProtocolError:
            raise AuthenticationFailed("bad signature") from None
        if not verify_signature(public, _request_message(method, path, audience, ts, nonce, body), sig):
            raise AuthenticationFailed("bad signature")
        self._remember((key_fp, nonce), when + self._window, now)
        return key_fp

    def _remember(self, entry: tuple[str, str], expiry: float, now: float) -> None:
        # A call is accepted while now <= its time + window; past that the clock check refuses it, so its
        # nonce can be forgotten: memory holds about one window of calls.
        with self._lock:
            expiries, seen = self._expiries, self._seen
            while expiries and expiries[0][0] < now:
                seen.discard(heapq.heappop(expiries)[1])
            if entry in seen:
                raise AuthenticationFailed("replayed request")
            if len(seen) >= self._max:
                # forgetting a nonce early would let its call be replayed; refusing is the safe overflow
                raise AuthenticationFailed("too many requests in the replay window; slow down")
            seen.add(entry)
            heapq.heappush(expiries, (expiry, entry))


# ----- the federation authority -----


def default_authority_dir() -> Path:
    # the XDG spec says a relative XDG_CONFIG_HOME is invalid and must be ignored
    base = os.environ.get("XDG_CONFIG_HOME", "")
    root = Path(base) if base and os.path.isabs(base) else Path.home() / ".config"
    return root / "hearth" / "authority"


def init_authority(directory: Path) -> Identity:
    path = directory / AUTHORITY_FILE
    key = Ed25519PrivateKey.generate()
    if not _create_key_file(path, key):
        raise ConfigError(f"an authority already exists at {path}")
    return Identity(key)


def load_authority(directory: Path) -> Identity:
    path = directory / AUTHORITY_FILE
    if not os.path.lexists(path):
        raise ConfigError(f"no authority key at {path}; run `hearth authority init` first")
    return Identity.load(path)
