"""`hearth plan calibrate` and `hearth plan --cluster` against a real scheduler on 127.0.0.1.

The scheduler runs for real (tests/support.py); its nodes are approved fakes whose heartbeats carry a GPU
summary and measured speeds, as a node's would. The benchmark file is written in bench_exl2.py's layout.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from hardware.catalog import gpu, model
from hardware.estimator import (
    DEFAULT_RESERVE_BYTES,
    decode_tokens_per_s,
    kv_bytes_per_token,
    prefill_tokens_per_s,
    weight_bytes,
)
from hardware.measured import BENCH_SHAPES, HEARTBEAT_CONTEXT, infer_bits
from hardware.model_spec import ModelSpec
from hearth.cli import main
from tests.gpu.gpu_model import ARCHS
from tests.support import LoopThread, Stack, attach_fake_node, start_scheduler, stop_stack

LLAMA_8B = model("Llama-3.1-8B")
CACHE_TOKENS = 16384
FOOTPRINT_4BPW = (
    weight_bytes(LLAMA_8B, 4.0) + CACHE_TOKENS * kv_bytes_per_token(LLAMA_8B) + DEFAULT_RESERVE_BYTES
)
HEARTBEAT_FACTOR = 0.8  # the 4090 node's measured speed against the estimate for its batch and context
BENCH_FACTOR = 1.1  # the H100 benchmark's
BENCH_VOCAB = 4096  # the demo tokenizer's vocabulary stands in for the real one in bench_exl2's models
SMALL = ["--model", "Llama-3.1-8B", "--requests", "200"]


def _per_stream_estimate(batch: int) -> float:
    return decode_tokens_per_s(LLAMA_8B, 4.0, gpu("RTX 4090"), batch, HEARTBEAT_CONTEXT) / batch


@pytest.fixture(scope="module")
def cluster(servers: LoopThread, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A scheduler with four approved nodes: a 4090 with a measured model, two 3090s with a model the
    planner does not know, a card the catalog does not know, and a CPU node."""
    stack = servers.call(start_scheduler(tmp_path_factory.mktemp("cluster")))
    ready = {
        "phase": "ready",
        "cache_tokens": CACHE_TOKENS,
        "max_sequences": 8,
        "footprint_bytes": FOOTPRINT_4BPW,
    }
    nodes: list[tuple[str, str, int, list[dict[str, Any]]]] = [
        ("n-4090", "1x NVIDIA GeForce RTX 4090", 23 << 30, [
            {"id": "Llama-3.1-8B", **ready, "active": 2, "tokens_per_s": HEARTBEAT_FACTOR * _per_stream_estimate(2)},
        ]),
        ("n-3090s", "2x NVIDIA GeForce RTX 3090", 46 << 30, [
            {"id": "mystery-model-exl2", **ready, "tokens_per_s": 40.0},
            {"id": "Llama-3.1-8B", "phase": "available"},
        ]),
        ("n-odd", "1x NVIDIA Quadro P9999", 16 << 30, []),
        ("n-cpu", "cpu", 8 << 30, [{"id": "Llama-3.1-8B", **ready, "tokens_per_s": 5.0}]),
    ]  # fmt: skip
    for node_id, gpus, memory, models in nodes:
        servers.call(
            attach_fake_node(
                stack, node_id, "http://127.0.0.1:9", models, gpus=gpus, memory_total_bytes=memory
            )
        )
    yield stack
    servers.call(stop_stack(stack))


def _cli(*args: str) -> tuple[int, str, str]:
    done = CliRunner().invoke(main, ["plan", *args])
    return done.exit_code, done.stdout, done.stderr


def _admin(stack: Stack) -> list[str]:
    return ["--scheduler", stack.base_url, "--token", stack.token]


def _plan(tmp_path: Path, *args: str) -> dict[str, Any]:
    out = tmp_path / "plan.json"
    code, _, err = _cli(*SMALL, *args, "--json", str(out), "--data-dir", str(tmp_path / "data"))
    assert code == 0, err
    doc: dict[str, Any] = json.loads(out.read_text(encoding="utf-8"))
    return doc


