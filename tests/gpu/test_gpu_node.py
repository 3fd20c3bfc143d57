"""On a GPU machine: a node's memory pool is its GPUs' free VRAM read through NVML, and a real scheduler
and node process (no memory budget declared) report and use it. Run with `bash tests/gpu/run.sh`."""

from __future__ import annotations

from collections.abc import Iterator

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
    spec = NodeSpec("gpu-node", "club", None, [(demo, DEMO_MODEL_ID, True)])  # no budget: NVML decides
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
