"""exllamav2's dynamic generator on a CPU, for the exllamav2 backend's tests.

Everything of exllamav2's that is plain Python runs as it is: the model config and tokenizer (read from the
generated demo model), the dynamic generator and its jobs, page table, prefix cache, stop conditions and
streaming, and the sampler's driver. What needs CUDA is stood in for:

- the **extension**: the handful of its functions the generator calls on this path, written in torch
  (sampling with temperature, top-k, top-p and min-p; the repetition penalties; prefix matching; moving
  cache pages). Any other call fails the test that made it.
- the **model**: a bigram table. The next token's logits depend on the last token only, so the answers are
  right whatever the generator does with the (absent) keys and values: how it pages, batches, chunks the
  prompt or reuses cached pages changes nothing a test can see but the page table. ``force`` makes a token
  always follow another, to steer an answer into a stop token or half a UTF-8 character.
- the **cache**: its size, and one tensor for the generator's page moves.

So the backend's own code (planning the cache and batch, admission, job scopes, stepping, parsing what
``iterate()`` returns, cancellation) meets the real library without a GPU. How fast it all runs, the
attention kernels and the loading of weights are tests/gpu/'s business.

Use it inside ``stand_in()``, which puts the extension in place before exllamav2 is imported, and forgets
that exllamav2 afterwards.
"""

from __future__ import annotations

import sys
import time
import types
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

VOCAB_PAD = 32  # exllamav2 pads the vocabulary to a multiple of 32 for its logits


