"""Benchmark: the GPU node against exllamav2's own generator (a GPU machine; not a test: it prints figures).

The same prompts (random token text of 128 and 2,000 tokens, a different one per stream so no prefix cache
helps either side) go

- **raw**: straight into ``ExLlamaV2DynamicGenerator`` in this process (library jobs, its ``iterate()`` loop),
- **node**: through a Hearth node in its own process, over HTTP, as the scheduler sends jobs (signed
  ``POST /jobs``, frames back), the node running the same generator on its job-runner thread,

at 1, 4, 16 and 64 concurrent streams, each generating ``--tokens`` tokens (end-of-text ignored), a level
repeated until it has given at least 8 first-token times (8 rounds of one stream, 2 of four). Both load the
model the same way (``ExLlamaV2Backend.load``: same cache, batch size and chunking).

Printed per prompt length and concurrency: TTFT p50 (raw / node / added), aggregate tokens/s (raw / node /
ratio). Then: ``/healthz`` latency p50/p99 while 16 × 2,000-token prompts are being read; how long after a
client hangs up the job's cache pages are free (against one decode iteration); batch-1 decode speed as a
fraction of the memory-bandwidth limit (weight bytes per token over the GPU's measured copy bandwidth).
Targets (issue 5): single stream ≥ 97 % of raw, 16 streams ≥ 95 %, added TTFT ≤ 2 ms p50, ``/healthz`` p99 <
50 ms, pages freed ≤ one iteration + 50 ms.

    python -m tests.bench.bench_exl2                      # llama-3.1-8b shape, fp16, about 10 minutes
    python -m tests.bench.bench_exl2 --arch llama-3.2-1b --quick
    python -m tests.bench.bench_exl2 --cpu-smoke          # the harness on a CPU box (exllamav2's generator
                                                          # over tests/node/exllamav2_cpu.py's stand-ins)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from protocol import frames

READY = "HEARTH-EXL2-NODE "
LEVELS = (1, 4, 16, 64)
PROMPTS = (128, 2000)


# ----------------------------------------------------------------------------------------------------------
# The node, in its own process


async def _serve(model: Path, data_dir: Path, backend: str, cache_tokens: int, sequences: int) -> None:
    from node.backends import load_backend
    from node.settings import ModelSettings, NodeSettings
    from tests.support import start_stack, stop_stack

    settings = ModelSettings(
        path=model, id="bench", cache_tokens=cache_tokens, max_sequences=sequences, max_queued=10_000
    )
    with contextlib.ExitStack() as stand_ins:

        def on_stand_ins(model: ModelSettings, node: NodeSettings) -> Any:
            assert model.path is not None
            return exllamav2_cpu.load(model.path, cache_tokens=cache_tokens, max_sequences=sequences)[0]

        loader = load_backend
        if backend == "exllamav2-cpu":  # the --cpu-smoke node: exllamav2 over the CPU stand-ins
            from tests.node import exllamav2_cpu

            stand_ins.enter_context(exllamav2_cpu.stand_in())
            loader, backend = (
                on_stand_ins,
                "transformers",
            )  # (a backend the settings accept: the loader decides)
        stack = await start_stack(data_dir, [settings], loader=loader, node={"backend": backend})
        print(READY + stack.node_url, flush=True)
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        await stop.wait()
        await stop_stack(stack)


# ----------------------------------------------------------------------------------------------------------
# Prompts


def _prompts(tokenizer_encode: Any, length: int, count: int, seed: int) -> list[str]:
    """``count`` different texts of about ``length`` tokens each."""
    rng = random.Random(seed)
    words = [
        "river",
        "stone",
        "lantern",
        "maple",
        "orbit",
        "quiet",
        "harbor",
        "velvet",
        "ember",
        "cobalt",
        "meadow",
        "signal",
        "thistle",
    ]
    texts = []
    for _ in range(count):
        text = " ".join(rng.choice(words) + str(rng.randrange(1000)) for _ in range(length))
        ids = tokenizer_encode(text)
        while len(ids) > length:
            text = text[: int(len(text) * length / len(ids)) - 1]
            ids = tokenizer_encode(text)
        texts.append(text)
    return texts


# ----------------------------------------------------------------------------------------------------------
# Raw: the library alone


@dataclass
class Run:
    ttft: list[float]
    tokens: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


TTFT_SAMPLES = 8  # at least, per level: a level of c streams runs ceil(8 / c) rounds


def _rounds(streams: int) -> int:
    return -(-TTFT_SAMPLES // streams)


def _merge(runs: list[Run]) -> Run:
    return Run([t for r in runs for t in r.ttft], sum(r.tokens for r in runs), sum(r.seconds for r in runs))


def _raw(backend: Any, prompts: list[list[int]], new_tokens: int) -> Run:
    import torch
    from exllamav2.generator import ExLlamaV2DynamicJob, ExLlamaV2Sampler

    generator = backend._generator
    # Plain jobs share cached pages across runs (the node's jobs, in private scopes, never do): start each
    # run from an empty cache so that neither side is helped by the one before.
    generator.reset_page_table()
    settings = ExLlamaV2Sampler.Settings(temperature=1.0, top_k=0, top_p=0.0, token_repetition_penalty=1.0)
    start = time.perf_counter()
    first: dict[int, float] = {}
    for i, ids in enumerate(prompts):
        generator.enqueue(
            ExLlamaV2DynamicJob(
                input_ids=torch.tensor([ids]), max_new_tokens=new_tokens, gen_settings=settings,
                stop_conditions=[], identifier=i,
            )
        )  # fmt: skip
    tokens = 0
    while generator.num_remaining_jobs():
        for r in generator.iterate():
            if r["stage"] == "streaming" and "token_ids" in r:
                first.setdefault(r["identifier"], time.perf_counter() - start)
                tokens += r["token_ids"].shape[-1]
    return Run([first[i] for i in range(len(prompts))], tokens, time.perf_counter() - start)


# ----------------------------------------------------------------------------------------------------------
# Through the node


class NodeClient:
    def __init__(self, url: str, data_dir: Path) -> None:
        from protocol.identity import load_or_create_identity

        self.url = url
        self.identity = load_or_create_identity(data_dir / "scheduler.key")

    def headers(self, method: str, path: str, body: bytes = b"") -> dict[str, str]:
        from protocol.identity import sign_request

        return sign_request(self.identity, method, path, body, audience="local")

    async def job(
        self,
        session: aiohttp.ClientSession,
        prompt: str,
        new_tokens: int,
        start: float,
        *,
        hang_up: bool = False,
    ) -> tuple[float, int]:
        """(TTFT from ``start``, completion tokens); ``hang_up``: leave after the first token."""
        job_id = os.urandom(6).hex()
        request = {
            "model": "bench",
            "prompt": prompt,
            "max_tokens": new_tokens,
            "stream": True,
            "ignore_eos": True,
        }
        body = json.dumps(
            {"job_id": job_id, "endpoint": "completion", "request_id": job_id, "request": request}
        ).encode()
        first, completion = 0.0, 0
        decoder = frames.FrameDecoder()
        async with session.post(
            self.url + "/jobs", data=body, headers=self.headers("POST", "/jobs", body)
        ) as resp:
            if resp.status != 200:
                raise RuntimeError(f"the node answered {resp.status}: {await resp.text()}")
            async for chunk in resp.content.iter_any():
                for frame in decoder.feed(chunk):
                    if frame.kind == frames.DATA and b'"text":' in frame.payload and not first:
                        first = time.perf_counter() - start
                        if hang_up:
                            return first, 0
                    elif frame.kind == frames.META:
                        completion = int(json.loads(frame.payload).get("completion_tokens", 0))
        return first, completion

    async def status(self, session: aiohttp.ClientSession) -> dict[str, Any]:
        async with session.get(self.url + "/status", headers=self.headers("GET", "/status")) as resp:
            doc: dict[str, Any] = await resp.json()
            return next(m for m in doc["models"] if m["id"] == "bench")


async def _node_level(client: NodeClient, prompts: list[str], new_tokens: int) -> Run:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1800)) as session:
        start = time.perf_counter()
        results = await asyncio.gather(*(client.job(session, p, new_tokens, start) for p in prompts))
        seconds = time.perf_counter() - start
    return Run([t for t, _ in results], sum(n for _, n in results), seconds)


async def _healthz_under_prefill(client: NodeClient, prompts: list[str]) -> list[float]:
    """/healthz latencies (ms) while ``prompts`` are being read (one token each)."""
    latencies: list[float] = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1800)) as session:
        start = time.perf_counter()
        jobs = asyncio.gather(*(client.job(session, p, 1, start) for p in prompts))
        while not jobs.done():
            t = time.perf_counter()
            async with session.get(client.url + "/healthz") as resp:
                await resp.read()
            latencies.append((time.perf_counter() - t) * 1000)
            await asyncio.sleep(0.01)
        await jobs
    return latencies


async def _cancel_free(client: NodeClient, prompt: str, new_tokens: int) -> tuple[float, float]:
    """(ms from hanging up until the node reports the cache free again, ms per decode iteration alone)."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        total = (await client.status(session))["cache_tokens"]
        one = await _node_level(client, [prompt], 64)
        iteration_ms = 1000 / one.rate if one.rate else 0.0
        await client.job(session, prompt, new_tokens, time.perf_counter(), hang_up=True)
        gone = time.perf_counter()
        while (await client.status(session))["cache_free_tokens"] != total:
            if time.perf_counter() - gone > 30:
                raise RuntimeError("the cache was not freed within 30 s")
            await asyncio.sleep(0.002)
        return (time.perf_counter() - gone) * 1000, iteration_ms


