"""The E2E envelope: what opens, and every tampering that must not."""

from __future__ import annotations

import dataclasses

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.directory import key_id
from protocol.envelope import (
    MAX_CANDIDATES,
    Candidate,
    EnvelopeError,
    ResponseOpener,
    ResponseSealer,
    Sealed,
    Wrap,
    bucket_for,
    from_wire,
    open_request,
    peek,
    public_key_bytes,
    response_secret,
    seal_request,
    to_wire,
)
from protocol.errors import InvalidRequest

NODES = {name: X25519PrivateKey.generate() for name in ("n1", "n2", "n3")}
KIDS = {n: key_id(public_key_bytes(k.public_key())) for n, k in NODES.items()}
CANDIDATES = [Candidate(n, KIDS[n], k.public_key()) for n, k in NODES.items()]
BODY = b'{"model": "m", "messages": [{"role": "user", "content": "CANARY the secret words"}]}'
NOW = 1_800_000_000


def seal(body: bytes = BODY, **changes: object) -> tuple[Sealed, bytes]:
    args: dict[str, object] = {
        "endpoint": "chat", "model": "m", "max_tokens": 64, "stream": True, "request_id": "req1",
        "issued_at": NOW, "ttl_s": 60, "candidates": CANDIDATES, **changes,
    }  # fmt: skip
    return seal_request(body, **args)  # type: ignore[arg-type]


def open_as(sealed: Sealed, node: str = "n2", kid: str | None = None, now: int = NOW) -> tuple[bytes, bytes]:
    return open_request(sealed, node_id=node, keys={kid or KIDS[node]: NODES[node]}, now=now, skew_s=0)


def test_every_candidate_opens_the_same_body_and_answers_with_its_own_secret() -> None:
    sealed, seed = seal()
    opened = {n: open_as(sealed, n) for n in NODES}
    assert {body for body, _ in opened.values()} == {BODY}
    assert {s for _, s in opened.values()} == {seed}
    assert len({response_secret(seed, n, "req1") for n in NODES}) == 3
    assert b"CANARY" not in sealed.ciphertext and sealed.header.bucket == 1024


def test_the_wire_form_round_trips() -> None:
    sealed, _ = seal()
    assert from_wire(to_wire(sealed)) == sealed
    assert "choices" not in to_wire(sealed)["header"], "one choice: the header as before the field"
    several, _ = seal(choices=6)
    assert to_wire(several)["header"]["choices"] == 6 and from_wire(to_wire(several)) == several
    for bad in (0, 65, True, "2"):
        doc = to_wire(several)
        doc["header"]["choices"] = bad
        with pytest.raises(EnvelopeError):
            from_wire(doc)


# (what an attacker changes) → the node refuses before doing any work
# fmt: off
TAMPERING = [
    ("model", lambda s: dataclasses.replace(s, header=dataclasses.replace(s.header, model="bigger-model"))),
    ("max_tokens", lambda s: dataclasses.replace(s, header=dataclasses.replace(s.header, max_tokens=8000))),
    ("stream", lambda s: dataclasses.replace(s, header=dataclasses.replace(s.header, stream=False))),
    ("request id", lambda s: dataclasses.replace(s, header=dataclasses.replace(s.header, request_id="req2"))),
    ("choices", lambda s: dataclasses.replace(s, header=dataclasses.replace(s.header, choices=2))),
    ("expiry", lambda s: dataclasses.replace(s, header=dataclasses.replace(s.header, expires_at=NOW + 10**6))),
    ("wrap moved to another node", lambda s: dataclasses.replace(
        s, wraps={**s.wraps, "n2": Wrap(s.wraps["n2"].key_id, s.wraps["n1"].data)})),
    ("endpoint", lambda s: dataclasses.replace(s, header=dataclasses.replace(s.header, endpoint="completion"))),
    ("wrap missing", lambda s: dataclasses.replace(s, wraps={"n1": s.wraps["n1"]})),
    ("nonce", lambda s: dataclasses.replace(s, nonce=bytes(12))),
    ("body cut", lambda s: dataclasses.replace(s, ciphertext=s.ciphertext[:-1])),
]
# fmt: on


@pytest.mark.parametrize(("what", "tamper"), TAMPERING, ids=[t[0] for t in TAMPERING])
def test_tampering_is_refused_with_one_error(what: str, tamper: object) -> None:
    sealed, _ = seal()
    with pytest.raises(EnvelopeError) as info:
        open_as(tamper(sealed))  # type: ignore[operator]
    assert info.value.message == "the end-to-end envelope could not be opened"


