"""Log probabilities and logit bias, the same for every backend (torch; imported where a model runs).

Log probabilities are those of the model's own distribution: a log-softmax of its raw logits, before
temperature, penalties, logit bias and truncation (vLLM's default; OpenAI does not say). So they do not
depend on how the answer was sampled, and a prompt scored with echo gets what an evaluation harness
computes from the same model in-process.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from node.backends.base import Scores


def scores_at(logits: Any, token: int, top: int) -> Scores:
    """The scores of ``token`` at a position whose logits (one row, the vocabulary) are given."""
    import torch

    logprobs = torch.log_softmax(logits.double(), dim=-1)
    return Scores(float(logprobs[token]), _top(logprobs, top))


def prompt_scores(logits: Any, prompt_ids: Sequence[int], top: int) -> list[Scores]:
    """Scores of the prompt's tokens after the first: ``logits[i]`` (positions × vocabulary) predicts
    ``prompt_ids[i + 1]``."""
    import torch

    out: list[Scores] = []
    for i, token in enumerate(prompt_ids[1:]):
        logprobs = torch.log_softmax(logits[i].double(), dim=-1)
        out.append(Scores(float(logprobs[token]), _top(logprobs, top)))
    return out


def _top(logprobs: Any, top: int) -> tuple[tuple[int, float], ...]:
    if top <= 0:
        return ()
    import torch

    values, ids = torch.topk(logprobs, min(top, logprobs.shape[-1]))
    return tuple((int(i), float(v)) for i, v in zip(ids.tolist(), values.tolist(), strict=True))


def biased(logits: Any, bias: Sequence[tuple[int, float]]) -> Any:
    """``logits`` with OpenAI's logit_bias added (ids outside the vocabulary were refused before)."""
    if not bias:
        return logits
    import torch

    ids = torch.tensor([i for i, _ in bias], dtype=torch.long)
    values = torch.tensor([b for _, b in bias], dtype=logits.dtype)
    return logits.index_add(-1, ids, values)


def bias_vector(bias: Sequence[tuple[int, float]], size: int) -> Any:
    """logit_bias as one float tensor over a (padded) vocabulary, as exllamav2's sampler adds it."""
    import torch

    vector = torch.zeros((size,), dtype=torch.float)
    for token, value in bias:
        vector[token] += value
    return vector
