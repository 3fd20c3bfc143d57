"""Soak: 100,000 mixed requests through a real scheduler and node, watching the scheduler for leaks.

Not a test (pytest never collects tests/bench): it prints figures and a verdict, and exits 1 on FAIL.

    .venv/bin/python -m tests.bench.soak                      # 100,000 requests, 16 in flight
    .venv/bin/python -m tests.bench.soak --quick              # 2,000 requests, a smoke run
    .venv/bin/python -m tests.bench.soak --requests 30000 --concurrency 16

The scheduler and the node run as separate processes on 127.0.0.1 (the children of
tests/bench/bench_relay.py, with the scripted backend of tests/bench/scripted.py, so the model costs nothing);
this process is the client, through aiohttp, with at most ``--concurrency`` requests in flight. Every tenth
request is invalid, one kind after another (see ``INVALID``); the rest are chat and completions, streamed
and not, in turn. Every answer's status is checked against the one expected, and valid answers' bodies too
(a JSON completion with choices; an SSE stream that ends with ``[DONE]`` and carries no error event).

The scheduler's resident memory (RSS) and open file descriptors are sampled every 1,000 requests (between
batches, after a short pause so queued usage rows are written). The verdict:

- RSS growth over the last half of the run (RSS at N minus RSS at N/2) under 1 MiB;
- open file descriptors back to their baseline once the client has closed its connections: the baseline is
  taken after start-up with no client connected; at the end the client closes its session and the script
  waits up to ``--settle`` seconds for the count to come back (the scheduler's own pool to the node closes
  idle connections after aiohttp's keep-alive of 15 s, checked every 15 s: up to 30 s after the last
  request, so the settle is longer than that);
- no unexpected status (any 5xx is one) and no malformed answer or client-side error.

``--quick`` judges statuses and descriptors only: its 2,000 requests are all warm-up for memory (SQLite's
page cache alone fills over the first ~15,000). Figures and what they showed: docs/benchmarks.md, "Soak".
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil  # type: ignore[import-untyped]

from protocol.envelope import MEDIA_TYPE as ENVELOPE_TYPE
from tests.bench.bench_relay import _spawn, _stop, _wait_ready, cpu_model, source_revision

GROWTH_LIMIT_BYTES = 1 << 20
SAMPLE_EVERY = 1000
SAMPLE_PAUSE_S = 0.25  # before each sample: in-flight requests have ended, the usage writer catches up
SLOTS = 4  # model slots on the node (bench-00 … bench-03): the valid requests spread over them
TOKENS = 8  # max_tokens of valid requests: the soak is about requests, not tokens

VALID = ("chat", "chat-stream", "completion", "completion-stream")
INVALID = (
    "bad-json",  # a body that is not JSON
    "not-object",  # JSON, but an array
    "empty-body",
    "unknown-model",
    "bad-token",  # a token the scheduler never issued
    "no-token",  # no Authorization header at all
    "wrong-type",  # messages as a string, max_tokens as a string, temperature as a list
    "unsupported",  # tools, which Hearth does not serve yet
    "max-tokens-cap",  # max_tokens over the policy's cap (8192): the scheduler refuses it
    "context-at-node",  # fits the scheduler's guess, not the node's context: the node refuses it, relayed
    "form-body",  # Content-Type: application/x-www-form-urlencoded with a form body
    "envelope-type",  # the end-to-end envelope's media type on a plaintext body
)


@dataclass(frozen=True)
class Call:
    kind: str
    path: str
    headers: dict[str, str]
    data: bytes
    expect: int
    stream: bool = False
    code: str | None = None  # the error code expected, where it tells which refusal answered


def make_call(i: int, token: str) -> Call:
    """The ``i``-th request of the run: every tenth is invalid (the kinds in turn), the rest valid."""
    auth = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    model = f"bench-{i % SLOTS:02d}"
    chat = {"model": model, "messages": [{"role": "user", "content": f"soak {i}"}], "max_tokens": TOKENS}
    if i % 10 == 9:
        kind = INVALID[(i // 10) % len(INVALID)]
        path, headers, expect, code = "/v1/chat/completions", auth, 400, None
        body: Any = chat
        data: bytes | None = None
        if kind == "bad-json":
            data = b'{"model": "' + model.encode() + b'", "messages": [{"role": "user", "content": "x"}'
        elif kind == "not-object":
            data = json.dumps([chat]).encode()
        elif kind == "empty-body":
            data = b""
        elif kind == "unknown-model":
            body, expect, code = {**chat, "model": "no-such-model"}, 404, "model_not_found"
        elif kind == "bad-token":
            headers, expect = {**auth, "Authorization": "Bearer hearth-not-a-real-token"}, 401
        elif kind == "no-token":
            headers, expect = {"Content-Type": "application/json"}, 401
        elif kind == "wrong-type":
            body = [
                {**chat, "messages": "soak"},
                {**chat, "max_tokens": "eight"},
                {**chat, "temperature": [0.5]},
            ][(i // 120) % 3]
        elif kind == "unsupported":
            body = {**chat, "tools": [{"type": "function", "function": {"name": "f"}}]}
        elif kind == "max-tokens-cap":
            path = "/v1/completions"
            body, code = {"model": model, "prompt": "soak", "max_tokens": 1_000_000}, "max_tokens_over_cap"
        elif kind == "context-at-node":
            # The scheduler guesses 4 bytes a token (about 1,000 here); the scripted model counts one a byte,
            # so 4,000 prompt tokens + 6,000 to generate do not fit its 8,192.
            body = {**chat, "messages": [{"role": "user", "content": "x" * 4000}], "max_tokens": 6000}
            code = "context_length_exceeded"
        elif kind == "form-body":
            headers = {**auth, "Content-Type": "application/x-www-form-urlencoded"}
            data = f"model={model}&prompt=soak&max_tokens={TOKENS}".encode()
        elif kind == "envelope-type":
            headers, code = {**auth, "Content-Type": ENVELOPE_TYPE}, "envelope_invalid"
        data = json.dumps(body).encode() if data is None else data
        return Call(kind, path, headers, data, expect, code=code)
    kind = VALID[(i - i // 10) % len(VALID)]
    stream = kind.endswith("-stream")
    if kind.startswith("chat"):
        return Call(
            kind, "/v1/chat/completions", auth, json.dumps({**chat, "stream": stream}).encode(), 200, stream
        )
    body = {"model": model, "prompt": f"soak {i}", "max_tokens": TOKENS, "stream": stream}
    return Call(kind, "/v1/completions", auth, json.dumps(body).encode(), 200, stream)


def check_answer(call: Call, status: int, content_type: str, body: bytes) -> str | None:
    """Why the answer is not the one expected, or None when it is."""
    if status != call.expect:
        return f"status {status}, expected {call.expect}"
    if call.expect != 200:
        try:
            err = json.loads(body)["error"]
            if not {"message", "type", "param", "code"} <= err.keys():
                return "error body lacks OpenAI's fields"
            if call.code is not None and err["code"] != call.code:
                return f"error code {err['code']!r}, expected {call.code!r}"
        except (ValueError, KeyError, TypeError, AttributeError):
            return "error body is not OpenAI's shape"
        return None
    if call.stream:
        if content_type != "text/event-stream":
            return f"stream answered as {content_type}"
        if not body.endswith(b"data: [DONE]\n\n") or b'"error"' in body:
            return "stream did not end with [DONE], or carried an error"
        return None
    try:
        doc = json.loads(body)
        if not doc["choices"] or "usage" not in doc:
            return "completion without choices or usage"
    except (ValueError, KeyError, TypeError):
        return "completion body is not JSON with choices"
    return None


@dataclass
class Tally:
    sent: Counter[str] = field(default_factory=Counter)
    failed: Counter[str] = field(default_factory=Counter)
    server_errors: int = 0
    examples: list[str] = field(default_factory=list)

    def fail(self, kind: str, why: str) -> None:
        self.failed[kind] += 1
        if len(self.examples) < 10:
            self.examples.append(f"{kind}: {why}")


async def one(session: aiohttp.ClientSession, base: str, call: Call, tally: Tally) -> None:
    tally.sent[call.kind] += 1
    try:
        async with session.post(base + call.path, data=call.data, headers=call.headers) as resp:
            body = await resp.read()
            status, content_type = resp.status, resp.content_type
    except (aiohttp.ClientError, TimeoutError) as exc:
        tally.fail(call.kind, f"client error {type(exc).__name__}")
        return
    if status >= 500:
        tally.server_errors += 1
    why = check_answer(call, status, content_type, body)
    if why is not None:
        tally.fail(call.kind, why)


@dataclass
class Sample:
    done: int
    rss: int
    fds: int
    node_rss: int


async def run_batches(
    session: aiohttp.ClientSession,
    base: str,
    token: str,
    total: int,
    concurrency: int,
    tally: Tally,
    on_sample: Callable[[int], None],
) -> None:
    """Send requests 0..total-1 with ``concurrency`` in flight, stopping at each sample point (every
    SAMPLE_EVERY requests, and the half-way mark) so every sample is taken at the same count."""

    async def worker(todo: Iterator[int]) -> None:
        for i in todo:
            await one(session, base, make_call(i, token), tally)

    marks = sorted(set(range(SAMPLE_EVERY, total, SAMPLE_EVERY)) | {total // 2, total})
    start = 0
    for mark in marks:
        todo = iter(range(start, mark))
        await asyncio.gather(*(worker(todo) for _ in range(concurrency)))
        start = mark
        await asyncio.sleep(SAMPLE_PAUSE_S)
        on_sample(mark)


async def settle_fds(proc: psutil.Process, baseline: int, settle_s: float) -> list[tuple[float, int]]:
    """Wait up to ``settle_s`` for the open descriptors to come back to ``baseline``; return each change
    of the count as (seconds since the client closed, count), the last one when it stopped waiting."""
    t0 = time.monotonic()
    seen: list[tuple[float, int]] = []
    while True:
        fds, waited = proc.num_fds(), time.monotonic() - t0
        if not seen or seen[-1][1] != fds:
            seen.append((waited, fds))
        if fds <= baseline or waited >= settle_s:
            if seen[-1][0] != waited:
                seen.append((waited, fds))
            return seen
        await asyncio.sleep(0.5)


async def soak(opts: argparse.Namespace) -> dict[str, Any]:
    from hearth.up import certify_local_node
    from scheduler.store import Store

    out: dict[str, Any] = {"machine": f"{cpu_model()}, {psutil.cpu_count()} logical CPUs"}
    out["revision"] = source_revision()
    tally = Tally()
    samples: list[Sample] = []
    with tempfile.TemporaryDirectory(prefix="hearth-soak-") as tmp:
        store = Store(Path(tmp) / "hearth.db")
        token, _ = store.create_token("soak")
        store.close()
        certify_local_node(Path(tmp), "bench")
        env = dict(os.environ)
        sched_proc, base = await _spawn(["--role", "scheduler", "--data-dir", tmp], env)
        node_proc = None
        try:
            node_proc, _ = await _spawn(
                ["--role", "node", "--slots", str(SLOTS), "--data-dir", tmp, "--node-url", base], env
            )
            sched, node = psutil.Process(sched_proc.pid), psutil.Process(node_proc.pid)
            async with aiohttp.ClientSession() as ready:
                await _wait_ready(ready, base, token, SLOTS)
            await asyncio.sleep(1.0)  # the readiness connection's close reaches the scheduler
            out["fd_baseline"] = sched.num_fds()

            def sample(done: int) -> None:
                samples.append(Sample(done, sched.memory_info().rss, sched.num_fds(), node.memory_info().rss))
                if done % (10 * SAMPLE_EVERY) == 0 or done in (opts.requests // 2, opts.requests):
                    rate = done / (time.perf_counter() - t0)
                    print(
                        f"  {done:>7} requests, {rate:5.0f}/s, scheduler RSS {samples[-1].rss / 2**20:.2f} MiB, "
                        f"{samples[-1].fds} fds, failures {sum(tally.failed.values())}",
                        file=sys.stderr,
                        flush=True,
                    )

            t0 = time.perf_counter()
            sample(0)
            cpu0 = sum(sched.cpu_times()[:2])
            timeout = aiohttp.ClientTimeout(total=120)
            connector = aiohttp.TCPConnector(limit=opts.concurrency)
            async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
                await run_batches(session, base, token, opts.requests, opts.concurrency, tally, sample)
            out["wall_s"] = time.perf_counter() - t0
            out["sched_cpu_s"] = sum(sched.cpu_times()[:2]) - cpu0
            out["fd_settle"] = await settle_fds(sched, out["fd_baseline"], opts.settle)
            out["fd_settle_s"], out["fd_end"] = out["fd_settle"][-1]
            out["node_alive"] = node_proc.returncode is None and sched_proc.returncode is None
        finally:
            if node_proc is not None:
                await _stop(node_proc)
            await _stop(sched_proc)
    out["samples"] = samples
    out["tally"] = tally
    return out


def report(r: dict[str, Any], opts: argparse.Namespace) -> tuple[str, bool]:
    samples: list[Sample] = r["samples"]
    tally: Tally = r["tally"]
    by_done = {s.done: s for s in samples}
    n, half = opts.requests, opts.requests // 2
    first, mid, last = by_done[0], by_done[half], by_done[n]
    growth = last.rss - mid.rss
    second = [s for s in samples if s.done >= half]
    done = sum(tally.sent.values())
    failures = sum(tally.failed.values())
    lines = [
        f"soak: {done} requests, {opts.concurrency} in flight, through a scheduler and a node on 127.0.0.1",
        f"machine: {r['machine']}; code at {r['revision']}",
        "",
        "requests by kind (failures):",
    ]
    for kind in (*VALID, *INVALID):
        lines.append(f"  {kind:<18} {tally.sent[kind]:>7}  ({tally.failed[kind]})")
    invalid = sum(tally.sent[k] for k in INVALID)
    lines += [
        f"  invalid in all     {invalid:>7}  ({invalid / max(done, 1):.1%})",
        f"failures: {failures} (5xx: {tally.server_errors})",
        *(f"  e.g. {e}" for e in tally.examples),
        f"throughput: {done / r['wall_s']:.0f} requests/s over {r['wall_s']:.0f} s; scheduler CPU "
        f"{r['sched_cpu_s'] / max(done, 1) * 1e3:.2f} ms per request",
        "",
        f"scheduler RSS: {first.rss / 2**20:.2f} MiB at 0, {mid.rss / 2**20:.2f} MiB at {half}, "
        f"{last.rss / 2**20:.2f} MiB at {n}",
        f"  growth over the last {n - half}: {growth / 1024:+.0f} KiB (limit {GROWTH_LIMIT_BYTES // 1024} KiB); "
        f"second half min {min(s.rss for s in second) / 2**20:.2f} MiB, max {max(s.rss for s in second) / 2**20:.2f} MiB",
        f"  node RSS (for reference): {first.node_rss / 2**20:.2f} / {mid.node_rss / 2**20:.2f} / "
        f"{last.node_rss / 2**20:.2f} MiB",
        f"scheduler fds: baseline {r['fd_baseline']}, most during the run {max(s.fds for s in samples)}, "
        f"end {r['fd_end']} (client closed, after {r['fd_settle_s']:.1f} s)",
        "  while settling (s: fds): " + ", ".join(f"{t:.1f}: {c}" for t, c in r["fd_settle"]),
    ]
    checks = [
        (f"RSS growth over the last {n - half} requests < 1 MiB", growth < GROWTH_LIMIT_BYTES),
        ("fds back to baseline", r["fd_end"] <= r["fd_baseline"]),
        ("0 unexpected statuses or answers", failures == 0),
        ("scheduler and node still running at the end", r["node_alive"]),
    ]
    lines.append("")
    if opts.quick:
        # SQLite's page cache for the usage table alone fills over the first ~15,000 requests.
        checks.pop(0)
        lines.append("  skip: RSS growth (a quick run is all warm-up: judge it on a full run)")
    ok = all(passed for _, passed in checks)
    lines += [f"  {'pass' if passed else 'FAIL'}: {what}" for what, passed in checks]
    lines.append(f"verdict: {'PASS' if ok else 'FAIL'}")
    return "\n".join(lines), ok


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.soak", description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=100_000, help="requests in all (default 100,000)")
    parser.add_argument("--concurrency", type=int, default=16, help="requests in flight (default 16)")
    parser.add_argument("--quick", action="store_true", help="2,000 requests: a smoke run")
    parser.add_argument(
        "--settle", type=float, default=60.0, help="seconds to wait for the fds to come back (default 60)"
    )
    parser.add_argument("--json", metavar="PATH", help="also write the samples and counts here")
    opts = parser.parse_args(argv)
    if opts.quick:
        opts.requests = 2_000
    if opts.requests < 2 or opts.concurrency < 1:
        parser.error("--requests must be at least 2 and --concurrency at least 1")

    async def guarded() -> dict[str, Any]:
        # Ctrl-C cancels this task (asyncio.run does that); SIGTERM does the same, so the children are
        # stopped by soak()'s finally either way.
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        return await soak(opts)

    try:
        results = asyncio.run(guarded())
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("soak: interrupted; the scheduler and node it started are stopped", file=sys.stderr)
        sys.exit(130)
    text, ok = report(results, opts)
    print(text)
    if opts.json:
        with contextlib.suppress(OSError):
            tally: Tally = results["tally"]
            raw = {k: v for k, v in results.items() if k not in ("samples", "tally")}
            raw["samples"] = [s.__dict__ for s in results["samples"]]
            raw["sent"], raw["failed"] = dict(tally.sent), dict(tally.failed)
            Path(opts.json).write_text(json.dumps(raw, indent=2))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
