"""Benchmark: what policy enforcement adds to the request path (not a test: it prints figures).

The same short streaming chat requests go through the scheduler's ``/v1/chat/completions`` with the
policies off (the built-in policy: one open ``default`` group) and on (a policy file of five groups, every
limit set on ``default``, the group of the benchmark's token), at 1, 10 and 100 concurrent streams paced by
a scripted backend (tests/bench/scripted.py). Scheduler and node are separate processes (the children of
tests/bench/bench_relay.py), so the scheduler's CPU time is its own. One scheduler serves both modes: the
policy is switched between blocks through ``PUT /admin/policy`` (off: an empty file, which resolves exactly
as no file does), and off and on blocks alternate (off-on, on-off, …) so drift hits both alike.

    .venv/bin/python -m tests.bench.bench_policy            # about 3 minutes on 2 cores
    .venv/bin/python -m tests.bench.bench_policy --quick    # a smoke run (about 1 minute)
    .venv/bin/python -m tests.bench.bench_policy --profile /tmp/sched.prof   # scheduler under cProfile

Printed per level: TTFT p50/p99 off and on (send → first content delta), the added p50 (on − off),
requests per second, and scheduler CPU per request off and on; the targets (issue 13): added TTFT p50
≤ 0.3 ms and scheduler CPU per request ≤ +10 %. Every request must get 200 and a whole stream, and the
scheduler must have refused none (its /metrics): the limits are set high enough never to bite, so the run
measures what checking and counting them costs. Also printed: ``Enforcer.admit`` + ``release`` in this
process, µs per decision, and its parts (the engine's ``decide``; the counters' ``Meters.admit`` +
``release``), which say where the cost is when a target is missed.
"""

from __future__ import annotations

import argparse
import re
import secrets
import sys
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import psutil  # type: ignore[import-untyped]

from tests.bench.bench_relay import (
    Bench,
    Block,
    Cluster,
    Target,
    _merge,
    _pct,
    _wait_ready,
    cluster,
    cpu_model,
    run_and_report,
    source_revision,
)

SLOTS = 100  # model slots on the node (one generation thread each): every stream of the top level has one
MEASURED = "default"  # the benchmark's token has no group of its own
BIG = 10**9  # a limit that never bites in a run of a few minutes
# The club of docs/policies.md, cut to five groups; the measured group sets every limit there is.
POLICY = f"""\
[groups.{MEASURED}]
description = "the benchmark's token: every limit set, none reached"
models = ["llama-3*", "mistral-*", "bench-*"]
max_tokens = 4096
max_prompt_tokens = 100000
requests_per_minute = {BIG}
tokens_per_minute = {BIG}
concurrent_requests = 100000
tokens_per_day = {BIG * 100}
tokens_per_month = {BIG * 1000}
tiers = ["club", "community"]
require_e2e = false
weight = 1.5
{{course_prompt}}
[groups.{MEASURED}.total]
requests_per_minute = {BIG}
tokens_per_minute = {BIG}
concurrent_requests = 100000
tokens_per_day = {BIG * 100}
tokens_per_month = {BIG * 1000}

[groups.students]
models = ["llama-3*", "mistral-*"]
max_tokens = 1024
requests_per_minute = 20
tokens_per_minute = 20000
concurrent_requests = 2
tokens_per_day = 50000
tokens_per_month = 600000

[groups.course-6101]
parent = "students"
system_prompt = "{{prompt}}"
weight = 1.5

[groups.course-6101.total]
tokens_per_day = 2000000

[groups.faculty]
max_tokens = 4096
requests_per_minute = 60
concurrent_requests = 8
tokens_per_month = 5000000
weight = 2

[groups.research]
parent = "faculty"
tiers = ["club"]
require_e2e = true
"""
COURSE_PROMPT = (
    "You are a patient tutor for 6.101. Explain step by step and ask guiding questions. Never hand over a "
    "complete solution to a problem set."
)
OFF = ""  # no groups: the built-in open default group, as without a file
TARGETS = {"added_p50_ms": 0.3, "cpu_per_request": 0.10}


