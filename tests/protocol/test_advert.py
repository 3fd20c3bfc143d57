"""The zeroconf TXT record: round trip, size limits, and every malformed record refused."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.advert import MAX_TXT_STRING, Advert, decode_txt, encode_txt
from protocol.errors import ProtocolError

ADVERT = Advert("gpu-box-1", "0.2.0", 9100, "club", "0123456789abcdef0123", "2x NVIDIA GeForce RTX 3090",
                44262490112, ("llama-3.1-8b", "qwen-0.5b"), 3, "192.168.1.20")  # fmt: skip


def wire(advert: Advert) -> dict[bytes, bytes | None]:
    return {k.encode(): v.encode() for k, v in encode_txt(advert).items()}


def test_round_trip() -> None:
    assert decode_txt(wire(ADVERT), host="192.168.1.20", port=9100) == ADVERT


def test_a_long_model_list_is_cut_to_fit_and_counted() -> None:
    many = Advert(ADVERT.node_id, ADVERT.version, ADVERT.port, ADVERT.tier, ADVERT.fingerprint, "x" * 400,
                  1, tuple(f"org/model-number-{i:03d}" for i in range(40)), 0)  # fmt: skip
    txt = encode_txt(many)
    assert all(len(f"{k}={v}".encode()) <= MAX_TXT_STRING for k, v in txt.items())
    shown = decode_txt(wire(many), host="h", port=1).models
    assert 0 < len(shown) < 40 and int(txt["more"]) == 40 - len(shown)


# (what is wrong with the record) — each must be refused with ProtocolError
# fmt: off
BAD = [
    {b"id": None},  # a key without a value
    {b"id": b"Not-A-Node"},  # node ids are lower-case
    {b"tier": b"gold"},  # unknown tier
    {b"fp": b"xyz"},  # not a fingerprint
    {b"free": b"-5"},  # counts are digits only
    {b"load": b"1e9"},
    {b"free": b"9" * 40},  # absurdly large
    {b"models": b"\xff\xfe"},  # not UTF-8
    {b"gpus": b"x" * 300},  # longer than a TXT string can be
    {b"models": b"a,\x07b"},  # control characters
    {b"id": b"gpu-1\n"},  # a trailing newline ("$" alone would let it through)
    {b"fp": b"00112233445566778899\n"},
]
# fmt: on


@pytest.mark.parametrize("change", BAD)
def test_malformed_records_are_refused(change: dict[bytes, bytes | None]) -> None:
    with pytest.raises(ProtocolError):
        decode_txt({**wire(ADVERT), **change}, host="h", port=9100)


@pytest.mark.parametrize("missing", [b"id", b"tier", b"fp", b"free", b"models", b"load", b"v", b"gpus"])
def test_every_key_is_required(missing: bytes) -> None:
    record = wire(ADVERT)
    del record[missing]
    with pytest.raises(ProtocolError):
        decode_txt(record, host="h", port=9100)


@pytest.mark.parametrize("port", [0, 70000])
def test_the_port_must_be_real(port: int) -> None:
    with pytest.raises(ProtocolError):
        decode_txt(wire(ADVERT), host="h", port=port)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from([b"id", b"v", b"tier", b"fp", b"gpus", b"free", b"models", b"more", b"load", b"x"]),
                       st.none() | st.binary(max_size=300)), st.integers(-1, 70000))  # fmt: skip
def test_no_record_crashes_the_decoder(record: dict[bytes, bytes | None], port: int) -> None:
    with contextlib.suppress(ProtocolError):
        decode_txt({**wire(ADVERT), **record}, host="h", port=port)
