"""Benchmark: how long one placement decision takes over clusters of 10, 100 and 1,000 nodes (not a test:
it prints figures). Target: p99 ≤ 1 ms at 100 nodes.

    .venv/bin/python -m tests.bench.bench_placement

The snapshots are built like the registry builds them: a mix of club and community nodes with one to four
models each, some warm and busy, some cold, a few unhealthy or draining, so that every filter and scorer
runs. Each decision places one request for a model that about a third of the nodes serve (the common case:
most nodes are filtered out by model first). Timings are wall-clock per `place()` call, after a warm-up,
with the garbage collector left on as in the server.
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import time

from scheduler.placement import ClusterSnapshot, ModelState, NodeState, PlacementRequest, place

GIB = 1 << 30
MODELS = [f"model-{i}" for i in range(12)]


def snapshot(n: int, rng: random.Random) -> ClusterSnapshot:
    nodes = []
    for i in range(n):
        total = rng.choice([24, 48, 80, 160]) * GIB
        models = []
        for model_id in rng.sample(MODELS, rng.randint(1, 4)):
            phase = rng.choices(["ready", "available", "loading"], weights=[6, 3, 1])[0]
            active = rng.randint(0, 8) if phase == "ready" else 0
            models.append(
                ModelState(
                    id=model_id, phase=phase, context_length=8192, footprint_bytes=rng.choice([6, 10, 20]) * GIB,
                    cache_tokens=32768 if phase == "ready" else 0, max_sequences=16, default_max_tokens=512,
                    active=active, reserved_tokens=active * 1500, outstanding_tokens=active * 400,
                    tokens_per_s=rng.uniform(15, 120), load_seconds=rng.uniform(5, 60), last_used=rng.uniform(0, 1000),
                )
            )  # fmt: skip
        nodes.append(
            NodeState(
                node_id=f"node-{i:04d}", tier=rng.choice(["club", "community"]), healthy=rng.random() > 0.05,
                draining=rng.random() < 0.03, memory_total_bytes=total, memory_free_bytes=total // 3,
                models=tuple(models),
            )
        )  # fmt: skip
    return ClusterSnapshot(tuple(nodes))


def measure(n: int, decisions: int, seed: int) -> dict[str, float]:
    rng = random.Random(seed)
    snap = snapshot(n, rng)
    requests = [
        PlacementRequest(rng.choice(MODELS[:3]), rng.choice([None, 128, 512, 1024]), rng.randint(50, 3000))
        for _ in range(256)
    ]
    for r in requests:  # warm-up
        place(r, snap, rng)
    times = []
    clock = time.perf_counter_ns
    for i in range(decisions):
        r = requests[i % len(requests)]
        start = clock()
        place(r, snap, rng)
        times.append((clock() - start) / 1e6)
    times.sort()
    return {
        "p50": statistics.median(times),
        "p99": times[int(0.99 * len(times)) - 1],
        "max": times[-1],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--decisions", type=int, default=20_000, help="decisions per cluster size")
    parser.add_argument("--seed", type=int, default=7)
    opts = parser.parse_args()
    print(f"placement decision time — Python {platform.python_version()}, {platform.machine()}")
    print(f"{'nodes':>6} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    for n in (10, 100, 1000):
        decisions = opts.decisions if n < 1000 else max(1000, opts.decisions // 10)
        figures = measure(n, decisions, opts.seed)
        print(f"{n:>6} {figures['p50']:>8.3f} {figures['p99']:>8.3f} {figures['max']:>8.3f}")
        if n == 100:
            verdict = "met" if figures["p99"] <= 1.0 else "MISSED"
            hundred = f"target p99 <= 1 ms at 100 nodes: {verdict} ({figures['p99']:.3f} ms)"
    print(hundred)


if __name__ == "__main__":
    main()
