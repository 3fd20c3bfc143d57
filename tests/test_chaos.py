"""Chaos on a real federation on 127.0.0.1: a scheduler, two nodes and `hearth proxy`, each its own process.

- A node killed (`kill -9`) while 20 streams run, plaintext straight to the scheduler and sealed through the
  proxy: every request completes, whole, with no error (failover before the first byte, continuation after).
- The scheduler restarted: tokens, nodes and usage are kept; a stream in flight ends with `[DONE]` or an
  error event, never a silent cut; the proxy serves again as soon as the nodes are back (it refetches the
  directory on a miss, not after its cache ages).

Bounded: 20 streams of 48 tokens, every process stopped at the end.
"""

from __future__ import annotations

import json
import re
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from node.demo import DEMO_MODEL_ID, build_demo_model
from tests.cluster import Cluster, NodeSpec

pytestmark = pytest.mark.timeout(600)
MB = 1_000_000
STREAMS = 20
TOKENS = 48
MODEL = "demo"
# Names no other test uses: nodes of other test runs on this machine may advertise on loopback too.
NODES = ("chaos-a", "chaos-b")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    base = tmp_path_factory.mktemp("chaos")
    model = build_demo_model(base / "models" / DEMO_MODEL_ID)
    c = Cluster(base)
    c.init()
    # 20 streams wait for two one-sequence nodes, then for one: on a busy 2-core machine that can take
    # longer than the cluster's usual 30 s queue wait, and a queue timeout is not what is tested here.
    config = base / "scheduler.toml"
    config.write_text(config.read_text().replace("max_queue_wait = 30.0", "max_queue_wait = 300.0"))
    c.start_scheduler()
    c.specs = {n: NodeSpec(n, "club", 200 * MB, [(model, MODEL, True)]) for n in NODES}  # type: ignore[attr-defined]
    try:
        for node_id in NODES:
            c.enroll(c.specs[node_id])  # type: ignore[attr-defined]
            c.start_node(c.specs[node_id])  # type: ignore[attr-defined]
            c.approve(node_id)
        c.wait(lambda: _both_ready(c), "both nodes serve the model", within=120)
        yield c
    finally:
        c.stop()
        for proc in getattr(c, "proxies", []):
            proc.stop()


def _both_ready(c: Cluster) -> bool:
    try:
        return all(c.model_phase(n, MODEL) == "ready" for n in NODES)
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="module")
def proxy(cluster: Cluster) -> str:
    user = cluster.user_token("proxied")
    proc = cluster._spawn(
        "proxy",
        ["proxy", "--scheduler", cluster.url, "--token", user, "--port", "0",
         "--data-dir", str(cluster.base / "proxy-user")],
    )  # fmt: skip
    cluster.proxies = [proc]  # type: ignore[attr-defined]
    return cluster._await_line(proc, r"point any OpenAI client at (http://\S+)").group(1).removesuffix("/v1")


def _stream(base: str, token: str, results: list[dict[str, object]], started: threading.Semaphore) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "go"}], "max_tokens": TOKENS,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    events: list[str] = []
    status = 0
    try:
        with httpx.stream(
            "POST", base + "/v1/chat/completions", json=body, timeout=180,
            headers={"Authorization": f"Bearer {token}"},
        ) as r:  # fmt: skip
            status = r.status_code
            if status != 200:
                events.append(r.read().decode(errors="replace"))
            for line in r.iter_lines():
                if line.startswith("data: "):
                    if not events:
                        started.release()
                    events.append(line.removeprefix("data: "))
    except httpx.HTTPError as exc:
        events.append(f"transport error {type(exc).__name__}")
    results.append({"status": status, "events": events})


def _outcome(result: dict[str, object]) -> str:
    """'ok' for a whole answer; otherwise what went wrong."""
    events = result["events"]
    assert isinstance(events, list)
    if result["status"] != 200:
        return f"status {result['status']}: {events[:1]}"
    if not events or events[-1] != "[DONE]":
        return f"cut: {events[-1:]}"
    chunks = [json.loads(e) for e in events[:-1]]
    if errors := [c["error"]["code"] for c in chunks if "error" in c]:
        return f"error {errors}"
    usage = chunks[-1].get("usage") or {}
    if usage.get("completion_tokens") != TOKENS:
        return f"short: {usage}"
    return "ok"


