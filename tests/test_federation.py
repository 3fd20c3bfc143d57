"""The federation end to end, with real processes: one scheduler and four nodes on 127.0.0.1.

    n1  club       200 MB  demo-a (loaded at start)
    n2  community  200 MB  demo-b (loaded at start)
    n3  community  100 MB  demo-b, demo-c, demo-huge (none loaded; room for one demo model at a time)
    n4  community  200 MB  demo-a; never enrolled with a code: found on the LAN, approved by the operator

Nodes are enrolled with codes through the real CLI, found over real zeroconf bound to loopback, approved
with the operator's authority key, and then placed on, killed (`kill -9`), drained, revoked and forged
against. The tests share one cluster and run in order: each one leaves it as the next expects.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from node.demo import DEMO_MODEL_ID, build_demo_model
from protocol.identity import Identity, sign_request
from tests.cluster import Cluster, NodeSpec, chat, error_code

MB = 1_000_000
CANARY = f"CANARY-{uuid.uuid4().hex} the words nobody may read"

pytestmark = pytest.mark.timeout(600)


def _model_copies(base: Path) -> dict[str, Path]:
    demo = build_demo_model(base / DEMO_MODEL_ID)
    dirs = {}
    for name in ("demo-a", "demo-b", "demo-c", "demo-huge"):
        dirs[name] = base / name
        shutil.copytree(demo, dirs[name])
    # demo-huge claims a context so long that its cache could never fit any node's budget.
    config = json.loads((dirs["demo-huge"] / "config.json").read_text())
    config["max_position_embeddings"] = 4_000_000
    (dirs["demo-huge"] / "config.json").write_text(json.dumps(config))
    return dirs


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    base = tmp_path_factory.mktemp("federation")
    models = _model_copies(base / "models")
    c = Cluster(base)
    c.init()
    c.start_scheduler()
    c.specs = {  # type: ignore[attr-defined]
        "n1": NodeSpec("n1", "club", 200 * MB, [(models["demo-a"], "demo-a", True)]),
        "n2": NodeSpec("n2", "community", 200 * MB, [(models["demo-b"], "demo-b", True)]),
        "n3": NodeSpec(
            "n3",
            "community",
            100 * MB,
            [
                (models["demo-b"], "demo-b", False),
                (models["demo-c"], "demo-c", False),
                (models["demo-huge"], "demo-huge", False),
            ],
        ),
        "n4": NodeSpec("n4", "community", 200 * MB, [(models["demo-a"], "demo-a", True)]),
    }
    try:
        for node_id in ("n1", "n2", "n3"):
            c.enroll(c.specs[node_id])  # type: ignore[attr-defined]
            c.start_node(c.specs[node_id])  # type: ignore[attr-defined]
        yield c
    finally:
        c.stop()


def _pending(c: Cluster) -> dict[str, dict[str, object]]:
    return {r["node_id"]: r for r in c.admin("/admin/enrollments?state=pending")["enrollments"]}


def test_enrolled_nodes_wait_for_approval_and_get_no_work(cluster: Cluster) -> None:
    listed = cluster.hearth("enroll", "list").stdout
    for node_id in ("n1", "n2", "n3"):
        assert node_id in listed
    pending = _pending(cluster)
    assert {pending[n]["tier"] for n in ("n1", "n2", "n3")} == {"club", "community"}
    assert all(pending[n]["source"] == "code" for n in ("n1", "n2", "n3"))
    # Pending nodes are not capacity: nobody serves demo-a yet.
    r = chat(cluster.url, cluster.token, "demo-a")
    assert r.status_code == 404 and error_code(r) == "model_not_found"
    assert cluster.admin("/admin/nodes")["nodes"] == []
    # A code works once.
    code = cluster.hearth("enroll", "create", "--tier", "community").stdout.strip()
    other = cluster.base / "nodes" / "other"
    first = cluster.hearth("node", "enroll", "--scheduler", cluster.url, "--code", code, "--node-id", "other",
                           "--data-dir", str(other))  # fmt: skip
    assert first.returncode == 0
    again = cluster.hearth("node", "enroll", "--scheduler", cluster.url, "--code", code, "--node-id", "other2",
                           "--data-dir", str(other), check=False)  # fmt: skip
    assert again.returncode == 1 and "unknown, used or expired" in again.stderr
    assert "Traceback" not in again.stderr
    cluster.hearth("enroll", "reject", "other")


def test_a_lan_node_is_discovered_as_a_pending_enrollment(cluster: Cluster) -> None:
    cluster.start_node(cluster.specs["n4"], authority_key=cluster.authority_key)  # type: ignore[attr-defined]
    cluster.wait(lambda: "n4" in _pending(cluster), "n4 is discovered over zeroconf", within=30)
    assert _pending(cluster)["n4"]["source"] == "discovered"
    assert cluster.node_doc("n4") is None  # never capacity before approval


def test_approval_turns_nodes_into_capacity(cluster: Cluster) -> None:
    for node_id in ("n1", "n2", "n3", "n4"):
        cluster.approve(node_id)
    for node_id, model in (("n1", "demo-a"), ("n2", "demo-b"), ("n4", "demo-a")):
        cluster.wait(lambda n=node_id, m=model: cluster.model_phase(n, m) == "ready", f"{model} on {node_id}")
    assert cluster.model_phase("n3", "demo-c") == "available"
    shown = cluster.hearth("models").stdout
    assert "demo-a" in shown and "n1" in shown and "n4" in shown
    # The certificate reached the node enrolled with a code through its heartbeat, and the LAN node
    # through the scheduler's push; both keep it.
    for node_id in ("n1", "n4"):
        cluster.wait(
            lambda n=node_id: (cluster.node_keys(n) / "certificate.json").exists(), f"{node_id} cert"
        )


def test_requests_go_where_the_rules_say(cluster: Cluster) -> None:
    start = time.time()
    client = openai.OpenAI(base_url=cluster.url + "/v1", api_key=cluster.token, max_retries=0)
    for _ in range(4):
        reply = client.chat.completions.create(
            model="demo-b", messages=[{"role": "user", "content": CANARY}], max_tokens=4
        )
        assert reply.usage is not None
    # demo-b is warm on n2 and cold on n3: the warm node serves it and n3 loads nothing.
    cluster.wait(lambda: len(cluster.usage_nodes(start)) == 4, "usage rows")
    assert {row[1] for row in cluster.usage_nodes(start)} == {"n2"}
    assert cluster.model_phase("n3", "demo-b") == "available"
    # max_tokens beyond the model's context can never run: 400 naming the context.
    r = chat(cluster.url, cluster.token, "demo-a", max_tokens=5000)
    assert r.status_code == 400 and error_code(r) == "context_length_exceeded"
    # A model larger than every node's memory: 422 naming memory, at once.
    r = chat(cluster.url, cluster.token, "demo-huge")
    assert r.status_code == 422 and "memory" in r.json()["error"]["message"]


def test_a_cold_model_is_loaded_once_on_demand(cluster: Cluster) -> None:
    results: list[int] = []

    def one() -> None:
        results.append(chat(cluster.url, cluster.token, "demo-c").status_code)

    threads = [threading.Thread(target=one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == [200] * 4
    assert cluster.model_phase("n3", "demo-c") == "ready"
    assert cluster.nodes["n3"].text().count("model demo-c ready") == 1


def test_a_heavy_user_cannot_starve_a_light_one(cluster: Cluster) -> None:
    heavy, light = cluster.user_token("heavy"), cluster.user_token("light")
    finished: list[str] = []
    lock = threading.Lock()

    def run(token: str, who: str) -> None:
        r = chat(cluster.url, token, "demo-b", max_tokens=48, ignore_eos=True)
        assert r.status_code == 200, r.text
        with lock:
            finished.append(who)

    # demo-b runs on n2 alone (one sequence at a time): the heavy user's requests queue at the scheduler.
    threads = [threading.Thread(target=run, args=(heavy, "heavy")) for _ in range(8)]
    for t in threads:
        t.start()
    cluster.wait(lambda: cluster.admin("/admin/nodes")["queued"] >= 5, "the heavy user's backlog", within=30)
    late = threading.Thread(target=run, args=(light, "light"))
    late.start()
    for t in [*threads, late]:
        t.join(120)
    assert len(finished) == 9
    # Served in arrival order the light request would be last; the fair queue serves it within two turns.
    assert finished.index("light") <= 3, finished


def test_drain_moves_work_and_evicts_the_least_recently_used_model(cluster: Cluster) -> None:
    cluster.hearth("node", "drain", "n2")
    cluster.wait(lambda: (cluster.node_doc("n2") or {}).get("draining") is True, "n2 draining")
    # The only other home of demo-b is n3, whose memory holds one model: it unloads idle demo-c.
    r = chat(cluster.url, cluster.token, "demo-b")
    assert r.status_code == 200, r.text
    assert cluster.model_phase("n3", "demo-b") == "ready"
    assert cluster.model_phase("n3", "demo-c") == "available"
    cluster.hearth("node", "drain", "n2", "--undo")
    cluster.wait(lambda: (cluster.node_doc("n2") or {}).get("draining") is False, "n2 back")


def test_a_node_killed_before_streaming_fails_over_invisibly(cluster: Cluster) -> None:
    # demo-b is warm on n2 and n3 now; kill n2 and ask at once, before its heartbeats are missed.
    cluster.kill_node("n2")
    start = time.time()
    for _ in range(3):
        r = chat(cluster.url, cluster.token, "demo-b", stream=False)
        assert r.status_code == 200, r.text
    cluster.wait(lambda: len(cluster.usage_nodes(start)) >= 3, "usage rows")
    served = [row for row in cluster.usage_nodes(start) if row[2] == "ok"]
    assert {row[1] for row in served} == {"n3"}


def test_a_node_killed_mid_stream_is_continued_by_the_other(cluster: Cluster) -> None:
    body = {"model": "demo-a", "messages": [{"role": "user", "content": "go"}], "max_tokens": 1500,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    # Both n1 and n4 serve demo-a; kill the one the stream landed on: the other continues the answer.
    start = time.time()
    with httpx.stream(
        "POST", cluster.url + "/v1/chat/completions", json=body, timeout=60,
        headers={"Authorization": f"Bearer {cluster.token}"},
    ) as r:  # fmt: skip
        lines = r.iter_lines()
        for _ in range(3):
            next(lines)
        victim = next(
            n for n in ("n1", "n4") if (cluster.node_doc(n) or {}).get("models", [{}])[0].get("active")
        )
        cluster.kill_node(victim)
        rest = [line for line in lines if line.startswith("data: ")]
    assert rest[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in rest[:-1]]
    assert not [c for c in chunks if "error" in c]
    assert chunks[-1]["usage"]["completion_tokens"] == 1500
    # The survivor serves demo-a from now on.
    assert chat(cluster.url, cluster.token, "demo-a").status_code == 200
    # The dead node comes back by itself when it is started again: no approval, no enrollment.
    cluster.start_node(cluster.specs[victim])  # type: ignore[attr-defined]
    cluster.wait(lambda: cluster.model_phase(victim, "demo-a") == "ready", f"{victim} back")
    assert start > 0


def test_restarting_the_scheduler_loses_nothing(cluster: Cluster) -> None:
    assert cluster.scheduler is not None
    cluster.scheduler.stop()
    r = httpx.get(cluster.url + "/healthz", timeout=5) if False else None
    assert r is None
    cluster.start_scheduler()  # same port, same data dir
    cluster.wait(lambda: cluster.model_phase("n1", "demo-a") == "ready", "n1 reconnects")
    cluster.wait(lambda: cluster.model_phase("n3", "demo-b") == "ready", "n3 reconnects")
    assert chat(cluster.url, cluster.token, "demo-a").status_code == 200
    states = {r["node_id"]: r["state"] for r in cluster.admin("/admin/enrollments")["enrollments"]}
    assert states["n1"] == states["n3"] == states["n4"] == "approved"


def _node_identity(cluster: Cluster, node_id: str) -> Identity:
    return Identity.load(cluster.node_keys(node_id) / "identity.key")


def test_forged_and_replayed_calls_are_refused(cluster: Cluster) -> None:
    n1 = cluster.node_urls["n1"]
    job = json.dumps({"endpoint": "chat", "request_id": "forged1", "request": {
        "model": "demo-a", "messages": [{"role": "user", "content": "x"}]}}).encode()  # fmt: skip
    scheduler_key = Identity.load(cluster.data_dir / "scheduler.key")

    def node_status() -> dict[str, object]:
        headers = sign_request(scheduler_key, "GET", "/status", b"", audience="n1")
        doc = httpx.get(n1 + "/status", headers=headers, timeout=10).json()
        return next(m for m in doc["models"] if m["id"] == "demo-a")  # type: ignore[no-any-return]

    before = node_status()
    # No signature, and a signature by a key that is not the scheduler's: 401, and nothing happens.
    assert httpx.post(n1 + "/jobs", content=job, timeout=10).status_code == 401
    mallory = Identity.generate()
    headers = sign_request(mallory, "POST", "/jobs", job, audience="n1")
    r = httpx.post(n1 + "/jobs", content=job, headers=headers, timeout=10)
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    unload = sign_request(mallory, "POST", "/models/demo-a/unload", b"", audience="n1")
    assert httpx.post(n1 + "/models/demo-a/unload", headers=unload, timeout=10).status_code == 401
    after = node_status()
    assert (after["started"], after["phase"]) == (before["started"], "ready"), "no job ran, nothing unloaded"
    # A call the scheduler really signed works once; the same bytes again are a replay.
    headers = sign_request(scheduler_key, "GET", "/status", b"", audience="n1")
    assert httpx.get(n1 + "/status", headers=headers, timeout=10).status_code == 200
    replay = httpx.get(n1 + "/status", headers=headers, timeout=10)
    assert replay.status_code == 401 and "replay" in replay.json()["error"]["message"]
    # Signed for another node: refused by this one.
    headers = sign_request(scheduler_key, "GET", "/status", b"", audience="n4")
    assert httpx.get(n1 + "/status", headers=headers, timeout=10).status_code == 401
    # The scheduler's side: a heartbeat from an unknown key, and a replayed real one.
    status = httpx.get(n1 + "/status", headers=sign_request(scheduler_key, "GET", "/status", b"", audience="n1"),
                       timeout=10).json()  # fmt: skip
    body = json.dumps(status).encode()
    forged = sign_request(mallory, "POST", "/v1/nodes/heartbeat", body, audience=scheduler_key.fingerprint)
    assert httpx.post(cluster.url + "/v1/nodes/heartbeat", content=body, headers=forged).status_code == 401
    real = sign_request(_node_identity(cluster, "n1"), "POST", "/v1/nodes/heartbeat", body,
                        audience=scheduler_key.fingerprint)  # fmt: skip
    assert httpx.post(cluster.url + "/v1/nodes/heartbeat", content=body, headers=real).status_code == 200
    assert httpx.post(cluster.url + "/v1/nodes/heartbeat", content=body, headers=real).status_code == 401


def test_a_revoked_node_gets_no_work_and_learns_it_at_its_next_heartbeat(cluster: Cluster) -> None:
    cluster.hearth("node", "revoke", "n4")
    cluster.hearth("node", "revoke", "n1")
    # demo-a had only n1 and n4: from now on nobody serves it.
    r = chat(cluster.url, cluster.token, "demo-a")
    assert r.status_code == 404
    cluster.wait(lambda: "revoked by the operator" in cluster.nodes["n1"].text(), "n1 learns it", within=10)
    scheduler_key = Identity.load(cluster.data_dir / "scheduler.key")
    headers = sign_request(scheduler_key, "GET", "/status", b"", audience="n1")
    assert httpx.get(cluster.node_urls["n1"] + "/status", headers=headers, timeout=10).status_code == 401


def test_no_prompt_text_reaches_any_log_or_file(cluster: Cluster) -> None:
    cluster.stop()
    hits = []
    for path in cluster.base.rglob("*"):
        if path.is_file() and CANARY.encode() in path.read_bytes():
            hits.append(path)
    assert hits == []