def test_the_key_id_is_bound() -> None:
    sealed, _ = seal()
    with pytest.raises(EnvelopeError):
        open_as(sealed, kid="0" * 20)  # the node holds no key of the id the wrap names
    relabelled = dataclasses.replace(
        sealed, wraps={**sealed.wraps, "n2": Wrap("f" * 20, sealed.wraps["n2"].data)}
    )
    with pytest.raises(EnvelopeError):
        open_as(relabelled, kid="f" * 20)  # the right key under another id: the id is in HPKE's info


@pytest.mark.parametrize("now", [NOW - 1, NOW + 61])
def test_outside_its_time_window_it_is_refused(now: int) -> None:
    sealed, _ = seal()
    with pytest.raises(EnvelopeError):
        open_as(sealed, now=now)


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_any_flipped_byte_is_detected(data: st.DataObject) -> None:
    sealed, _ = seal()
    field = data.draw(st.sampled_from(["ciphertext", "wrap"]))
    blob = bytearray(sealed.ciphertext if field == "ciphertext" else sealed.wraps["n2"].data)
    i = data.draw(st.integers(0, len(blob) - 1))
    blob[i] ^= data.draw(st.integers(1, 255))
    if field == "ciphertext":
        sealed = dataclasses.replace(sealed, ciphertext=bytes(blob))
    else:
        sealed = dataclasses.replace(sealed, wraps={**sealed.wraps, "n2": Wrap(KIDS["n2"], bytes(blob))})
    with pytest.raises(EnvelopeError):
        open_as(sealed)


def test_limits_are_checked_before_work() -> None:
    many = [Candidate(f"x{i}", KIDS["n1"], NODES["n1"].public_key()) for i in range(MAX_CANDIDATES + 1)]
    with pytest.raises(InvalidRequest):
        seal(candidates=many)  # too many candidates
    with pytest.raises(InvalidRequest):
        seal(candidates=CANDIDATES + CANDIDATES[:1])  # the same node twice
    with pytest.raises(InvalidRequest):
        seal(candidates=[])
    with pytest.raises(InvalidRequest):
        bucket_for(5 * 1024 * 1024)  # over the body limit
    assert [bucket_for(n) for n in (0, 1000, 1005, 3000)] == [1024, 1024, 2048, 4096]


def frames(n: int = 4) -> tuple[list[bytes], bytes]:
    secret = bytes(range(32))
    sealer = ResponseSealer(secret, "req1")
    out = [sealer.seal(f"token {i}".encode(), final=i == n - 1) for i in range(n)]
    return out, secret


def read(sent: list[bytes], finals: list[bool], secret: bytes) -> list[bytes]:
    opener = ResponseOpener(secret, "req1")
    got = [opener.open(f, final=fin) for f, fin in zip(sent, finals, strict=True)]
    opener.finish()
    return got


def test_a_response_opens_in_order_and_complete() -> None:
    sent, secret = frames()
    assert read(sent, [False, False, False, True], secret) == [b"token 0", b"token 1", b"token 2", b"token 3"]
    assert {len(f) for f in sent} == {64 + 16}, "padded: every short frame has the same length"


# (how the stream is damaged) → detected
# fmt: off
STREAMS = [
    ("cut at a frame boundary", lambda f: (f[:2], [False, False])),
    ("frames swapped", lambda f: ([f[1], f[0], f[2], f[3]], [False, False, False, True])),
    ("frame duplicated", lambda f: ([f[0], f[0], f[1], f[2], f[3]], [False, False, False, False, True])),
    ("early frame claimed final", lambda f: (f[:2], [False, True])),
    ("trailing frame after the final", lambda f: ([*f, f[3]], [False, False, False, True, True])),
]
# fmt: on


@pytest.mark.parametrize(("what", "damage"), STREAMS, ids=[s[0] for s in STREAMS])
def test_a_damaged_stream_is_detected(what: str, damage: object) -> None:
    sent, secret = frames()
    frames_, finals = damage(sent)  # type: ignore[operator]
    with pytest.raises(EnvelopeError):
        read(frames_, finals, secret)


def test_another_candidates_secret_does_not_open_the_answer() -> None:
    sent, _ = frames()
    with pytest.raises(EnvelopeError):
        read(sent, [False, False, False, True], bytes(32))
    opener = ResponseOpener(bytes(range(32)), "req2")  # the right secret, another request
    with pytest.raises(EnvelopeError):
        opener.open(sent[0], final=False)