class StandInExtension:
    """The functions of ``exllamav2_ext`` that the generator and sampler call, on a CPU."""

    def __getattr__(self, name: str) -> Any:
        def missing(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError(f"the CUDA extension's {name} was called: it has no CPU stand-in")

        return missing

    @staticmethod
    def fast_fill_cpu_ones_bool(mask: torch.Tensor) -> None:
        mask.fill_(True)

    @staticmethod
    def fast_fadd_cpu(a: torch.Tensor, b: torch.Tensor) -> None:
        a.add_(b)

    @staticmethod
    def logit_filter_exclusive(mask: torch.Tensor, allowed: list[list[int]]) -> None:
        for row, tokens in enumerate(allowed):
            keep = mask[row].clone()
            mask[row] = False
            mask[row, tokens] = keep[tokens]

    @staticmethod
    def apply_rep_penalty(
        ids: torch.Tensor, penalty: float, window: int, decay: int, frequency: float, presence: float,
        logits: torch.Tensor,
    ) -> None:  # fmt: skip
        for row in range(logits.shape[0]):
            recent = ids[row] if window < 0 else ids[row, ids.shape[-1] - window :]
            tokens, counts = torch.unique(recent, return_counts=True)
            values = logits[row, 0, tokens]
            values = torch.where(values > 0, values / penalty, values * penalty)
            logits[row, 0, tokens] = values - frequency * counts - presence

    @staticmethod
    def sample_basic(
        logits: torch.Tensor, temperature: float, top_k: int, top_p: float, top_a: float, min_p: float,
        tfs: float, typical: float, random: float, out_tokens: torch.Tensor, out_probs: torch.Tensor,
        out_kprobs: torch.Tensor, out_ktokens: torch.Tensor, mask: torch.Tensor, mirostat: bool,
        mirostat_mu: list[float], mirostat_tau: float, mirostat_eta: float, temperature_last: float,
        *rest: Any,
    ) -> list[float]:  # fmt: skip
        """Temperature, then top-k, top-p and min-p, then the draw at ``random`` in the distribution."""
        for row in range(logits.shape[0]):
            scores = logits[row, 0].float().clone()
            if mask.device.type != "meta":
                scores[~mask[row]] = float("-inf")
            if top_k == 1:
                token = int(torch.argmax(scores))
                out_tokens[row, 0], out_probs[row, 0] = token, 1.0
                continue
            probs = torch.softmax(scores / (temperature * temperature_last), dim=-1)
            probs, order = torch.sort(probs, descending=True)
            keep = torch.ones_like(probs, dtype=torch.bool)
            if top_k > 0:
                keep[top_k:] = False
            if 0.0 < top_p < 1.0:
                keep &= torch.cumsum(probs, 0) - probs < top_p
            if min_p > 0.0:
                keep &= probs >= min_p * probs[0]
            probs = torch.where(keep, probs, 0.0)
            probs /= probs.sum()
            pick = min(int(torch.searchsorted(torch.cumsum(probs, 0), random)), int(keep.sum()) - 1)
            out_tokens[row, 0], out_probs[row, 0] = int(order[pick]), float(probs[pick])
        return mirostat_mu

    @staticmethod
    def count_match(a: torch.Tensor, b: torch.Tensor, limit: int) -> int:
        """Leading tokens ``a`` (up to ``limit``) and ``b`` share."""
        n = min(limit, a.shape[-1], b.shape[-1])
        differ = torch.nonzero(a[0, :n] != b[0, :n])
        return int(differ[0, 0]) if len(differ) else n

    @staticmethod
    def cache_rotate(cache: torch.Tensor, rotation: torch.Tensor, buffer: torch.Tensor) -> None:
        """Page ``rotation[i]`` takes page ``rotation[i + 1]``'s contents, the last takes the first's."""
        first = cache[int(rotation[0])].clone()
        for target, source in zip(rotation[:-1].tolist(), rotation[1:].tolist(), strict=True):
            cache[target] = cache[source]
        cache[int(rotation[-1])] = first


@contextmanager
def stand_in() -> Iterator[types.ModuleType]:
    """exllamav2's generator module over the stand-in extension, for the duration; then exllamav2 is
    forgotten, so that a later import in the process gets the real one. RuntimeError when exllamav2 is
    already imported with its real extension (as on a GPU box running everything in one process)."""
    ours = [name for name in sys.modules if name == "exllamav2" or name.startswith("exllamav2.")]
    loaded = sys.modules.get("exllamav2.ext")
    if ours and not getattr(loaded, "HEARTH_STAND_IN", False):
        raise RuntimeError("exllamav2 is already imported with its real extension in this process")
    ext = types.ModuleType("exllamav2.ext")
    ext.exllamav2_ext = StandInExtension()  # type: ignore[attr-defined]
    ext.none_tensor = torch.empty((1, 1), device="meta")  # type: ignore[attr-defined]
    ext.HEARTH_STAND_IN = True  # type: ignore[attr-defined]
    sys.modules["exllamav2.ext"] = ext
    try:
        from exllamav2.generator import dynamic

        # Paged attention is flash-attn's; the stand-in model has no attention to page.
        dynamic.assert_paged_attn = lambda: None
        yield dynamic
    finally:
        for name in [n for n in sys.modules if n == "exllamav2" or n.startswith("exllamav2.")]:
            if name not in ours:
                del sys.modules[name]


class BigramModel:
    """A model whose next token depends on the last one only (see the module's docstring)."""

    def __init__(self, config: Any, *, seed: int = 0, delay: float = 0.0) -> None:
        self.config = config
        self.delay = delay  # seconds per forward pass: a GPU's pace, for tests that need time to pass
        padded = -(-config.vocab_size // VOCAB_PAD) * VOCAB_PAD
        gen = torch.Generator().manual_seed(seed)
        self.table = torch.randn((config.vocab_size, padded), generator=gen) * 4.0
        self.table[:, config.vocab_size :] = float("-inf")
        self.forward_passes = 0
        self.prompt_tokens = 0  # tokens run through prefill: what the prefix cache saves shows here
        self.unloaded = False

    def force(self, after: int, then: int) -> None:
        """Make ``then`` always follow ``after``."""
        self.table[after, : self.config.vocab_size] = -50.0
        self.table[after, then] = 50.0

    def forward_chunk(
        self, input_ids: torch.Tensor, *, preprocess_only: bool = False, **kwargs: Any
    ) -> dict[str, torch.Tensor]:
        self.forward_passes += 1
        if self.delay:
            time.sleep(self.delay)
        if preprocess_only:
            self.prompt_tokens += int(input_ids.numel())
            return {}
        return {"logits": self.table[input_ids]}

    def forward(
        self, input_ids: torch.Tensor, cache: Any = None, *, last_id_only: bool = False, **kwargs: Any
    ) -> torch.Tensor:
        """``ExLlamaV2.forward`` without a cache: logits at every position (echo's prompt scoring)."""
        assert cache is None and input_ids.shape[-1] <= self.config.max_input_len
        logits = self.forward_chunk(input_ids)["logits"]
        return logits[:, -1:] if last_id_only else logits

    def unload(self) -> None:
        self.unloaded = True


class SizedCache:
    """A cache of ``tokens`` positions, holding nothing the model reads."""

    batch_size = 1

    def __init__(self, tokens: int) -> None:
        self.max_seq_len = tokens
        self.current_seq_len = 0
        self._pages = torch.zeros((1, tokens, 1, 8), dtype=torch.half)

    def all_tensors(self) -> list[torch.Tensor]:
        return [self._pages]

    def copy_states(self, *args: Any) -> None:
        """Keys and values copied from one page to another: there are none."""


def load(
    path: Path,
    *,
    cache_tokens: int,
    max_sequences: int | None,
    paged: bool = True,
    seed: int = 0,
    context: int | None = None,
    delay: float = 0.0,
) -> tuple[Any, BigramModel]:
    """The exllamav2 backend over the model directory at ``path`` (its config and tokenizer), as
    ``ExLlamaV2Backend.load`` builds it, with the stand-in model and cache in place of the GPU's;
    ``context``: the model's own, if not its config's. Inside ``stand_in()``."""
    from node.backends.exllamav2_backend import ExLlamaV2Backend, Plan, read_config

    config = read_config(path)
    if context is not None:  # as if the model's config.json said so
        config.max_seq_len = context
    plan = Plan.make(config, paged_attention=paged, cache_tokens=cache_tokens, max_sequences=max_sequences)
    model = BigramModel(config, seed=seed, delay=delay)
    return ExLlamaV2Backend.assemble(path, model, SizedCache(plan.cache_tokens), plan), model
