"""The contract every generation backend meets: transformers on the CPU, exllamav2 on NVIDIA GPUs.

Backends work in token ids; text handling (templates, incremental decoding, stop strings) lives in the node,
so every backend behaves the same. Two shapes:

- ``Backend`` runs one sequence at a time: ``generate`` yields its tokens (the transformers reference
  backend, and test doubles that wrap it).
- ``BatchBackend`` runs many at once: sequences are admitted while its cache has room for them, and each
  ``step`` advances every running sequence by one iteration (exllamav2's dynamic generator: paged cache,
  continuous batching).

The node's job runner (node.runner) drives a ``BatchBackend`` from its own thread, never from the event
loop; a plain ``Backend`` is adapted with ``Sequential``. Both pass the same contract suite
(tests/node/backend_contract.py).
"""

from __future__ import annotations

import itertools
import secrets
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol, runtime_checkable

if TYPE_CHECKING:
    from node.constrain import ConstraintFactory


@dataclass(frozen=True, slots=True)
class SamplingParams:
    max_new_tokens: int
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0  # 1: off
    top_k: int = 0  # 0: off
    min_p: float = 0.0  # 0: off
    repetition_penalty: float = 1.0  # 1: off; >1 makes tokens already in prompt or answer less likely
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop_token_ids: tuple[int, ...] = ()  # end the answer like an end-of-sequence token (not yielded)
    ignore_eos: bool = False  # go on past end-of-sequence tokens (stop_token_ids still end it)
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit), as OpenAI's
    logprobs: int | None = None  # None: off; k: each token's logprob and the k most likely (Step.scores)
    prompt_logprobs: bool = False  # score the prompt's tokens too (echo; Step.prompt_scores)
    # A grammar the answer must follow (node.constrain): each sequence gets its own matcher from it, and
    # end-of-sequence tokens end a constrained answer even with ignore_eos (the grammar says where it ends).
    constraint: ConstraintFactory | None = None

    def __post_init__(self) -> None:
        # Logits divided by a temperature of 1e-300 overflow to infinity and sampling fails; any temperature
        # this small picks the most likely token anyway, so it is greedy decoding, as 0 is.
        if self.temperature < GREEDY_BELOW:
            object.__setattr__(self, "temperature", 0.0)


GREEDY_BELOW = 1e-4  # temperatures under this decode greedily (every backend)


@dataclass(frozen=True, slots=True)
class CacheScope:
    """Which jobs may share cached prompt pages: those with equal keys (one user's turns), never others.

    A prefix cache that let one user's cached prompt speed up another's would tell the second user, by
    timing, what the first one sent (cf. vLLM CVE-2025-46570). ``CacheScope.private()`` shares with no one.
    """

    key: bytes

    @classmethod
    def private(cls) -> CacheScope:
        return cls(secrets.token_bytes(16))


class TextModel(Protocol):
    """What the node needs of any loaded model to turn text into token ids and back."""

    @property
    def context_length(self) -> int:
        """Prompt plus generated tokens one sequence can attend to."""
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


class Backend(TextModel, Protocol):
    """A loaded model that turns prompt token ids into generated token ids, one sequence at a time."""

    def generate(
        self, prompt_ids: Sequence[int], params: SamplingParams, cancelled: threading.Event
    ) -> Iterator[int | Scored]:
        """Yield new token ids one at a time (``Scored`` ones when ``params.logprobs`` is set), ending at
        an end-of-sequence or stop token (not yielded), at ``params.max_new_tokens``, or as soon as
        ``cancelled`` is set (checked before every step)."""
        ...

    def score_prompt(self, prompt_ids: Sequence[int], top: int) -> list[Scores]:
        """The log probability of each prompt token after the first, given those before it (echo)."""
        ...

    def close(self) -> None:
        """Release the model's memory."""
        ...


Finish = Literal["stop", "length"]


@dataclass(frozen=True, slots=True)
class Scores:
    """Log probabilities at one position, of the model's own distribution (before temperature, penalties,
    logit bias and truncation, as vLLM returns them): the token's there, and the most likely ones'."""

    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True, slots=True)
class Scored:
    """What ``Backend.generate`` yields instead of a bare id when ``params.logprobs`` is set."""

    token: int
    scores: Scores


@dataclass(slots=True)
class Step:
    """What one iteration did for one sequence: the tokens it produced (often one, none while its prompt
    is being read), and ``finish`` once the sequence ended (its cache is free again)."""

    seq: int
    tokens: list[int] = field(default_factory=list)
    finish: Finish | None = None
    scores: list[Scores] = field(default_factory=list)  # one per token when params.logprobs is set
    # With params.prompt_logprobs, once (the first step): the prompt's tokens after the first, scored.
    prompt_scores: list[Scores] | None = None


