"""What the scheduler keeps of a sealed answer for blind failover, and when it stops keeping it."""

from __future__ import annotations

from protocol.identity import b64d
from scheduler.streams import MAX_RESUME_BYTES, SealedStream


def test_frames_are_kept_per_node_for_a_replacement() -> None:
    stream = SealedStream()
    first: list[bytes] = []
    stream.segments.append(("n1", first))
    for payload in (b"a" * 80, b"b" * 80):
        stream.relayed(first, payload)
    second: list[bytes] = []
    stream.segments.append(("n2", second))
    stream.relayed(second, b"c" * 80)
    assert stream.seq == 3 and stream.resumable
    resume = stream.resume()
    assert resume is not None
    assert [(s["node_id"], [b64d(f) for f in s["frames"]]) for s in resume] == [
        ("n1", [b"a" * 80, b"b" * 80]),
        ("n2", [b"c" * 80]),
    ]


def test_past_the_limit_nothing_is_kept_and_the_answer_is_not_resumable() -> None:
    stream = SealedStream()
    kept: list[bytes] = []
    stream.segments.append(("n1", kept))
    chunk = b"x" * (256 * 1024)
    for _ in range(MAX_RESUME_BYTES // len(chunk) + 2):
        stream.relayed(kept, chunk)
    assert not stream.resumable
    assert kept == [], "the copies were dropped"
    assert stream.seq == MAX_RESUME_BYTES // len(chunk) + 2, "the frames are still counted"
