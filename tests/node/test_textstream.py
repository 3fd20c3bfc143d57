"""Incremental decoding and stop sequences, with the real demo tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest

from node.textstream import IncrementalDecoder, StopMatcher


@pytest.fixture(scope="module")
def tokenizer(demo_model_dir: Path):  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo_model_dir)


@pytest.mark.parametrize(
    "text",
    [
        "plain words with spaces",  # merged-space tokens
        "accents: café, naïve, Zürich",  # two-byte characters
        "emoji 🎉 and family 👨‍👩‍👧 and flag 🇫🇷",  # four-byte and joined sequences
        "漢字とかな, кириллица",  # CJK and Cyrillic
        "tabs\tand\r\nnewlines\n\n",  # control whitespace
    ],
)
def test_streamed_text_equals_whole_decode(tokenizer, text: str) -> None:  # type: ignore[no-untyped-def]
    ids = tokenizer.encode(text, add_special_tokens=False)
    decoder = IncrementalDecoder(lambda t: tokenizer.decode(list(t), skip_special_tokens=True))
    pieces = [decoder.push(i) for i in ids]
    pieces.append(decoder.flush())
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces), "a half character was streamed"


@pytest.mark.parametrize(
    ("stops", "chunks", "emitted", "stopped"),
    [
        (["END"], ["abc", "def"], "abcdef", False),  # no stop: everything passes
        (["END"], ["abcE", "ND tail"], "abc", True),  # stop split across chunks
        (["END"], ["abcEN", "x"], "abcENx", False),  # a false start is released
        (["\n\n", "###"], ["one\n", "\ntwo"], "one", True),  # first of several stops
        (["ab", "b"], ["xab"], "x", True),  # earliest match wins
        ([], ["free"], "free", False),  # no stops at all
    ],
)
def test_stop_matcher(stops: list[str], chunks: list[str], emitted: str, stopped: bool) -> None:
    matcher = StopMatcher(stops)
    out, hit = "", False
    for chunk in chunks:
        text, hit = matcher.push(chunk)
        out += text
        if hit:
            break
    if not hit:
        out += matcher.flush()
    assert (out, hit) == (emitted, stopped)
