"""The node directory: who may be sealed to, as an append-only hash-chained log anyone can check.

Entries are of three kinds. A ``certificate`` is the authority's signature over a node's keys and tier (made
when an operator approves it). A ``key`` is a node's own statement of its current encryption key, signed by
the identity key its certificate names, valid from ``not_before`` to ``not_after``; nodes rotate it. A
``revoke`` takes a node out; the scheduler writes it unsigned, since it can only ever remove a node (and a
scheduler that wants to refuse service can do that anyway).

Each entry names the hash of the one before it, so the log's head hash commits to its whole history. A
client pins the authority key on first use and keeps the last head it saw; it accepts a later directory only
when every certificate verifies against the pinned key, every statement against its node's certificate, and
the history continues the head it kept. A scheduler cannot add a node of its own (it cannot mint
certificates), swap a node's key (it cannot sign statements), or show different clients different histories
without one of them noticing at its next fetch.

Everything here is pure: no I/O, no clock (times are passed in).
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

from protocol.envelope import Candidate
from protocol.errors import PermissionDenied, ProtocolError
from protocol.identity import (
    KEY_BYTES,
    SIGNATURE_BYTES,
    Certificate,
    Identity,
    b64d,
    b64e,
    canonical,
    fingerprint,
    valid_node_id,
    verify_certificate,
    verify_signature,
)

_KEY_TAG = b"hearth-key-v1\n"
_LOG_TAG = b"hearth-log-v1\n"
GENESIS = "0" * 64
MAX_KEY_VALIDITY_S = 7 * 24 * 3600
MAX_ENTRIES = 100_000  # per fetch; a club's log grows by a few entries per node per day
MAX_DIRECTORY_BYTES = 64 * 1024 * 1024
_HASH_RE = re.compile(r"[0-9a-f]{64}")
_KEY_ID_RE = re.compile(r"[0-9a-f]{20}")
_MAX_TIME = 2**53
Kind = Literal["certificate", "key", "revoke"]
KINDS: tuple[Kind, ...] = ("certificate", "key", "revoke")


def _time(value: Any) -> int:
    if type(value) is not int or not 0 <= value <= _MAX_TIME:
        raise ProtocolError("a time in the directory is malformed")
    return value


# ----- key statements -----


@dataclass(frozen=True, slots=True)
class KeyStatement:
    node_id: str
    key_id: str  # the fingerprint of the public key
    public_key: str  # X25519, base64url
    not_before: int
    not_after: int

    def valid_at(self, now: float) -> bool:
        return self.not_before <= now <= self.not_after

    def candidate(self) -> Candidate:
        """This key as a candidate to seal an envelope to."""
        return _candidate(self.node_id, self.key_id, self.public_key)


@functools.lru_cache(maxsize=1024)
def _candidate(node_id: str, key_id: str, public_key: str) -> Candidate:
    # Decoded once per key, not once per request (~0.1 ms on a cold path, each time a user sends).
    return Candidate(node_id, key_id, X25519PublicKey.from_public_bytes(b64d(public_key, length=KEY_BYTES)))


def key_id(public_raw: bytes) -> str:
    return fingerprint(public_raw)


def make_key_statement(
    identity: Identity, *, node_id: str, public_raw: bytes, not_before: int, not_after: int
) -> dict[str, Any]:
    body = {
        "v": 1,
        "node_id": node_id,
        "key_id": key_id(public_raw),
        "public_key": b64e(public_raw),
        "not_before": not_before,
        "not_after": not_after,
    }
    _parse_statement(body)  # never sign what no verifier would accept
    return {"statement": body, "signature": b64e(identity.sign(_KEY_TAG + canonical(body)))}


def _parse_statement(body: Any) -> KeyStatement:
    if not isinstance(body, dict) or set(body) != {
        "v",
        "node_id",
        "key_id",
        "public_key",
        "not_before",
        "not_after",
    }:
        raise ProtocolError("a key statement has exactly the known fields")
    if type(body["v"]) is not int or body["v"] != 1:
        raise ProtocolError("unknown key statement version")
    node_id, kid, public = body["node_id"], body["key_id"], body["public_key"]
    if not isinstance(node_id, str) or not valid_node_id(node_id):
        raise ProtocolError("a key statement's node id is malformed")
    if not isinstance(kid, str) or _KEY_ID_RE.fullmatch(kid) is None:
        raise ProtocolError("a key statement's key id is malformed")
    raw = b64d(public, length=KEY_BYTES)
    if key_id(raw) != kid:
        raise ProtocolError("a key statement's key id is not its key's fingerprint")
    start, end = _time(body["not_before"]), _time(body["not_after"])
    if not start < end <= start + MAX_KEY_VALIDITY_S:
        raise ProtocolError(f"a key statement is valid for 1 s to {MAX_KEY_VALIDITY_S // 86400} days")
    return KeyStatement(node_id, kid, public, start, end)


def verify_key_statement(doc: Any, identity_key: str) -> KeyStatement:
    """Check a statement against the identity key (base64url Ed25519) its node's certificate names."""
    if not isinstance(doc, dict) or set(doc) != {"statement", "signature"}:
        raise ProtocolError("a key statement document is {statement, signature}")
    statement = _parse_statement(doc["statement"])
    signature = b64d(doc["signature"], length=SIGNATURE_BYTES)
    if not verify_signature(
        b64d(identity_key, length=KEY_BYTES), _KEY_TAG + canonical(doc["statement"]), signature
    ):
        raise ProtocolError("a key statement's signature does not verify")
    return statement


