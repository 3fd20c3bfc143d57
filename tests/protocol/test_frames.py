"""The node → scheduler frame stream: round trips, cuts and lies are all detected before allocation."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol import frames
from protocol.errors import ProtocolError


def _stream(*payloads: bytes) -> bytes:
    body = b"".join(frames.encode(p) for p in payloads)
    return body + frames.encode_json({"completion_tokens": 3}, frames.META | frames.FINAL)


@given(st.lists(st.binary(max_size=300), max_size=8), st.integers(min_value=1, max_value=64))
def test_any_chunking_yields_the_same_frames(payloads: list[bytes], step: int) -> None:
    data = _stream(*payloads)
    decoder = frames.FrameDecoder()
    got = [f for i in range(0, len(data), step) for f in decoder.feed(data[i : i + step])]
    decoder.close()
    assert [f.payload for f in got[:-1]] == payloads
    assert got[-1].final and got[-1].kind == frames.META
    assert got[-1].json() == {"completion_tokens": 3}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            frames.HEADER.pack(frames.MAX_FRAME_PAYLOAD + 1, 0),
            "over the limit",
        ),  # huge length, nothing allocated
        (frames.HEADER.pack(2**32 - 1, 0), "over the limit"),  # the largest length field
        (frames.HEADER.pack(1, 0x80) + b"x", "unknown frame flags"),  # a flag nobody defined
        (_stream(b"a") + frames.encode(b"late"), "after the final frame"),  # trailing frame
    ],
)
def test_malformed_streams_are_refused(data: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        frames.FrameDecoder().feed(data)


@pytest.mark.parametrize("cut", [0, 3, 5, 7])
def test_a_cut_stream_is_detected(cut: int) -> None:
    data = _stream(b"hello")
    decoder = frames.FrameDecoder()
    decoder.feed(data[: len(frames.encode(b"hello")) + cut])
    with pytest.raises(ProtocolError, match="before its final frame"):
        decoder.close()


def test_encoding_refuses_oversized_payloads() -> None:
    with pytest.raises(ProtocolError):
        frames.encode(b"x" * (frames.MAX_FRAME_PAYLOAD + 1))


def test_malformed_meta_json_is_a_protocol_error() -> None:
    (frame,) = frames.FrameDecoder().feed(frames.encode(b"{not json", frames.META | frames.FINAL))
    with pytest.raises(ProtocolError):
        frame.json()
