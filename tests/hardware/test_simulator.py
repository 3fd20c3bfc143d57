"""The cluster simulator: deterministic, conserves requests, and ranks hardware and policies sensibly."""

from __future__ import annotations

import math

import pytest

from hardware.catalog import gpu, model
from hardware.estimator import decode_tokens_per_s
from hardware.simulator import POLICIES, NodeSpec, Simulation, TraceRequest, scale

LLAMA = model("Llama-3.1-8B")


def trace(n: int = 200, every: float = 0.05, prompt: int = 500, output: int = 100) -> list[TraceRequest]:
    return [TraceRequest(i * every, prompt + (i * 37) % 400, output + (i * 13) % 150) for i in range(n)]


@pytest.mark.parametrize("policy", POLICIES)
def test_every_request_completes_and_runs_repeat_exactly(policy: str) -> None:
    sim = Simulation([NodeSpec("a", gpu("RTX 4090")), NodeSpec("b", gpu("RTX 3090"))], LLAMA, seed=3)
    first = sim.run(trace(), policy)  # type: ignore[arg-type]
    assert first.completed == 200
    assert first == sim.run(trace(), policy)  # type: ignore[arg-type]
    assert 0 <= first.ttft_p50 <= first.ttft_p99 <= first.latency_p99


def test_a_faster_card_answers_sooner() -> None:
    work = trace(n=100, every=0.02)
    fast = Simulation([NodeSpec("h100", gpu("H100 SXM"))], LLAMA).run(work, "hearth")
    slow = Simulation([NodeSpec("3090", gpu("RTX 3090"))], LLAMA).run(work, "hearth")
    assert fast.latency_p50 < slow.latency_p50


def test_late_binding_beats_round_robin_on_a_mixed_cluster_under_load() -> None:
    nodes = [NodeSpec("h100", gpu("H100 SXM")), NodeSpec("3060", gpu("RTX 3060 12GB"), max_sequences=8)]
    work = scale(trace(n=400), 12.0)
    ours = Simulation(nodes, LLAMA).run(work, "hearth")
    rr = Simulation(nodes, LLAMA).run(work, "round-robin")
    assert ours.ttft_p99 < rr.ttft_p99 / 2


def test_scaling_a_trace_keeps_its_requests_and_sets_the_rate() -> None:
    scaled = scale(trace(n=101, every=0.5), 10.0)
    assert [r.output_tokens for r in scaled] == [r.output_tokens for r in trace(n=101, every=0.5)]
    assert scaled[0].arrival == 0.0 and scaled[-1].arrival == pytest.approx(10.0)


def test_a_model_that_fits_no_card_is_refused() -> None:
    with pytest.raises(ValueError, match="does not fit"):
        Simulation([NodeSpec("small", gpu("RTX 3060 12GB"))], model("Llama-3.1-70B")).run(
            trace(n=1), "hearth"
        )


@pytest.mark.parametrize("rate", [2.0, 12.0, 40.0])
def test_the_shortcuts_to_placement_give_the_same_run_as_asking_it_every_time(rate: float) -> None:
    # The simulator skips placement when fewer than two nodes can start the queue's head, shows it only
    # those nodes, keeps their states while unchanged, and does not ask again for a head refused until a
    # sequence ends. None of that may change a run: compared with asking placement, over the whole
    # cluster, at every chance. Two equal cards (ties, settled by the random stream), a small one with few
    # sequences, a node of a tier no request may reach, and a last request whose answer is longer than
    # the context (the service would refuse it: left out of both runs).
    nodes = [
        NodeSpec("a", gpu("RTX 4090")),
        NodeSpec("b", gpu("RTX 4090")),
        NodeSpec("c", gpu("RTX 3060 12GB"), max_sequences=4),
        NodeSpec("d", gpu("H100 SXM"), tier="lab"),
    ]
    work = [*scale(trace(n=300), rate), TraceRequest(1e6, 100, 9000)]
    fast = Simulation(nodes, LLAMA, seed=7).run(work, "hearth")
    straight = Simulation(nodes, LLAMA, seed=7, shortcuts=False).run(work, "hearth")
    assert fast == straight
    assert fast.completed == 300


def test_one_request_alone_writes_each_token_in_a_batch_1_decode_step() -> None:
    card = gpu("RTX 4090")
    result = Simulation([NodeSpec("a", card)], LLAMA).run([TraceRequest(0.0, 500, 101)], "hearth")
    step = 1 / decode_tokens_per_s(LLAMA, 4.0, card, batch=1, context=8192)
    assert result.tpot_p50 == pytest.approx(step, rel=1e-9)
    assert result.tpot_p99 == pytest.approx(step, rel=1e-9)
    assert result.queue_mean == 0.0 and result.queue_max == 0


def test_requests_of_one_token_have_no_time_per_token() -> None:
    work = [TraceRequest(i * 0.1, 300, 1) for i in range(5)]
    result = Simulation([NodeSpec("a", gpu("RTX 4090"))], LLAMA).run(work, "hearth")
    assert result.completed == 5 and result.tpot_p50 == result.tpot_p99 == math.inf


@pytest.mark.parametrize("policy", POLICIES)
def test_the_queue_is_empty_at_light_load_and_grows_under_overload(policy: str) -> None:
    nodes = [NodeSpec("a", gpu("RTX 4090")), NodeSpec("b", gpu("RTX 3090"))]
    light = Simulation(nodes, LLAMA).run(trace(n=20, every=5.0), policy)  # type: ignore[arg-type]
    assert light.queue_mean == 0.0 and light.queue_max == 0
    calm = Simulation(nodes, LLAMA).run(scale(trace(n=300), 20.0), policy)  # type: ignore[arg-type]
    flood = Simulation(nodes, LLAMA).run(scale(trace(n=300), 200.0), policy)  # type: ignore[arg-type]
    assert flood.queue_max > calm.queue_max and flood.queue_mean > calm.queue_mean > 0


def test_the_queue_of_a_burst_on_a_one_sequence_card_averages_half_the_burst() -> None:
    # Ten equal requests at once on a card that runs one at a time: the queue holds 9, then 8, ... 0,
    # each for one request's service time, so its mean over the run is 4.5 and its most 9.
    nodes = [NodeSpec("a", gpu("RTX 4090"), max_sequences=1)]
    result = Simulation(nodes, LLAMA).run([TraceRequest(0.0, 400, 50)] * 10, "hearth")
    assert result.completed == 10
    assert result.queue_max == 9
    assert result.queue_mean == pytest.approx(4.5, rel=1e-9)