# ----- the log -----


def entry_hash(entry: Mapping[str, Any]) -> str:
    return hashlib.sha256(_LOG_TAG + canonical(entry)).hexdigest()


def make_entry(seq: int, prev: str, kind: Kind, doc: dict[str, Any], at: int) -> dict[str, Any]:
    return {"seq": seq, "prev": prev, "kind": kind, "doc": doc, "at": at}


@dataclass(frozen=True, slots=True)
class Head:
    seq: int  # entries so far; the next entry has this number
    hash: str  # the last entry's hash (GENESIS for an empty log)

    def to_json(self) -> dict[str, Any]:
        return {"seq": self.seq, "hash": self.hash}

    @classmethod
    def parse(cls, doc: Any) -> Head:
        if not isinstance(doc, dict) or set(doc) != {"seq", "hash"}:
            raise ProtocolError("a directory head is {seq, hash}")
        seq, digest = doc["seq"], doc["hash"]
        if type(seq) is not int or not 0 <= seq <= _MAX_TIME:
            raise ProtocolError("a directory head's seq is malformed")
        if not isinstance(digest, str) or _HASH_RE.fullmatch(digest) is None:
            raise ProtocolError("a directory head's hash is malformed")
        return cls(seq, digest)


EMPTY = Head(0, GENESIS)


@dataclass
class NodeEntry:
    certificate: Certificate
    keys: list[KeyStatement] = field(default_factory=list)
    revoked: bool = False

    def current_key(self, now: float) -> KeyStatement | None:
        """The newest statement valid at ``now``, or None (a revoked node has none)."""
        if self.revoked:
            return None
        valid = [k for k in self.keys if k.valid_at(now)]
        return max(valid, key=lambda k: (k.not_before, k.key_id)) if valid else None


