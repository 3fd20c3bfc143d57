"""On a GPU machine: a node's memory pool is its GPUs' free VRAM read through NVML, and a real scheduler
and node process (no memory budget declared) report and use it. Run with `bash tests/gpu/run.sh`."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from hardware.probe import probe
from node.demo import DEMO_MODEL_ID, build_demo_model
from node.heartbeat import memory_pool
from node.settings import NodeSettings
from tests.cluster import Cluster, NodeSpec, chat

found = probe()
pytestmark = pytest.mark.skipif(not found.gpus, reason=f"no GPU: {found.reason}")


def test_the_pool_is_the_free_vram_nvml_reports() -> None:
    total, gpus = memory_pool(NodeSettings())
    assert gpus.startswith(f"{len(found.gpus)}x NVIDIA")
    # Free VRAM moves a little between two readings (the driver's own use); within 1 GiB.
    assert abs(total - found.free_bytes) < 1 << 30
    assert 0 < total <= found.total_bytes


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("gpu"))
    c.init()
    c.start_scheduler()
    try:
        yield c
    finally:
        c.stop()


def test_a_gpu_node_reports_its_vram_and_serves(cluster: Cluster) -> None:
    demo = build_demo_model(cluster.base / "models" / DEMO_MODEL_ID)
    # The demo model's tiny shapes are not exllamav2's: the reference backend serves it here.
    spec = NodeSpec("gpu-node", "club", None, [(demo, DEMO_MODEL_ID, True)], backend="transformers")
    cluster.enroll(spec)
    cluster.start_node(spec)
    cluster.approve("gpu-node")
    cluster.wait(lambda: cluster.model_phase("gpu-node", DEMO_MODEL_ID) == "ready", "the GPU node is ready")
    doc = cluster.node_doc("gpu-node")
    assert doc is not None
    print(
        "the node as the scheduler sees it:",
        {k: doc[k] for k in ("gpus", "memory_total_bytes", "memory_free_bytes")},
    )
    assert doc["gpus"].startswith(f"{len(found.gpus)}x NVIDIA")
    assert abs(doc["memory_total_bytes"] - found.free_bytes) < 1 << 30
    assert doc["memory_free_bytes"] < doc["memory_total_bytes"]  # the loaded demo model is accounted for
    r = chat(cluster.url, cluster.token, DEMO_MODEL_ID)
    assert r.status_code == 200, r.text


def test_an_exllamav2_node_serves_the_openai_client_with_batching(cluster: Cluster) -> None:
    from openai import OpenAI

    from tests.gpu.gpu_model import build_gpu_model, exllamav2_missing

    if (why := exllamav2_missing()) is not None:
        pytest.skip(f"exllamav2 cannot run: {why}")
    model = build_gpu_model(cluster.base / "models" / "llama-3.2-1b", "llama-3.2-1b")
    spec = NodeSpec("exl2-node", "club", None, [(model, "llama-1b", True)], backend="exllamav2")
    cluster.enroll(spec)
    cluster.start_node(spec)
    cluster.approve("exl2-node")
    cluster.wait(
        lambda: cluster.model_phase("exl2-node", "llama-1b") == "ready", "the exllamav2 node is ready", 300
    )
    doc = cluster.node_doc("exl2-node")
    assert doc is not None
    (status,) = [m for m in doc["models"] if m["id"] == "llama-1b"]
    print("the exllamav2 model as the scheduler sees it:", status)
    # Paged and batching with flash-attn; without it, one sequence at a time in one page.
    paged = status["page_tokens"] == 256
    assert status["max_sequences"] > 1 if paged else status["max_sequences"] == 1
    client = OpenAI(base_url=cluster.url + "/v1", api_key=cluster.token)

    def one(i: int) -> str:
        stream = client.chat.completions.create(
            model="llama-1b", messages=[{"role": "user", "content": f"hello {i}"}], max_tokens=40, stream=True,
            extra_body={"ignore_eos": True, "top_k": 40, "min_p": 0.05, "repetition_penalty": 1.1},
        )  # fmt: skip
        return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    with ThreadPoolExecutor(8) as pool:  # eight streams at once: the node batches them
        answers = list(pool.map(one, range(8)))
    assert all(answers), "every stream carried text"
