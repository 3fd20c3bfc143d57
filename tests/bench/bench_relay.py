"""Benchmark: what the scheduler's relay costs (not a test: it prints figures and asserts nothing).

The same streaming chat requests go straight to a node's ``/jobs`` and through the scheduler's
``/v1/chat/completions``, at 1, 10 and 100 concurrent streams, against a scripted backend that takes the
model out of the picture (tests/bench/scripted.py). The node and the scheduler run as separate processes so
that the scheduler's CPU time and resident memory are its own; the load generator is this process. Results
are in docs/benchmarks.md.

    .venv/bin/python -m tests.bench.bench_relay            # full run (about 2 minutes on 2 cores)
    .venv/bin/python -m tests.bench.bench_relay --quick    # smaller run, for a smoke check (about 1 minute)
    .venv/bin/python -m tests.bench.bench_relay --profile /tmp/sched.prof   # scheduler under cProfile

Printed: time to first token (TTFT) p50/p99 both ways and the difference of the percentiles ("added"),
relayed tokens per second and per scheduler CPU-second, and the scheduler's resident memory after a warm-up
and after 10,000 more requests.

How the load is made:
- TTFT is the time from sending the request to receiving the first chunk whose delta carries content, taken
  the same way on both paths (the SSE events the node writes inside its frames, and the scheduler relays).
- Concurrency is closed-loop: each of N workers sends its next stream as soon as its last one ends. Workers
  start staggered over one stream's duration, so arrivals spread out instead of coming in waves of N.
- Paced levels offer the same total (``--rate``, 2,000 tokens/s): each stream gets a token every
  ``N / rate`` seconds (0.5, 5 and 50 ms) on its own schedule, so every token reaches the scheduler as a
  frame of its own, and the levels differ in open streams, not in load.
- The burst level sends 100 unpaced streams: the node then packs many tokens into each frame, so it shows
  the relay's capacity when it is kept busy (and the TTFT of a saturated 2-core machine).
- Direct and relayed blocks alternate (two of each per level) so drift hits both paths alike; CPU time
  (user + system) of each process comes from psutil around each block.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import json
import logging
import os
import platform
import pstats
import secrets
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil  # type: ignore[import-untyped]

# A tiny Llama shape, only for the node's memory estimate: the scripted backend has no weights.
SCRIPTED_CONFIG = {
    "model_type": "llama", "hidden_size": 64, "intermediate_size": 172, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512, "max_position_embeddings": 4096,
}  # fmt: skip
READY_LINE = "HEARTH-BENCH-URL "
CONTENT_MARK = b'"delta":{"content":'


# --------------------------------------------------------------------------------------------------------------
# Child processes: the node and the scheduler, each serving on 127.0.0.1 with a free port.


def _stop_event() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def _serve_node(slots: int, data_dir: Path, scheduler_url: str) -> None:
    from node.app import start_node
    from node.settings import ModelSettings, NodeSettings
    from tests.bench.scripted import ScriptedBackend

    models = []
    for i in range(slots):
        # The scripted backend needs no weights; the node estimates each model's memory from its config.
        path = data_dir / "models" / f"bench-{i:02d}"
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text(json.dumps(SCRIPTED_CONFIG))
        models.append(ModelSettings(path=path, id=f"bench-{i:02d}", max_queued=100_000))
    settings = NodeSettings(
        node_id="bench", data_dir=data_dir / "node", models=models, advertise=False,
        scheduler_url=scheduler_url, memory_budget_bytes=1 << 40,
    )  # fmt: skip
    stop = _stop_event()
    runner, url, _ = await start_node(settings, loader=lambda _m, _s: ScriptedBackend())
    print(READY_LINE + url, flush=True)
    await stop.wait()
    await runner.cleanup()


async def _serve_scheduler(data_dir: Path, profile: str | None) -> None:
    from protocol.identity import load_authority
    from protocol.web import start_site
    from scheduler.app import create_app
    from scheduler.settings import SchedulerSettings

    settings = SchedulerSettings(
        port=0,
        data_dir=data_dir,
        discovery=False,
        authority_key=load_authority(data_dir / "authority").public_b64,
    )
    stop = _stop_event()
    profiler = cProfile.Profile() if profile else None
    runner, url = await start_site(create_app(settings), "127.0.0.1", 0)
    print(READY_LINE + url, flush=True)
    if profiler is not None:
        profiler.enable()
    await stop.wait()
    if profiler is not None and profile:
        profiler.disable()
        profiler.dump_stats(profile)
    await runner.cleanup()


# --------------------------------------------------------------------------------------------------------------
# The load generator.


@dataclass
class Target:
    name: str
    url: str
    headers: dict[str, str]
    direct: bool  # True: the node's /jobs (frames); False: the scheduler's /v1/chat/completions (SSE)
    # Direct calls must be signed like the scheduler's own (a fresh signature per body): sign(body) -> headers
    sign: Callable[[bytes], dict[str, str]] | None = None


@dataclass
class Block:
    """What one run of streams measured."""

    ttft: list[float] = field(default_factory=list)
    tokens: int = 0
    chunks: int = 0
    streams: int = 0
    errors: int = 0
    wall: float = 0.0
    cpu: dict[str, float] = field(default_factory=dict)


def _first_content(buf: bytearray) -> bool:
    """Consume whole SSE events from ``buf``; True when one carries non-empty delta content."""
    while True:
        end = buf.find(b"\n\n")
        if end < 0:
            return False
        event = bytes(buf[:end])
        del buf[: end + 2]
        for line in event.split(b"\n"):
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            choices = json.loads(line[6:]).get("choices") or [{}]
            if choices[0].get("delta", {}).get("content"):
                return True


class ProtocolMismatch(Exception):
    pass


async def _one_stream(
    session: aiohttp.ClientSession, target: Target, body: dict[str, Any], rid: str
) -> tuple[float, int, int]:
    """Send one streaming chat; return (TTFT seconds, content tokens received, chunks received)."""
    from protocol import frames

    if target.direct:
        data = json.dumps({"endpoint": "chat", "request_id": rid, "job_id": rid, "request": body}).encode()
    else:
        data = json.dumps(body).encode()
    sse = bytearray()
    seen: list[bytes] = []
    decoder = frames.FrameDecoder() if target.direct else None
    ttft = -1.0
    t0 = time.perf_counter()
    headers = target.headers if target.sign is None else {**target.headers, **target.sign(data)}
    async with session.post(target.url, data=data, headers=headers) as resp:
        if resp.status != 200:
            await resp.read()
            raise ProtocolMismatch(f"HTTP {resp.status}")
        async for chunk in resp.content.iter_any():
            now = time.perf_counter()
            if decoder is not None:
                parts = [f.payload for f in decoder.feed(chunk) if f.kind == frames.DATA]
                payload = b"".join(parts)
            else:
                payload = chunk
            seen.append(payload)
            if ttft < 0:
                sse += payload
                if _first_content(sse):
                    ttft = now - t0
    if decoder is not None:
        decoder.close()
    whole = b"".join(seen)
    if ttft < 0 or not whole.endswith(b"data: [DONE]\n\n"):
        raise ProtocolMismatch("stream ended without content or [DONE]")
    return ttft, whole.count(CONTENT_MARK), len(seen)


async def _one_plain(
    session: aiohttp.ClientSession, url: str, headers: dict[str, str], body: dict[str, Any]
) -> None:
    async with session.post(url, data=json.dumps(body).encode(), headers=headers) as resp:
        await resp.read()
        if resp.status != 200:
            raise ProtocolMismatch(f"HTTP {resp.status}")


async def _closed_loop(
    concurrency: int,
    total: int,
    deadline: float,
    job: Callable[[int, int], Awaitable[None]],
    stagger_s: float = 0.0,
) -> tuple[int, int]:
    """Run ``job(worker, index)`` for index 0..total-1 on ``concurrency`` workers; return (done, errors).

    Worker ``w`` starts ``w / concurrency * stagger_s`` late: with streams of equal length (stagger_s = one
    stream's duration) the arrivals then spread evenly instead of coming in waves of ``concurrency``."""
    counter = iter(range(total))
    done = errors = 0

    async def worker(w: int) -> None:
        nonlocal done, errors
        if stagger_s:
            await asyncio.sleep(w / concurrency * stagger_s)
        for i in counter:
            if time.monotonic() > deadline:
                return
            try:
                await job(w, i)
                done += 1
            except (ProtocolMismatch, aiohttp.ClientError, TimeoutError, ValueError):
                errors += 1

    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    return done, errors


def _cpu(proc: psutil.Process) -> float:
    """CPU seconds the process has run: from the scheduler's nanosecond counters of each of its threads
    (/proc/PID/task/*/schedstat) where Linux has them, since the tick-based user + system time moves in
    10 ms steps, a few percent of a benchmark block; else user + system."""
    total, found = 0, False
    with contextlib.suppress(OSError):
        for task in os.scandir(f"/proc/{proc.pid}/task"):
            with contextlib.suppress(OSError, ValueError, IndexError), open(f"{task.path}/schedstat") as f:
                total += int(f.read().split()[0])
                found = True
    if found:
        return total / 1e9
    t = proc.cpu_times()
    return float(t.user + t.system)


@dataclass
class Bench:
    node: psutil.Process
    scheduler: psutil.Process
    direct: Target
    via: Target
    tokens: int
    delay_ms: float
    slots: int
    session: aiohttp.ClientSession
    me: psutil.Process = field(default_factory=psutil.Process)

    def body(
        self, worker: int, stream: bool = True, tokens: int | None = None, delay_ms: float | None = None
    ) -> dict[str, Any]:
        delay = self.delay_ms if delay_ms is None else delay_ms
        return {
            "model": f"bench-{worker % self.slots:02d}",
            "messages": [{"role": "user", "content": f"relay benchmark, delay_ms={delay}"}],
            "max_tokens": self.tokens if tokens is None else tokens,
            "temperature": 0,
            "stream": stream,
        }

    async def streams(self, target: Target, concurrency: int, total: int, budget_s: float) -> Block:
        block = Block()
        procs = {"node": self.node, "scheduler": self.scheduler, "client": self.me}

        async def job(w: int, i: int) -> None:
            ttft, got, chunks = await _one_stream(
                self.session, target, self.body(w), f"bench{i}x{secrets.token_hex(4)}"
            )
            block.ttft.append(ttft)
            block.tokens += got
            block.chunks += chunks

        stagger = self.tokens * self.delay_ms / 1000
        before = {k: _cpu(p) for k, p in procs.items()}
        t0 = time.perf_counter()
        block.streams, block.errors = await _closed_loop(
            concurrency, total, time.monotonic() + budget_s, job, stagger
        )
        block.wall = time.perf_counter() - t0
        block.cpu = {k: _cpu(p) - before[k] for k, p in procs.items()}
        return block


def _pct(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), q in 0..100."""
    if not values:
        return float("nan")
    s = sorted(values)
    pos = (len(s) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _merge(blocks: list[Block]) -> Block:
    out = Block()
    for b in blocks:
        out.ttft += b.ttft
        out.tokens += b.tokens
        out.chunks += b.chunks
        out.streams += b.streams
        out.errors += b.errors
        out.wall += b.wall
        for k, v in b.cpu.items():
            out.cpu[k] = out.cpu.get(k, 0.0) + v
    return out


async def _level(
    bench: Bench, concurrency: int, delay_ms: float, total: int, rounds: int, budget_s: float
) -> dict[str, Any]:
    """Alternate direct and relayed blocks (``rounds`` of each) so drift hits both paths alike."""
    bench.delay_ms = delay_ms
    await bench.streams(bench.direct, concurrency, concurrency, budget_s)  # warm connections and slots
    await bench.streams(bench.via, concurrency, concurrency, budget_s)
    direct: list[Block] = []
    via: list[Block] = []
    per_round = max(concurrency, total // rounds)
    for _ in range(rounds):
        direct.append(await bench.streams(bench.direct, concurrency, per_round, budget_s / (2 * rounds)))
        via.append(await bench.streams(bench.via, concurrency, per_round, budget_s / (2 * rounds)))
    d, v = _merge(direct), _merge(via)
    sched_cpu = v.cpu["scheduler"]
    return {
        "concurrency": concurrency,
        "delay_ms": delay_ms,
        "streams": [d.streams, v.streams],
        "errors": [d.errors, v.errors],
        "ttft_direct_ms": [_pct(d.ttft, 50) * 1e3, _pct(d.ttft, 99) * 1e3],
        "ttft_via_ms": [_pct(v.ttft, 50) * 1e3, _pct(v.ttft, 99) * 1e3],
        "added_ms": [
            (_pct(v.ttft, 50) - _pct(d.ttft, 50)) * 1e3,
            (_pct(v.ttft, 99) - _pct(d.ttft, 99)) * 1e3,
        ],
        "tokens_relayed": v.tokens,
        "tokens_direct": d.tokens,
        "relayed_tok_per_chunk": v.tokens / v.chunks if v.chunks else 0.0,
        "relayed_tok_per_s": v.tokens / v.wall if v.wall else 0.0,
        "direct_tok_per_s": d.tokens / d.wall if d.wall else 0.0,
        "scheduler_cpu_s": sched_cpu,
        "relayed_tok_per_cpu_s": v.tokens / sched_cpu if sched_cpu > 0 else float("inf"),
        "scheduler_cpu_per_token_us": sched_cpu / v.tokens * 1e6 if v.tokens else float("nan"),
        "busy_direct": {k: c / d.wall for k, c in d.cpu.items()},
        "busy_via": {k: c / v.wall for k, c in v.cpu.items()},
    }


async def _memory(bench: Bench, warmup: int, requests: int, concurrency: int, samples: int) -> dict[str, Any]:
    """Scheduler RSS after ``warmup`` requests, then every ``requests / samples`` of ``requests`` more.

    Short requests (16 tokens, no pacing), half streamed and half not, all through the scheduler."""
    via = bench.via

    async def job(w: int, i: int) -> None:
        if i % 2:
            await _one_stream(bench.session, via, bench.body(w, tokens=16, delay_ms=0), "unused")
        else:
            await _one_plain(
                bench.session, via.url, via.headers, bench.body(w, stream=False, tokens=16, delay_ms=0)
            )

    far = time.monotonic() + 600
    _, errors = await _closed_loop(concurrency, warmup, far, job)
    await asyncio.sleep(0.5)
    rss = [(0, bench.scheduler.memory_info().rss)]
    done_total = 0
    t0 = time.perf_counter()
    cpu0 = _cpu(bench.scheduler)
    step = requests // samples
    for _ in range(samples):
        done, err = await _closed_loop(concurrency, step, far, job)
        done_total += done
        errors += err
        await asyncio.sleep(0.5)  # let the usage writer drain its queue
        rss.append((done_total, bench.scheduler.memory_info().rss))
    wall = time.perf_counter() - t0
    cpu = _cpu(bench.scheduler) - cpu0
    mid = rss[len(rss) // 2]
    return {
        "warmup": warmup,
        "requests": done_total,
        "errors": errors,
        "rss": rss,
        "growth_bytes_per_request": (rss[-1][1] - rss[0][1]) / max(done_total, 1),
        "growth_second_half_bytes_per_request": (rss[-1][1] - mid[1]) / max(rss[-1][0] - mid[0], 1),
        "requests_per_s": done_total / wall,
        "scheduler_cpu_per_request_ms": cpu / max(done_total, 1) * 1e3,
    }


# --------------------------------------------------------------------------------------------------------------
# Orchestration and report.


async def _spawn(args: list[str], env: dict[str, str]) -> tuple[asyncio.subprocess.Process, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.bench.bench_relay", *args, stdout=asyncio.subprocess.PIPE, env=env
    )
    assert proc.stdout is not None
    try:
        line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode()
        if not line.startswith(READY_LINE):
            raise RuntimeError(f"child {args[:2]} did not start: {line!r}")
    except BaseException:  # a child that never came up (or Ctrl-C meanwhile) is not left running
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise
    return proc, line[len(READY_LINE) :].strip()


async def _stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 30)
        except TimeoutError:
            proc.kill()
            await proc.wait()


async def _wait_ready(session: aiohttp.ClientSession, url: str, token: str, slots: int) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with contextlib.suppress(aiohttp.ClientError):
            async with session.get(url + "/v1/models", headers={"Authorization": f"Bearer {token}"}) as resp:
                if resp.status == 200 and len((await resp.json())["data"]) >= slots:
                    return
        await asyncio.sleep(0.2)
    raise RuntimeError("the scheduler did not see the node's models in time")


@dataclass
class Cluster:
    """A scheduler and a node of scripted model slots, each a child process, on one fresh data directory."""

    data_dir: Path
    token: str  # a user token
    admin_token: str
    scheduler: psutil.Process
    scheduler_url: str
    node: psutil.Process
    node_url: str


@contextlib.asynccontextmanager
async def cluster(
    slots: int, *, profile: str | None = None, prefix: str = "hearth-bench-"
) -> AsyncIterator[Cluster]:
    """Start the two children (the node enrolled and approved as `hearth up` does it, its models listed by
    the scheduler), and stop them on the way out. ``profile``: run the scheduler under cProfile, stats there."""
    from hearth.up import certify_local_node
    from scheduler.store import Store

    env = dict(os.environ)
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        store = Store(Path(tmp) / "hearth.db")
        token, _ = store.create_token("bench")
        admin, _ = store.create_token("bench-admin", "admin")
        store.close()
        certify_local_node(Path(tmp), "bench")
        sched_args = ["--role", "scheduler", "--data-dir", tmp]
        if profile:
            sched_args += ["--profile", profile]
        sched_proc, sched_url = await _spawn(sched_args, env)
        node_proc = None
        try:
            node_args = ["--role", "node", "--slots", str(slots), "--data-dir", tmp, "--node-url", sched_url]
            node_proc, node_url = await _spawn(node_args, env)
            yield Cluster(
                Path(tmp), token, admin, psutil.Process(sched_proc.pid), sched_url,
                psutil.Process(node_proc.pid), node_url,
            )  # fmt: skip
        finally:
            if node_proc is not None:
                await _stop(node_proc)
            await _stop(sched_proc)


def source_revision() -> str:
    """The commit measured, with "+changes" when the code under test differs from it."""
    import subprocess

    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "scheduler", "node", "protocol", "policies"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return rev + ("+changes" if dirty else "")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def plan(opts: argparse.Namespace) -> list[tuple[str, int, float, int, float]]:
    """(label, concurrency, pace ms/token, streams per path, time budget s) of each measured level."""
    quick = opts.quick
    streams = {1: 60, 10: 100, 100: 200} if quick else {1: 300, 10: 300, 100: 400}
    levels = [
        (
            f"{c}",
            c,
            opts.delay_ms if opts.delay_ms is not None else 1000.0 * c / opts.rate,
            streams.get(c, 4 * c),
            30.0 if quick else 60.0,
        )
        for c in opts.levels
    ]
    if not opts.skip_burst:
        levels.append(("100 burst", 100, 0.0, 300 if quick else 1000, 20.0 if quick else 40.0))
    return levels


async def run_bench(opts: argparse.Namespace) -> dict[str, Any]:
    from protocol.identity import load_or_create_identity, sign_request

    results: dict[str, Any] = {
        "machine": {
            "cpu": cpu_model(),
            "cores": psutil.cpu_count(logical=True),
            "python": platform.python_version(),
            "aiohttp": aiohttp.__version__,
            "os": platform.platform(),
            "revision": source_revision(),
        },
        "params": {
            "tokens_per_stream": opts.tokens,
            "offered_tok_per_s": opts.rate,
            "slots": opts.slots,
            "quick": opts.quick,
        },
    }
    async with cluster(opts.slots, profile=opts.profile) as c:
        # The load generator signs direct calls with the scheduler's key, as the scheduler would.
        scheduler_key = load_or_create_identity(c.data_dir / "scheduler.key")
        connector = aiohttp.TCPConnector(limit=0)
        timeout = aiohttp.ClientTimeout(total=120)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            await _wait_ready(session, c.scheduler_url, c.token, opts.slots)
            bench = Bench(
                node=c.node,
                scheduler=c.scheduler,
                direct=Target(
                    "direct",
                    c.node_url + "/jobs",
                    {"Content-Type": "application/json"},
                    True,
                    lambda body: sign_request(scheduler_key, "POST", "/jobs", body, audience="bench"),
                ),
                via=Target(
                    "scheduler",
                    c.scheduler_url + "/v1/chat/completions",
                    {"Authorization": f"Bearer {c.token}", "Content-Type": "application/json"},
                    False,
                ),
                tokens=opts.tokens,
                delay_ms=0.0,
                slots=opts.slots,
                session=session,
            )
            levels = []
            for label, concurrency, pace, total, budget in plan(opts):
                print(f"  {label} concurrent streams, {pace:g} ms/token…", file=sys.stderr, flush=True)
                level = await _level(bench, concurrency, pace, total, 2, budget)
                level["label"] = label
                levels.append(level)
            results["levels"] = levels
            if not opts.skip_memory:
                warmup, requests = (200, 2000) if opts.quick else (500, opts.memory_requests)
                print(f"  memory: {warmup} + {requests} requests…", file=sys.stderr, flush=True)
                results["memory"] = await _memory(bench, warmup, requests, 50, 10)
    return results


TARGETS = {"added_p50_ms": 2.0, "added_p99_ms": 10.0, "tok_per_cpu_s": 20_000}


def _verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def report(r: dict[str, Any]) -> str:
    m, p = r["machine"], r["params"]
    out = [
        f"machine: {m['cpu']}, {m['cores']} logical CPUs (shared by node, scheduler and load generator); "
        f"Python {m['python']}, aiohttp {m['aiohttp']}; code at {m['revision']}",
        f"streams of {p['tokens_per_stream']} tokens; paced levels offer {p['offered_tok_per_s']:g} tokens/s in "
        f"total (pace = concurrency / rate); burst: no pacing; node: {p['slots']} scripted model slots",
        "",
        "                          TTFT p50 (ms)            TTFT p99 (ms)        relayed  tokens  relayed tok  "
        "sched CPU  busy via scheduler",
        "streams   pace     n    direct    via  added    direct    via  added     tok/s  /chunk   per CPU-s  "
        " per token  node sched client",
    ]
    for lv in r.get("levels", []):
        dp50, dp99 = lv["ttft_direct_ms"]
        vp50, vp99 = lv["ttft_via_ms"]
        a50, a99 = lv["added_ms"]
        busy = lv["busy_via"]
        out.append(
            f"{lv['label']:>9} {lv['delay_ms']:5.1f} {lv['streams'][1]:>5}  {dp50:8.2f} {vp50:6.2f} {a50:+6.2f}  "
            f"{dp99:8.2f} {vp99:6.2f} {a99:+6.2f}  {lv['relayed_tok_per_s']:8.0f}  {lv['relayed_tok_per_chunk']:6.1f}"
            f"  {lv['relayed_tok_per_cpu_s']:9.0f}"
            f"  {lv['scheduler_cpu_per_token_us']:6.1f} µs  {busy['node']:4.2f}  {busy['scheduler']:4.2f}  "
            f"{busy['client']:4.2f}"
        )
        if any(lv["errors"]):
            out.append(f"          errors: direct {lv['errors'][0]}, via scheduler {lv['errors'][1]}")
    out.append(
        "(pace: ms per token; tokens/chunk: content tokens per read the client got from the scheduler; "
        "busy: CPU-seconds per second of each process while streaming via the scheduler)"
    )
    if "memory" in r:
        mem = r["memory"]
        first, last = mem["rss"][0][1], mem["rss"][-1][1]
        out += [
            "",
            f"scheduler RSS after {mem['warmup']} warm-up requests: {first / 2**20:.1f} MiB; after "
            f"{mem['requests']} more: {last / 2**20:.1f} MiB "
            f"({mem['growth_bytes_per_request']:+.1f} bytes/request; over the second half "
            f"{mem['growth_second_half_bytes_per_request']:+.1f} bytes/request; errors {mem['errors']})",
            "  samples (requests after warm-up: MiB): "
            + ", ".join(f"{n}: {b / 2**20:.2f}" for n, b in mem["rss"]),
            f"  {mem['requests_per_s']:.0f} requests/s through the scheduler (16 tokens, half streamed), "
            f"{mem['scheduler_cpu_per_request_ms']:.2f} ms scheduler CPU per request",
        ]
    paced = [lv for lv in r.get("levels", []) if lv["delay_ms"] > 0]
    top = next((lv for lv in paced if lv["concurrency"] == 100), None)
    out += ["", "targets:"]
    if top is not None:
        out += [
            f"  added TTFT p50 at 100 streams {top['added_ms'][0]:+.2f} ms (target <= 2 ms): "
            f"{_verdict(top['added_ms'][0] <= TARGETS['added_p50_ms'])}",
            f"  added TTFT p99 at 100 streams {top['added_ms'][1]:+.2f} ms (target <= 10 ms): "
            f"{_verdict(top['added_ms'][1] <= TARGETS['added_p99_ms'])}",
        ]
    for lv in r.get("levels", []):
        out.append(
            f"  relayed tokens per scheduler CPU-second, {lv['label']} streams: {lv['relayed_tok_per_cpu_s']:.0f} "
            f"(target >= 20000): {_verdict(lv['relayed_tok_per_cpu_s'] >= TARGETS['tok_per_cpu_s'])}"
        )
    return "\n".join(out)


def run_and_report(
    run: Callable[[argparse.Namespace], Coroutine[Any, Any, dict[str, Any]]],
    report: Callable[[dict[str, Any]], str],
    opts: argparse.Namespace,
) -> None:
    """Run a benchmark and print its report and run time; write ``--json``, print ``--profile``'s stats."""
    started = time.perf_counter()
    results = asyncio.run(run(opts))
    results["runtime_s"] = time.perf_counter() - started
    print(report(results))
    print(f"\n(total run time {results['runtime_s']:.0f} s)")
    if opts.json:
        Path(opts.json).write_text(json.dumps(results, indent=2))
    if opts.profile:
        _print_profile(opts.profile, 30)


def _print_profile(path: str, limit: int) -> None:
    stats = pstats.Stats(path)
    stats.sort_stats("tottime").print_stats(limit)
    stats.sort_stats("cumulative").print_stats(limit)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench.bench_relay", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="fewer streams and requests (a smoke run)")
    parser.add_argument("--tokens", type=int, default=64, help="tokens per stream (default 64)")
    parser.add_argument(
        "--rate",
        type=float,
        default=2000.0,
        help="tokens/s offered in total at each paced level; each stream's pace is concurrency/rate (default 2000)",
    )
    parser.add_argument("--delay-ms", type=float, help="fixed pace per token for every paced level instead")
    parser.add_argument("--slots", type=int, default=100, help="model slots on the node (default 100)")
    parser.add_argument(
        "--levels", type=int, nargs="+", default=[1, 10, 100], help="paced concurrency levels"
    )
    parser.add_argument("--skip-burst", action="store_true", help="leave out the unpaced 100-stream level")
    parser.add_argument("--skip-memory", action="store_true", help="leave out the 10,000-request memory run")
    parser.add_argument(
        "--memory-requests", type=int, default=10_000, help="requests after the warm-up in the memory run"
    )
    parser.add_argument("--json", metavar="PATH", help="also write the raw results here")
    parser.add_argument("--profile", metavar="PATH", help="run the scheduler under cProfile, stats to PATH")
    parser.add_argument(
        "--role", choices=["bench", "node", "scheduler"], default="bench", help=argparse.SUPPRESS
    )
    parser.add_argument("--node-url", help=argparse.SUPPRESS)  # for the node: the scheduler's URL
    parser.add_argument("--data-dir", help=argparse.SUPPRESS)
    opts = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if opts.role == "node":
        asyncio.run(_serve_node(opts.slots, Path(opts.data_dir), opts.node_url))
        return
    if opts.role == "scheduler":
        asyncio.run(_serve_scheduler(Path(opts.data_dir), opts.profile))
        return
    run_and_report(run_bench, report, opts)


if __name__ == "__main__":
    main()
