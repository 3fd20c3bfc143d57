"""A node's end-to-end keys: rotating X25519 encryption keys with signed statements, and replay memory.

Files in the node's data dir:

    encryption.key        the key made at enrollment: the first one statements name
    e2e/<not_before>.key  keys made by rotation (0600, written once), named by when they start
    e2e/<key id>.json     each key's statement, signed by the node's identity key (public)
    e2e/replay.log        envelopes already opened: "<expires_at> <header hash>" per line

A new key is made every ``rotation_s`` seconds; each statement is valid for twice that, so a proxy that
fetched the directory a while ago still seals to a key the node holds. A key is deleted once its statement
has expired and no envelope sealed to it can still be inside its time window.

Replay memory is on disk so that a restart does not reopen the door: an envelope is remembered (by the hash
of its header, which names its request id and times) until its window has closed. The line is written
before any work starts. Nothing in it says anything about what the request asked.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from protocol.directory import KeyStatement, key_id, make_key_statement, verify_key_statement
from protocol.envelope import MAX_SKEW_S, MAX_TTL_S, EnvelopeError, public_key_bytes
from protocol.errors import ConfigError, ProtocolError
from protocol.identity import Identity, load_or_create_encryption_key, write_private

log = logging.getLogger("hearth.node.keys")

GRACE_S = MAX_TTL_S + 2 * MAX_SKEW_S  # how long after its statement a key may still be needed
MAX_REPLAY_LINE = 128


class NodeKeys:
    """The node's encryption keys by key id, and the statement of the current one."""

    def __init__(self, data_dir: Path, identity: Identity, node_id: str, *, rotation_s: float) -> None:
        self._dir = data_dir / "e2e"
        self._identity = identity
        self._node_id = node_id
        self._rotation_s = int(rotation_s)
        self._lock = threading.Lock()
        self._keys: dict[str, tuple[X25519PrivateKey, KeyStatement, dict[str, Any]]] = {}
        self._load(load_or_create_encryption_key(data_dir / "encryption.key"))

    def _statement_path(self, kid: str) -> Path:
        return self._dir / f"{kid}.json"

    def _load(self, first: X25519PrivateKey) -> None:
        self._dir.mkdir(mode=0o700, exist_ok=True)
        candidates = [first]
        for path in sorted(self._dir.glob("*.key")):
            candidates.append(load_or_create_encryption_key(path))
        for key in candidates:
            kid = key_id(public_key_bytes(key.public_key()))
            path = self._statement_path(kid)
            if not path.is_file():
                continue
            try:
                doc = json.loads(path.read_text())
                statement = verify_key_statement(doc, self._identity.public_b64)
            except (OSError, ValueError, ProtocolError) as exc:
                log.warning("ignoring the statement %s: %s", path.name, exc)
                continue
            if statement.node_id == self._node_id and statement.key_id == kid:
                self._keys[kid] = (key, statement, doc)
        if not self._keys:
            self._adopt(first, int(time.time()))

    def _adopt(self, key: X25519PrivateKey, now: int) -> None:
        raw = public_key_bytes(key.public_key())
        lifetime = min(2 * self._rotation_s, 7 * 24 * 3600)
        doc = make_key_statement(
            self._identity, node_id=self._node_id, public_raw=raw, not_before=now, not_after=now + lifetime
        )
        kid = key_id(raw)
        write_private(self._statement_path(kid), json.dumps(doc).encode(), replace=True)
        statement = verify_key_statement(doc, self._identity.public_b64)
        self._keys[kid] = (key, statement, doc)

    def current(self) -> tuple[KeyStatement, dict[str, Any]]:
        with self._lock:
            _, statement, doc = max(self._keys.values(), key=lambda v: (v[1].not_before, v[1].key_id))
            return statement, doc

    def rotate_if_due(self, now: float | None = None) -> bool:
        """Make a new key when the current one is ``rotation_s`` old; forget keys no one can use. Blocking
        (it writes files): call it off the event loop."""
        now = int(time.time() if now is None else now)
        statement, _ = self.current()
        rotated = False
        with self._lock:
            if now >= statement.not_before + self._rotation_s:
                key = load_or_create_encryption_key(self._dir / f"{now}.key")
                self._adopt(key, now)
                rotated = True
                log.info("rotated the encryption key (now %s)", key_id(public_key_bytes(key.public_key())))
            for kid, (_, old, _) in list(self._keys.items()):
                if old.not_after + GRACE_S < now and len(self._keys) > 1:
                    del self._keys[kid]
                    self._statement_path(kid).unlink(missing_ok=True)
                    (self._dir / f"{old.not_before}.key").unlink(missing_ok=True)
        return rotated

    def private_keys(self, now: float) -> dict[str, X25519PrivateKey]:
        """Keys an envelope may be sealed to at ``now``."""
        with self._lock:
            return {
                kid: key
                for kid, (key, st, _) in self._keys.items()
                if st.not_before - MAX_SKEW_S <= now <= st.not_after + GRACE_S
            }


COMPACT_SLACK = 8192  # lines of expired entries the replay log may carry before it is rewritten


class ReplayMemory:
    """Envelopes this node has opened, until their windows close; kept on disk across restarts."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._lock = threading.Lock()
        self._seen: dict[str, int] = {}
        now = int(time.time())
        try:
            lines = path.read_text().splitlines()
        except FileNotFoundError:
            lines = []
        for line in lines:
            parts = line.split(" ")
            if len(parts) == 2 and parts[0].isdigit() and int(parts[0]) + MAX_SKEW_S >= now:
                self._seen[parts[1]] = int(parts[0])
        self._fd = -1
        self._compact()

    def _compact(self) -> None:
        """Rewrite the file without what has expired (atomically), then append to the new one. A rewrite
        that fails leaves the old file, and its descriptor, in use."""
        text = "".join(f"{exp} {digest}\n" for digest, exp in self._seen.items())
        write_private(self._path, text.encode(), replace=True)
        fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        old, self._fd = self._fd, fd
        if old >= 0:
            os.close(old)
        self._lines = len(self._seen)

    def remember(self, digest: str, expires_at: int, now: float) -> None:
        """Raise EnvelopeError when ``digest`` was seen before; otherwise record it (blocking: a write)."""
        with self._lock:
            if digest in self._seen:
                raise EnvelopeError()
            if len(self._seen) > 4096:
                self._seen = {d: e for d, e in self._seen.items() if e + MAX_SKEW_S >= now}
            self._seen[digest] = expires_at
            os.write(self._fd, f"{expires_at} {digest}\n".encode()[:MAX_REPLAY_LINE])
            self._lines += 1
            if self._lines > 2 * len(self._seen) + COMPACT_SLACK:
                # A node that runs for months must not grow the file for ever; if the disk refuses the
                # rewrite, appending goes on (every entry is on disk already) and it is tried again later.
                try:
                    self._compact()
                except ConfigError as exc:
                    self._lines = len(self._seen)
                    log.warning("the replay log could not be compacted: %s", exc.message)

    def close(self) -> None:
        os.close(self._fd)
