"""The end-to-end envelope (groundwork for the E2E issue): a request only its candidate nodes can open, and
an answer only its sender can read, in order and complete.

Suite ``hearth-e2e-v1``: HPKE (RFC 9180) base mode, DHKEM(X25519, HKDF-SHA256) / HKDF-SHA256 /
ChaCha20-Poly1305, from `cryptography`'s own ``hpke`` module; ChaCha20-Poly1305 and HKDF from `cryptography`
for the body and the response. Nothing here is hand-rolled beyond framing.

Request
    A fresh content key seals the (padded) OpenAI body once, with the hash of the visible header as
    associated data. For each candidate node the content key and a fresh per-candidate response secret are
    HPKE-wrapped to that node's encryption key, with the suite, node id, key id and header hash in HPKE's
    ``info``: a wrap moved to another node, another key, or another header does not open. The scheduler sees
    only the header (model, max_tokens, stream, length bucket, request id, times).

Response
    From the response secret and the request id, HKDF gives a key and a nonce base; frame ``i`` is sealed
    with nonce = base XOR i and associated data = (i, final flag), so a frame cut, reordered, duplicated or
    falsely marked final fails to open, and one after the final frame is refused. Payloads are padded to
    buckets so that lengths tell little about the tokens.

Every failure to open raises the same `EnvelopeError` with the same message, so an attacker learns nothing
from which check failed. Sizes are checked before anything is allocated or decrypted.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import asdict, dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, hpke, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from protocol.errors import InvalidRequest

SUITE_ID = "hearth-e2e-v1"
_SUITE = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.CHACHA20_POLY1305)
KEY_BYTES = 32
TAG_BYTES = 16
NONCE_BYTES = 12
_WRAP_SECRET_BYTES = 2 * KEY_BYTES  # content key ‖ response secret
WRAP_BYTES = KEY_BYTES + _WRAP_SECRET_BYTES + TAG_BYTES  # HPKE enc ‖ ciphertext

MAX_CANDIDATES = 8
MAX_BODY_BYTES = 4 * 1024 * 1024
MIN_BUCKET = 1024
MAX_FRAME_PAYLOAD = 256 * 1024
RESPONSE_BUCKETS = (64, 256, 1024, 4096, 16384, 65536, MAX_FRAME_PAYLOAD)
_LENGTH = struct.Struct(">I")


class EnvelopeError(InvalidRequest):
    """Anything wrong with a sealed request or frame. One message for every cause, on purpose."""

    default_code = "envelope_invalid"

    def __init__(self) -> None:
        super().__init__("the end-to-end envelope could not be opened", code="envelope_invalid")


@dataclass(frozen=True, slots=True)
class Header:
    """What the scheduler may see of a sealed request."""

    model: str
    max_tokens: int | None
    stream: bool
    bucket: int  # the padded body's length
    request_id: str
    issued_at: int
    expires_at: int

    def canonical(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()

    def digest(self) -> bytes:
        return hashlib.sha256(SUITE_ID.encode() + b"\n" + self.canonical()).digest()


@dataclass(frozen=True, slots=True)
class Candidate:
    node_id: str
    key_id: str
    public_key: X25519PublicKey


@dataclass(frozen=True, slots=True)
class Sealed:
    header: Header
    nonce: bytes
    ciphertext: bytes
    wraps: dict[str, bytes]  # node id → HPKE wrap for that node


def bucket_for(length: int) -> int:
    """The padded size of a body of ``length`` bytes (plus its 4-byte length): the next power of two."""
    need = length + _LENGTH.size + TAG_BYTES
    if need > MAX_BODY_BYTES:
        raise InvalidRequest(f"the request body is larger than {MAX_BODY_BYTES} bytes")
    size = MIN_BUCKET
    while size < need:
        size *= 2
    return size


def _pad(data: bytes, total: int) -> bytes:
    return _LENGTH.pack(len(data)) + data + bytes(total - _LENGTH.size - len(data))


def _unpad(padded: bytes) -> bytes:
    if len(padded) < _LENGTH.size:
        raise EnvelopeError()
    (length,) = _LENGTH.unpack_from(padded)
    if length > len(padded) - _LENGTH.size or any(padded[_LENGTH.size + length :]):
        raise EnvelopeError()
    return padded[_LENGTH.size : _LENGTH.size + length]


def _info(node_id: str, key_id: str, header_digest: bytes) -> bytes:
    return b"\n".join((SUITE_ID.encode(), node_id.encode(), key_id.encode(), header_digest))


def seal_request(
    body: bytes, *, model: str, max_tokens: int | None, stream: bool, request_id: str, issued_at: int,
    ttl_s: int, candidates: list[Candidate],
) -> tuple[Sealed, dict[str, bytes]]:  # fmt: skip
    """Seal ``body`` for ``candidates``; returns the envelope and each candidate's response secret."""
    if not 1 <= len(candidates) <= MAX_CANDIDATES:
        raise InvalidRequest(f"an envelope names 1 to {MAX_CANDIDATES} candidate nodes")
    padded_size = bucket_for(len(body))
    header = Header(model, max_tokens, stream, padded_size, request_id, issued_at, issued_at + ttl_s)
    digest = header.digest()
    content_key = ChaCha20Poly1305.generate_key()
    nonce = os.urandom(NONCE_BYTES)
    ciphertext = ChaCha20Poly1305(content_key).encrypt(nonce, _pad(body, padded_size - TAG_BYTES), digest)
    wraps: dict[str, bytes] = {}
    secrets_: dict[str, bytes] = {}
    for c in candidates:
        secret = os.urandom(KEY_BYTES)
        wraps[c.node_id] = _SUITE.encrypt(
            content_key + secret, c.public_key, _info(c.node_id, c.key_id, digest)
        )
        secrets_[c.node_id] = secret
    return Sealed(header, nonce, ciphertext, wraps), secrets_


