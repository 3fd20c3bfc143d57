"""Identities, node certificates and signed calls: who may talk to whom in a federation.

Three kinds of Ed25519 key exist. The **federation authority** key stays with the operator and signs a
certificate for each node it approves. The **scheduler** key signs every call the scheduler makes to a node.
Each **node** has an identity key that signs its heartbeats (and an X25519 key prompts will be sealed to).

A certificate binds a node id and tier to the node's keys and to the one scheduler it serves; a node that
pinned the authority key can check it alone, and the scheduler can store certificates without being able to
mint them.

Calls between the scheduler and its nodes are signed over the method, path, audience (the receiver), time,
a random nonce and the body's hash. The receiver accepts a call only from a key it trusts, addressed to
itself, within a time window, and only once: a captured call cannot be replayed, redirected to another node,
or altered. (The network is not trusted; confidentiality of prompts is the E2E envelope's job, not this.)
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
import secrets
import stat
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from protocol.errors import AuthenticationFailed, ConfigError, PermissionDenied, ProtocolError

NODE_ID_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
TIERS = ("club", "community")
KEY_BYTES = 32
MAX_FIELD = 256

_CERT_TAG = b"hearth-cert-v1\n"
_REQ_TAG = b"hearth-req-v1\n"
AUTHORITY_FILE = "authority.key"


def valid_node_id(value: str) -> bool:
    return bool(NODE_ID_RE.match(value))


def b64e(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64d(text: str, *, length: int | None = None) -> bytes:
    if not isinstance(text, str) or len(text) > 4096:
        raise ProtocolError("malformed base64")
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (ValueError, binascii.Error):
        raise ProtocolError("malformed base64") from None
    if length is not None and len(raw) != length:
        raise ProtocolError(f"expected {length} bytes")
    return raw


def fingerprint(public_raw: bytes) -> str:
    return hashlib.sha256(public_raw).digest()[:10].hex()


def verify_signature(public_raw: bytes, data: bytes, signature: bytes) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(public_raw).verify(signature, data)
        return True
    except (InvalidSignature, ValueError):
        return False


# key files


def write_private(path: Path, data: bytes, *, replace: bool = False) -> None:
    """Write a file only its owner can read (0600, in a 0700 folder), atomically. Keys are written once
    (``replace=False`` refuses an existing file, also one created meanwhile); state files may be replaced."""
    if not replace and path.exists():
        raise ConfigError(f"{path} exists already; refusing to overwrite a key")
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # atomic, and fails instead of replacing a key created meanwhile
    except FileExistsError:
        raise ConfigError(f"{path} exists already; refusing to overwrite a key") from None
    finally:
        tmp.unlink(missing_ok=True)


def _read_private(path: Path) -> bytes:
    try:
        mode = path.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigError(f"{path} is readable by others; run: chmod 600 {path}")
        return path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"no key at {path}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None


def _pem(key: Ed25519PrivateKey | X25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _load_pem(path: Path) -> Any:
    try:
        return serialization.load_pem_private_key(_read_private(path), password=None)
    except (ValueError, TypeError):
        raise ConfigError(f"{path} is not a readable private key") from None


class Identity:
    """An Ed25519 signing key."""

    def __init__(self, private: Ed25519PrivateKey) -> None:
        self._private = private
        self.public_raw = private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.public_b64 = b64e(self.public_raw)
        self.fingerprint = fingerprint(self.public_raw)

    @classmethod
    def generate(cls) -> Identity:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load(cls, path: Path) -> Identity:
        key = _load_pem(path)
        if not isinstance(key, Ed25519PrivateKey):
            raise ConfigError(f"{path} is not an Ed25519 key")
        return cls(key)

    def save(self, path: Path) -> None:
        write_private(path, _pem(self._private))

    def sign(self, data: bytes) -> bytes:
        return self._private.sign(data)


def load_or_create_identity(path: Path) -> Identity:
    if path.exists():
        return Identity.load(path)
    identity = Identity.generate()
    identity.save(path)
    return identity


def load_or_create_encryption_key(path: Path) -> X25519PrivateKey:
    if path.exists():
        key = _load_pem(path)
        if not isinstance(key, X25519PrivateKey):
            raise ConfigError(f"{path} is not an X25519 key")
        return key
    key = X25519PrivateKey.generate()
    write_private(path, _pem(key))
    return key


def encryption_public_b64(key: X25519PrivateKey) -> str:
    return b64e(key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))


# certificates


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


_CERT_FIELDS = (
    "node_id",
    "tier",
    "identity_key",
    "encryption_key",
    "scheduler_key",
    "serial",
    "authority_key",
)


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


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
    _check_fields(body)
    return {"certificate": body, "signature": b64e(authority.sign(_CERT_TAG + _canonical(body)))}


def _check_fields(body: Mapping[str, Any]) -> Certificate:
    if body.get("v") != 1:
        raise ProtocolError("unknown certificate version")
    if set(body) != {"v", "issued_at", *_CERT_FIELDS}:
        raise ProtocolError("a certificate has exactly the known fields")
    for name in _CERT_FIELDS:
        value = body[name]
        if not isinstance(value, str) or len(value) > MAX_FIELD:
            raise ProtocolError(f"certificate field {name} is malformed")
    issued = body["issued_at"]
    if type(issued) is not int or issued < 0:
        raise ProtocolError("certificate field issued_at is malformed")
    if not valid_node_id(body["node_id"]):
        raise ProtocolError("certificate node id is malformed")
    if body["tier"] not in TIERS:
        raise ProtocolError("certificate tier is unknown")
    for name in ("identity_key", "encryption_key", "scheduler_key", "authority_key"):
        b64d(body[name], length=KEY_BYTES)
    return Certificate(**{k: body[k] for k in (*_CERT_FIELDS, "issued_at")})


def verify_certificate(doc: Any, authority_key: str) -> Certificate:
    if not isinstance(doc, dict) or set(doc) != {"certificate", "signature"}:
        raise ProtocolError("a certificate document is {certificate, signature}")
    body, signature = doc["certificate"], doc["signature"]
    if not isinstance(body, dict) or not isinstance(signature, str):
        raise ProtocolError("a certificate document is {certificate, signature}")
    cert = _check_fields(body)
    if cert.authority_key != authority_key:
        raise PermissionDenied("the certificate was issued by another authority")
    sig = b64d(signature, length=64)
    if not verify_signature(b64d(authority_key, length=KEY_BYTES), _CERT_TAG + _canonical(body), sig):
        raise PermissionDenied("the certificate's signature does not verify")
    return cert


# signed requests

H_KEY, H_AUDIENCE, H_TIME, H_NONCE, H_SIGNATURE = (
    "X-Hearth-Key",
    "X-Hearth-Audience",
    "X-Hearth-Time",
    "X-Hearth-Nonce",
    "X-Hearth-Signature",
)
SIGNATURE_HEADERS = (H_KEY, H_AUDIENCE, H_TIME, H_NONCE, H_SIGNATURE)


def _request_message(method: str, path: str, audience: str, ts: str, nonce: str, body: bytes) -> bytes:
    digest = hashlib.sha256(body).hexdigest()
    return _REQ_TAG + "\n".join((method.upper(), path, audience, ts, nonce, digest)).encode()


def sign_request(
    identity: Identity, method: str, path: str, body: bytes, audience: str, *, now: float | None = None
) -> dict[str, str]:
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
    value = headers.get(name)
    if value is None and isinstance(headers, dict):
        lowered = name.lower()
        value = next((v for k, v in headers.items() if k.lower() == lowered), None)
    return value


class RequestVerifier:
    """Checks signed calls: trusted signer, this audience, fresh, never seen before."""

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
        self.lookup = lookup
        self._window = window_s
        self._max = max_nonces
        self._clock = clock
        self._seen: OrderedDict[tuple[str, str], float] = OrderedDict()

    @property
    def audience(self) -> str:
        return self._audience() if callable(self._audience) else self._audience

    def verify(self, method: str, path: str, headers: Mapping[str, str], body: bytes) -> str:
        values = [_header(headers, h) for h in SIGNATURE_HEADERS]
        if any(v is None for v in values):
            raise AuthenticationFailed("missing signature headers: this API accepts signed calls only")
        key_fp, audience, ts, nonce, signature = (str(v) for v in values)
        if max(len(key_fp), len(audience), len(ts), len(nonce)) > 128 or len(signature) > 128:
            raise AuthenticationFailed("malformed signature headers")
        if audience != self.audience:
            raise AuthenticationFailed("request meant for another audience")
        now = self._clock()
        try:
            when = int(ts)
        except ValueError:
            raise AuthenticationFailed("malformed signature headers") from None
        if abs(now - when) > self._window:
            raise AuthenticationFailed("request too old or from the future — check the clocks")
        public = self.lookup(key_fp)
        if public is None:
            raise AuthenticationFailed("unknown signer")
        try:
            sig = b64d(signature, length=64)
        except ProtocolError:
            raise AuthenticationFailed("bad signature") from None
        if not verify_signature(public, _request_message(method, path, audience, ts, nonce, body), sig):
            raise AuthenticationFailed("bad signature")
        self._remember(key_fp, nonce, now)
        return key_fp

    def _remember(self, key_fp: str, nonce: str, now: float) -> None:
        seen = self._seen
        while seen:
            oldest_key, at = next(iter(seen.items()))
            if now - at <= 2 * self._window:
                break
            del seen[oldest_key]
        entry = (key_fp, nonce)
        if entry in seen:
            raise AuthenticationFailed("replayed request")
        if len(seen) >= self._max:
            raise AuthenticationFailed("too many requests in the replay window; slow down")
        seen[entry] = now


# the federation authority


def default_authority_dir() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "hearth" / "authority"


def init_authority(directory: Path) -> Identity:
    path = directory / AUTHORITY_FILE
    if path.exists():
        raise ConfigError(f"an authority already exists at {path}")
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    identity = Identity.generate()
    identity.save(path)
    return identity


def load_authority(directory: Path) -> Identity:
    path = directory / AUTHORITY_FILE
    if not path.exists():
        raise ConfigError(f"no authority key at {path}; run `hearth authority init` first")
    return Identity.load(path)