def _busy_node(cluster: Cluster) -> str:
    nodes = cluster.admin("/admin/nodes")["nodes"]
    busy = [n["node_id"] for n in nodes for m in n["models"] if m.get("active", 0) > 0]
    return busy[0] if busy else NODES[0]


@pytest.mark.parametrize("route", ["plain", "sealed"])
def test_a_node_killed_during_20_streams_loses_none(cluster: Cluster, proxy: str, route: str) -> None:
    base, token = (cluster.url, cluster.token) if route == "plain" else (proxy, "unused-by-the-proxy")
    results: list[dict[str, object]] = []
    started = threading.Semaphore(0)
    threads = [threading.Thread(target=_stream, args=(base, token, results, started)) for _ in range(STREAMS)]
    for t in threads:
        t.start()
    assert started.acquire(timeout=120), "a stream began"
    victim = _busy_node(cluster)
    cluster.kill_node(victim)
    for t in threads:
        t.join(300)
    outcomes = [_outcome(r) for r in results]
    assert outcomes == ["ok"] * STREAMS, outcomes
    # The node comes back for the next test.
    cluster.start_node(cluster.specs[victim])  # type: ignore[attr-defined]
    cluster.wait(lambda: _both_ready(cluster), f"{victim} is back", within=120)


def _count(db: Path, table: str) -> int:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        return int(conn.execute(f"select count(*) from {table}").fetchone()[0])


def test_a_scheduler_restart_keeps_state_and_cuts_no_stream_silently(cluster: Cluster, proxy: str) -> None:
    user = cluster.user_token("survivor")
    assert (
        httpx.get(cluster.url + "/v1/models", headers={"Authorization": f"Bearer {user}"}).status_code == 200
    )
    db = cluster.data_dir / "hearth.db"
    ok = httpx.post(
        cluster.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {user}"}, timeout=60,
        json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
    )  # fmt: skip
    assert ok.status_code == 200
    cluster.wait(lambda: _count(db, "usage") > 0, "the usage row is written")
    usage_before = _count(db, "usage")
    # A long stream in flight when the scheduler is told to stop.
    body = {"model": MODEL, "messages": [{"role": "user", "content": "go"}], "max_tokens": 1500,
            "ignore_eos": True, "stream": True}  # fmt: skip
    events: list[str] = []
    with httpx.stream(
        "POST", cluster.url + "/v1/chat/completions", json=body, timeout=60,
        headers={"Authorization": f"Bearer {cluster.token}"},
    ) as r:  # fmt: skip
        lines = (line for line in r.iter_lines() if line.startswith("data: "))
        events.append(next(lines))
        assert cluster.scheduler is not None
        stopping = threading.Thread(target=cluster.scheduler.stop)
        stopping.start()
        events += list(lines)
        stopping.join(60)
    last = events[-1].removeprefix("data: ")
    assert last == "[DONE]" or json.loads(last)["error"]["code"] == "shutting_down", events[-3:]
    assert "Traceback" not in cluster.scheduler.text()

    cluster.start_scheduler()  # the same port and data directory
    # Tokens and usage are kept; the nodes, heartbeating all along, are back within their next beats.
    assert (
        httpx.get(cluster.url + "/v1/models", headers={"Authorization": f"Bearer {user}"}).status_code == 200
    )
    assert _count(db, "usage") >= usage_before + 1  # the interrupted stream is accounted for too
    cluster.wait(lambda: _both_ready(cluster), "the nodes are back", within=60)
    back = time.monotonic()
    served = None
    while served is None and time.monotonic() - back < 60:  # a deadline, not the measure
        r = httpx.post(
            proxy + "/v1/chat/completions", timeout=60,
            json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
        )  # fmt: skip
        if r.status_code == 200:
            served = time.monotonic() - back
        else:
            assert r.status_code in (503, 502), r.text  # retryable while the directory fills again
            time.sleep(0.1)
    # Served again; that it is by re-reading the directory on a miss, not by its cache ageing, is shown
    # without a clock by tests/test_proxy_recovery.py (age-based refresh off there).
    assert served is not None, "the proxy serves again once the nodes are back"
    print(f"proxy served again {served:.2f} s after the nodes were back")


def test_no_process_logged_a_traceback_or_a_prompt(cluster: Cluster) -> None:
    logs = list((cluster.base / "logs").glob("*"))
    assert logs
    for path in logs:
        text = path.read_text(errors="replace")
        assert "Traceback" not in text, path.name
        assert not re.search(r'"content":\s*"go"', text), path.name
