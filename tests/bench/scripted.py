"""A scripted, instant generation backend for benchmarks: it takes the model out of the measurement.

It meets the node's ``Backend`` protocol (node/backends/base.py) without any ML runtime, so a benchmark sees
only what Hearth itself costs: the node's request handling, framing and streaming, and the scheduler's relay.
Users never run it.

Tokens:
    0, 1, 2           <s>, </s>, <pad>
    3 … 258           one byte each (how prompts are encoded: any text round-trips)
    259 …             one word each, with its leading space (how answers are made: ~5 characters a token)

The answer is a fixed cycle of words, exactly ``max_new_tokens`` long (the eos is never produced). The prompt
can script the pace: a prompt containing ``delay_ms=<float>`` waits that long before each token; without
one, the backend's default delay applies (0: every token at once). Each stream keeps its own schedule from its
own start, so the first token comes ``delay_ms`` after the job starts and any delay before that (the
scheduler's, say) shows in the time to first token one for one.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator, Sequence

from node.backends.base import SamplingParams

BOS_ID, EOS_ID, PAD_ID = 0, 1, 2
BYTE_BASE = 3
WORD_BASE = BYTE_BASE + 256
WORDS = (
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "while",
    "hearth",
    "relays",
    "every",
    "token",
    "as",
    "it",
    "comes",
    "from",
    "node",
    "to",
    "client",
    "without",
    "reading",
    "one",
)
_DELAY = re.compile(rb"delay_ms=([0-9]+(?:\.[0-9]+)?)")


class ScriptedBackend:
    """Deterministic and instant (or paced): the fake model of the relay benchmark."""

    def __init__(self, *, context_length: int = 8192, delay_s: float = 0.0) -> None:
        self._context_length = context_length
        self._delay_s = delay_s
        self.generated = 0

    @property
    def context_length(self) -> int:
        return self._context_length

    @property
    def chat_template(self) -> str | None:
        return None  # the node falls back to chatml

    @property
    def bos_token(self) -> str:
        return "<s>"

    @property
    def eos_token(self) -> str:
        return "</s>"

    def encode(self, text: str, *, add_special_tokens: bool) -> list[int]:
        ids = [BYTE_BASE + b for b in text.encode()]
        return [BOS_ID, *ids] if add_special_tokens else ids

    def decode(self, ids: Sequence[int]) -> str:
        out: list[str] = []
        raw = bytearray()
        for i in ids:
            if BYTE_BASE <= i < WORD_BASE:
                raw.append(i - BYTE_BASE)
                continue
            if raw:
                out.append(raw.decode("utf-8", errors="replace"))
                raw.clear()
            if i >= WORD_BASE:
                out.append(" " + WORDS[(i - WORD_BASE) % len(WORDS)])
        if raw:
            out.append(raw.decode("utf-8", errors="replace"))
        return "".join(out)

    def _delay_for(self, prompt_ids: Sequence[int]) -> float:
        prompt = bytes(i - BYTE_BASE for i in prompt_ids if BYTE_BASE <= i < WORD_BASE)
        match = _DELAY.search(prompt)
        return float(match.group(1)) / 1000.0 if match else self._delay_s

    def generate(
        self, prompt_ids: Sequence[int], params: SamplingParams, cancelled: threading.Event
    ) -> Iterator[int]:
        delay = self._delay_for(prompt_ids)
        start = len(prompt_ids) + (params.seed or 0)
        deadline = time.perf_counter()
        for step in range(params.max_new_tokens):
            if cancelled.is_set():
                return
            if delay:
                # Sleep to a schedule rather than a fixed gap, so the pace holds however late a wake-up is.
                deadline += delay
                pause = deadline - time.perf_counter()
                if pause > 0:
                    time.sleep(pause)
            self.generated += 1
            yield WORD_BASE + (start + step) % len(WORDS)

    def close(self) -> None:
        pass
