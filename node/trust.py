"""What a node knows of who may use it: its own keys, its scheduler, and its certificate.

Files in the node's data dir (keys 0600, written once):

    identity.key     Ed25519: signs heartbeats, proves enrollment; its fingerprint names the node on the LAN
    encryption.key   X25519: the key prompts will be sealed to (end-to-end encryption)
    enrollment.json  the scheduler's URL and public key, the authority key, node id and tier
    certificate.json the certificate the operator's authority signed at approval

The node accepts calls only when they are signed by the scheduler key it pinned at enrollment (or the one
a certificate from its pinned authority names), for this node, recently, and never twice.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from protocol.errors import ConfigError, ProtocolError
from protocol.identity import (
    Certificate,
    Identity,
    RequestVerifier,
    b64d,
    encryption_public_b64,
    fingerprint,
    load_or_create_encryption_key,
    load_or_create_identity,
    verify_certificate,
    write_private,
)

log = logging.getLogger("hearth.node.trust")


@dataclass
class Enrollment:
    scheduler_url: str
    scheduler_key: str
    authority_key: str | None
    node_id: str
    tier: str

    @classmethod
    def load(cls, path: Path) -> Enrollment | None:
        if not path.is_file():
            return None
        try:
            doc: Any = json.loads(path.read_text())
            return cls(
                str(doc["scheduler_url"]), str(doc["scheduler_key"]), doc.get("authority_key"),
                str(doc["node_id"]), str(doc["tier"]),
            )  # fmt: skip
        except (ValueError, KeyError, TypeError):
            raise ConfigError(f"{path} is damaged; enroll again with `hearth node enroll`") from None

    def save(self, path: Path) -> None:
        write_private(path, (json.dumps(self.__dict__, indent=2) + "\n").encode(), replace=True)


class Trust:
    """The node's keys and the scheduler it serves; blocking file I/O happens in ``open`` only."""

    def __init__(self, data_dir: Path, identity: Identity, encryption: X25519PrivateKey) -> None:
        self.data_dir = data_dir
        self.identity = identity
        self.encryption = encryption
        self.enrollment = Enrollment.load(data_dir / "enrollment.json")
        self.certificate: Certificate | None = None
        self.revoked = False
        cert_path = data_dir / "certificate.json"
        if cert_path.is_file() and self.enrollment is not None and self.enrollment.authority_key:
            try:
                self.certificate = verify_certificate(
                    json.loads(cert_path.read_text()), self.enrollment.authority_key
                )
            except (ValueError, ProtocolError, ConfigError):
                log.warning("ignoring an unreadable certificate at %s", cert_path)

    @classmethod
    def open(cls, data_dir: Path) -> Trust:
        return cls(
            data_dir,
            load_or_create_identity(data_dir / "identity.key"),
            load_or_create_encryption_key(data_dir / "encryption.key"),
        )

    @property
    def encryption_public(self) -> str:
        return encryption_public_b64(self.encryption)

    @property
    def scheduler_key(self) -> bytes | None:
        if self.revoked or self.enrollment is None:
            return None
        return b64d(self.enrollment.scheduler_key, length=32)

    def verifier(self, node_id: str) -> RequestVerifier:
        def lookup(fp: str) -> bytes | None:
            key = self.scheduler_key
            return key if key is not None and fingerprint(key) == fp else None

        return RequestVerifier(node_id, lookup)

    def enroll(self, enrollment: Enrollment) -> None:
        enrollment.save(self.data_dir / "enrollment.json")
        self.enrollment = enrollment
        self.revoked = False

    def accept_certificate(self, doc: Any, authority_key: str) -> Certificate:
        """Check a certificate against the pinned authority and keep it (blocking: small file write)."""
        cert = verify_certificate(doc, authority_key)
        if cert.identity_key != self.identity.public_b64 or cert.encryption_key != self.encryption_public:
            raise ProtocolError("the certificate is for another machine's keys")
        write_private(self.data_dir / "certificate.json", (json.dumps(doc) + "\n").encode(), replace=True)
        self.certificate = cert
        return cert
