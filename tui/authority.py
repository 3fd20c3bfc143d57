"""Approving a node on the operator's machine: the federation authority key signs its certificate here.

The authority key never goes to the scheduler (a scheduler that could mint certificates could slip in a
node of its own and read prompts), so approval happens where the key is: `hearth enroll approve` and the
console's Approvals screen both sign with these functions, then send only the signed certificate.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from protocol import identity
from protocol.admin import Enrollment
from protocol.errors import ConfigError
from tui.client import ConsoleClient


def default_authority_dir() -> Path:
    """Where `hearth authority init` puts the key by default: $XDG_CONFIG_HOME/hearth/authority, else
    ~/.config/hearth/authority."""
    return identity.default_authority_dir()


def load_authority_key(authority_dir: Path) -> identity.Identity:
    """The operator's authority key, or a ConfigError that says where it was looked for."""
    path = authority_dir / identity.AUTHORITY_FILE
    if not os.path.lexists(path):
        raise ConfigError(
            f"no authority key at {path}: approving a node needs the operator's authority key, which lives "
            "on the operator's machine, never on the scheduler; run `hearth authority init` there, or give "
            "the folder that holds it (--dir)"
        )
    return identity.load_authority(authority_dir)


def sign_enrollment(authority_dir: Path, enrollment: Enrollment, scheduler_key: str) -> dict[str, Any]:
    """The certificate document {certificate, signature} that approves ``enrollment`` for the scheduler
    whose key is ``scheduler_key`` (GET /admin/authority). Reads a file: call it off the event loop."""
    key = load_authority_key(authority_dir)
    return identity.issue_certificate(
        key,
        node_id=enrollment.node_id,
        tier=enrollment.tier,
        identity_key=enrollment.identity_key,
        encryption_key=enrollment.encryption_key,
        scheduler_key=scheduler_key,
    )


async def approve_enrollment(client: ConsoleClient, authority_dir: Path, node_id: str) -> Enrollment:
    """Approve the enrollment ``node_id``: check the scheduler trusts this authority, sign its certificate
    here and send it. ConfigError when the key is missing, is not the one the scheduler trusts, or there is
    no such enrollment."""
    key = await asyncio.to_thread(load_authority_key, authority_dir)
    keys = await client.authority()
    if keys.authority_key != key.public_b64:
        raise ConfigError(
            "this scheduler trusts another authority key (or none): set its authority_key to "
            f"{key.public_b64} and restart it"
        )
    enrollments = (await client.enrollments()).enrollments
    record = next((e for e in enrollments if e.node_id == node_id), None)
    if record is None:
        raise ConfigError(f"no enrollment called {node_id} (see `hearth enroll list`)")
    certificate = await asyncio.to_thread(sign_enrollment, authority_dir, record, keys.scheduler_key)
    return await client.approve(node_id, certificate)
