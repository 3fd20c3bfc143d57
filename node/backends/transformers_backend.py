"""The reference backend: Hugging Face transformers on the CPU (or whatever torch finds).

It decodes token by token with the model's KV cache, so a cancelled job stops within one step and a
streamed token leaves as soon as it is sampled. One job at a time: on a CPU box the matrix work already
uses every core, and batching would only add latency to the first token.
"""

from __future__ import annotations

import inspect
import secrets
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from node.backends.base import SamplingParams, Scored, Scores
from node.backends.sampling import biased, prompt_scores, scores_at
from protocol.errors import ConfigError


class TransformersBackend:
    def __init__(self, model: Any, tokenizer: Any, eos_ids: frozenset[int], context_length: int) -> None:
        self._model = model
        self._tokenizer = tokenizer
        self._eos_ids = eos_ids
        self._context_length = context_length

    @classmethod
    def load(cls, path: Path, *, threads: int | None = None) -> TransformersBackend:
        """Load a Hugging Face-layout model directory (blocking: call it off the event loop)."""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # clutters the operator log
        if threads:
            torch.set_num_threads(threads)
        if not (path / "config.json").is_file():
            raise ConfigError(f"{path} is not a model directory (no config.json)")
        try:
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot load the model in {path}: {type(exc).__name__}") from None
        model.eval()  # type: ignore[no-untyped-call]
        eos: set[int] = set()
        gen_eos = getattr(model.generation_config, "eos_token_id", None)
        if isinstance(gen_eos, int):
            eos.add(gen_eos)
        elif isinstance(gen_eos, list):
            eos.update(int(i) for i in gen_eos)
        if tokenizer.eos_token_id is not None:
            eos.add(int(tokenizer.eos_token_id))
        context = int(getattr(model.config, "max_position_embeddings", 2048) or 2048)
        return cls(model, tokenizer, frozenset(eos), context)

    @property
    def context_length(self) -> int:
        return self._context_length

    @property
    def chat_template(self) -> str | None:
        template = getattr(self._tokenizer, "chat_template", None)
        return template if isinstance(template, str) else None

    @property
    def bos_token(self) -> str:
        return str(self._tokenizer.bos_token or "")

    @property
    def eos_token(self) -> str:
        return str(self._tokenizer.eos_token or "")

    def encode(self, text: str, *, add_special_tokens: bool) -> list[int]:
        return list(self._tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: Sequence[int]) -> str:
        return str(self._tokenizer.decode(list(ids), skip_special_tokens=True))

    @property
    def vocab_size(self) -> int:
        return int(self._model.get_output_embeddings().weight.shape[0])

    def score_prompt(self, prompt_ids: Sequence[int], top: int) -> list[Scores]:
        import torch

        with torch.inference_mode():
            out = self._model(input_ids=torch.tensor([list(prompt_ids)]), use_cache=False)
            return prompt_scores(out.logits[0], prompt_ids, top)

    def constraint_vocabulary(self) -> tuple[str, frozenset[int]] | None:
        """The tokenizer as Hugging Face tokenizers' JSON, and the end-of-sequence ids (node.constrain)."""
        backend = getattr(self._tokenizer, "backend_tokenizer", None)
        return (str(backend.to_str()), self._eos_ids) if backend is not None else None

    def generate(
        self, prompt_ids: Sequence[int], params: SamplingParams, cancelled: threading.Event
    ) -> Iterator[int | Scored]:
        import torch

        generator = torch.Generator()
        generator.manual_seed(params.seed if params.seed is not None else secrets.randbits(63))
        stop_ids = (set() if params.ignore_eos else set(self._eos_ids)) | set(params.stop_token_ids)
        constraint = params.constraint() if params.constraint is not None else None
        if constraint is not None:
            stop_ids |= self._eos_ids
        # Token counts of the answer (presence/frequency penalties), and which tokens appeared anywhere,
        # prompt included (the repetition penalty, as transformers applies it) unless presence or frequency
        # penalties are set too: exllamav2 applies all three over one window, kept to the answer then.
        counts: Any = None
        seen: Any = None
        # Inference mode around each computation, never across a yield: a generator suspended inside the
        # block would leave its caller's thread in inference mode (and several of them interleaved on one
        # thread, Sequential's way, would restore each other's modes out of order).
        with torch.inference_mode():
            # Logits for the last position only: all of them would be prompt × vocabulary floats (GBs).
            out = self._model(input_ids=torch.tensor([list(prompt_ids)]), use_cache=True, logits_to_keep=1)
        for step in range(params.max_new_tokens):
            if cancelled.is_set():
                return
            with torch.inference_mode():
                # Sampled in float64: a temperature or penalty that the API allows but float32 cannot
                # divide by (5e-324 rounds to 0 there) stays exact, and the scaling below cannot overflow.
                logits = raw = out.logits[0, -1].double()
                if params.presence_penalty or params.frequency_penalty:
                    if counts is None:
                        counts = torch.zeros_like(logits)
                    logits = logits - params.frequency_penalty * counts
                    logits = logits - params.presence_penalty * (counts > 0).float()
                if params.repetition_penalty != 1.0:
                    if seen is None:
                        seen = torch.zeros_like(logits, dtype=torch.bool)
                        if not (params.presence_penalty or params.frequency_penalty):
                            seen[torch.tensor(list(prompt_ids))] = True
                    penalized = torch.where(
                        logits > 0, logits / params.repetition_penalty, logits * params.repetition_penalty
                    )
                    logits = torch.where(seen, penalized, logits)
                logits = biased(logits, params.logit_bias)
                if constraint is not None:
                    logits = constraint.restrict(logits)
                token = _sample(logits, params, generator)
                if constraint is not None:
                    constraint.advance(token)
                if counts is not None:
                    counts[token] += 1
                if seen is not None:
                    seen[token] = True
            if token in stop_ids:
                return
            if params.logprobs is not None:
                yield Scored(token, scores_at(raw, token, params.logprobs))
            else:
                yield token
            if step + 1 == params.max_new_tokens:
                return
            with torch.inference_mode():
                out = self._model(
                    input_ids=torch.tensor([[token]]), use_cache=True, **cache_kwargs(self._model, out)
                )

    def close(self) -> None:
        self._model = None
        self._tokenizer = None