def policy_text(course_prompt: bool) -> str:
    line = f'system_prompt = "{COURSE_PROMPT}"\n' if course_prompt else ""
    return POLICY.replace("{course_prompt}", line).replace("{prompt}", COURSE_PROMPT)


# --------------------------------------------------------------------------------------------------------------
# In-process: one decision and its hold, without the network.


def _per_call_us(fn: Callable[[str], object], ids: list[str], runs: int = 5) -> float:
    """``fn(request_id)`` over ``ids`` in ``runs`` runs: µs per call of the median run (the machine is
    shared). Request ids are fresh per call, as generation.py makes them."""
    n = len(ids) // runs
    times = []
    for r in range(runs):
        t0 = time.perf_counter()
        for rid in ids[r * n : (r + 1) * n]:
            fn(rid)
        times.append((time.perf_counter() - t0) / n * 1e6)
    return sorted(times)[runs // 2]


def micro(n: int, course_prompt: bool) -> dict[str, Any]:
    """µs per ``Enforcer.admit`` + ``release`` off and on, and the parts of the latter."""
    from policies import Meter, Policy, Principal, UsageWindow, Visible, decide
    from scheduler.enforce import Enforcer
    from scheduler.limits import Meters
    from scheduler.rules import Rules, builtin, parse_policy
    from scheduler.store import TokenRecord

    token = TokenRecord("tok_bench", "bench", "user", time.time(), None)
    # As the scheduler sees a benchmark request: about 160 bytes, so an estimate of 40 tokens for the caps,
    # and at most 160 for what it reserves.
    visible = Visible("bench-07", 16, sealed=False, prompt_tokens=40, prompt_bound=160)
    out: dict[str, Any] = {"n": n}
    enforcers = {
        "off": Enforcer(Rules(current=builtin()), Policy()),
        "on": Enforcer(Rules(current=parse_policy(policy_text(course_prompt), "bench")), Policy()),
    }
    for mode, enforcer in enforcers.items():
        out[f"{mode}_rules"] = enforcer.admit(token, visible, "warm").rules.decode() or "(none)"
        enforcer.release("warm")

        def admit_release(rid: str, enforcer: Enforcer = enforcer) -> None:
            enforcer.admit(token, visible, rid)
            enforcer.release(rid)

        out[f"enforcer_{mode}_us"] = _per_call_us(
            admit_release, [secrets.token_hex(12) for _ in range(5 * n)]
        )
    group = enforcers["on"].group(MEASURED)
    assert group is not None
    principal = Principal(token_id=token.id, group=group)
    window = UsageWindow(each=Meter(requests_minute=10), total=Meter(requests_minute=10))
    out["decide_us"] = _per_call_us(lambda _: decide(principal, visible, window), [""] * 5 * n)
    meters = Meters()

    def meters_admit_release(rid: str) -> None:
        meters.admit(rid, principal, visible)
        meters.release(rid)

    out["meters_us"] = _per_call_us(meters_admit_release, [secrets.token_hex(12) for _ in range(5 * n)])
    return out


# --------------------------------------------------------------------------------------------------------------
# Through the scheduler.


async def _set_policy(session: aiohttp.ClientSession, c: Cluster, text: str) -> None:
    """Apply ``text`` at once (PUT /admin/policy), and check the token's group is limited exactly when on."""
    auth = {"Authorization": f"Bearer {c.admin_token}"}
    async with session.put(c.scheduler_url + "/admin/policy", json={"text": text}, headers=auth) as resp:
        if resp.status != 200:
            raise RuntimeError(f"PUT /admin/policy: HTTP {resp.status}: {await resp.text()}")
    auth = {"Authorization": f"Bearer {c.token}"}
    async with session.get(c.scheduler_url + "/v1/policy", headers=auth) as resp:
        rules = (await resp.json())["rules"]
    if (rules["each"].get("requests_per_minute") is not None) != bool(text):
        raise RuntimeError(f"the policy in force is not the one just put: {rules}")


_REQUESTS = re.compile(r'^hearth_requests_total\{[^}]*status="([^"]+)"[^}]*\} ([0-9.e+]+)$', re.M)


async def _outcomes(session: aiohttp.ClientSession, url: str) -> dict[str, float]:
    """The scheduler's own count of generation requests by outcome (its /metrics)."""
    async with session.get(url + "/metrics") as resp:
        text = await resp.text()
    out: dict[str, float] = {}
    for status, value in _REQUESTS.findall(text):
        out[status] = out.get(status, 0.0) + float(value)
    return out


async def _level(
    bench: Bench, c: Cluster, texts: dict[str, str], concurrency: int, pace: float, per_block: int,
    rounds: int,
) -> dict[str, Any]:  # fmt: skip
    """Off and on blocks, ``rounds`` of each, in the order off-on, on-off, … (each pair's order swapped)."""
    bench.delay_ms = pace
    budget = 120.0  # a block that takes this long has gone wrong; its streams so far still count
    blocks: dict[str, list[Block]] = {"off": [], "on": []}
    for mode in ("off", "on"):  # warm connections, slots and caches in both modes
        await _set_policy(bench.session, c, texts[mode])
        await bench.streams(bench.via, concurrency, concurrency, budget)
    for r in range(rounds):
        for mode in ("off", "on") if r % 2 == 0 else ("on", "off"):
            await _set_policy(bench.session, c, texts[mode])
            blocks[mode].append(await bench.streams(bench.via, concurrency, per_block, budget))
    out: dict[str, Any] = {"concurrency": concurrency, "pace_ms": pace}
    for mode, merged in (("off", _merge(blocks["off"])), ("on", _merge(blocks["on"]))):
        out[mode] = {
            "streams": merged.streams,
            "errors": merged.errors,
            "ttft_p50_ms": _pct(merged.ttft, 50) * 1e3,
            "ttft_p99_ms": _pct(merged.ttft, 99) * 1e3,
            "requests_per_s": merged.streams / merged.wall if merged.wall else 0.0,
            "sched_cpu_per_request_ms": merged.cpu["scheduler"] / max(merged.streams, 1) * 1e3,
        }
    off, on = out["off"], out["on"]
    out["added_p50_ms"] = on["ttft_p50_ms"] - off["ttft_p50_ms"]
    out["cpu_added"] = on["sched_cpu_per_request_ms"] / off["sched_cpu_per_request_ms"] - 1
    return out


def plan(opts: argparse.Namespace) -> list[tuple[int, float, int]]:
    """(streams, pace in ms per token, requests per block) of each level. The pace is streams / rate, so
    every level offers the same load and the levels differ in open streams."""
    per_block = {1: 60, 10: 100, 100: 200} if opts.quick else {1: 250, 10: 300, 100: 300}
    return [(n, 1000.0 * n / opts.rate, per_block.get(n, 4 * n)) for n in opts.levels]


async def run(opts: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {
        "machine": {"cpu": cpu_model(), "cores": psutil.cpu_count(), "revision": source_revision()},
        "params": {"tokens": opts.tokens, "rate": opts.rate, "rounds": opts.rounds, "quick": opts.quick,
                   "course_prompt": opts.course_prompt},
    }  # fmt: skip
    print("  in process: Enforcer.admit + release…", file=sys.stderr, flush=True)
    results["micro"] = micro(2000 if opts.quick else 20000, opts.course_prompt)
    texts = {"off": OFF, "on": policy_text(opts.course_prompt)}
    async with (
        cluster(SLOTS, profile=opts.profile, prefix="hearth-bench-policy-") as c,
        aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=120)
        ) as session,
    ):
        await _wait_ready(session, c.scheduler_url, c.token, SLOTS)
        via = Target(
            "scheduler", c.scheduler_url + "/v1/chat/completions",
            {"Authorization": f"Bearer {c.token}", "Content-Type": "application/json"}, False,
        )  # fmt: skip
        # Only the way through the scheduler is measured here: direct is there because Bench needs one.
        bench = Bench(c.node, c.scheduler, via, via, opts.tokens, 0.0, SLOTS, session)
        before = await _outcomes(session, c.scheduler_url)
        levels = []
        for concurrency, pace, per_block in plan(opts):
            print(f"  {concurrency} streams, {pace:g} ms/token…", file=sys.stderr, flush=True)
            levels.append(await _level(bench, c, texts, concurrency, pace, per_block, opts.rounds))
        after = await _outcomes(session, c.scheduler_url)
        results["levels"] = levels
        results["outcomes"] = {k: v - before.get(k, 0.0) for k, v in after.items() if v != before.get(k)}
    return results


