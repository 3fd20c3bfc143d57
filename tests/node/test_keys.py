"""A node's end-to-end keys (rotation, statements) and its replay memory across restarts."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from node.keys import COMPACT_SLACK, GRACE_S, NodeKeys, ReplayMemory
from protocol.directory import verify_key_statement
from protocol.envelope import EnvelopeError
from protocol.identity import Identity


def test_the_first_key_is_the_enrollment_key_and_its_statement_verifies(tmp_path: Path) -> None:
    ident = Identity.generate()
    keys = NodeKeys(tmp_path, ident, "gpu-1", rotation_s=3600)
    statement, doc = keys.current()
    assert verify_key_statement(doc, ident.public_b64) == statement
    assert statement.not_after - statement.not_before == 7200
    assert (tmp_path / "encryption.key").stat().st_mode & 0o077 == 0
    again = NodeKeys(tmp_path, ident, "gpu-1", rotation_s=3600)
    assert again.current()[0] == statement, "a restart keeps the key and its statement"


def test_rotation_makes_a_new_key_keeps_the_old_one_while_needed_then_forgets_it(tmp_path: Path) -> None:
    ident = Identity.generate()
    keys = NodeKeys(tmp_path, ident, "gpu-1", rotation_s=3600)
    first, _ = keys.current()
    now = first.not_before
    assert not keys.rotate_if_due(now + 10)
    assert keys.rotate_if_due(now + 3600)
    second, _ = keys.current()
    assert second.key_id != first.key_id and second.not_before == now + 3600
    assert set(keys.private_keys(now + 3700)) == {first.key_id, second.key_id}, (
        "envelopes sealed earlier open"
    )
    keys.rotate_if_due(first.not_after + GRACE_S + 1)
    assert first.key_id not in keys.private_keys(first.not_after + GRACE_S + 1)
    restarted = NodeKeys(tmp_path, ident, "gpu-1", rotation_s=3600)
    assert restarted.current()[0].key_id != first.key_id


def test_replay_memory_survives_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "replay.log"
    now = time.time()
    memory = ReplayMemory(path)
    memory.remember("a" * 64, int(now) + 60, now)
    with pytest.raises(EnvelopeError):
        memory.remember("a" * 64, int(now) + 60, now)
    memory.close()
    restarted = ReplayMemory(path)
    with pytest.raises(EnvelopeError):
        restarted.remember("a" * 64, int(now) + 60, now)
    restarted.remember("b" * 64, int(now) + 60, now)
    restarted.close()
    assert path.stat().st_mode & 0o077 == 0


def test_replay_memory_forgets_what_has_expired(tmp_path: Path) -> None:
    path = tmp_path / "replay.log"
    memory = ReplayMemory(path)
    memory.remember("c" * 64, int(time.time()) - 3600, time.time())
    memory.close()
    ReplayMemory(path).close()
    assert "c" * 64 not in path.read_text()


def test_a_long_running_nodes_replay_log_stays_bounded(tmp_path: Path) -> None:
    path = tmp_path / "replay.log"
    memory = ReplayMemory(path)
    now = time.time()
    for i in range(30_000):  # months of requests, their windows long closed
        memory.remember(f"{i:064x}", int(now) - 3600, now)
    memory.remember("f" * 64, int(now) + 60, now)  # one still open
    lines = path.read_text().splitlines()
    assert len(lines) < 2 * 4096 + COMPACT_SLACK + 10
    with pytest.raises(EnvelopeError):
        memory.remember("f" * 64, int(now) + 60, now)
    memory.close()
