"""The contract every generation backend meets (transformers on CPU today, exllamav2 on NVIDIA next).

A backend is synchronous and single-threaded by design: the node's job runner calls it from its own worker
thread, never from the event loop. It works in token ids; text handling (templates, incremental decoding,
stop strings) lives in the node so every backend behaves the same.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class SamplingParams:
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    ignore_eos: bool = False


class Backend(Protocol):
    """A loaded model that turns prompt token ids into generated token ids."""

    @property
    def context_length(self) -> int:
        """Prompt plus generated tokens the model can attend to."""
        ...

    @property
    def chat_template(self) -> str | None:
        """The model's own Jinja chat template, if it ships one."""
        ...

    @property
    def bos_token(self) -> str: ...

    @property
    def eos_token(self) -> str: ...

    def encode(self, text: str, *, add_special_tokens: bool) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def generate(
        self, prompt_ids: Sequence[int], params: SamplingParams, cancelled: threading.Event
    ) -> Iterator[int]:
        """Yield new token ids one at a time, ending at an end-of-sequence token (which is not yielded),
        at ``params.max_new_tokens``, or as soon as ``cancelled`` is set (checked before every step)."""
        ...

    def close(self) -> None:
        """Release the model's memory."""
        ...