def _verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def report(r: dict[str, Any]) -> str:
    m, p, mi = r["machine"], r["params"], r["micro"]
    out = [
        f"Policy enforcement off vs on through the scheduler — {m['cpu']}, {m['cores']} cores, revision "
        f"{m['revision']}",
        f"streams of {p['tokens']} tokens; each level offers {p['rate']:g} tokens/s in all (pace = streams / "
        f"rate); {p['rounds']} blocks per mode per level, alternating"
        + ("; the measured group carries a course prompt" if p["course_prompt"] else ""),
        "",
        "| streams | pace ms/token | mode | requests | TTFT p50 ms | TTFT p99 ms | added p50 ms | requests/s "
        "| scheduler CPU ms/request | CPU added |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for lv in r["levels"]:
        for mode in ("off", "on"):
            s = lv[mode]
            added = f"**{lv['added_p50_ms']:+.2f}**" if mode == "on" else ""
            cpu = f"**{lv['cpu_added']:+.1%}**" if mode == "on" else ""
            out.append(
                f"| {lv['concurrency']} | {lv['pace_ms']:g} | {mode} | {s['streams']} | {s['ttft_p50_ms']:.2f} | "
                f"{s['ttft_p99_ms']:.2f} | {added} | {s['requests_per_s']:.1f} | "
                f"{s['sched_cpu_per_request_ms']:.3f} | {cpu} |"
            )
    errors = sum(lv[mode]["errors"] for lv in r["levels"] for mode in ("off", "on"))
    refused = {k: v for k, v in r["outcomes"].items() if k.startswith("refused")}
    out += [
        "",
        f"client: {errors} requests without 200 and a whole stream; scheduler /metrics over the run: "
        + ", ".join(f"{k} {v:.0f}" for k, v in sorted(r["outcomes"].items()))
        + f" ({sum(refused.values()):.0f} refused)",
        "",
        f"in process, µs per decision and hold ({mi['n']} × 5 runs, median run): Enforcer.admit + release "
        f"off {mi['enforcer_off_us']:.1f}, on {mi['enforcer_on_us']:.1f} (+{mi['enforcer_on_us'] - mi['enforcer_off_us']:.1f}); "
        f"of which, on: policies.decide {mi['decide_us']:.1f}, Meters.admit + release (decide included) "
        f"{mi['meters_us']:.1f}",
        f"rules sent to the node with each job: off {mi['off_rules']}, on {mi['on_rules']}",
        "",
        "targets:",
    ]
    for lv in r["levels"]:
        out.append(
            f"  {lv['concurrency']} streams: added TTFT p50 {lv['added_p50_ms']:+.2f} ms (≤ 0.3 ms): "
            f"{_verdict(lv['added_p50_ms'] <= TARGETS['added_p50_ms'])}; scheduler CPU per request "
            f"{lv['cpu_added']:+.1%} (≤ +10 %): {_verdict(lv['cpu_added'] <= TARGETS['cpu_per_request'])}"
        )
    out.append(f"  no request refused or failed: {_verdict(errors == 0 and not refused)}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench.bench_policy", description=(__doc__ or "").split("\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="fewer requests and rounds (a smoke run)")
    parser.add_argument("--tokens", type=int, default=16, help="tokens per stream (default 16)")
    parser.add_argument(
        "--rate", type=float, default=1000.0, help="tokens/s each level offers in all (default 1000)"
    )
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 10, 100], help="concurrent streams")
    parser.add_argument("--rounds", type=int, help="blocks per mode per level (default 4; --quick 2)")
    parser.add_argument(
        "--course-prompt", action="store_true", help="give the measured group a course's system prompt too"
    )
    parser.add_argument("--json", metavar="PATH", help="also write the raw results here")
    parser.add_argument("--profile", metavar="PATH", help="run the scheduler under cProfile, stats to PATH")
    opts = parser.parse_args(argv)
    if opts.rounds is None:
        opts.rounds = 2 if opts.quick else 4
    run_and_report(run, report, opts)


if __name__ == "__main__":
    main()