def open_request(
    sealed: Sealed, *, node_id: str, key_id: str, private_key: X25519PrivateKey, now: int
) -> tuple[bytes, bytes]:
    """The body and this node's response secret; EnvelopeError for anything amiss, expiry included."""
    header = sealed.header
    wrap = sealed.wraps.get(node_id)
    if (
        wrap is None
        or len(wrap) != WRAP_BYTES
        or len(sealed.nonce) != NONCE_BYTES
        or len(sealed.ciphertext) != header.bucket
        or not MIN_BUCKET <= header.bucket <= MAX_BODY_BYTES
        or not header.issued_at <= now <= header.expires_at
    ):
        raise EnvelopeError()
    digest = header.digest()
    try:
        secrets_ = _SUITE.decrypt(wrap, private_key, _info(node_id, key_id, digest))
        content_key, secret = secrets_[:KEY_BYTES], secrets_[KEY_BYTES:]
        padded = ChaCha20Poly1305(content_key).decrypt(sealed.nonce, sealed.ciphertext, digest)
    except (InvalidTag, ValueError):
        raise EnvelopeError() from None
    return _unpad(padded), secret


# Responses


def _response_keys(secret: bytes, request_id: str) -> tuple[ChaCha20Poly1305, bytes]:
    okm = HKDF(
        algorithm=hashes.SHA256(), length=KEY_BYTES + NONCE_BYTES, salt=None,
        info=f"{SUITE_ID}/response/{request_id}".encode(),
    ).derive(secret)  # fmt: skip
    return ChaCha20Poly1305(okm[:KEY_BYTES]), okm[KEY_BYTES:]


def _nonce(base: bytes, seq: int) -> bytes:
    return bytes(a ^ b for a, b in zip(base, seq.to_bytes(NONCE_BYTES, "big"), strict=True))


def _aad(seq: int, final: bool) -> bytes:
    return struct.pack(">QB", seq, 1 if final else 0)


def _response_bucket(length: int) -> int:
    need = length + _LENGTH.size
    for size in RESPONSE_BUCKETS:
        if need <= size:
            return size
    raise InvalidRequest(f"a response frame carries at most {MAX_FRAME_PAYLOAD - _LENGTH.size} bytes")


class ResponseSealer:
    """The node's side: seals frames in order."""

    def __init__(self, secret: bytes, request_id: str) -> None:
        self._aead, self._base = _response_keys(secret, request_id)
        self._seq = 0
        self._done = False

    def seal(self, payload: bytes, *, final: bool = False) -> bytes:
        if self._done:
            raise InvalidRequest("the final frame was sealed already")
        padded = _pad(payload, _response_bucket(len(payload)))
        frame = self._aead.encrypt(_nonce(self._base, self._seq), padded, _aad(self._seq, final))
        self._seq += 1
        self._done = final
        return frame


class ResponseOpener:
    """The client's side: opens frames in order; `finish()` tells a complete answer from a cut one."""

    def __init__(self, secret: bytes, request_id: str) -> None:
        self._aead, self._base = _response_keys(secret, request_id)
        self._seq = 0
        self.finished = False

    def open(self, frame: bytes, *, final: bool) -> bytes:
        if self.finished or not TAG_BYTES + _LENGTH.size <= len(frame) <= MAX_FRAME_PAYLOAD + TAG_BYTES:
            raise EnvelopeError()
        try:
            padded = self._aead.decrypt(_nonce(self._base, self._seq), frame, _aad(self._seq, final))
        except InvalidTag:
            raise EnvelopeError() from None
        self._seq += 1
        self.finished = final
        return _unpad(padded)

    def finish(self) -> None:
        if not self.finished:
            raise EnvelopeError()


def public_key_bytes(key: X25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


__all__ = [
    "SUITE_ID",
    "Candidate",
    "EnvelopeError",
    "Header",
    "ResponseOpener",
    "ResponseSealer",
    "Sealed",
    "bucket_for",
    "open_request",
    "public_key_bytes",
    "seal_request",
]
