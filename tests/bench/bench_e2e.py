"""Benchmark: what end-to-end encryption costs through the real scheduler (not a test: it prints figures).

The same streaming chat requests go through the scheduler's ``/v1/chat/completions`` in plaintext and sealed
(`hearth proxy`'s client, hearth.proxy.SealedClient, in this process: it seals, the node opens, seals every
frame, and the client opens them), at 1 and 10 concurrent streams paced by a scripted backend
(tests/bench/scripted.py), plus an unpaced burst that keeps the scheduler busy. Scheduler and node are
separate processes (the children of tests/bench/bench_relay.py), so their CPU time is their own. Plain and
sealed blocks alternate (ROUNDS times) so drift hits both alike.

    .venv/bin/python -m tests.bench.bench_e2e            # about 2 minutes on 2 cores
    .venv/bin/python -m tests.bench.bench_e2e --quick    # a smoke run

Printed per level and mode: TTFT p50/p99 (send → first content delta, sealing and opening included), the
difference sealed − plain at p50 ("added"), tokens per second, and tokens per scheduler CPU-second (the
relay's throughput; the targets: < 1 ms added TTFT p50, < 5 % relay throughput lost).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any

import aiohttp
import psutil  # type: ignore[import-untyped]

from tests.bench.bench_relay import CONTENT_MARK, _cpu, _pct, _wait_ready, cluster, cpu_model, source_revision

SLOTS = 10  # model slots on the node: one generation thread each, so each worker has its own
# Plain and sealed blocks alternate this many times per level, so that drift (and the 10 ms resolution of
# a process's CPU time) weighs on both alike.
ROUNDS = 4


def _body(worker: int, pace: float, tokens: int) -> bytes:
    prompt = f"delay_ms={pace}" if pace else "go"
    return json.dumps({"model": f"bench-{worker % SLOTS:02d}", "messages": [{"role": "user", "content": prompt}],
                       "max_tokens": tokens, "stream": True}).encode()  # fmt: skip


async def _plain(session: aiohttp.ClientSession, url: str, token: str, body: bytes) -> tuple[float, int]:
    start = time.perf_counter()
    first, tokens = 0.0, 0
    async with session.post(
        url + "/v1/chat/completions", data=body,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    ) as resp:  # fmt: skip
        async for chunk in resp.content.iter_any():
            n = chunk.count(CONTENT_MARK)
            if n and not first:
                first = time.perf_counter() - start
            tokens += n
    return first, tokens


async def _sealed(client: Any, body: bytes) -> tuple[float, int]:
    start = time.perf_counter()
    first, tokens = 0.0, 0
    payloads = (await client.send("chat", body)).payloads
    async for payload in payloads:
        n = payload.count(CONTENT_MARK)
        if n and not first:
            first = time.perf_counter() - start
        tokens += n
    return first, tokens


async def _block(
    fn: Any, concurrency: int, total: int, sched: psutil.Process, gap: float = 0.0
) -> dict[str, Any]:
    ttft: list[float] = []
    tokens = 0
    queue = list(range(total))

    async def worker(w: int) -> None:
        nonlocal tokens
        while queue:
            queue.pop()
            first, n = await fn(w)
            ttft.append(first)
            tokens += n
            if gap:
                await asyncio.sleep(gap)

    cpu0, t0 = _cpu(sched), time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    wall, cpu = time.perf_counter() - t0, _cpu(sched) - cpu0
    return {"ttft": ttft, "tokens": tokens, "wall": wall, "cpu": cpu}


def _summary(blocks: list[dict[str, Any]]) -> dict[str, float]:
    ttft = sorted(t for b in blocks for t in b["ttft"])
    tokens = sum(b["tokens"] for b in blocks)
    return {
        "ttft_p50_ms": _pct(ttft, 50) * 1e3,
        "ttft_p99_ms": _pct(ttft, 99) * 1e3,
        "tok_per_s": tokens / sum(b["wall"] for b in blocks),
        "tok_per_sched_cpu_s": tokens / max(sum(b["cpu"] for b in blocks), 1e-9),
    }


async def run(opts: argparse.Namespace) -> dict[str, Any]:
    from hearth.proxy import SealedClient

    results: dict[str, Any] = {
        "machine": {"cpu": cpu_model(), "cores": psutil.cpu_count(), "revision": source_revision()}
    }
    async with (
        cluster(SLOTS, prefix="hearth-bench-e2e-") as c,
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session,
    ):
        sched_url, token, sched = c.scheduler_url, c.token, c.scheduler
        await _wait_ready(session, sched_url, token, SLOTS)
        client = SealedClient(sched_url, token, c.data_dir / "pin.json", session)
        deadline = time.monotonic() + 30
        while not (await client.refresh(force=True)).usable(time.time()):
            if time.monotonic() > deadline:
                raise RuntimeError("the node's key never reached the directory")
            await asyncio.sleep(0.3)
        levels = []
        quick = opts.quick
        # (label, streams, ms per token, requests, pause after each request): "1 spaced" is a user
        # chatting (a pause between requests), the others are closed loops (the next request
        # starts as the last one ends, so each also pays for its predecessor's wind-down).
        for label, concurrency, pace, total, gap in [
            ("1 spaced", 1, 5.0, 40 if quick else 150, 0.05),
            ("1", 1, 5.0, 40 if quick else 150, 0.0),
            ("10", 10, 5.0, 100 if quick else 300, 0.0),
            ("10 burst", 10, 0.0, 100 if quick else 800, 0.0),
        ]:
            print(f"  {label} streams, {pace:g} ms/token…", file=sys.stderr, flush=True)
            plain, sealed = [], []
            for _ in range(ROUNDS):
                plain.append(await _block(
                    lambda w, p=pace: _plain(session, sched_url, token, _body(w, p, opts.tokens)),
                    concurrency, total // ROUNDS, sched, gap,
                ))  # fmt: skip
                sealed.append(await _block(
                    lambda w, p=pace: _sealed(client, _body(w, p, opts.tokens)), concurrency,
                    total // ROUNDS, sched, gap,
                ))  # fmt: skip
            levels.append({"label": label, "plain": _summary(plain), "sealed": _summary(sealed)})
        results["levels"] = levels
    return results


def report(r: dict[str, Any]) -> str:
    m = r["machine"]
    lines = [
        f"E2E on vs off through the scheduler — {m['cpu']}, {m['cores']} cores, revision {m['revision']}",
        "",
    ]
    lines.append(
        "| streams | mode | TTFT p50 ms | TTFT p99 ms | added p50 ms | tokens/s | tokens per scheduler CPU-s |"
    )
    lines.append("|---|---|---|---|---|---|---|")
    for level in r["levels"]:
        for mode in ("plain", "sealed"):
            s = level[mode]
            added = s["ttft_p50_ms"] - level["plain"]["ttft_p50_ms"] if mode == "sealed" else 0.0
            lines.append(
                f"| {level['label']} | {mode} | {s['ttft_p50_ms']:.2f} | {s['ttft_p99_ms']:.2f} | "
                f"{added:+.2f} | {s['tok_per_s']:,.0f} | {s['tok_per_sched_cpu_s']:,.0f} |"
            )
        lost = 1 - level["sealed"]["tok_per_sched_cpu_s"] / level["plain"]["tok_per_sched_cpu_s"]
        lines.append(f"| {level['label']} | relay throughput lost | | | | | {lost:+.1%} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer streams (a smoke run)")
    parser.add_argument("--tokens", type=int, default=64, help="tokens per stream (default 64)")
    opts = parser.parse_args(argv)
    print(report(asyncio.run(run(opts))))


if __name__ == "__main__":
    main()
