"""The end-to-end envelope: a request only its candidate nodes can open, and an answer only its sender can
read, in order and complete. `docs/protocol.md` is the byte-level specification.

Suite ``hearth-e2e-v1``: HPKE (RFC 9180) base mode, DHKEM(X25519, HKDF-SHA256) / HKDF-SHA256 /
ChaCha20-Poly1305, from `cryptography`'s own ``hpke`` module; ChaCha20-Poly1305 and HKDF from `cryptography`
for the body and the response. Nothing here is hand-rolled beyond framing.

Request
    A fresh content key seals the (padded) OpenAI body once, with the hash of the visible header as
    associated data. For each candidate node the content key and a fresh response seed are HPKE-wrapped to
    that node's encryption key, with the suite, node id, key id and header hash in HPKE's ``info``: a wrap
    moved to another node, another key, or another header does not open. The scheduler sees only the
    header (endpoint, model, max_tokens, stream, length bucket, request id, times).

Response
    Each candidate's response secret is HKDF(seed, node id, request id): a frame sealed by one candidate
    does not open as another's. HKDF gives a key and a nonce base; frame ``i`` is sealed with nonce =
    base XOR i and associated data = (i, final flag), so a frame cut, reordered, duplicated or falsely
    marked final fails to open, and one after the final frame is refused. Payloads are padded to buckets so
    that lengths tell little about the tokens.

Blind failover
    Every candidate holds the seed, so a replacement candidate can open what the failed one streamed (the
    scheduler hands it the ciphertext frames), continue the answer from there, and seal its own frames from
    the next sequence number on. The candidates could read the request already, so this widens nothing.

Every failure to open raises the same `EnvelopeError` with the same message, so an attacker learns nothing
from which check failed. Sizes are checked before anything is allocated or decrypted.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, hpke, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from protocol.errors import InvalidRequest, ProtocolError
from protocol.identity import b64d, b64e, canonical
from protocol.schemas import MAX_BATCH_CHOICES

SUITE_ID = "hearth-e2e-v1"
_SUITE = hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.CHACHA20_POLY1305)
KEY_BYTES = 32
TAG_BYTES = 16
NONCE_BYTES = 12
_WRAP_SECRET_BYTES = 2 * KEY_BYTES  # content key ‖ response secret
WRAP_BYTES = KEY_BYTES + _WRAP_SECRET_BYTES + TAG_BYTES  # HPKE enc ‖ ciphertext

MEDIA_TYPE = "application/x-hearth-envelope"  # proxy → scheduler: the envelope's JSON form
SEALED_JOB = "application/x-hearth-sealed-job"  # scheduler → node: {"envelope", "resume"}
# What a sealed request can be: generation, or a tokenizer request the node answers without generating
# (protocol.tokenizer); the scheduler routes and counts by it.
JOB_KINDS = ("chat", "completion", "tokenize", "detokenize", "tokenizer_info")
MAX_CANDIDATES = 8  # what any node accepts; the proxy's own default is 4
MAX_TTL_S = 600  # an envelope's time window; nodes remember request ids this long (plus the skew)
MAX_SKEW_S = 30  # clocks of the user's machine and the node may disagree by this much
MAX_BODY_BYTES = 4 * 1024 * 1024
MIN_BUCKET = 1024
MAX_FRAME_PAYLOAD = 256 * 1024
FRAME_CHUNK = MAX_FRAME_PAYLOAD - 4 - TAG_BYTES  # the most payload one response frame carries
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

    endpoint: str  # one of JOB_KINDS
    model: str
    max_tokens: int | None
    stream: bool
    bucket: int  # the padded body's length
    request_id: str
    issued_at: int
    expires_at: int
    # The answers the body asks for (n × prompts), so the scheduler reserves quota for all of them. Absent
    # on the wire when 1, so a header is what it was before the field existed.
    choices: int = 1

    def to_dict(self) -> dict[str, Any]:
        # By hand: dataclasses.asdict deep-copies field by field, ~0.1 ms here, on every request's path.
        out = {
            "endpoint": self.endpoint, "model": self.model, "max_tokens": self.max_tokens,
            "stream": self.stream, "bucket": self.bucket, "request_id": self.request_id,
            "issued_at": self.issued_at, "expires_at": self.expires_at,
        }  # fmt: skip
        if self.choices != 1:
            out["choices"] = self.choices
        return out

    def canonical(self) -> bytes:
        return canonical(self.to_dict())

    def digest(self) -> bytes:
        return _digest(self)


@functools.lru_cache(maxsize=256)
def _digest(header: Header) -> bytes:
    # Each side needs it more than once per request (info, aad, the node's replay memory): computed once.
    return hashlib.sha256(SUITE_ID.encode() + b"\n" + header.canonical()).digest()


@dataclass(frozen=True, slots=True)
class Candidate:
    node_id: str
    key_id: str
    public_key: X25519PublicKey


@dataclass(frozen=True, slots=True)
class Wrap:
    key_id: str
    data: bytes  # HPKE enc ‖ ciphertext of (content key ‖ response seed)


@dataclass(frozen=True, slots=True)
class Sealed:
    header: Header
    nonce: bytes
    ciphertext: bytes
    wraps: dict[str, Wrap]  # node id → that node's wrap


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
    body: bytes, *, endpoint: str, model: str, max_tokens: int | None, stream: bool, request_id: str,
    issued_at: int, ttl_s: int, candidates: list[Candidate], choices: int = 1,
) -> tuple[Sealed, bytes]:  # fmt: skip
    """Seal ``body`` for ``candidates``; returns the envelope and the response seed (the sender keeps it)."""
    if not 1 <= len(candidates) <= MAX_CANDIDATES or len({c.node_id for c in candidates}) != len(candidates):
        raise InvalidRequest(f"an envelope names 1 to {MAX_CANDIDATES} different candidate nodes")
    if not 0 < ttl_s <= MAX_TTL_S:
        raise InvalidRequest(f"an envelope lives 1 to {MAX_TTL_S} seconds")
    padded_size = bucket_for(len(body))
    header = Header(
        endpoint, model, max_tokens, stream, padded_size, request_id, issued_at, issued_at + ttl_s, choices
    )
    check_header(header)
    digest = header.digest()
    content_key = ChaCha20Poly1305.generate_key()
    seed = os.urandom(KEY_BYTES)
    nonce = os.urandom(NONCE_BYTES)
    ciphertext = ChaCha20Poly1305(content_key).encrypt(nonce, _pad(body, padded_size - TAG_BYTES), digest)
    wraps = {
        c.node_id: Wrap(
            c.key_id, _SUITE.encrypt(content_key + seed, c.public_key, _info(c.node_id, c.key_id, digest))
        )
        for c in candidates
    }
    return Sealed(header, nonce, ciphertext, wraps), seed


def open_request(
    sealed: Sealed, *, node_id: str, keys: Mapping[str, X25519PrivateKey], now: int, skew_s: int = MAX_SKEW_S
) -> tuple[bytes, bytes]:
    """The body and the response seed, for the node ``node_id`` holding ``keys`` (key id → private key).

    EnvelopeError for anything amiss: no wrap for this node, a key it does not hold, a damaged byte, or
    a time window that does not contain ``now`` (give or take ``skew_s`` for clocks that disagree)."""
    header = sealed.header
    wrap = sealed.wraps.get(node_id)
    key = keys.get(wrap.key_id) if wrap is not None else None
    if (
        wrap is None
        or key is None
        or len(wrap.data) != WRAP_BYTES
        or len(sealed.nonce) != NONCE_BYTES
        or len(sealed.ciphertext) != header.bucket
        or not MIN_BUCKET <= header.bucket <= MAX_BODY_BYTES
        or not header.issued_at - skew_s <= now <= header.expires_at + skew_s
    ):
        raise EnvelopeError()
    digest = header.digest()
    try:
        opened = _SUITE.decrypt(wrap.data, key, _info(node_id, wrap.key_id, digest))
        content_key, seed = opened[:KEY_BYTES], opened[KEY_BYTES:]
        padded = ChaCha20Poly1305(content_key).decrypt(sealed.nonce, sealed.ciphertext, digest)
    except (InvalidTag, ValueError):
        raise EnvelopeError() from None
    return _unpad(padded), seed


def response_secret(seed: bytes, node_id: str, request_id: str) -> bytes:
    """The secret that the candidate ``node_id`` seals its answer with."""
    return HKDF(
        algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None,
        info=f"{SUITE_ID}/candidate/{node_id}/{request_id}".encode(),
    ).derive(seed)  # fmt: skip


# The wire form: JSON, binary fields in unpadded base64url (docs/protocol.md).

_HEADER_FIELDS = {f.name for f in fields(Header)}
_WRAP_FIELDS = {"node_id", "key_id", "wrap"}
_ENVELOPE_FIELDS = {"suite", "header", "nonce", "ciphertext", "wraps"}
_ID = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
_NODE_ID = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
_KEY_ID = re.compile(r"[0-9a-f]{20}")
MAX_MODEL_CHARS = 256


def check_header(header: Header) -> None:
    """A header any node would accept the shape of: EnvelopeError otherwise."""
    ok = (
        header.endpoint in JOB_KINDS
        and isinstance(header.model, str)
        and 0 < len(header.model) <= MAX_MODEL_CHARS
        and (header.max_tokens is None or (type(header.max_tokens) is int and 0 <= header.max_tokens < 2**31))
        and type(header.stream) is bool
        and type(header.bucket) is int
        and MIN_BUCKET <= header.bucket <= MAX_BODY_BYTES
        and header.bucket & (header.bucket - 1) == 0
        and isinstance(header.request_id, str)
        and _ID.fullmatch(header.request_id) is not None
        and type(header.issued_at) is int
        and type(header.expires_at) is int
        and 0 <= header.issued_at < header.expires_at <= header.issued_at + MAX_TTL_S
        and type(header.choices) is int
        and 1 <= header.choices <= MAX_BATCH_CHOICES
    )
    if not ok:
        raise EnvelopeError()


def to_wire(sealed: Sealed) -> dict[str, Any]:
    return {
        "suite": SUITE_ID,
        "header": sealed.header.to_dict(),
        "nonce": b64e(sealed.nonce),
        "ciphertext": b64e(sealed.ciphertext),
        "wraps": [
            {"node_id": node_id, "key_id": w.key_id, "wrap": b64e(w.data)}
            for node_id, w in sealed.wraps.items()
        ],
    }


def _b64_text(text: Any, length: int) -> str:
    # the length is checked on the text before anything is decoded
    if not isinstance(text, str) or len(text) != (4 * length + 2) // 3:
        raise EnvelopeError()
    return text


def _b64(text: Any, length: int) -> bytes:
    try:
        return b64d(_b64_text(text, length), length=length)
    except ProtocolError:
        raise EnvelopeError() from None


def peek(doc: Any) -> tuple[Header, list[str]]:
    """The header and candidate node ids of an envelope's JSON form, every shape and length checked, nothing
    decoded: what the scheduler needs (the node that opens it decodes, and refuses, the rest)."""
    if not isinstance(doc, dict) or set(doc) != _ENVELOPE_FIELDS or doc["suite"] != SUITE_ID:
        raise EnvelopeError()
    head, wraps = doc["header"], doc["wraps"]
    if not isinstance(head, dict) or not _HEADER_FIELDS - {"choices"} <= set(head) <= _HEADER_FIELDS:
        raise EnvelopeError()
    header = Header(**head)
    check_header(header)
    if not isinstance(wraps, list) or not 1 <= len(wraps) <= MAX_CANDIDATES:
        raise EnvelopeError()
    nodes: list[str] = []
    for w in wraps:
        if (
            not isinstance(w, dict)
            or set(w) != _WRAP_FIELDS
            or not isinstance(w["node_id"], str)
            or _NODE_ID.fullmatch(w["node_id"]) is None
            or not isinstance(w["key_id"], str)
            or _KEY_ID.fullmatch(w["key_id"]) is None
            or w["node_id"] in nodes
        ):
            raise EnvelopeError()
        _b64_text(w["wrap"], WRAP_BYTES)
        nodes.append(w["node_id"])
    _b64_text(doc["nonce"], NONCE_BYTES)
    _b64_text(doc["ciphertext"], header.bucket)
    return header, nodes


def from_wire(doc: Any) -> Sealed:
    """Parse an envelope's JSON form; EnvelopeError for any deviation (sizes checked before decoding)."""
    header, _ = peek(doc)
    wraps = {w["node_id"]: Wrap(w["key_id"], _b64(w["wrap"], WRAP_BYTES)) for w in doc["wraps"]}
    return Sealed(header, _b64(doc["nonce"], NONCE_BYTES), _b64(doc["ciphertext"], header.bucket), wraps)


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
    """The node's side: seals frames in order, from ``start`` on (a resumed answer goes on numbering)."""

    def __init__(self, secret: bytes, request_id: str, *, start: int = 0) -> None:
        self._aead, self._base = _response_keys(secret, request_id)
        self._seq = start
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
    """The client's side: opens frames in order; `finish()` tells a complete answer from a cut one.

    `switch` moves to another candidate's secret at the current sequence number (blind failover): the
    numbering goes on, so the scheduler cannot drop, repeat or reorder frames across the switch either."""

    def __init__(self, secret: bytes, request_id: str, *, start: int = 0) -> None:
        self._request_id = request_id
        self._aead, self._base = _response_keys(secret, request_id)
        self._seq = start
        self.finished = False

    @property
    def seq(self) -> int:
        return self._seq

    def switch(self, secret: bytes, *, at: int) -> None:
        if self.finished or at != self._seq:
            raise EnvelopeError()
        self._aead, self._base = _response_keys(secret, self._request_id)

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


MAX_ENVELOPE_BYTES = (4 * MAX_BODY_BYTES + 2) // 3 + MAX_CANDIDATES * 256 + 4096  # its JSON form, at most


__all__ = [
    "MAX_ENVELOPE_BYTES",
    "SUITE_ID",
    "Candidate",
    "EnvelopeError",
    "Header",
    "ResponseOpener",
    "ResponseSealer",
    "Sealed",
    "Wrap",
    "bucket_for",
    "check_header",
    "from_wire",
    "open_request",
    "peek",
    "public_key_bytes",
    "response_secret",
    "seal_request",
    "to_wire",
]
