"""The simulator against the estimator it is built on and against queueing theory where theory applies."""

from __future__ import annotations

import math
import random

import pytest

from hardware.catalog import gpu, model
from hardware.estimator import decode_tokens_per_s, prefill_tokens_per_s
from hardware.simulator import NodeSpec, Simulation, TraceRequest

LLAMA = model("Llama-3.1-8B")
CARD = gpu("H100 SXM")


def test_one_saturated_card_runs_at_the_estimators_batch_throughput() -> None:
    # 64 requests at t=0, one prompt token, 400 output tokens each, on a card that batches 16. The first
    # iteration starts when the first arrival is placed (alone; the other 15 join at the next one), so jobs
    # finish staggered by a step and the batch stays full from then on: tokens come at
    # decode_tokens_per_s(batch=16) with the same context, apart from edge effects (one batch-1 step at the
    # start, a thinning batch at the end, 64 one-token prefills) of a few steps in ~1,600, i.e. < 0.3%.
    # A 1% tolerance covers them and still catches any change to how steps are timed.
    batch, waves, output, context = 16, 4, 400, 8192
    trace = [TraceRequest(0.0, 1, output) for _ in range(batch * waves)]
    sim = Simulation([NodeSpec("one", CARD, max_sequences=batch)], LLAMA, context=context)
    result = sim.run(trace, "hearth")
    assert result.completed == batch * waves
    simulated = batch * waves * output / result.duration_s
    expected = decode_tokens_per_s(LLAMA, 4.0, CARD, batch=batch, context=context)
    assert simulated == pytest.approx(expected, rel=0.01)


def test_one_card_one_sequence_at_a_time_is_an_m_m_1_queue() -> None:
    # With max_sequences=1 a node serves one request at a time from the central FIFO queue: a single
    # server. Poisson arrivals (exponential gaps); one output token, so a request's service is its prefill
    # plus one decode step, S = prompt / prefill rate + 1 / decode rate. Prompts drawn exponentially with a
    # mean of 3,000 tokens make S exponential up to rounding to whole tokens and a constant 1.2% shift (the
    # decode step), so the queue is M/M/1 to within about 1%. Its time in system is then exponential with
    # rate mu - lambda: median ln 2 / (mu - lambda), 99th percentile ln 100 / (mu - lambda).
    # Sample size: 20,000 requests at rho = 0.6; the queue forgets its state in ~1/(1-sqrt(rho))^2 ≈ 20
    # services, so ~1,000 effectively independent stretches: the median's relative standard error is a few
    # percent, the 99th percentile's larger. Bounds of 8% and 15% hold for the fixed seed with margin and
    # would fail on a wrong discipline (a processor-sharing or LIFO queue has a different median).
    rng = random.Random(20260515)
    prefill, step = (
        prefill_tokens_per_s(LLAMA, CARD),
        1 / decode_tokens_per_s(LLAMA, 4.0, CARD, context=65536),
    )
    mean_prompt = 3000
    mean_service = mean_prompt / prefill + step
    rho, n = 0.6, 20_000
    rate = rho / mean_service
    now, trace = 0.0, []
    for _ in range(n):
        now += rng.expovariate(rate)
        trace.append(TraceRequest(now, max(1, round(rng.expovariate(1 / mean_prompt))), 1))
    sim = Simulation([NodeSpec("one", CARD, max_sequences=1)], LLAMA, context=65536)
    result = sim.run(trace, "hearth")
    assert result.completed == n
    drain = 1 / mean_service - rate  # mu - lambda
    assert result.latency_p50 == pytest.approx(math.log(2) / drain, rel=0.08)
    assert result.latency_p99 == pytest.approx(math.log(100) / drain, rel=0.15)


def test_a_request_placed_during_an_iteration_waits_for_its_own_prefill() -> None:
    # Two 4,000-token prompts, the second arriving while the first one's prefill runs: it joins the next
    # iteration, whose time includes its own prefill, so its first token comes at least two prefills after
    # the start. (The simulator once counted a request placed mid-iteration as prefilled when that iteration
    # ended, so time to first token fell as the load rose.)
    prefill = prefill_tokens_per_s(LLAMA, CARD)
    first_prefill = 4000 / prefill
    trace = [TraceRequest(0.0, 4000, 1), TraceRequest(first_prefill / 2, 4000, 1)]
    sim = Simulation([NodeSpec("one", CARD, max_sequences=8)], LLAMA, context=8192)
    result = sim.run(trace, "hearth")
    assert result.completed == 2
    # The second request's time to first token: the rest of the first iteration, then its own prefill.
    assert result.ttft_p99 >= first_prefill / 2 + 4000 / prefill


def test_a_request_placed_during_a_decode_run_joins_at_the_next_iteration() -> None:
    # A long answer decodes alone; the simulator runs its identical iterations as one event. A request
    # placed in the middle of that run must join at the end of the iteration in progress, as it would if
    # every iteration were its own event: its first token comes after at most one batch-1 step of waiting,
    # then its own prefill and a batch-2 step.
    prefill = prefill_tokens_per_s(LLAMA, CARD)
    step1 = 1 / decode_tokens_per_s(LLAMA, 4.0, CARD, batch=1, context=8192)
    step2 = 2 / decode_tokens_per_s(LLAMA, 4.0, CARD, batch=2, context=8192)
    arrival = 200.37 * step1  # well inside the run, between two iteration boundaries
    trace = [TraceRequest(0.0, 1, 2000), TraceRequest(arrival, 500, 2)]
    sim = Simulation([NodeSpec("one", CARD, max_sequences=8)], LLAMA, context=8192)
    result = sim.run(trace, "hearth")
    assert result.completed == 2
    own = 500 / prefill + step2
    assert own <= result.ttft_p99 <= own + step1 * 1.001
