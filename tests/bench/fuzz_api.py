"""Benchmark-style API fuzzing: the run tests/test_fuzz_api.py makes, longer and random (not a test: it
prints figures, and exits 1 if Schemathesis found a failure).

A real `hearth up` with the demo model in this process, fuzzed by `schemathesis run` over every operation
of its OpenAPI document with its admin token, steered as tests/fuzz_api.py describes. Unlike the test:
a random seed (printed, to replay a run) and random generation, many more examples per operation, every
phase (examples, coverage in full, fuzzing, stateful), and the methods the document does not list.

    .venv/bin/python -m tests.bench.fuzz_api                      # 200 examples per operation
    .venv/bin/python -m tests.bench.fuzz_api --examples 1000      # longer
    .venv/bin/python -m tests.bench.fuzz_api --seed 1234          # replay a run's generation

Printed: operations tested, test cases generated, failures (unique, and cases with one), Schemathesis'
warnings, the valid cases each operation accepted, and seconds. Results are in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from node.demo import DEMO_MODEL_ID, build_demo_model
from node.settings import ModelSettings
from tests import fuzz_api
from tests.support import LoopThread


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--examples", type=int, default=200, help="examples per operation (fuzzing phase)")
    parser.add_argument("--seed", type=int, default=None, help="a seed to replay (default: a random one)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds the run may take")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="hearth-fuzz-") as tmp:
        base = Path(tmp)
        model = ModelSettings(
            path=build_demo_model(base / "models" / DEMO_MODEL_ID), id=DEMO_MODEL_ID, default_max_tokens=64
        )
        servers = LoopThread()
        try:
            with fuzz_api.hearth_up(servers, base / "data", model) as target:
                up = time.monotonic() - started
                outcome = fuzz_api.run(
                    target,
                    base / "run",
                    max_examples=args.examples,
                    seed=args.seed,
                    thorough=True,
                    timeout=args.timeout,
                )
        finally:
            servers.close()
    report = outcome.report
    tests = report["test_cases"]
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    print(f"schemathesis {report['schemathesis_version']}, seed {report['seed']}, {args.examples} examples")
    print(f"hearth up ready in {up:.1f} s")
    print(f"operations: {report['operations']['tested']} tested of {report['operations']['total']}")
    print(f"cases: {tests['generated']} generated, {tests['with_failures']} with failures, "
          f"{tests['errored']} errored")  # fmt: skip
    print(f"failures: {tests['unique_failures']} unique")
    for failure in report["failures"]:
        print(
            f"  {failure['code']} {failure['title']}: {failure['count']} in {', '.join(failure['operations'])}"
        )
    print("warnings:", json.dumps({k: v for k, v in report["warnings"].items() if v}) or "none")
    print("valid cases accepted (2xx), by operation:")
    for operation in sorted(report["valid_rates"]):
        print(f"  {outcome.accepted(operation):6d}  {operation}")
    print(f"seconds: {outcome.seconds:.1f} fuzzing, {time.monotonic() - started:.1f} in all")
    if outcome.exit_code != 0:
        print(outcome.output[-20000:], file=sys.stderr)
    return 1 if report["failures"] or report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