def test_a_replacement_candidate_goes_on_numbering_and_the_opener_follows() -> None:
    # Blind failover: n1 streams two frames and dies; n2 resumes from frame 2 with its own secret.
    seed = bytes(range(32))
    first = ResponseSealer(response_secret(seed, "n1", "req1"), "req1")
    second = ResponseSealer(response_secret(seed, "n2", "req1"), "req1", start=2)
    sent = [first.seal(b"a"), first.seal(b"b"), second.seal(b"c"), second.seal(b"d", final=True)]
    opener = ResponseOpener(response_secret(seed, "n1", "req1"), "req1")
    got = [opener.open(sent[0], final=False), opener.open(sent[1], final=False)]
    with pytest.raises(EnvelopeError):
        opener.switch(response_secret(seed, "n2", "req1"), at=1)  # the scheduler cannot rewind the stream
    opener.switch(response_secret(seed, "n2", "req1"), at=2)
    got += [opener.open(sent[2], final=False), opener.open(sent[3], final=True)]
    opener.finish()
    assert got == [b"a", b"b", b"c", b"d"]
    # A frame of n2's, presented as n1's: rejected.
    wrong = ResponseOpener(response_secret(seed, "n1", "req1"), "req1")
    with pytest.raises(EnvelopeError):
        wrong.open(ResponseSealer(response_secret(seed, "n2", "req1"), "req1").seal(b"x"), final=False)


@settings(max_examples=200, deadline=None)
@given(st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=6),
    max_leaves=20,
))  # fmt: skip
def test_the_wire_parser_raises_only_the_envelope_error(doc: object) -> None:
    with pytest.raises(EnvelopeError):
        from_wire(doc)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_a_mutated_wire_form_raises_only_the_envelope_error(data: st.DataObject) -> None:
    sealed, _ = seal()
    doc = to_wire(sealed)
    part = data.draw(st.sampled_from(["header", "wraps", "nonce", "ciphertext", "suite"]))
    value = data.draw(st.none() | st.integers() | st.text(max_size=40) | st.lists(st.integers(), max_size=3))
    if part == "header":
        key = data.draw(st.sampled_from(sorted(doc["header"])))
        doc["header"][key] = value
    elif part == "wraps":
        key = data.draw(st.sampled_from(["node_id", "key_id", "wrap"]))
        doc["wraps"][0][key] = value
    else:
        doc[part] = value
    try:
        header, nodes = peek(doc)  # the scheduler's check: likewise only EnvelopeError
    except EnvelopeError:
        header = None
    try:
        parsed = from_wire(doc)  # any other error than EnvelopeError fails the test
    except EnvelopeError:
        return
    assert header == parsed.header and nodes == list(parsed.wraps)  # what parses also passes the peek
    if part == "wraps":
        # Only the changed wrap is spoiled: the others are intact and still open, each for its own node.
        changed = doc["wraps"][0]["node_id"]
        openers = [changed] if changed in NODES else []
    else:
        openers = [n for n in parsed.wraps if n in NODES]
    if parsed == sealed or not openers:
        return
    with pytest.raises(EnvelopeError):  # it parsed (a still well-formed value): it must not open
        open_as(parsed, openers[0])


def test_oversized_fields_are_refused_before_decoding() -> None:
    sealed, _ = seal()
    doc = to_wire(sealed)
    doc["ciphertext"] = "A" * (10 * 1024 * 1024)  # not the bucket's length: refused by length alone
    with pytest.raises(EnvelopeError):
        from_wire(doc)
    doc = to_wire(sealed)
    doc["wraps"] = [dict(doc["wraps"][0], node_id=f"x{i}") for i in range(MAX_CANDIDATES + 1)]
    with pytest.raises(EnvelopeError):
        from_wire(doc)
    doc = to_wire(sealed)
    doc["header"]["bucket"] = 1 << 40
    with pytest.raises(EnvelopeError):
        from_wire(doc)


def test_zero_length_and_oversized_frames_are_refused_before_any_work() -> None:
    opener = ResponseOpener(bytes(32), "req1")
    for frame in (b"", b"x" * 19, b"x" * (256 * 1024 + 17)):
        with pytest.raises(EnvelopeError):
            opener.open(frame, final=False)
    assert opener.seq == 0, "nothing counted"
