"""Benchmark: placement quality on a simulated heterogeneous cluster, replaying a real trace (not a test: it
prints figures). Hearth's placement against round-robin and least-outstanding-requests.

    .venv/bin/python -m tests.bench.bench_placement_quality            # about a minute on 2 cores
    .venv/bin/python -m tests.bench.bench_placement_quality --requests 1000   # quicker

Trace: the Azure LLM inference trace 2023, conversation part (`../shared/traces/azure_llm_2023_conv.csv`;
CC-BY 4.0, Microsoft; Patel et al., "Splitwise: Efficient generative LLM inference using phase splitting",
ISCA 2024): arrival times and prompt/output token counts. A window of consecutive requests is replayed with
its arrival times scaled to each offered load.

Cluster (`MIXED`): two H100s and one A100 80GB run by the club, and three RTX 4090s and four RTX 3090s lent by
volunteers, all serving Llama-3.1-8B at 4.0 bits per weight (EXL2) with up to 32 sequences each; speeds and
cache sizes from hardware.estimator. The simulator (hardware/simulator.py) runs the real
`scheduler.placement.place` for Hearth.

Goodput counts requests that met the SLO: first token within 2 s, and at most 100 ms per output token after.
Targets: at least 2x lower p99 time-to-first-token than round-robin near saturation, and better than
least-outstanding on this mixed cluster.
"""

from __future__ import annotations

import argparse
import csv
import time
from datetime import datetime
from pathlib import Path

from hardware.catalog import gpu, model
from hardware.simulator import POLICIES, NodeSpec, Result, Simulation, TraceRequest, scale

TRACE = Path(__file__).resolve().parents[3] / "shared" / "traces" / "azure_llm_2023_conv.csv"

MIXED = [
    NodeSpec("h100-a", gpu("H100 SXM"), "club"),
    NodeSpec("h100-b", gpu("H100 SXM"), "club"),
    NodeSpec("a100", gpu("A100 80GB"), "club"),
    *(NodeSpec(f"4090-{i}", gpu("RTX 4090"), "community") for i in range(3)),
    *(NodeSpec(f"3090-{i}", gpu("RTX 3090"), "community") for i in range(4)),
]


def load_trace(path: Path, start: int, count: int) -> list[TraceRequest]:
    if not path.is_file():
        raise SystemExit(f"no trace at {path}: this benchmark reads ../shared/traces/ beside the repository")
    rows: list[TraceRequest] = []
    first: datetime | None = None
    with path.open(newline="") as f:
        for i, row in enumerate(csv.DictReader(f)):
            if i < start:
                continue
            if len(rows) >= count:
                break
            when = datetime.fromisoformat(row["TIMESTAMP"][:26])
            first = first or when
            rows.append(
                TraceRequest(
                    (when - first).total_seconds(),
                    int(row["ContextTokens"]),
                    max(1, int(row["GeneratedTokens"])),
                )
            )
    return rows


def line(rate: float, r: Result) -> str:
    return (
        f"{rate:>6.1f} {r.policy:<18} {r.ttft_p50:>8.2f} {r.ttft_p99:>8.2f} {r.latency_p50:>8.1f} "
        f"{r.latency_p99:>8.1f} {r.goodput_rps:>8.2f} {100 * r.slo_attainment:>6.1f}%"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=3000, help="consecutive trace requests replayed")
    parser.add_argument("--start", type=int, default=0, help="index of the first trace request")
    parser.add_argument(
        "--rates", type=float, nargs="+", default=[10.0, 20.0, 30.0, 35.0, 40.0], help="offered requests/s"
    )
    opts = parser.parse_args()
    trace = load_trace(TRACE, opts.start, opts.requests)
    sim = Simulation(MIXED, model("Llama-3.1-8B"), bits_per_weight=4.0)
    mean_in = sum(r.prompt_tokens for r in trace) / len(trace)
    mean_out = sum(r.output_tokens for r in trace) / len(trace)
    print(
        f"trace: {len(trace)} requests from {TRACE.name}, mean {mean_in:.0f} prompt / {mean_out:.0f} output tokens"
    )
    print(f"cluster: {', '.join(n.gpu.name for n in MIXED)}")
    print(
        f"{'req/s':>6} {'policy':<18} {'TTFT p50':>8} {'TTFT p99':>8} {'e2e p50':>8} {'e2e p99':>8} {'goodput':>8} {'SLO':>7}"
    )
    started = time.monotonic()
    for rate in opts.rates:
        results = {p: sim.run(scale(trace, rate), p) for p in POLICIES}
        for r in results.values():
            print(line(rate, r))
        ours, rr, lor = results["hearth"], results["round-robin"], results["least-outstanding"]
        print(
            f"{'':>6} p99 TTFT: {rr.ttft_p99 / ours.ttft_p99:.1f}x lower than round-robin, "
            f"{lor.ttft_p99 / ours.ttft_p99:.1f}x lower than least-outstanding; goodput "
            f"{ours.goodput_rps / max(1e-9, lor.goodput_rps):.2f}x least-outstanding's"
        )
    print(f"({time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    main()
