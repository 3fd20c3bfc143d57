"""The node directory: what a proxy accepts, and every forgery or rewrite it must refuse."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.directory import (
    EMPTY,
    GENESIS,
    Directory,
    Head,
    entry_hash,
    make_entry,
    make_key_statement,
    verify_key_statement,
)
from protocol.envelope import public_key_bytes
from protocol.errors import ProtocolError
from protocol.identity import Identity, b64e, issue_certificate

NOW = 1_800_000_000
AUTHORITY = Identity.generate()
SCHEDULER = Identity.generate()


def node(node_id: str, authority: Identity = AUTHORITY) -> tuple[Identity, dict[str, Any]]:
    ident = Identity.generate()
    cert = issue_certificate(
        authority, node_id=node_id, tier="club", identity_key=ident.public_b64,
        encryption_key=b64e(public_key_bytes(X25519PrivateKey.generate().public_key())),
        scheduler_key=SCHEDULER.public_b64, now=NOW,
    )  # fmt: skip
    return ident, cert


def statement(ident: Identity, node_id: str, start: int = NOW, end: int = NOW + 3600) -> dict[str, Any]:
    raw = public_key_bytes(X25519PrivateKey.generate().public_key())
    return make_key_statement(ident, node_id=node_id, public_raw=raw, not_before=start, not_after=end)


def log(*items: tuple[str, dict[str, Any]]) -> list[dict[str, Any]]:
    entries, prev = [], GENESIS
    for seq, (kind, doc) in enumerate(items):
        entry = make_entry(seq, prev, kind, doc, NOW)  # type: ignore[arg-type]
        entries.append(entry)
        prev = entry_hash(entry)
    return entries


def test_a_certified_node_with_a_current_key_is_usable() -> None:
    ident, cert = node("gpu-1")
    st = statement(ident, "gpu-1")
    d = Directory(AUTHORITY.public_b64)
    d.apply(log(("certificate", cert), ("key", st)))
    usable = d.usable(NOW + 10)
    assert list(usable) == ["gpu-1"] and usable["gpu-1"][1].key_id == st["statement"]["key_id"]
    assert d.usable(NOW + 3601) == {}, "an expired statement makes the node unusable"
    assert d.head.seq == 2 and d.head != EMPTY


def test_a_rotated_key_replaces_the_old_one() -> None:
    ident, cert = node("gpu-1")
    old, new = statement(ident, "gpu-1"), statement(ident, "gpu-1", NOW + 100, NOW + 4000)
    d = Directory(AUTHORITY.public_b64)
    d.apply(log(("certificate", cert), ("key", old), ("key", new)))
    assert d.usable(NOW + 200)["gpu-1"][1].key_id == new["statement"]["key_id"]


def test_a_revoked_node_is_not_usable() -> None:
    ident, cert = node("gpu-1")
    d = Directory(AUTHORITY.public_b64)
    d.apply(log(("certificate", cert), ("key", statement(ident, "gpu-1")), ("revoke", {"node_id": "gpu-1"})))
    assert d.usable(NOW) == {}


def test_a_certificate_from_another_authority_is_refused() -> None:
    _, cert = node("evil", authority=Identity.generate())
    with pytest.raises(ProtocolError, match="another authority"):
        Directory(AUTHORITY.public_b64).apply(log(("certificate", cert)))


def test_a_key_statement_signed_by_anyone_else_is_refused() -> None:
    ident, cert = node("gpu-1")
    forged = statement(Identity.generate(), "gpu-1")  # the scheduler's own key, say
    with pytest.raises(ProtocolError):
        Directory(AUTHORITY.public_b64).apply(log(("certificate", cert), ("key", forged)))
    tampered = statement(ident, "gpu-1")
    tampered["statement"]["not_after"] += 1
    with pytest.raises(ProtocolError):
        Directory(AUTHORITY.public_b64).apply(log(("certificate", cert), ("key", tampered)))


def test_statements_valid_too_long_or_backwards_are_refused() -> None:
    ident, _ = node("gpu-1")
    with pytest.raises(ProtocolError):
        statement(ident, "gpu-1", NOW, NOW + 8 * 86400)
    with pytest.raises(ProtocolError):
        statement(ident, "gpu-1", NOW, NOW)


def test_a_forked_history_is_refused_and_changes_nothing() -> None:
    ident, cert = node("gpu-1")
    entries = log(("certificate", cert), ("key", statement(ident, "gpu-1")))
    d = Directory(AUTHORITY.public_b64)
    d.apply(entries[:1])
    seen = d.head
    # The scheduler rewrites entry 0 (another certificate) and serves a continuation of that instead.
    _, other = node("gpu-1")
    fork = log(("certificate", other), ("key", statement(ident, "gpu-1")))
    with pytest.raises(ProtocolError, match="continuation"):
        d.apply(fork[1:])
    assert d.head == seen
    # Skipped or repeated entries are refused too.
    with pytest.raises(ProtocolError):
        d.apply(entries[:1])


def test_a_changed_entry_is_detected_by_the_next_link() -> None:
    ident, cert = node("gpu-1")
    entries = log(("certificate", cert), ("key", statement(ident, "gpu-1")), ("revoke", {"node_id": "gpu-1"}))
    changed = copy.deepcopy(entries)
    changed[1]["at"] += 1
    with pytest.raises(ProtocolError):
        Directory(AUTHORITY.public_b64).apply(changed)


def test_keys_for_unknown_nodes_and_unknown_kinds_are_refused() -> None:
    ident, _ = node("gpu-1")
    with pytest.raises(ProtocolError):
        Directory(AUTHORITY.public_b64).apply(log(("key", statement(ident, "gpu-1"))))
    with pytest.raises(ProtocolError):
        Directory(AUTHORITY.public_b64).apply(log(("secret", {})))
    with pytest.raises(ProtocolError):
        Directory(AUTHORITY.public_b64).apply([{"seq": 0}])


def test_verify_key_statement_checks_the_id_is_the_keys_fingerprint() -> None:
    ident, _ = node("gpu-1")
    st = statement(ident, "gpu-1")
    assert verify_key_statement(st, ident.public_b64).node_id == "gpu-1"
    st["statement"]["key_id"] = "0" * 20
    with pytest.raises(ProtocolError):
        verify_key_statement(st, ident.public_b64)


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=6),
    max_leaves=25,
)


@settings(max_examples=200, deadline=None)
@given(st.lists(_JSON, max_size=4))
def test_the_log_parser_raises_only_the_protocol_error(entries: list[object]) -> None:
    directory = Directory(AUTHORITY.public_b64)
    try:
        directory.apply(entries)
    except ProtocolError:
        assert directory.head == EMPTY, "a refused batch changes nothing"
        return
    assert entries == [], "only an empty batch applies"


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_a_mutated_entry_is_refused(data: st.DataObject) -> None:
    ident, cert = node("gpu-1")
    entries = log(("certificate", cert), ("key", statement(ident, "gpu-1")))
    honest = Directory(AUTHORITY.public_b64)
    honest.apply(entries)
    i = data.draw(st.integers(0, 1))
    key = data.draw(st.sampled_from(["seq", "prev", "kind", "doc", "at"]))
    value = data.draw(_JSON)
    if entries[i][key] == value:
        return
    entries[i][key] = value
    mutated = Directory(AUTHORITY.public_b64)
    try:
        mutated.apply(entries)
    except ProtocolError:
        return
    # Only the last entry's time can change without breaking a link; the head then differs, so a client
    # holding the served head (or a later entry linking to it) sees it.
    assert (i, key) == (1, "at") and mutated.head != honest.head


def _page(entries: list[dict[str, Any]], since: int, size: int, total_head: Head) -> dict[str, Any]:
    page = entries[since : since + size]
    return {"entries": page, "more": since + len(page) < len(entries), "head": total_head.to_json()}


def test_pages_apply_in_turn_and_must_lead_through_the_kept_head() -> None:
    ident, cert = node("gpu-1")
    entries = log(
        ("certificate", cert), *[("key", statement(ident, "gpu-1", NOW + i, NOW + 3600)) for i in range(5)]
    )
    full = Directory(AUTHORITY.public_b64)
    full.apply(entries)
    kept = Head(3, entry_hash(entries[2]))
    d = Directory(AUTHORITY.public_b64)
    while d.apply_page(_page(entries, d.head.seq, 2, full.head), kept):
        pass
    assert d.head == full.head
    # A served history that does not pass through the kept head, or ends before it, is refused.
    with pytest.raises(ProtocolError, match="continuation"):
        Directory(AUTHORITY.public_b64).apply_page(_page(entries, 0, 10, full.head), Head(3, "0" * 64))
    with pytest.raises(ProtocolError, match="shorter"):
        Directory(AUTHORITY.public_b64).apply_page(_page(entries[:2], 0, 10, full.head), kept)
    with pytest.raises(ProtocolError, match="head"):
        Directory(AUTHORITY.public_b64).apply_page(_page(entries, 0, 10, EMPTY))


def test_a_copy_is_independent() -> None:
    _, cert = node("gpu-1")
    d = Directory(AUTHORITY.public_b64)
    d.apply(log(("certificate", cert)))
    other = d.copy()
    other.nodes["gpu-1"].revoked = True
    assert not d.nodes["gpu-1"].revoked
