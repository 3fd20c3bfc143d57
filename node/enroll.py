"""`hearth node enroll`: a volunteer's machine asks a scheduler to join, with the operator's one-time code.

The node makes its keys (if it has none), proves it holds the identity key by signing the code with it,
and pins the scheduler key and authority key the scheduler answers with. It is then a pending enrollment
until the operator approves it; `hearth node start` heartbeats meanwhile and picks the certificate up.
"""

from __future__ import annotations

import json
import re
import socket
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from node.trust import Enrollment, Trust
from protocol.errors import ConfigError, HearthError
from protocol.federation import EnrollReply, EnrollRequest, parse, proof_message
from protocol.identity import b64e

TIMEOUT_S = 30.0


def default_node_id() -> str:
    """This machine's host name, made into a valid node id."""
    name = re.sub(r"[^a-z0-9-]+", "-", socket.gethostname().lower()).strip("-")[:63]
    return name if name and name[0].isalnum() else "node"


def enroll(
    data_dir: Path, scheduler_url: str, code: str, node_id: str, public_url: str | None
) -> EnrollReply:
    """Enroll this machine (blocking); returns what the scheduler said and saves the enrollment."""
    url = scheduler_url.rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"{scheduler_url} is not a scheduler URL (it starts with http:// or https://)")
    trust = Trust.open(data_dir)
    identity_key, encryption_key = trust.identity.public_b64, trust.encryption_public
    proof = trust.identity.sign(proof_message(code, node_id, identity_key, encryption_key))
    try:
        request = EnrollRequest(
            code=code, node_id=node_id, identity_key=identity_key, encryption_key=encryption_key,
            url=public_url, proof=b64e(proof),
        )  # fmt: skip
    except ValidationError as exc:
        field = ".".join(str(p) for p in exc.errors()[0]["loc"])
        what = {"code": "an enrollment code", "url": "a URL (--public-url)"}.get(field, f"a valid {field}")
        raise ConfigError(f"that is not {what}") from None
    doc = _post(url + "/v1/enroll", request.model_dump(exclude_none=True))
    reply: EnrollReply = parse(EnrollReply, doc)
    if reply.node_id != node_id:
        raise ConfigError("the scheduler answered for another node; not saved")
    trust.enroll(Enrollment(url, reply.scheduler_key, reply.authority_key, reply.node_id, reply.tier))
    return reply


def _post(url: str, doc: dict[str, Any]) -> Any:
    req = urllib.request.Request(
        url, data=json.dumps(doc).encode(), method="POST", headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT_S) as resp:
            return json.loads(resp.read(64 * 1024))
    except urllib.error.HTTPError as exc:
        try:
            body = json.loads(exc.read(64 * 1024))
        except ValueError:
            body = None
        raise HearthError.from_body(exc.code, body) from None
    except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
        raise ConfigError(f"cannot reach the scheduler at {url}: {getattr(exc, 'reason', exc)}") from None
    except ValueError:
        raise ConfigError("the scheduler's answer is not JSON") from None