class Directory:
    """A verified view of the log, built by applying entries in order.

    ``apply`` checks each entry's link, kind and signatures before it changes anything; a bad entry
    raises ProtocolError and leaves the view as it was before that call."""

    def __init__(self, authority_key: str) -> None:
        b64d(authority_key, length=KEY_BYTES)
        self.authority_key = authority_key
        self.head = EMPTY
        self.nodes: dict[str, NodeEntry] = {}

    def apply(self, entries: Iterable[Any]) -> None:
        head = self.head
        nodes = {k: NodeEntry(v.certificate, list(v.keys), v.revoked) for k, v in self.nodes.items()}
        for count, entry in enumerate(entries):
            if count >= MAX_ENTRIES:
                raise ProtocolError("too many directory entries at once")
            head = self._apply_one(entry, head, nodes)
        self.head, self.nodes = head, nodes

    def _apply_one(self, entry: Any, head: Head, nodes: dict[str, NodeEntry]) -> Head:
        if not isinstance(entry, dict) or set(entry) != {"seq", "prev", "kind", "doc", "at"}:
            raise ProtocolError("a directory entry is {seq, prev, kind, doc, at}")
        if entry["seq"] != head.seq or type(entry["seq"]) is not int:
            raise ProtocolError("the directory skips or repeats an entry")
        if entry["prev"] != head.hash:
            raise ProtocolError("the directory's history is not a continuation of the one seen before")
        _time(entry["at"])
        kind, doc = entry["kind"], entry["doc"]
        if kind == "certificate":
            try:
                cert = verify_certificate(doc, self.authority_key)
            except PermissionDenied as exc:  # another authority's, or a bad signature
                raise ProtocolError(exc.message) from None
            nodes[cert.node_id] = NodeEntry(cert)
        elif kind == "key":
            if not isinstance(doc, dict) or not isinstance(doc.get("statement"), dict):
                raise ProtocolError("a key entry holds a key statement")
            node = nodes.get(doc["statement"].get("node_id"))  # type: ignore[arg-type]
            if node is None or node.revoked:
                raise ProtocolError("a key statement for a node the directory does not hold")
            statement = verify_key_statement(doc, node.certificate.identity_key)
            node.keys = [k for k in node.keys if k.key_id != statement.key_id] + [statement]
            del node.keys[:-MAX_KEYS_KEPT]
        elif kind == "revoke":
            if not isinstance(doc, dict) or set(doc) != {"node_id"} or doc["node_id"] not in nodes:
                raise ProtocolError("a revoke entry names a node the directory holds")
            nodes[doc["node_id"]].revoked = True
        else:
            raise ProtocolError("unknown directory entry kind")
        return Head(head.seq + 1, entry_hash(entry))

    def copy(self) -> Directory:
        other = Directory(self.authority_key)
        other.head = self.head
        other.nodes = {k: NodeEntry(v.certificate, list(v.keys), v.revoked) for k, v in self.nodes.items()}
        return other

    def apply_page(self, doc: Any, kept: Head | None = None) -> bool:
        """Apply one answer of ``GET /v1/directory?since=<self.head.seq>``; return whether more follow.

        ``kept`` is a head this client verified before: the history must lead through it. The served head
        must match the entries once the last page is in. ProtocolError for anything amiss (the view may
        then hold part of the page: work on a copy)."""
        if not isinstance(doc, dict) or not isinstance(doc.get("entries"), list):
            raise ProtocolError("the directory is malformed")
        entries: list[Any] = doc["entries"]
        more = doc.get("more") is True
        if kept is not None and self.head.seq < kept.seq:
            cut = kept.seq - self.head.seq
            self.apply(entries[:cut])
            if self.head.seq < kept.seq:
                if not more:
                    raise ProtocolError("the directory is shorter than the history seen before")
                return True
            if self.head != kept:
                raise ProtocolError("the directory's history is not a continuation of the one seen before")
            entries = entries[cut:]
        self.apply(entries)
        if not more and Head.parse(doc.get("head")) != self.head:
            raise ProtocolError("the directory's head does not match its entries")
        return more

    def usable(self, now: float) -> dict[str, tuple[Certificate, KeyStatement]]:
        """Nodes a request may be sealed to at ``now``: certified, not revoked, with a valid key."""
        out: dict[str, tuple[Certificate, KeyStatement]] = {}
        for node_id, node in self.nodes.items():
            key = node.current_key(now)
            if key is not None:
                out[node_id] = (node.certificate, key)
        return out


MAX_KEYS_KEPT = 4  # a node's newest statements; older ones have expired long before


__all__ = [
    "EMPTY",
    "GENESIS",
    "KINDS",
    "MAX_DIRECTORY_BYTES",
    "Directory",
    "Head",
    "KeyStatement",
    "NodeEntry",
    "canonical",
    "entry_hash",
    "key_id",
    "make_entry",
    "make_key_statement",
    "verify_key_statement",
]
