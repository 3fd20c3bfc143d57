"""The production backend: exllamav2's dynamic generator on NVIDIA GPUs (paged cache, continuous batching).

The node's job runner calls ``admit``, ``step`` and ``cancel`` from the model's own generation thread, so
the generator's ``iterate()`` never runs on the event loop (exllamav2's own async wrapper would run it
there). Everything here follows the library's documented API (``ExLlamaV2DynamicGenerator``,
``ExLlamaV2DynamicJob``) and its source for the one rule the node must mirror:

- **Admission.** The generator starts a job only when the cache has free pages (256 tokens each) for its
  prompt plus ``max_new_tokens``, reserved up front; a job that can never fit fails an assertion. ``admit``
  applies that rule before handing a job over (counting pages already promised to jobs that start at the
  next iteration), so a job that must wait stays in the node's queue, where the runner can see and cancel
  it, and one that never fits is refused.
- **Cancellation.** ``generator.cancel(job)`` frees the job's pages at once; the runner calls it before the
  next iteration after a client leaves.
- **Prefix-cache isolation.** The generator reuses cached pages whose hash matches: a hash chained over the
  page's tokens and the pages before it, starting from nothing. Shared between users, a hit would tell the
  second user, by timing, that someone sent the same prompt (cf. vLLM CVE-2025-46570). Each job here
  carries a ``CacheScope``, and the chain starts from the scope's key instead, so only jobs of one scope
  (one user's conversation turns) ever share pages. The library has no option for this: its module-level
  hash function is wrapped once to read the job's scope from the generation thread (set around the two job
  methods that hash pages). Two other reuse paths compare tokens rather than hashes and know nothing of
  scopes: a partly filled first page copied from any page that starts alike, and unpaged mode's reuse of
  the previous job's prefix. Both go through the extension's ``count_match``, which is wrapped to find no
  match: what that gives up is reuse within a page, never whole pages of one user's conversation.
- **Paged attention needs flash-attn ≥ 2.5.7** (and an Ampere or newer GPU, and an architecture that may use
  flash-attn). Without it the generator runs unpaged: one sequence at a time, no prefix cache. The node
  logs that and reports ``max_sequences`` 1, so placement knows.

Models: EXL2-quantized or unquantized Hugging Face layout, split over the box's GPUs when one is not enough
(``load_autosplit``). Imported only when a model is loaded: the node, the scheduler and CPU boxes import this
module without torch or exllamav2.
"""

from __future__ import annotations

import gc
import importlib.util
import json
import logging
import os
import sys
import threading
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from node.backends.base import CacheScope, CacheState, NeverFits, SamplingParams, Scores, Step
from node.backends.exllamav2_filter import constraint_filters
from protocol.errors import ConfigError

log = logging.getLogger("hearth.node.exllamav2")

CacheQuant = Literal["fp16", "q8", "q6", "q4"]
CACHE_CLASSES: dict[str, str] = {
    "fp16": "ExLlamaV2Cache",
    "q8": "ExLlamaV2Cache_Q8",
    "q6": "ExLlamaV2Cache_Q6",
    "q4": "ExLlamaV2Cache_Q4",
}
CACHE_BITS: dict[str, int] = {"fp16": 16, "q8": 8, "q6": 6, "q4": 4}
PAGE_TOKENS = 256  # exllamav2.generator.dynamic.PAGED_PAGE_SIZE
DEFAULT_MAX_SEQUENCES = 32
CHUNK_TOKENS = 2048  # prompt tokens per forward pass: a long prompt interrupts running streams this long


def available() -> str | None:
    """Why the exllamav2 backend cannot run here (None when it can): the package, torch, a CUDA GPU."""
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible to torch"
    _skip_a_broken_flash_attn()
    try:
        import exllamav2  # noqa: F401
    except ModuleNotFoundError as exc:
        if exc.name == "exllamav2":
            return "exllamav2 is not installed (pip install 'hearth-llm[node-gpu]')"
        return f"exllamav2 failed to import: {exc}"
    except Exception as exc:  # its extension is built on first import, with the machine's nvcc
        return f"exllamav2 failed to import: {type(exc).__name__}: {exc}"
    return None