def _one_line_error(result: tuple[int, str, str], says: str) -> None:
    code, _, err = result
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("hearth: error: ") and says in err, err


def _bench_doc(rates: dict[str, float]) -> dict[str, Any]:
    """bench_exl2.py's --json document (an H100, the 8B shape), with the node's rates as given."""
    a = ARCHS["llama-3.1-8b"]
    head_dim = a["hidden"] // a["heads"]
    layer = a["hidden"] * head_dim * 2 * (a["heads"] + a["kv_heads"]) + 3 * a["hidden"] * a["inter"]
    decode_bytes = 2 * (a["layers"] * (layer + 2 * a["hidden"]) + a["hidden"] + BENCH_VOCAB * a["hidden"])
    levels = {key: {"raw": {"ttft": [0.02], "rate": r * 1.02}, "node": {"ttft": [0.021], "rate": r}}
              for key, r in rates.items()}  # fmt: skip
    return {
        "arch": "llama-3.1-8b", "tokens": 256, "levels": levels, "gpu": "NVIDIA H100 80GB HBM3",
        "bandwidth_gbs": 2900.0, "decode_bytes": decode_bytes, "healthz_ms": [1.0, 2.0],
        "healthz_streams": [16, 2000], "cancel": {"freed_ms": 3.0, "iteration_ms": 12.0},
        "median_node_ttft_ms": 21.0,
    }  # fmt: skip


