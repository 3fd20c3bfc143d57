"""A request's grammar (node.constrain) as an exllamav2 filter: one per job, so every sequence of a batch
follows its own.

The filter masks the logits itself (``can_mask_logits``) rather than listing allowed tokens, and computes
the next mask on the generator's filter threads while the GPU runs the forward pass
(``use_background_worker``). Imported only where exllamav2 is: the class is made on first use.
"""

from __future__ import annotations

import functools
from typing import Any

from node.backends.base import SamplingParams


def constraint_filters(params: SamplingParams, model: Any, tokenizer: Any) -> list[Any] | None:
    """The job's filters: one for its constraint, or none."""
    if params.constraint is None:
        return None
    return [_filter_class()(model, tokenizer, params.constraint())]


@functools.cache
def _filter_class() -> type:
    import torch
    from exllamav2.generator.filters import ExLlamaV2Filter

    class ConstraintFilter(ExLlamaV2Filter):  # type: ignore[misc]
        def __init__(self, model: Any, tokenizer: Any, constraint: Any) -> None:
            super().__init__(model, tokenizer)
            self.constraint = constraint
            self.width = 0
            self.mask: torch.Tensor | None = None

        def begin(self, prefix_str: str) -> None:
            self.mask = None

        def feed(self, token: Any) -> None:
            self.mask = None
            self.constraint.advance(int(token))

        def use_background_worker(self) -> bool:
            return True

        def can_mask_logits(self) -> bool:
            return True

        def prepare_logit_mask(self) -> bool:
            # The logits' width is known once they come (padded past the vocabulary); the first mask of a
            # job is computed then, the later ones here, on a filter thread.
            if self.width:
                self.mask = self.constraint.allowed(self.width)
            return True

        def mask_logits(self, logits: torch.Tensor) -> torch.Tensor:
            if self.mask is None or self.width != logits.shape[-1]:
                self.width = logits.shape[-1]
                self.mask = self.constraint.allowed(self.width)
            return logits.masked_fill_(~self.mask.to(logits.device), float("-inf"))

        def next(self) -> tuple[set[int], set[int]]:
            # The token-list path, used only when another filter of the job cannot mask: not in Hearth.
            allowed = self.constraint.allowed(self.width or self.tokenizer.get_vocab_size())
            return set(torch.nonzero(allowed).flatten().tolist()), set()

    return ConstraintFilter
