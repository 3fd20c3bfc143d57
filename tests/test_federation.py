"""The federation end to end, with real processes: one scheduler and four nodes on 127.0.0.1.

    n1  club       200 MB  demo-a (loaded at start)
    n2  community  200 MB  demo-b (loaded at start)
    n3  community  100 MB  demo-b, demo-c, demo-huge (none loaded; room for one demo model at a time)
    n4  community  200 MB  demo-a; never enrolled with a code: found on the LAN, approved by the operator

Nodes are enrolled with codes through the real CLI, found over real zeroconf bound to loopback, approved
with the operator's authority key, and then placed on, killed (`kill -9`), drained, revoked and forged
against. The scheduler and the four nodes are shared by the module (they take seconds to start), but no
test leans on another: each asks, through fixtures, for the state it needs (which nodes are at work,
which model n3 holds), and the fixtures bring the cluster there from whatever the tests before left, so
every test passes alone and in any order. Tests of a node's first steps (enrollment, discovery, approval,
revocation) use nodes of their own, which nobody else approves or revokes.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
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
    """The scheduler, and the four nodes described above (started by the fixtures that need them)."""
    base = tmp_path_factory.mktemp("federation")
    models = _model_copies(base / "models")
    c = Cluster(base)
    c.init()
    c.start_scheduler()
    c.specs = {
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
        "n4": NodeSpec("n4", "community", 200 * MB, [(models["demo-a"], "demo-a", True)], lan=True),
    }
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture(autouse=True)
def _scheduler_runs(cluster: Cluster) -> None:
    """A test before may have stopped it (a restart, the canary's final sweep)."""
    cluster.ensure_scheduler()


@pytest.fixture
def demo_a_nodes(cluster: Cluster) -> None:
    """n1 and n4 at work, demo-a ready on both."""
    cluster.ensure("n1", "n4")


@pytest.fixture
def all_nodes(cluster: Cluster) -> None:
    cluster.ensure("n1", "n2", "n3", "n4")


@pytest.fixture
def n3_holds_demo_c(cluster: Cluster) -> None:
    """n2 and n3 at work; n3 holds demo-c, idle, so demo-b is warm on n2 alone (n3 could load it)."""
    cluster.ensure("n2", "n3")
    if cluster.model_phase("n3", "demo-c") != "ready":
        # demo-c lives on n3 alone: asking for it loads it there, which unloads an idle demo-b.
        r = chat(cluster.url, cluster.token, "demo-c")
        assert r.status_code == 200, r.text
    assert cluster.model_phase("n3", "demo-c") == "ready"
    cluster.wait(lambda: cluster.model_phase("n3", "demo-b") == "available", "demo-b unloaded from n3")


@pytest.fixture
def n3_holds_demo_b(cluster: Cluster) -> None:
    """n2 and n3 at work; demo-b warm on both (so demo-c is cold on n3)."""
    cluster.ensure("n2", "n3")
    if cluster.model_phase("n3", "demo-b") != "ready":
        # With n2 draining, n3 is the only home of demo-b left: asking for it loads it there.
        cluster.hearth("node", "drain", "n2")
        try:
            cluster.wait(lambda: (cluster.node_doc("n2") or {}).get("draining") is True, "n2 draining")
            r = chat(cluster.url, cluster.token, "demo-b")
            assert r.status_code == 200, r.text
        finally:
            cluster.hearth("node", "drain", "n2", "--undo")
        cluster.wait(lambda: (cluster.node_doc("n2") or {}).get("draining") is False, "n2 back")
    assert cluster.model_phase("n3", "demo-b") == "ready"
    cluster.wait(lambda: cluster.model_phase("n3", "demo-c") == "available", "demo-c unloaded from n3")


OwnNode = Callable[..., NodeSpec]


@pytest.fixture
def own_node(cluster: Cluster) -> Iterator[OwnNode]:
    """Makes nodes for one test alone, each serving a model of its own (``demo-<id>``, loaded at start):
    enrolled with a code and started, or (``lan=True``) started and found on the LAN. Afterwards they
    are stopped and their enrollment ended, so that they never show among the shared nodes."""
    made: list[NodeSpec] = []
    demo = cluster.specs["n1"].models[0][0]

    def make(tier: str, *, lan: bool = False, cold: bool = False) -> NodeSpec:
        node_id = cluster.new_id("own")
        models = [(demo, f"demo-{node_id}", True)] + ([(demo, f"demo-{node_id}-cold", False)] if cold else [])
        spec = NodeSpec(node_id, tier, 200 * MB, models, lan=lan)
        made.append(spec)
        if lan:
            cluster.start_node(spec, authority_key=cluster.authority_key)
            cluster.wait(
                lambda: node_id in cluster.enrollments("pending"), f"{node_id} is discovered", within=30
            )
        else:
            cluster.enroll(spec)
            cluster.start_node(spec)
        return spec

    yield make
    for spec in made:
        if spec.node_id in cluster.nodes:
            cluster.nodes[spec.node_id].stop()
    if cluster.scheduler_running():
        known = cluster.enrollments()
        for spec in made:
            state = known.get(spec.node_id, {}).get("state")
            if state == "approved":
                cluster.hearth("node", "revoke", spec.node_id)
            elif state == "pending":
                cluster.hearth("enroll", "reject", spec.node_id)


def test_enrolled_nodes_wait_for_approval_and_get_no_work(cluster: Cluster, own_node: OwnNode) -> None:
    node = own_node("club")
    model = node.preloaded[0]
    cluster.wait(lambda: f"model {model} ready" in cluster.nodes[node.node_id].text(), f"{model} loaded")
    listed = cluster.hearth("enroll", "list").stdout
    assert node.node_id in listed
    pending = cluster.enrollments("pending")
    assert pending[node.node_id]["tier"] == "club"
    assert pending[node.node_id]["source"] == "code"
    # A pending node is not capacity, though it runs and has its model loaded: nobody serves that model.
    r = chat(cluster.url, cluster.token, model)
    assert r.status_code == 404 and error_code(r) == "model_not_found"
    assert cluster.node_doc(node.node_id) is None
    # A code works once.
    code = cluster.hearth("enroll", "create", "--tier", "community").stdout.strip()
    other_id = cluster.new_id("other")
    other = cluster.base / "nodes" / other_id
    first = cluster.hearth("node", "enroll", "--scheduler", cluster.url, "--code", code, "--node-id", other_id,
                           "--data-dir", str(other))  # fmt: skip
    assert first.returncode == 0
    again = cluster.hearth("node", "enroll", "--scheduler", cluster.url, "--code", code, "--node-id",
                           f"{other_id}-again", "--data-dir", str(other), check=False)  # fmt: skip
    assert again.returncode == 1 and "unknown, used or expired" in again.stderr
    assert "Traceback" not in again.stderr
    cluster.hearth("enroll", "reject", other_id)


def test_a_lan_node_is_discovered_as_a_pending_enrollment(cluster: Cluster, own_node: OwnNode) -> None:
    node = own_node("community", lan=True)
    assert cluster.enrollments("pending")[node.node_id]["source"] == "discovered"
    assert cluster.node_doc(node.node_id) is None  # never capacity before approval


def test_approval_turns_nodes_into_capacity(cluster: Cluster, own_node: OwnNode) -> None:
    coded, found = own_node("club", cold=True), own_node("community", lan=True)
    for node in (coded, found):
        cluster.approve(node.node_id)
    for node in (coded, found):
        model = node.preloaded[0]
        cluster.wait(lambda n=node.node_id, m=model: cluster.model_phase(n, m) == "ready", f"{model} ready")
    assert cluster.model_phase(coded.node_id, f"demo-{coded.node_id}-cold") == "available"
    shown = cluster.hearth("models").stdout
    for node in (coded, found):
        assert node.preloaded[0] in shown and node.node_id in shown
    # The certificate reached the node enrolled with a code through its heartbeat, and the LAN node
    # through the scheduler's push; both keep it.
    for node in (coded, found):
        cluster.wait(
            lambda n=node.node_id: (cluster.node_keys(n) / "certificate.json").exists(),
            f"{node.node_id} cert",
        )


@pytest.mark.usefixtures("n3_holds_demo_c", "demo_a_nodes")
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


@pytest.mark.usefixtures("n3_holds_demo_b")
def test_a_cold_model_is_loaded_once_on_demand(cluster: Cluster) -> None:
    loads_before = cluster.nodes["n3"].text().count("model demo-c ready")
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
    assert cluster.nodes["n3"].text().count("model demo-c ready") == loads_before + 1


@pytest.mark.usefixtures("n3_holds_demo_c")
def test_a_heavy_user_cannot_starve_a_light_one(cluster: Cluster) -> None:
    suffix = uuid.uuid4().hex[:8]
    heavy, light, holder = (f"{who}-{suffix}" for who in ("heavy", "light", "holder"))
    tokens = {who: cluster.user_token(who) for who in (heavy, light, holder)}
    statuses: list[int] = []

    def run(who: str) -> None:
        statuses.append(chat(cluster.url, tokens[who], "demo-b", max_tokens=16, ignore_eos=True).status_code)

    def queued() -> int:
        return int(cluster.admin("/admin/nodes")["queued"])

    start = time.time()
    # demo-b is warm on n2 alone, which runs one sequence at a time. A long answer for a third user takes
    # that sequence and holds it (the demo model needs many seconds for it) while the heavy user's eight
    # requests and then the light user's one reach the scheduler and wait in its queue; leaving that
    # answer frees n2. From then on nothing but the fair queue decides who is served next.
    body = {"model": "demo-b", "messages": [{"role": "user", "content": "go"}], "max_tokens": 2000,
            "ignore_eos": True, "stream": True}  # fmt: skip
    with httpx.stream(
        "POST", cluster.url + "/v1/chat/completions", json=body, timeout=60,
        headers={"Authorization": f"Bearer {tokens[holder]}"},
    ) as held:  # fmt: skip
        assert held.status_code == 200
        lines = held.iter_lines()  # kept: an iterator of the response dropped early closes the connection
        while not next(lines).startswith("data: "):
            pass  # the first event: n2 is generating the answer
        backlog = [threading.Thread(target=run, args=(heavy,)) for _ in range(8)]
        for t in backlog:
            t.start()
        cluster.wait(lambda: queued() == 8, "the heavy user's backlog waits at the scheduler")
        late = threading.Thread(target=run, args=(light,))
        late.start()
        cluster.wait(lambda: queued() == 9, "the light request waits behind it")
    for t in [*backlog, late]:
        t.join(120)
    assert statuses == [200] * 9
    cluster.wait(lambda: len(cluster.served(start)) == 10, "usage rows")
    rows = [row for row in cluster.served(start) if row[0] != holder]
    assert {node for _, node, _, _ in rows} == {"n2"}
    # By the scheduler's clock the light request came last; in arrival order it would be served last.
    assert max(rows, key=lambda row: row[2])[0] == light
    # The fair queue serves it within two turns: at most one more of the heavy user's requests first.
    served = [who for who, _, _, _ in rows]  # in the order their answers ended
    assert served.index(light) <= 1, served


@pytest.mark.usefixtures("n3_holds_demo_c")
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


@pytest.mark.usefixtures("n3_holds_demo_b")
def test_a_node_killed_before_streaming_fails_over_invisibly(cluster: Cluster) -> None:
    # demo-b is warm on n2 and n3; kill n2 and ask at once, before its heartbeats are missed.
    cluster.kill_node("n2")
    start = time.time()
    for _ in range(3):
        r = chat(cluster.url, cluster.token, "demo-b", stream=False)
        assert r.status_code == 200, r.text
    cluster.wait(lambda: len(cluster.usage_nodes(start)) >= 3, "usage rows")
    served = [row for row in cluster.usage_nodes(start) if row[2] == "ok"]
    assert {row[1] for row in served} == {"n3"}


@pytest.mark.usefixtures("demo_a_nodes")
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


@pytest.mark.usefixtures("all_nodes")
def test_restarting_the_scheduler_loses_nothing(cluster: Cluster) -> None:
    def models() -> dict[str, dict[str, str]]:
        nodes = cluster.admin("/admin/nodes")["nodes"]
        return {n["node_id"]: {m["id"]: m["phase"] for m in n["models"]} for n in nodes if n["healthy"]}

    before = models()
    assert set(before) == {"n1", "n2", "n3", "n4"}
    assert cluster.scheduler is not None
    cluster.scheduler.stop()
    with pytest.raises(httpx.ConnectError):
        httpx.get(cluster.url + "/healthz", timeout=5)
    cluster.start_scheduler()  # same port, same data dir
    # Every node reconnects by itself, with its models as they were.
    cluster.wait(lambda: models() == before, "every node reconnects")
    assert chat(cluster.url, cluster.token, "demo-a").status_code == 200
    states = {node_id: r["state"] for node_id, r in cluster.enrollments().items()}
    assert all(states[n] == "approved" for n in before), states


def _node_identity(cluster: Cluster, node_id: str) -> Identity:
    return Identity.load(cluster.node_keys(node_id) / "identity.key")


@pytest.mark.usefixtures("demo_a_nodes")
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


def test_a_revoked_node_gets_no_work_and_learns_it_at_its_next_heartbeat(
    cluster: Cluster, own_node: OwnNode
) -> None:
    node = own_node("club")
    model = node.preloaded[0]
    cluster.approve(node.node_id)
    cluster.wait(lambda: cluster.model_phase(node.node_id, model) == "ready", f"{model} ready")
    assert chat(cluster.url, cluster.token, model).status_code == 200
    cluster.hearth("node", "revoke", node.node_id)
    # The model had only this node: from now on nobody serves it.
    r = chat(cluster.url, cluster.token, model)
    assert r.status_code == 404
    proc = cluster.nodes[node.node_id]
    cluster.wait(lambda: "revoked by the operator" in proc.text(), f"{node.node_id} learns it", within=10)
    scheduler_key = Identity.load(cluster.data_dir / "scheduler.key")
    headers = sign_request(scheduler_key, "GET", "/status", b"", audience=node.node_id)
    assert (
        httpx.get(cluster.node_urls[node.node_id] + "/status", headers=headers, timeout=10).status_code == 401
    )


@pytest.mark.usefixtures("demo_a_nodes", "n3_holds_demo_c")
def test_no_prompt_text_reaches_any_log_or_file(cluster: Cluster) -> None:
    # The canary goes through both endpoints, streamed and not, to both kinds of node (a code-enrolled
    # club node or a LAN node for demo-a, n2 for demo-b), and is refused once.
    headers = {"Authorization": f"Bearer {cluster.token}"}
    messages = [{"role": "system", "content": CANARY}, {"role": "user", "content": CANARY}]
    for model in ("demo-a", "demo-b"):
        for stream in (False, True):
            for path, body in (
                ("/v1/chat/completions", {"messages": messages}),
                ("/v1/completions", {"prompt": CANARY}),
            ):
                r = httpx.post(cluster.url + path, json={"model": model, "max_tokens": 4, "stream": stream, **body},
                               headers=headers, timeout=60)  # fmt: skip
                assert r.status_code == 200, r.text
    r = chat(cluster.url, cluster.token, "demo-a", messages=messages, max_tokens=5000)
    assert r.status_code == 400 and CANARY not in r.text
    # Stopped, every process has written all it ever will (the fixtures start them again for later tests).
    cluster.stop()
    hits = []
    for path in cluster.base.rglob("*"):
        if path.is_file() and CANARY.encode() in path.read_bytes():
            hits.append(path)
    assert hits == []