def _bandwidth_gbs() -> float:
    """The GPU's device-to-device copy rate, bytes read + written (GB/s, 1e9)."""
    import torch

    a = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        b.copy_(a)
    torch.cuda.synchronize()
    return 10 * 2 * a.numel() / (time.perf_counter() - t) / 1e9


# ----------------------------------------------------------------------------------------------------------


def _p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def run(opts: argparse.Namespace) -> dict[str, Any]:
    from tests.gpu.gpu_model import build_gpu_model, decode_bytes

    work = Path(opts.workdir or tempfile.mkdtemp(prefix="hearth-exl2-"))
    if opts.cpu_smoke:
        from node.demo import build_demo_model

        model = build_demo_model(work / "demo")
    else:
        model = build_gpu_model(work / opts.arch, opts.arch)
    levels = (1, 4) if opts.quick or opts.cpu_smoke else LEVELS
    lengths = (128,) if opts.cpu_smoke else PROMPTS
    sequences = max(levels)
    cache_tokens = sequences * (max(lengths) + opts.tokens + 256)
    result: dict[str, Any] = {
        "arch": "demo" if opts.cpu_smoke else opts.arch,
        "tokens": opts.tokens,
        "levels": {},
    }

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    encode = lambda text: tok.encode(text, add_special_tokens=True)  # noqa: E731
    prompts = {n: _prompts(encode, n, sequences, seed=n) for n in lengths}

    with contextlib.ExitStack() as stand_ins:
        if opts.cpu_smoke:  # exllamav2's own generator over the CPU stand-ins (tests/node/exllamav2_cpu.py)
            from tests.node import exllamav2_cpu

            stand_ins.enter_context(exllamav2_cpu.stand_in())
            backend, _ = exllamav2_cpu.load(model, cache_tokens=cache_tokens, max_sequences=sequences)
        else:
            import torch

            from node.backends.exllamav2_backend import ExLlamaV2Backend

            result["gpu"] = torch.cuda.get_device_name(0)
            result["bandwidth_gbs"] = _bandwidth_gbs()
            backend = ExLlamaV2Backend.load(model, cache_tokens=cache_tokens, max_sequences=sequences)
            result["decode_bytes"] = decode_bytes(model)
        _raw(backend, [encode(prompts[128][0])], 8)  # warm-up (kernels, allocator)
        for n in lengths:
            for c in levels:
                ids = [encode(p) for p in prompts[n][:c]]
                r = _merge([_raw(backend, ids, opts.tokens) for _ in range(_rounds(c))])
                result["levels"].setdefault(f"{n}x{c}", {})["raw"] = {"ttft": r.ttft, "rate": r.rate}
                print(
                    f"raw   prompt {n:5d} × {c:2d}: {r.rate:9.1f} tok/s, TTFT p50 {_p(r.ttft, 0.5) * 1000:7.2f} ms",
                    flush=True,
                )
        backend.close()
        del backend

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    backend_name = "exllamav2-cpu" if opts.cpu_smoke else "exllamav2"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.bench.bench_exl2", "--serve", str(model), str(work / "stack"), backend_name,
        str(cache_tokens), str(sequences), stdout=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = ""
        while not line.startswith(READY):  # (exllamav2 prints a warning or two as it is imported)
            line = (await asyncio.wait_for(proc.stdout.readline(), 900)).decode()
            if not line:
                raise RuntimeError("the node did not start (see its output above)")
        client = NodeClient(line[len(READY) :].strip(), work / "stack")
        await _node_level(client, prompts[128][:1], 8)  # warm-up
        for n in lengths:
            for c in levels:
                r = _merge(
                    [await _node_level(client, prompts[n][:c], opts.tokens) for _ in range(_rounds(c))]
                )
                result["levels"].setdefault(f"{n}x{c}", {})["node"] = {"ttft": r.ttft, "rate": r.rate}
                print(
                    f"node  prompt {n:5d} × {c:2d}: {r.rate:9.1f} tok/s, TTFT p50 {_p(r.ttft, 0.5) * 1000:7.2f} ms",
                    flush=True,
                )
        long = prompts[max(lengths)][: min(16, sequences)]
        result["healthz_ms"] = await _healthz_under_prefill(client, long)
        result["healthz_streams"] = (len(long), max(lengths))
        freed_ms, iteration_ms = await _cancel_free(client, prompts[max(lengths)][0], 4 * opts.tokens)
        result["cancel"] = {"freed_ms": freed_ms, "iteration_ms": iteration_ms}
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(proc.wait(), 60)
    return result