def _skip_a_broken_flash_attn() -> None:
    """exllamav2 uses flash-attn when it imports, and fails to import when flash-attn is installed but broken
    (built for another torch or CUDA): run without it then, unpaged, rather than not at all."""
    if "EXLLAMA_NO_FLASH_ATTN" in os.environ or importlib.util.find_spec("flash_attn") is None:
        return
    try:
        from flash_attn import flash_attn_func  # noqa: F401
    except Exception as exc:
        log.warning("flash-attn is installed but does not load (%s): exllamav2 runs without it", exc)
        os.environ["EXLLAMA_NO_FLASH_ATTN"] = "1"


# exllamav2 runs every model on one CUDA stream per GPU and captures CUDA graphs on it while it generates:
# GPU work of two models (or a model loading beside one generating) must not interleave on it. Each takes
# this lock for an iteration, a cancellation (it may move cache pages), each layer it loads, and to unload.
_GPU = threading.Lock()

_scope = threading.local()


class _NoTokenMatch:
    """exllamav2's extension with ``count_match`` finding nothing (prefix reuse that ignores scopes)."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    @staticmethod
    def count_match(*args: Any) -> int:
        return 0


def _install_scoped_hash() -> None:
    """Start every page-hash chain from the current job's scope key, and turn off the token-by-token
    prefix matches that cannot tell scopes apart (see the module's docstring)."""
    from exllamav2.generator import dynamic

    if getattr(dynamic, "hearth_scoped", False):
        return

    plain: Callable[[Any, bytes | None], bytes] | None = getattr(dynamic, "_tensor_hash_checksum", None)
    if plain is None or not hasattr(dynamic.ext_c, "count_match"):
        # Another version's generator: serving on it could share one user's cached prompt with another.
        version = getattr(sys.modules.get("exllamav2.version"), "__version__", "?")
        raise ConfigError(
            f"exllamav2 {version} is not supported: the node cannot keep users' prefix caches apart on it "
            "(install exllamav2 0.3.2)"
        )

    def scoped(tensor: Any, prev_hash: bytes | None) -> bytes:
        if prev_hash is None:
            prev_hash = getattr(_scope, "key", None)
        return plain(tensor, prev_hash)

    dynamic._tensor_hash_checksum = scoped
    dynamic.ext_c = _NoTokenMatch(dynamic.ext_c)
    dynamic.hearth_scoped = True


def _scoped_job_class() -> type:
    from exllamav2.generator import ExLlamaV2DynamicJob

    class ScopedJob(ExLlamaV2DynamicJob):  # type: ignore[misc]
        """A job whose cached pages only jobs of the same scope can reuse."""

        def __init__(
            self, *args: Any, scope: bytes, top: int | None = None, vocab: int = 0, **kwargs: Any
        ) -> None:
            super().__init__(*args, **kwargs)
            self.hearth_scope = scope
            self.hearth_top = top  # None: no logprobs; else the alternatives each token comes with
            self.hearth_vocab = vocab
            self.hearth_scores: list[Scores] = []  # of tokens sampled and not yet taken by step()

        def receive_logits(self, logits: Any) -> Any:
            # The sampler changes the logits in place (penalties, bias): the model's own are read first.
            raw = None if self.hearth_top is None else logits[0, 0, : self.hearth_vocab].clone()
            result = super().receive_logits(logits)
            if raw is not None:
                from node.backends.sampling import scores_at

                token = int(result[0].flatten()[0])
                self.hearth_scores.append(scores_at(raw, token, self.hearth_top or 0))
            return result

        def prepare_for_queue(self, generator: Any, serial_number: int) -> Any:
            _scope.key = self.hearth_scope
            try:
                return super().prepare_for_queue(generator, serial_number)
            finally:
                _scope.key = None

        def receive_sample(self, *args: Any, **kwargs: Any) -> Any:
            _scope.key = self.hearth_scope
            try:
                return super().receive_sample(*args, **kwargs)
            finally:
                _scope.key = None

    return ScopedJob


def read_config(path: Path) -> Any:
    """exllamav2's view of a model directory (reads config.json and the weights' headers; no GPU)."""
    from exllamav2 import ExLlamaV2Config

    if not (path / "config.json").is_file():
        raise ConfigError(f"{path} is not a model directory (no config.json)")
    try:
        config = ExLlamaV2Config(str(path))
        config.arch_compat_overrides(quiet=True)
    except (OSError, ValueError, KeyError, AssertionError, TypeError) as exc:
        raise ConfigError(f"exllamav2 cannot read the model in {path}: {type(exc).__name__}: {exc}") from None
    return config


@dataclass(frozen=True)
class Plan:
    """How a model runs in exllamav2: the cache, the context, the batch. ``make`` sets the model's config
    to match, within the limits the generator asserts rather than works around."""

    cache_tokens: int  # a whole number of pages
    context: int  # the longest sequence: prompt + answer
    chunk: int  # prompt tokens per forward pass
    batch: int  # sequences at once
    paged: bool  # paged attention (flash-attn): continuous batching and the prefix cache

    @classmethod
    def make(
        cls, config: Any, *, paged_attention: bool, cache_tokens: int | None, max_sequences: int | None
    ) -> Plan:
        tokens = _round_up(cache_tokens or config.max_seq_len, PAGE_TOKENS)
        # One sequence never outgrows the cache (nor, unpaged, the cache's single page).
        context = min(config.max_seq_len, tokens)
        config.max_seq_len = context
        # Paged, the prompt goes through in whole pages: a context shorter than a page runs unpaged.
        paged = paged_attention and not config.no_flash_attn and context >= PAGE_TOKENS
        chunk = min(CHUNK_TOKENS, context)
        config.max_input_len = _round_down(chunk, PAGE_TOKENS) if paged else chunk
        config.max_attention_size = config.max_input_len**2
        if paged:
            # The generator needs max_batch_size × 8 (its max_q_size) ≤ max_batch_size × max_input_len of the
            # model's config, whose max_batch_size stays 1.
            most = min(256, tokens // PAGE_TOKENS, config.max_input_len // 8)
            batch = max(1, min(max_sequences or DEFAULT_MAX_SEQUENCES, most))
        else:
            batch = 1
        return cls(tokens, context, config.max_input_len, batch, paged)


class ExLlamaV2Backend:
    def __init__(
        self,
        *,
        model: Any,
        cache: Any,
        tokenizer: Any,
        generator: Any,
        context_length: int,
        chat_template: str | None,
        eos_ids: frozenset[int],
        paged: bool,
    ) -> None:
        self._model = model
        self._cache = cache
        self._tokenizer = tokenizer
        self._generator = generator
        self._context_length = context_length
        self._chat_template = chat_template
        self._eos_ids = eos_ids
        self._paged = paged
        self._job_class = _scoped_job_class()
        self._jobs: dict[int, Any] = {}  # seq → ExLlamaV2DynamicJob
        self._prompts: dict[int, list[Scores]] = {}  # seq → its prompt's scores, for the next step (echo)
        self._scoring: set[int] = set()  # seqs that only score their prompt (max_new_tokens 0)
        self._pages: dict[int, int] = {}  # seq → pages it reserves
        self._next = 0
        self._state = self._measure()  # what cache() reports: taken on the generation thread

    @classmethod
    def load(
        cls,
        path: Path,
        *,
        cache_tokens: int | None = None,
        cache_quant: CacheQuant = "fp16",
        max_sequences: int | None = None,
    ) -> ExLlamaV2Backend:
        """Load a model directory onto the GPUs (blocking: call it off the event loop)."""
        why = available()
        if why is not None:
            raise ConfigError(f"the exllamav2 backend cannot run here: {why}")
        import exllamav2
        import torch
        from exllamav2 import ExLlamaV2
        from exllamav2.attn import has_flash_attn_with_paged

        config = read_config(path)
        if any(torch.cuda.get_device_capability(i)[0] < 8 for i in range(torch.cuda.device_count())):
            config.no_flash_attn = True  # exllamav2 would call flash-attn, which needs Ampere or newer
        plan = Plan.make(
            config, paged_attention=bool(has_flash_attn_with_paged), cache_tokens=cache_tokens,
            max_sequences=max_sequences,
        )  # fmt: skip
        if not plan.paged:
            log.warning(
                "no paged attention (it needs flash-attn 2.5.7 or later and an Ampere or newer GPU): "
                "exllamav2 runs unpaged, one sequence at a time and without a prefix cache"
            )
        _install_scoped_hash()  # (before any memory is taken: it refuses a version it does not know)
        model, cache = _load_layers(
            lambda: ExLlamaV2(config),
            lambda model: getattr(exllamav2, CACHE_CLASSES[cache_quant])(
                model, max_seq_len=plan.cache_tokens, lazy=True
            ),
            what=f"{path.name} with a cache of {plan.cache_tokens} tokens ({cache_quant})",
        )
        log.info(
            "loaded %s: context %d, cache %d tokens (%s), %d sequences at once%s",
            path.name, plan.context, plan.cache_tokens, cache_quant, plan.batch,
            "" if plan.paged else " (unpaged)",
        )  # fmt: skip
        return cls.assemble(path, model, cache, plan)

    @classmethod
    def assemble(cls, path: Path, model: Any, cache: Any, plan: Plan) -> ExLlamaV2Backend:
        """The generator over a loaded model and its cache, and the backend over that."""
        from exllamav2 import ExLlamaV2Tokenizer
        from exllamav2.generator import ExLlamaV2DynamicGenerator

        _install_scoped_hash()
        tokenizer = ExLlamaV2Tokenizer(model.config)
        generator = ExLlamaV2DynamicGenerator(
            model=model, cache=cache, tokenizer=tokenizer, max_batch_size=plan.batch,
            max_chunk_size=plan.chunk, paged=plan.paged,
        )  # fmt: skip
        eos = {int(tokenizer.eos_token_id)} if tokenizer.eos_token_id is not None else set()
        eos |= _generation_eos(path)
        return cls(
            model=model, cache=cache, tokenizer=tokenizer, generator=generator, context_length=plan.context,
            chat_template=_chat_template(path), eos_ids=frozenset(eos), paged=plan.paged,
        )  # fmt: skip

    # Text

    @property
    def context_length(self) -> int:
        return self._context_length

    @property
    def chat_template(self) -> str | None:
        return self._chat_template

    @property
    def bos_token(self) -> str:
        return str(self._tokenizer.bos_token or "")

    @property
    def eos_token(self) -> str:
        return str(self._tokenizer.eos_token or "")

    def encode(self, text: str, *, add_special_tokens: bool) -> list[int]:
        # Chat templates write special tokens as text (<|im_start|>): they must encode as themselves.
        ids = self._tokenizer.encode(text, add_bos=add_special_tokens, encode_special_tokens=True)
        return [int(i) for i in ids[0].tolist()]

    def decode(self, ids: Sequence[int]) -> str:
        # The list form of ``decode`` (which takes a tensor and lists it again): five times faster, and the
        # runner decodes twice per token of every sequence.
        return str(self._tokenizer.decode_(list(ids), False))

    @property
    def vocab_size(self) -> int:
        return int(self._model.config.vocab_size)

    @property
    def score_limit(self) -> int:
        """The longest prompt ``score_prompt`` takes: one forward pass, without a cache."""
        return int(self._model.config.max_input_len)

    def score_prompt(self, prompt_ids: Sequence[int], top: int) -> list[Scores]:
        import torch

        from node.backends.sampling import prompt_scores

        if len(prompt_ids) > self.score_limit:
            raise NeverFits(f"{len(prompt_ids)} prompt tokens are more than one pass scores")
        with _GPU, torch.inference_mode():
            logits = self._model.forward(
                torch.tensor([list(prompt_ids)], dtype=torch.long), cache=None, last_id_only=False
            )
        return prompt_scores(logits[0, :, : self.vocab_size].float().cpu(), prompt_ids, top)

    def constraint_vocabulary(self) -> tuple[str, frozenset[int]] | None:
        """The tokenizer as Hugging Face tokenizers' JSON, and the end-of-sequence ids (node.constrain)."""
        hf = getattr(self._tokenizer.tokenizer_model, "hf_tokenizer", None)  # None: a SentencePiece model
        return (str(hf.to_str()), self._eos_ids) if hf is not None else None

    # Batching

    def _promised(self) -> int:
        """Pages of jobs handed to the generator that it has not started yet (it will, at the next
        iteration): not free any more, though the generator has not taken them."""
        if not self._generator.pending_jobs:
            return 0
        pending = {id(job) for job in self._generator.pending_jobs}
        return sum(self._pages[seq] for seq, job in self._jobs.items() if id(job) in pending)

    def cache(self) -> CacheState:
        """The cache as of the last admit, step or cancel. Heartbeats read it from the event loop while the
        generation thread changes the generator: they get this snapshot, never the live tables."""
        return self._state

    def _measure(self) -> CacheState:
        generator = self._generator
        page = generator.page_size
        free_pages = max(0, len(generator.unreferenced_pages) - self._promised())
        return CacheState(generator.max_pages * page, free_pages * page, page, generator.max_batch_size)

    def admit(self, prompt_ids: Sequence[int], params: SamplingParams, scope: CacheScope) -> int | None:
        generator = self._generator
        page = generator.page_size
        pages = -(-(len(prompt_ids) + params.max_new_tokens) // page)
        context = self._context_length  # never more than the cache
        if len(prompt_ids) + params.max_new_tokens > context:
            raise NeverFits(
                f"{len(prompt_ids)} + {params.max_new_tokens} tokens exceed the context ({context})"
            )
        # The generator's own rule (iterate_start_jobs), minus what jobs enqueued since the last iteration
        # will take; pages this job could share with cached ones are not counted as a saving.
        if (
            len(self._jobs) >= generator.max_batch_size
            or pages > len(generator.unreferenced_pages) - self._promised()
        ):
            return None
        import torch

        scored = self.score_prompt(prompt_ids, params.logprobs or 0) if params.prompt_logprobs else None
        if params.max_new_tokens == 0:  # scoring only: nothing for the generator to run
            seq, self._next = self._next, self._next + 1
            self._scoring.add(seq)
            self._prompts[seq] = scored or []
            return seq
        eos = frozenset() if params.ignore_eos and params.constraint is None else self._eos_ids
        stop: list[int] = sorted(eos | set(params.stop_token_ids))
        settings = _sampler_settings(params)
        if params.presence_penalty or params.frequency_penalty:
            # OpenAI's penalties count the answer's tokens; exllamav2 counts its window of the whole
            # sequence. The window is kept to the answer (nothing yet; widened each step).
            settings.token_repetition_range = 0
        if params.logit_bias:
            from node.backends.sampling import bias_vector

            settings.token_bias = bias_vector(params.logit_bias, generator.padded_vocab_size)
        job = self._job_class(
            input_ids=torch.tensor([list(prompt_ids)], dtype=torch.long),
            max_new_tokens=params.max_new_tokens,
            gen_settings=settings,
            seed=params.seed,
            stop_conditions=stop,
            identifier=self._next,
            scope=scope.key,
            top=params.logprobs,
            vocab=self.vocab_size,
            filters=constraint_filters(params, self._model, self._tokenizer),
        )
        seq, self._next = self._next, self._next + 1
        if scored is not None:
            self._prompts[seq] = scored
        generator.enqueue(job)
        self._pages[seq] = pages
        self._jobs[seq] = job
        self._state = self._measure()
        return seq

    def step(self) -> list[Step]:
        steps: dict[int, Step] = {}
        for seq, scored in self._prompts.items():
            steps[seq] = Step(seq, prompt_scores=scored)
        self._prompts.clear()
        for seq in self._scoring:
            steps[seq].finish = "length"
        self._scoring.clear()
        with _GPU:
            results = self._generator.iterate() if self._jobs else []
        for r in results:
            if r.get("stage") != "streaming":
                continue
            seq = int(r["identifier"])
            step = steps.setdefault(seq, Step(seq))
            ids = r.get("token_ids")
            job = self._jobs.get(seq)
            if ids is not None:
                self._take(step, job, [int(t) for t in ids[0].tolist()])
            if r.get("eos"):
                if r.get("eos_reason") == "stop_token":
                    # Tokens held back (an incomplete UTF-8 character) are not emitted with a stop token's
                    # end: they come under "held", the stop token last (not part of the answer).
                    held = (r.get("held") or {}).get("token_ids")
                    if held is not None:
                        self._take(step, job, [int(t) for t in held[0].tolist()[:-1]])
                step.finish = "length" if r.get("eos_reason") == "max_new_tokens" else "stop"
                self._jobs.pop(seq, None)
                self._pages.pop(seq, None)
        for job in self._jobs.values():
            if job.gen_settings.token_repetition_range >= 0:  # penalties over the answer only
                job.gen_settings.token_repetition_range = max(0, job.new_tokens)
        self._state = self._measure()
        return list(steps.values())

    @staticmethod
    def _take(step: Step, job: Any, tokens: list[int]) -> None:
        """Tokens the generator emitted for a step, each with its scores when the job keeps them."""
        step.tokens += tokens
        if job is not None and job.hearth_top is not None:
            step.scores += job.hearth_scores[: len(tokens)]
            del job.hearth_scores[: len(tokens)]

    def cancel(self, seq: int) -> None:
        self._prompts.pop(seq, None)
        self._scoring.discard(seq)
        job = self._jobs.pop(seq, None)
        self._pages.pop(seq, None)
        if job is not None:
            with _GPU:  # the last job's end may defragment the cache: a kernel
                self._generator.cancel(job)
            self._state = self._measure()

    def close(self) -> None:
        """Free the weights and the cache now: the owner, or the next model, wants the memory."""
        import torch

        for seq in list(self._jobs):
            self.cancel(seq)
        self._state = CacheState(0, 0, self._state.page_tokens, self._state.max_sequences)
        with _GPU:
            if self._model is not None:
                self._model.unload()
        for name in ("sampling_pool", "filter_pool"):  # the generator's threads: not left to a collection
            pool = getattr(self._generator, name, None)
            if pool is not None:
                pool.shutdown(wait=False)
        # The generator's pages point back at it: a cycle that keeps the cache alive until a collection.
        self._model = self._cache = self._generator = self._tokenizer = None
        gc.collect()
        with _GPU:
            torch.cuda.empty_cache()


def _load_layers(
    make_model: Callable[[], Any], make_cache: Callable[[Any], Any], *, what: str
) -> tuple[Any, Any]:
    """A model and its cache, loaded over every visible GPU as it fills them, a layer at a time under the GPU
    lock, so that models already serving go on between layers. A load that fails frees what it took before
    it raises (only this function holds it): a ConfigError in one line when the GPUs' memory is short."""
    import torch

    model = make_model()
    cache = make_cache(model)
    layers = model.load_autosplit_gen(cache, callback_gen=_each_layer)
    try:
        while True:
            with _GPU:
                if next(layers, None) is None:
                    return model, cache
    except Exception as exc:
        # The traceback's frames (the loader's own among them) hold the tensors loaded so far.
        traceback.clear_frames(exc.__traceback__)
        with _GPU:
            model.unload()
        del model, cache, layers
        gc.collect()
        with _GPU:
            torch.cuda.empty_cache()
        if isinstance(exc, RuntimeError) and ("Insufficient VRAM" in str(exc) or "out of memory" in str(exc)):
            raise ConfigError(
                f"{what} does not fit in the GPUs' free memory: lower cache_tokens, or choose a q4 cache or "
                "fewer bits per weight"
            ) from None
        raise


def _each_layer(done: int, total: int) -> Iterator[bool]:
    """``load_autosplit_gen``'s progress callback: one yield per layer loaded."""
    yield True


def _sampler_settings(params: SamplingParams) -> Any:
    """Our parameters in exllamav2's sampler, every one set (its defaults are not OpenAI's: top_k 50,
    top_p 0.8, a repetition penalty of 1.025)."""
    from exllamav2.generator import ExLlamaV2Sampler

    if params.temperature == 0.0:
        return ExLlamaV2Sampler.Settings.greedy(
            token_frequency_penalty=params.frequency_penalty, token_presence_penalty=params.presence_penalty,
            token_repetition_penalty=params.repetition_penalty,
        )  # fmt: skip
    return ExLlamaV2Sampler.Settings(
        temperature=params.temperature,
        top_k=params.top_k,
        top_p=params.top_p if params.top_p < 1.0 else 0.0,  # exllamav2: 0 is off
        min_p=params.min_p,
        token_repetition_penalty=params.repetition_penalty,
        token_frequency_penalty=params.frequency_penalty,
        token_presence_penalty=params.presence_penalty,
    )


def _chat_template(path: Path) -> str | None:
    """The model's own template (exllamav2's tokenizer does not expose it), where Hugging Face keeps it:
    chat_template.jinja (transformers 4.43 and later), chat_template.json, or tokenizer_config.json."""
    try:
        return (path / "chat_template.jinja").read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        pass
    for name in ("chat_template.json", "tokenizer_config.json"):
        try:
            doc = json.loads((path / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        template = doc.get("chat_template") if isinstance(doc, dict) else None
        if isinstance(template, list):  # named templates: the default one
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        if isinstance(template, str):
            return template
    return None


def _generation_eos(path: Path) -> set[int]:
    """End-of-turn tokens a model lists in generation_config.json beside the tokenizer's one."""
    try:
        doc = json.loads((path / "generation_config.json").read_text())
    except (OSError, ValueError):
        return set()
    eos = doc.get("eos_token_id") if isinstance(doc, dict) else None
    if isinstance(eos, int):
        return {eos}
    if isinstance(eos, list):
        return {int(e) for e in eos if isinstance(e, int)}
    return set()


def _round_up(value: int, step: int) -> int:
    return -(-value // step) * step


def _round_down(value: int, step: int) -> int:
    return max(step, value // step * step)
