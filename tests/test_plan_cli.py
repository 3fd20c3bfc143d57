"""`hearth plan` as a planner runs it: every input form, the JSON document, and one-line errors (exit 2)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from hearth.cli import main

TRACES = Path(__file__).resolve().parents[2] / "shared" / "traces"
needs_traces = pytest.mark.skipif(not TRACES.is_dir(), reason="the shared traces are not beside the repo")
SMALL = ["--model", "Llama-3.1-8B", "--gpus", "4090x2", "--requests", "200"]
# Llama-3.1-8B's config.json as published (the keys the planner reads).
LLAMA_8B = {
    "model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 128256,
    "max_position_embeddings": 131072, "tie_word_embeddings": False,
}  # fmt: skip


def _run(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    done = CliRunner().invoke(main, ["plan", *args], env=env)
    return done.exit_code, done.stdout, done.stderr


def _plan(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> dict[str, object]:
    out_file = tmp_path / "plan.json"
    code, out, err = _run(*args, "--json", str(out_file), env=env)
    assert code == 0, err
    doc = json.loads(out_file.read_text(encoding="utf-8"))
    assert out.splitlines()[0] == doc["verdict"]  # the verdict comes first
    for title in ("Fit", "Speed", "Simulation", "Cost for"):
        assert f"\n{title}" in out
    return doc


def test_a_club_fleet_for_a_70b_model(tmp_path: Path) -> None:
    # The seed's question: a 65-70B model on second-hand and gaming cards, for a few hundred users.
    doc = _plan(
        tmp_path, "--model", "Llama-3.1-70B", "--gpus", "3090x4,4090x2", "--users", "300", "--rate", "6",
        "--requests", "500", "--prompt-tokens", "300",
    )  # fmt: skip
    verdict = str(doc["verdict"])
    assert verdict.startswith("4×RTX 3090 + 2×RTX 4090 serve Llama-3.1-70B at 4 bpw to ")
    assert verdict.endswith("(enough for the 300 users asked)")
    fit = doc["fit"]
    assert isinstance(fit, list) and [f["cards"] for f in fit] == [
        ["RTX 3090", "RTX 3090"], ["RTX 3090", "RTX 3090"], ["RTX 4090", "RTX 4090"],
    ]  # fmt: skip
    assert all(34 < f["weights_gib"] < 36 and f["cache_tokens"] >= 8192 for f in fit)
    assert doc["unused_cards"] == []
    max_users = doc["max_users"]
    assert isinstance(max_users, int) and 300 <= max_users <= 2000
    sweep = doc["sweep"]
    assert isinstance(sweep, list) and len(sweep) >= 8
    assert [p["users"] for p in sweep] == sorted(p["users"] for p in sweep)
    assert any(p["users"] == max_users and p["ok"] for p in sweep)
    assert any(p["users"] > max_users and not p["ok"] for p in sweep)
    options = {o["name"]: o for o in doc["cost"]["options"]}  # type: ignore[index]
    assert set(options) == {"own", "rent", "api"}
    assert options["api"]["usd_per_million_tokens"] == pytest.approx(0.88)
    assert all(o["usd_per_month"] > 0 for o in options.values())


def test_the_sweep_reports_time_per_token_and_the_queue(tmp_path: Path) -> None:
    out_file = tmp_path / "plan.json"
    code, out, err = _run(*SMALL, "--json", str(out_file))
    assert code == 0, err
    doc = json.loads(out_file.read_text(encoding="utf-8"))
    sweep = doc["sweep"]
    light, flood = sweep[0], sweep[-1]  # a tenth of the estimated capacity, and twice it
    # Nobody waits to be placed at light load; at twice the capacity the queue runs away.
    assert light["queue_mean"] == 0 and light["queue_max"] == 0
    assert flood["queue_max"] > 20 and flood["queue_mean"] > 5
    # A token after the first takes at least a batch-1 decode step, and longer as batches fill.
    step = 1 / doc["speed"][0]["decode_batch1_tokens_per_s"]
    assert step <= light["tpot_p50_s"] <= light["tpot_p99_s"] < flood["tpot_p99_s"]
    assert all(p["tpot_p50_s"] <= p["tpot_p99_s"] for p in sweep)
    header = next(line for line in out.splitlines() if line.startswith("users"))
    assert header.split("  ")[:6] == ["users", "req/s", "TTFT p50", "TTFT p99", "TPOT p50", "TPOT p99"]
    assert "queue mean/max" in header and "latency p50" not in header  # that one is in the JSON only
    assert max(len(line) for line in out.splitlines()[out.splitlines().index(header) :][:20]) <= 110
    assert f"{flood['queue_mean']:.1f}/{flood['queue_max']}" in out


def test_a_local_config_json_and_a_cached_hugging_face_id(tmp_path: Path) -> None:
    model_dir = tmp_path / "my-llama"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(LLAMA_8B), encoding="utf-8")
    by_dir = _plan(tmp_path, "--model", str(model_dir), "--gpus", "4090x2", "--requests", "200")
    by_file = _plan(
        tmp_path, "--model", str(model_dir / "config.json"), "--gpus", "4090x2", "--requests", "200"
    )
    catalog = _plan(tmp_path, *SMALL)
    assert by_dir["fit"] == by_file["fit"] and by_dir["inputs"]["model"] == "my-llama"  # type: ignore[index]
    assert [f["cache_tokens"] for f in by_dir["fit"]] == [f["cache_tokens"] for f in catalog["fit"]]  # type: ignore[union-attr]
    snapshot = tmp_path / "hub" / "models--someone--llama-copy" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps(LLAMA_8B), encoding="utf-8")
    by_id = _plan(
        tmp_path, "--model", "someone/llama-copy", "--gpus", "4090x2", "--requests", "200",
        env={"HF_HUB_CACHE": str(tmp_path / "hub")},
    )  # fmt: skip
    assert by_id["inputs"]["model"] == "someone/llama-copy"  # type: ignore[index]
    assert by_id["fit"] == by_dir["fit"]


def test_the_fleet_string_groups_cards_into_copies(tmp_path: Path) -> None:
    # One 8B copy per card; the same card named twice adds up; spellings follow the catalog.
    doc = _plan(
        tmp_path, "--model", "Llama-3.1-8B", "--gpus", "4090x2, rtx-3090 x1,4090", "--requests", "200"
    )
    assert [f["copy"] for f in doc["fit"]] == ["1×RTX 4090"] * 3 + ["1×RTX 3090"]  # type: ignore[union-attr]


def test_the_rate_moves_the_answer(tmp_path: Path) -> None:
    # Twice the requests per user means about half the users.
    calm = _plan(tmp_path, *SMALL, "--rate", "3")
    busy = _plan(tmp_path, *SMALL, "--rate", "12")
    assert isinstance(calm["max_users"], int) and isinstance(busy["max_users"], int)
    assert 2.5 * busy["max_users"] < calm["max_users"] < 5.5 * busy["max_users"]


@needs_traces
@pytest.mark.parametrize("name", ["azure-conv", "azure-code"])
def test_named_traces(tmp_path: Path, name: str) -> None:
    doc = _plan(tmp_path, *SMALL, "--trace", name, "--trace-dir", str(TRACES))
    assert doc["inputs"]["demand"] == f"trace {name}, 200 requests"  # type: ignore[index]
    assert doc["inputs"]["requests_simulated"] == 200  # type: ignore[index]


def test_a_csv_trace_of_the_clubs_own(tmp_path: Path) -> None:
    trace = tmp_path / "ours.csv"
    rows = "".join(f"{i * 2.5},{200 + i},{100}\n" for i in range(50))
    trace.write_text("arrival_s,prompt_tokens,output_tokens\n" + rows, encoding="utf-8")
    doc = _plan(tmp_path, *SMALL, "--trace", str(trace))
    assert doc["inputs"]["requests_simulated"] == 50  # type: ignore[index]
    assert doc["dropped_requests"] == 0


def test_answers_the_service_would_refuse_are_dropped_not_waited_for(tmp_path: Path) -> None:
    # A club's log where a few requests asked for more tokens than the context holds: the scheduler
    # refuses those at once (400), so the plan leaves them out and the rest are served as usual.
    trace = tmp_path / "log.csv"
    rows = [f"{i * 2.0},{300},{9000 if i % 10 == 0 else 200}" for i in range(100)]
    trace.write_text("arrival_s,prompt_tokens,output_tokens\n" + "\n".join(rows) + "\n", encoding="utf-8")
    doc = _plan(
        tmp_path, "--model", "Llama-3.1-8B", "--gpus", "4090x1", "--trace", str(trace), "--users", "5"
    )
    assert doc["dropped_requests"] == 10
    sweep = doc["sweep"]
    assert isinstance(sweep, list)
    light = next(p for p in sweep if p["users"] == 5)
    assert light["completed"] == 90 and light["ok"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        # A card the catalog does not know: the closest names are offered.
        (["--gpus", "4090x2,GTX 1080x1"], "unknown GPU 'GTX 1080'"),
        # A count that is not a number, and no cards at all.
        (["--gpus", "4090x2,"], "an empty item"),
        (["--gpus", "4090x0"], "has no cards"),
        # 70B at 8 bpw on one 12 GB card fits nowhere.
        (["--model", "Llama-3.1-70B", "--bits", "8", "--gpus", "3060x1"], "fits on none of the cards"),
        (["--model", "no-such-model"], "unknown model 'no-such-model'"),
        (["--bits", "9"], "bits per weight must be between"),
        (["--bits", "lots"], "'lots' is not a valid float"),
        (["--cache-bits", "5"], "cache bits must be one of"),
        (["--price-kwh", "-0.1"], "electricity usd per kwh cannot be negative"),
        (["--price-card", "RTX 4090=-5"], "card price for RTX 4090 cannot be negative"),
        (["--price-card", "RTX 4090"], "write CARD=PRICE"),
        (["--price-cloud", "GTX 1080=1"], "unknown GPU 'GTX 1080'"),
        (["--years", "0"], "amortisation years must be positive"),
        (["--hours", "25"], "hours of use per day must be between 0 and 24"),
        (["--users", "0"], "users must be at least 1"),
        (["--rate", "-1"], "requests per user-hour must be positive"),
        (["--slo-ttft", "0"], "TTFT and tokens per second must be positive"),
        (["--context", "999999"], "context must be between 1 and"),
        (["--trace", "azure-chat", "--trace-dir", "."], "trace 'azure-chat': no file"),
        (["--requests", "0"], "must be at least 1"),
        # Answers the length of the context: the scheduler would refuse every one.
        (["--output-tokens", "8192"], "every request of the demand has a prompt or an answer as long as"),
    ],
)
def test_errors_are_one_line_and_exit_2(args: list[str], message: str) -> None:
    base = {"--model": "Llama-3.1-8B", "--gpus": "4090x2", "--requests": "100"}
    for flag, value in zip(args[::2], args[1::2], strict=True):
        base[flag] = value
    code, out, err = _run(*(x for kv in base.items() for x in kv))
    assert code == 2, out + err
    assert err.startswith("hearth: error: ") and message in err, err
    assert err.count("\n") == 1  # one line, no traceback
    assert "Traceback" not in out + err


def test_a_malformed_trace_is_one_line(tmp_path: Path) -> None:
    trace = tmp_path / "bad.csv"
    trace.write_text("arrival_s,prompt_tokens,output_tokens\n0,lots,10\n", encoding="utf-8")
    code, _, err = _run(*SMALL, "--trace", str(trace))
    assert code == 2 and err.count("\n") == 1 and "line 2: not a time and two token counts" in err