def report(r: dict[str, Any]) -> str:
    lines = [
        f"model: {r['arch']} (random weights), {r['tokens']} new tokens per stream; GPU: {r.get('gpu', 'none')}",
        "",
        "| prompt × streams | TTFT p50 raw / node / added (ms) | tokens/s raw / node | node / raw |",
        "|---|---|---|---|",
    ]
    for key, both in r["levels"].items():
        raw, node = both.get("raw"), both["node"]
        tn = _p(node["ttft"], 0.5) * 1000
        if raw is None:
            lines.append(f"| {key} | – / {tn:.2f} / – | – / {node['rate']:.1f} | – |")
            continue
        tr = _p(raw["ttft"], 0.5) * 1000
        ratio = node["rate"] / raw["rate"] if raw["rate"] else float("nan")
        lines.append(
            f"| {key} | {tr:.2f} / {tn:.2f} / **{tn - tr:+.2f}** | {raw['rate']:.1f} / {node['rate']:.1f} | **{ratio:.1%}** |"
        )
    h = r["healthz_ms"]
    lines += [
        "",
        f"/healthz while {r['healthz_streams'][0]} prompts of {r['healthz_streams'][1]} tokens are read: p50 {_p(h, 0.5):.1f} ms, p99 {_p(h, 0.99):.1f} ms ({len(h)} probes)",
    ]
    c = r["cancel"]
    lines.append(
        f"cache free {c['freed_ms']:.1f} ms after the client hung up (one decode iteration: {c['iteration_ms']:.1f} ms)"
    )
    if "bandwidth_gbs" in r:
        single = r["levels"].get("128x1", {}).get("raw")
        if single:
            limit = r["bandwidth_gbs"] * 1e9 / r["decode_bytes"]
            lines.append(
                f"batch-1 decode: {single['rate']:.1f} tok/s = {single['rate'] / limit:.1%} of the bandwidth limit "
                f"({r['decode_bytes'] / 1e9:.2f} GB of weights per token at {r['bandwidth_gbs']:.0f} GB/s measured)"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--serve":
        model, data_dir, backend, cache_tokens, sequences = argv[1:6]
        asyncio.run(_serve(Path(model), Path(data_dir), backend, int(cache_tokens), int(sequences)))
        return
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arch", default="llama-3.1-8b", help="the model shape (tests/gpu/gpu_model.py)")
    parser.add_argument("--tokens", type=int, default=256, help="new tokens per stream")
    parser.add_argument("--quick", action="store_true", help="1 and 4 streams only")
    parser.add_argument(
        "--cpu-smoke", action="store_true", help="the harness on a CPU: demo model, exllamav2 over stand-ins"
    )
    parser.add_argument("--workdir", default=None, help="where the model is built (kept between runs)")
    parser.add_argument("--json", default=None, help="also write the figures here")
    opts = parser.parse_args(argv)
    if opts.cpu_smoke:
        opts.tokens = min(opts.tokens, 32)
    result = asyncio.run(run(opts))
    print(report(result))
    if opts.json:
        Path(opts.json).write_text(json.dumps({**result, "median_node_ttft_ms": statistics.median(
            _p(v["node"]["ttft"], 0.5) * 1000 for v in result["levels"].values())}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