@dataclass(frozen=True, slots=True)
class CacheState:
    """A backend's KV cache as placement sees it (tokens; a page is ``page_tokens`` of them)."""

    total_tokens: int
    free_tokens: int
    page_tokens: int
    max_sequences: int


class NeverFits(Exception):
    """A sequence larger than the backend's whole cache: it can never be admitted."""


def vocab_size(model: object) -> int | None:
    """The size of a model's vocabulary (token ids run below it), where its backend says."""
    size = getattr(model, "vocab_size", None)
    return size if isinstance(size, int) else None


@runtime_checkable
class BatchBackend(TextModel, Protocol):
    """A loaded model that runs several sequences at once. Not thread-safe: one thread calls it."""

    def cache(self) -> CacheState: ...

    def admit(self, prompt_ids: Sequence[int], params: SamplingParams, scope: CacheScope) -> int | None:
        """Start a sequence if the cache has room for its prompt and ``max_new_tokens`` now (reserved up
        front); its id, or None when it must wait for running ones to end. NeverFits when it never will."""
        ...

    def step(self) -> list[Step]:
        """One iteration of every running sequence (a prompt chunk, or one token each)."""
        ...

    def cancel(self, seq: int) -> None:
        """End a running sequence now and free its cache."""
        ...

    def close(self) -> None: ...


@dataclass(slots=True)
class _Turn:
    tokens: Iterator[int | Scored]
    cancelled: threading.Event
    limit: int
    produced: int = 0
    prompt: Sequence[int] | None = None  # to score at the first step (echo)
    top: int = 0


class Sequential:
    """A one-sequence ``Backend`` as a ``BatchBackend``: up to ``max_sequences`` sequences take turns, one
    token each per step, each with its own cache (none is shared, so scopes do not matter)."""

    def __init__(self, inner: Backend, max_sequences: int = 1) -> None:
        self.inner = inner
        self.max_sequences = max_sequences
        self._running: dict[int, _Turn] = {}
        self._ids = itertools.count()

    @property
    def context_length(self) -> int:
        return self.inner.context_length

    @property
    def chat_template(self) -> str | None:
        return self.inner.chat_template

    @property
    def bos_token(self) -> str:
        return self.inner.bos_token

    @property
    def eos_token(self) -> str:
        return self.inner.eos_token

    def encode(self, text: str, *, add_special_tokens: bool) -> list[int]:
        return self.inner.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids: Sequence[int]) -> str:
        return self.inner.decode(ids)

    @property
    def vocab_size(self) -> int | None:
        return vocab_size(self.inner)

    def cache(self) -> CacheState:
        per, most = self.inner.context_length, self.max_sequences
        return CacheState(per * most, per * (most - len(self._running)), 1, most)

    def admit(self, prompt_ids: Sequence[int], params: SamplingParams, scope: CacheScope) -> int | None:
        if len(prompt_ids) + params.max_new_tokens > self.inner.context_length:
            raise NeverFits(f"{len(prompt_ids)} + {params.max_new_tokens} tokens exceed the context")
        if len(self._running) >= self.max_sequences:
            return None
        seq = next(self._ids)
        cancelled = threading.Event()
        tokens = self.inner.generate(prompt_ids, params, cancelled)
        prompt = list(prompt_ids) if params.prompt_logprobs else None
        self._running[seq] = _Turn(tokens, cancelled, params.max_new_tokens, 0, prompt, params.logprobs or 0)
        return seq

    def step(self) -> list[Step]:
        steps: list[Step] = []
        for seq, turn in list(self._running.items()):
            step = Step(seq)
            steps.append(step)
            if turn.prompt is not None:
                step.prompt_scores = self.inner.score_prompt(turn.prompt, turn.top)
                turn.prompt = None
            if turn.limit == 0:  # scoring the prompt only (echo with max_tokens 0)
                step.finish = "length"
                self.cancel(seq)
                continue
            try:
                item = next(turn.tokens)
            except StopIteration:
                step.finish = "stop"
                del self._running[seq]
                continue
            if isinstance(item, Scored):
                step.tokens.append(item.token)
                step.scores.append(item.scores)
            else:
                step.tokens.append(item)
            turn.produced += 1
            if turn.produced >= turn.limit:
                step.finish = "length"
                self.cancel(seq)
        return steps

    def cancel(self, seq: int) -> None:
        turn = self._running.pop(seq, None)
        if turn is not None:
            turn.cancelled.set()
            close = getattr(turn.tokens, "close", None)
            if close is not None:
                close()  # a generator's own cleanup (its cache) runs now, not at garbage collection

    def close(self) -> None:
        for seq in list(self._running):
            self.cancel(seq)
        self.inner.close()