def cache_kwargs(model: Any, out: Any) -> dict[str, Any]:
    """The keyword that hands a forward pass's KV cache to the next one.

    transformers 5.2x renamed `past_key_values` to `cache` (argument and output field); the node supports
    both, since a volunteer's box may have either.
    """
    if "cache" in inspect.signature(model.forward).parameters:
        return {"cache": out.cache}
    return {"past_key_values": out.past_key_values}


def _sample(logits: Any, params: SamplingParams, generator: Any) -> int:
    """Greedy at temperature 0; else temperature, then top_k, min_p and top_p cut the candidates (the
    order exllamav2's sampler applies them in), and one is drawn."""
    import torch

    if params.temperature == 0.0:
        return int(torch.argmax(logits).item())
    # From the largest logit down: every scaled logit is <= 0, so a temperature near 0 gives -inf to all
    # but the best (its limit, greedy decoding) instead of inf - inf. A penalty may have made some logit
    # infinite already; it is the largest a float holds for this.
    finite = torch.finfo(logits.dtype).max
    logits = torch.clamp(logits, -finite, finite)
    probs = torch.softmax((logits - logits.max()) / params.temperature, dim=-1)
    if params.top_k <= 0 and params.min_p <= 0.0 and params.top_p >= 1.0:
        return int(torch.multinomial(probs, 1, generator=generator).item())
    sorted_probs, order = torch.sort(probs, descending=True)
    keep = torch.ones_like(sorted_probs, dtype=torch.bool)
    if params.top_k > 0:
        keep[params.top_k :] = False
    if params.min_p > 0.0:
        keep &= sorted_probs >= params.min_p * sorted_probs[0]
    if params.top_p < 1.0:
        # The smallest set whose mass reaches top_p (the most likely token always stays).
        keep &= torch.cumsum(sorted_probs, dim=-1) - sorted_probs < params.top_p
    keep[0] = True
    sorted_probs = torch.where(keep, sorted_probs, torch.zeros_like(sorted_probs))
    choice = torch.multinomial(sorted_probs / sorted_probs.sum(), 1, generator=generator)
    return int(order[choice].item())
