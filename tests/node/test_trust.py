"""What a node keeps on disk about whom it serves: private files, a certificate only for its own keys."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from node.trust import Enrollment, Trust
from protocol.errors import ProtocolError
from protocol.identity import Identity, issue_certificate


def test_keys_and_enrollment_are_private_and_survive_a_restart(tmp_path: Path) -> None:
    trust = Trust.open(tmp_path / "node")
    scheduler = Identity.generate()
    trust.enroll(Enrollment("http://127.0.0.1:8000", scheduler.public_b64, None, "n1", "club"))
    trust.enroll(Enrollment("http://127.0.0.1:9000", scheduler.public_b64, None, "n1", "club"))  # replaced
    for name in ("identity.key", "encryption.key", "enrollment.json"):
        assert stat.S_IMODE((tmp_path / "node" / name).stat().st_mode) == 0o600, name
    again = Trust.open(tmp_path / "node")
    assert again.identity.public_b64 == trust.identity.public_b64
    assert again.enrollment is not None and again.enrollment.scheduler_url == "http://127.0.0.1:9000"
    assert again.scheduler_key == scheduler.public_raw
    again.revoked = True
    assert again.scheduler_key is None, "a revoked node trusts nobody"


def test_a_certificate_for_other_keys_is_refused(tmp_path: Path) -> None:
    trust = Trust.open(tmp_path / "node")
    authority, other = Identity.generate(), Identity.generate()
    cert = issue_certificate(
        authority, node_id="n1", tier="club", identity_key=other.public_b64,
        encryption_key=trust.encryption_public, scheduler_key=other.public_b64,
    )  # fmt: skip
    with pytest.raises(ProtocolError, match="another machine"):
        trust.accept_certificate(cert, authority.public_b64)
    mine = issue_certificate(
        authority, node_id="n1", tier="club", identity_key=trust.identity.public_b64,
        encryption_key=trust.encryption_public, scheduler_key=other.public_b64,
    )  # fmt: skip
    assert trust.accept_certificate(mine, authority.public_b64).node_id == "n1"
    assert stat.S_IMODE((tmp_path / "node" / "certificate.json").stat().st_mode) == 0o600
