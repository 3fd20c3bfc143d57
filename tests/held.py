"""A backend whose jobs the test moves token by token: the real demo model, except that a job asking for
exactly HELD_TOKENS tokens writes each token after its first only when the test lets it through (``GATE``).
A test then decides when such a job moves on and when it ends, instead of racing a fast model. (The first
token goes at once: an answer's headers leave with its first chunk, and the test's client waits for them.)

For tests only: no user runs a held backend.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence

from node.backends.base import SamplingParams
from tests.support import WrappedBackend

HELD_TOKENS = 48  # a job asking for this many tokens is held by the gate; any other runs freely


class Gate:
    """The tokens held jobs may write: none until the test allows some, all once it opens the gate."""

    def __init__(self) -> None:
        self._permits = threading.Semaphore(0)
        self._open = threading.Event()

    def allow(self, tokens: int) -> None:
        self._permits.release(tokens)

    def open(self) -> None:
        self._open.set()

    def reset(self) -> None:
        self._permits = threading.Semaphore(0)
        self._open.clear()

    def through(self, cancelled: threading.Event) -> bool:
        """Wait for the next token's turn (on the node's generation thread); False if the job ended."""
        while not self._open.is_set():
            if cancelled.is_set():
                return False
            if self._permits.acquire(timeout=0.02):
                return True
        return True


GATE = Gate()


class Held(WrappedBackend):
    def generate(
        self, prompt_ids: Sequence[int], params: SamplingParams, cancelled: threading.Event
    ) -> Iterator[int]:
        held = params.max_new_tokens == HELD_TOKENS
        for n, token in enumerate(super().generate(prompt_ids, params, cancelled)):
            if held and n > 0 and not GATE.through(cancelled):
                return
            yield token
