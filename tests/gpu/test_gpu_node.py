"""On a GPU machine: a node's memory pool is its GPUs' free VRAM read through NVML, and a real scheduler
and node process (no memory budget declared) report and use it. Run with `bash tests/gpu/run.sh`."""

from __future__ import annotations

import json
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


@pytest.fixture(scope="module")
def exl2_node(cluster: Cluster) -> str:
    """An exllamav2 node serving a random llama-3.2-1b as "llama-1b"; its id."""
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
    return "exl2-node"


def test_an_exllamav2_node_serves_the_openai_client_with_batching(cluster: Cluster, exl2_node: str) -> None:
    from openai import OpenAI

    doc = cluster.node_doc(exl2_node)
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


BOUNDED = {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}, "days": {"type": "integer",
           "minimum": 1, "maximum": 9}}, "required": ["city", "days"], "additionalProperties": False}  # fmt: skip


def test_structured_output_tools_and_logprobs_on_an_exllamav2_node(cluster: Cluster, exl2_node: str) -> None:
    """Issue 16's features through exllamav2 on a GPU: the grammar through its filter interface (batched,
    streamed and whole), chat logprobs, and completions' echo scoring (a forward pass without the cache)."""
    import jsonschema
    from openai import OpenAI

    client = OpenAI(base_url=cluster.url + "/v1", api_key=cluster.token, max_retries=0)
    ask = [{"role": "user", "content": "Weather?"}]
    fmt = {"type": "json_schema", "json_schema": {"name": "w", "schema": BOUNDED, "strict": True}}

    def structured(seed: int) -> str:
        r = client.chat.completions.create(
            model="llama-1b",
            messages=ask,
            max_tokens=200,
            seed=seed,
            response_format=fmt,  # type: ignore[arg-type]
        )
        assert r.choices[0].finish_reason == "stop"
        return r.choices[0].message.content or ""

    with ThreadPoolExecutor(8) as pool:  # batched: each sequence under its own matcher
        for text in pool.map(structured, range(8)):
            jsonschema.validate(json.loads(text), BOUNDED)
    tool = {"type": "function", "function": {"name": "weather", "parameters": BOUNDED}}
    r = client.chat.completions.create(
        model="llama-1b", messages=ask, max_tokens=200, tools=[tool], tool_choice="required",  # type: ignore[arg-type]
        parallel_tool_calls=False,
    )  # fmt: skip
    (call,) = r.choices[0].message.tool_calls or []
    assert r.choices[0].finish_reason == "tool_calls"
    jsonschema.validate(json.loads(call.function.arguments), BOUNDED)
    r = client.chat.completions.create(
        model="llama-1b", messages=ask, max_tokens=5, logprobs=True, top_logprobs=3,  # type: ignore[arg-type]
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    content = r.choices[0].logprobs.content if r.choices[0].logprobs else None
    assert content and len(content) == 5 and all(len(e.top_logprobs) == 3 for e in content)
    assert all(e.logprob <= 0 for e in content)
    scored = client.completions.create(
        model="llama-1b", prompt="The capital of France is Paris", max_tokens=0, echo=True, logprobs=1
    )
    lp = scored.choices[0].logprobs
    assert lp is not None and lp.token_logprobs and lp.token_logprobs[0] is None
    assert all(v is not None and v <= 0 for v in lp.token_logprobs[1:])
    print("exllamav2 echo scoring, summed:", sum(v for v in lp.token_logprobs[1:] if v is not None))