def _bench_estimate(prompt: int, streams: int, tokens: int = 256) -> float:
    """The benchmark's run as the estimator sees it: the prompts' prefill, then `tokens` decode steps."""
    a = ARCHS["llama-3.1-8b"]
    spec = ModelSpec("bench", a["hidden"], a["layers"], a["heads"], a["kv_heads"], a["hidden"] // a["heads"],
                     a["inter"], BENCH_VOCAB, False, a["context"])  # fmt: skip
    h100 = gpu("H100 SXM")
    decode_s = tokens * streams / decode_tokens_per_s(spec, 16, h100, streams, prompt + tokens // 2)
    return tokens * streams / (prompt * streams / prefill_tokens_per_s(spec, h100) + decode_s)


def _write_bench(tmp_path: Path, factor: float, queue: bool = True) -> Path:
    rates = {f"{p}x{c}": factor * _bench_estimate(p, c) for p in (128, 2000) for c in (1, 4)}
    if queue:  # 16 streams that took turns: no faster than one
        rates["128x16"] = rates["128x1"] * 1.05
    path = tmp_path / "bench_exl2.json"
    path.write_text(json.dumps(_bench_doc(rates), indent=1), encoding="utf-8")
    return path


# ----- the live cluster as input -----


def test_the_cluster_is_the_fleet(cluster: Stack, tmp_path: Path) -> None:
    out = tmp_path / "plan.json"
    code, _, err = _cli(*SMALL, "--cluster", *_admin(cluster), "--json", str(out), "--no-calibration")
    assert code == 0, err
    doc = json.loads(out.read_text(encoding="utf-8"))
    assert sorted(c for f in doc["fit"] for c in f["cards"]) == ["RTX 3090", "RTX 3090", "RTX 4090"]
    assert set(doc["inputs"]["fleet"].split(" + ")) == {"1×RTX 4090", "2×RTX 3090"}
    # The nodes left out, one line each on stderr (the progress bar aside).
    warnings = [line for line in err.splitlines() if line.startswith("hearth: warning: ")]
    assert len(warnings) == 2
    assert any(
        "n-odd" in w and "'NVIDIA Quadro P9999' is not a card the catalog knows" in w for w in warnings
    )
    assert any("n-cpu" in w and "a CPU node" in w for w in warnings)


@pytest.mark.parametrize(
    ("args", "says"),
    [
        # A token the scheduler does not know.
        (["--token", "not-a-token"], "hearth: error: "),
        # Nothing listening there.
        (["--scheduler", "http://127.0.0.1:9", "--token", "x"], "cannot reach the scheduler"),
        # Not an http(s) URL.
        (["--scheduler", "ftp://example", "--token", "x"], "is not a scheduler URL"),
        # --cluster with --gpus too.
        (["--gpus", "4090"], "choose one: --gpus LIST"),
    ],
)
def test_cluster_errors_are_one_line(cluster: Stack, args: list[str], says: str) -> None:
    base = ["--scheduler", cluster.base_url] if "--scheduler" not in args else []
    token = ["--token", cluster.token] if "--token" not in args else []
    _one_line_error(_cli(*SMALL, "--cluster", *base, *token, *args), says)


def test_a_cluster_without_a_token_is_refused(cluster: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HEARTH_TOKEN", raising=False)
    _one_line_error(_cli(*SMALL, "--cluster", "--scheduler", cluster.base_url), "pass --token")


# ----- calibration -----


def test_calibrate_from_heartbeats_then_plans_use_it(cluster: Stack, tmp_path: Path) -> None:
    data = tmp_path / "data"
    code, out, err = _cli("calibrate", "--cluster", *_admin(cluster), "--data-dir", str(data))
    assert code == 0, err
    # Each figure is used or skipped, with its reason.
    assert "used     Llama-3.1-8B at 4 bpw on n-4090, 2 active: measured" in out
    assert "skipped  mystery-model-exl2 on n-3090s (RTX 3090): model unknown to the planner" in out
    assert "skipped  Llama-3.1-8B on n-3090s (RTX 3090): no speed measured yet" in out
    assert "skipped  node n-odd: 'NVIDIA Quadro P9999' is not a card the catalog knows" in out
    assert "skipped  node n-cpu: a CPU node (no GPU)" in out
    stored = json.loads((data / "plan-calibration.json").read_text(encoding="utf-8"))
    entry = stored["cards"]["RTX 4090"]
    assert set(stored["cards"]) == {"RTX 4090"}
    assert entry["factor"] == pytest.approx(HEARTBEAT_FACTOR, rel=1e-3)
    assert entry["samples"] == 1 and entry["source"] == f"cluster {cluster.base_url}"
    assert entry["measurements"][0]["batch"] == 2 and entry["measured_at"].endswith("+00:00")

    calibrated = _plan(tmp_path, "--gpus", "4090x1,3090x2")
    plain = _plan(tmp_path, "--gpus", "4090x1,3090x2", "--no-calibration")
    speeds = {s["copy"]: s for s in calibrated["speed"]}
    before = {s["copy"]: s for s in plain["speed"]}
    four = speeds["1×RTX 4090"]
    for key in ("prefill_tokens_per_s", "decode_batch1_tokens_per_s"):
        assert four[key] == pytest.approx(HEARTBEAT_FACTOR * before["1×RTX 4090"][key], rel=1e-6)
    assert four["figures"] == "measured" and speeds["1×RTX 3090"]["figures"] == "estimated"
    assert speeds["1×RTX 3090"] == before["1×RTX 3090"]  # an uncalibrated card is untouched
    assert all(s["figures"] == "estimated" for s in plain["speed"])
    assert calibrated["inputs"]["calibration"] == {
        "RTX 4090": {
            "factor": entry["factor"], "source": entry["source"], "samples": 1, "when": entry["measured_at"],
        }
    }  # fmt: skip
    assert plain["inputs"]["calibration"] == {}
    # The terminal's speed table says so too.
    code, out, err = _cli(*SMALL, "--gpus", "4090x1", "--data-dir", str(data))
    assert code == 0, err
    assert "Speed (tokens per second, measured where a card is calibrated, else estimated)" in out
    assert "RTX 4090: 0.8× the estimate, from 1 measurements" in out
    row = next(line for line in out.splitlines() if line.startswith("1×RTX 4090") and "measured" in line)
    assert row.endswith("measured")


def test_calibrate_from_a_benchmark_file(tmp_path: Path) -> None:
    data = tmp_path / "data"
    bench = _write_bench(tmp_path, BENCH_FACTOR)
    code, out, err = _cli("calibrate", "--bench", str(bench), "--data-dir", str(data))
    assert code == 0, err
    assert sum(line.startswith("used     ") for line in out.splitlines()) == 4
    assert (
        "skipped  llama-3.1-8b (benchmark) at 16 bpw on H100 SXM, 128-token prompts × 16 streams: ran at "
        "1.05× one stream's rate" in out
    )
    stored = json.loads((data / "plan-calibration.json").read_text(encoding="utf-8"))["cards"]
    assert stored["H100 SXM"]["factor"] == pytest.approx(BENCH_FACTOR, rel=1e-3)
    assert stored["H100 SXM"]["samples"] == 4 and stored["H100 SXM"]["source"] == "bench bench_exl2.json"

    calibrated = _plan(tmp_path, "--gpus", "H100x1")
    plain = _plan(tmp_path, "--gpus", "H100x1", "--no-calibration")
    (a,), (b,) = calibrated["speed"], plain["speed"]
    assert a["decode_batch1_tokens_per_s"] == pytest.approx(
        BENCH_FACTOR * b["decode_batch1_tokens_per_s"], 1e-3
    )
    assert a["decode_batch_tokens_per_s"] == pytest.approx(
        BENCH_FACTOR * b["decode_batch_tokens_per_s"], 1e-3
    )
    assert a["figures"] == "measured" and b["figures"] == "estimated"
    # A faster card serves more users in the simulation too (the simulator sees the calibrated card).
    assert calibrated["max_users"] > plain["max_users"]


def test_search_uses_the_calibration(tmp_path: Path) -> None:
    bench = _write_bench(tmp_path, BENCH_FACTOR)
    assert _cli("calibrate", "--bench", str(bench), "--data-dir", str(tmp_path / "data"))[0] == 0
    doc = _plan(tmp_path, "--gpus", "H100x1,4090x1", "--users", "50", "--search")
    assert doc["search"]["best"]["fleet"] == "1×RTX 4090"  # the cheapest that serves 50 users
    assert [s["figures"] for s in doc["speed"]] == ["estimated"]
    assert doc["inputs"]["calibration"] == {}  # the 4090 alone: the H100's factor plays no part
    tried = {c["fleet"]: c for c in doc["search"]["tried"]}
    plain = _plan(tmp_path, "--gpus", "H100x1,4090x1", "--users", "50", "--search", "--no-calibration")
    plain_tried = {c["fleet"]: c for c in plain["search"]["tried"]}
    assert set(tried) == set(plain_tried)
    with_h100 = [fleet for fleet in tried if "H100" in fleet]  # the runner-ups
    assert with_h100
    for fleet in with_h100:  # estimated faster once the H100 is calibrated
        assert tried[fleet]["estimated_users"] > plain_tried[fleet]["estimated_users"]


def test_a_later_calibration_keeps_other_cards(cluster: Stack, tmp_path: Path) -> None:
    data = tmp_path / "data"
    assert (
        _cli("calibrate", "--bench", str(_write_bench(tmp_path, BENCH_FACTOR)), "--data-dir", str(data))[0]
        == 0
    )
    assert _cli("calibrate", "--cluster", *_admin(cluster), "--data-dir", str(data))[0] == 0
    stored = json.loads((data / "plan-calibration.json").read_text(encoding="utf-8"))["cards"]
    assert set(stored) == {"H100 SXM", "RTX 4090"} and len(stored["H100 SXM"]["measurements"]) == 4
    code, out, _ = _cli("calibrate", "--show", "--data-dir", str(data))
    assert code == 0 and "H100 SXM: 1.1× the estimate, 4 samples" in out and "RTX 4090: 0.8×" in out
    code, out, _ = _cli("calibrate", "--reset", "--data-dir", str(data))
    assert code == 0 and not (data / "plan-calibration.json").exists()
    assert "no calibration stored" in _cli("calibrate", "--show", "--data-dir", str(data))[1]


def test_an_absurd_factor_is_refused_and_nothing_stored(tmp_path: Path) -> None:
    result = _cli("calibrate", "--bench", str(_write_bench(tmp_path, 9.0)), "--data-dir", str(tmp_path))
    _one_line_error(
        result, "H100 SXM measured 9.00× its estimated speed (median of 4 samples), outside 0.2–3"
    )
    assert not (tmp_path / "plan-calibration.json").exists()


@pytest.mark.parametrize(
    ("doc", "says"),
    [
        # A --cpu-smoke run: no GPU, nothing to calibrate.
        ({"arch": "demo", "tokens": 32, "levels": {"128x1": {"raw": {"ttft": [0.1], "rate": 2000.0}}}},
         "no GPU in it"),
        # A card the catalog does not know.
        ({**_bench_doc({"128x1": 100.0}), "gpu": "NVIDIA Quadro P9999"}, "is not a card the catalog knows"),
        # Not the benchmark's document at all.
        ([1, 2, 3], "not the GPU benchmark's JSON"),
    ],
)  # fmt: skip
def test_a_benchmark_file_with_nothing_usable(tmp_path: Path, doc: Any, says: str) -> None:
    path = tmp_path / "b.json"
    path.write_text(json.dumps(doc), encoding="utf-8")
    result = _cli("calibrate", "--bench", str(path), "--data-dir", str(tmp_path))
    assert says in result[1]  # the reason, per file or sample
    _one_line_error(result, "no measured figure could be used")


@pytest.mark.parametrize(
    ("args", "says"),
    [
        # No action.
        ([], "choose one: --bench FILE and/or --cluster, --show, or --reset"),
        # Two actions.
        (["--show", "--reset"], "choose one"),
        # A file that is not there, and one that is not JSON.
        (["--bench", "/nonexistent/b.json"], "cannot read /nonexistent/b.json"),
        # A plan option before the subcommand.
        (["--show", "--bits", "3"], "No such option '--bits'"),
    ],
)
def test_calibrate_errors_are_one_line(tmp_path: Path, args: list[str], says: str) -> None:
    _one_line_error(_cli("calibrate", *args, "--data-dir", str(tmp_path)), says)


def test_plan_options_before_calibrate_are_refused(tmp_path: Path) -> None:
    _one_line_error(_cli("--bits", "3", "calibrate", "--show"), "--bits is an option of `hearth plan`")


def test_a_broken_calibration_file_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "plan-calibration.json").write_text('{"format": 1, "cards": {"RTX 4090": {"factor": 40}}}')
    _one_line_error(
        _cli(*SMALL, "--gpus", "4090", "--data-dir", str(tmp_path)), "RTX 4090's factor 40 is outside 0.2–3"
    )
    (tmp_path / "plan-calibration.json").write_text("not json")
    _one_line_error(_cli(*SMALL, "--gpus", "4090", "--data-dir", str(tmp_path)), "not a readable calibration")
    # --no-calibration does not read it at all.
    assert _cli(*SMALL, "--gpus", "4090", "--data-dir", str(tmp_path), "--no-calibration")[0] == 0


# ----- the pieces -----


def test_the_benchmark_shapes_are_the_benchmarks_own() -> None:
    assert BENCH_SHAPES == ARCHS


@pytest.mark.parametrize(
    ("bits", "cache_tokens"),
    [
        (4.0, 16384),  # a common EXL2 conversion
        (6.5, 4096),  # a high one, a small cache
        (2.5, 65536),  # a 70B-on-two-cards kind of quantization, a large cache
        (16.0, 8192),  # the unquantized checkpoint
    ],
)
def test_bits_per_weight_from_a_footprint(bits: float, cache_tokens: int) -> None:
    footprint = (
        weight_bytes(LLAMA_8B, bits) + cache_tokens * kv_bytes_per_token(LLAMA_8B) + DEFAULT_RESERVE_BYTES
    )
    assert infer_bits(LLAMA_8B, footprint, cache_tokens) == pytest.approx(bits, abs=0.01)


def test_a_footprint_that_is_no_quantization() -> None:
    # Less than even 2 bits per weight leaves: something else is in it (or the model is another one).
    assert infer_bits(LLAMA_8B, 2 << 30, 0) is None
