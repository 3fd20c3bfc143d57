"""A discrete-event simulation of a heterogeneous cluster serving one model, driven by the real placement.

Each node runs continuous batching the way exllamav2's dynamic generator does: at every iteration it admits
waiting jobs whose prompt plus max_new_tokens fit its free cache (and its batch), prefills them, and then
every running sequence gains one token. Iteration times come from `hardware.estimator` for the node's GPU:
prefill at `prefill_tokens_per_s`, a decode step at the batch's `decode_tokens_per_s`. Numbers are
estimates, so the simulator compares policies on the same footing rather than predicting exact latencies.

Policies:
- ``hearth``: the scheduler's own rule. Requests wait in one central queue; each is placed by the real
  `scheduler.placement.place` over a snapshot built from the simulated nodes (in-flight work, reserved
  cache, measured speed), and only when a node can start it now (cache admission). Late binding: a request
  goes to whichever node frees up first and suits it best. Placement is asked only when it has a choice:
  when two or more nodes can start the head (by its own cache, sequence, context and tier rules), over those
  nodes; with one, that is its only option; with none, its refusal (nothing is drawn from the random stream
  either way). ``shortcuts=False`` asks it at every chance over the whole cluster, for tests to compare.
- ``round-robin``: each arrival goes to the next node in turn, into that node's own FIFO queue.
- ``least-outstanding``: each arrival goes to the node with the fewest requests running or queued there.

Pure: no I/O, no clock; the caller passes the trace in.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
import statistics
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from hardware.catalog import GpuSpec
from hardware.estimator import (
    DEFAULT_RESERVE_BYTES,
    decode_tokens_per_s,
    kv_bytes_per_token,
    prefill_tokens_per_s,
    weight_bytes,
)
from hardware.model_spec import ModelSpec
from scheduler.placement import ClusterSnapshot, ModelState, NodeState, Placement, PlacementRequest, place

Policy = Literal["hearth", "round-robin", "least-outstanding"]
POLICIES: tuple[Policy, ...] = ("hearth", "round-robin", "least-outstanding")
MODEL_ID = "model"


@dataclass(frozen=True, slots=True)
class TraceRequest:
    arrival: float  # seconds from the start
    prompt_tokens: int
    output_tokens: int


def servable(request: TraceRequest, context: int) -> bool:
    """Whether the service would take the request at all: the scheduler refuses max_tokens that fill the
    context (scheduler.placement's context filter) and the node a prompt that leaves no room to answer.
    The rest are left out of a run (`hearth plan` counts them as dropped)."""
    return request.prompt_tokens + 1 < context and request.output_tokens < context


@dataclass(frozen=True, slots=True)
class NodeSpec:
    node_id: str
    gpu: GpuSpec
    tier: str = "club"
    max_sequences: int = 32


@dataclass(frozen=True, slots=True)
class Slo:
    """What counts as a good answer for goodput."""

    ttft_s: float = 2.0
    time_per_token_s: float = 0.1


@dataclass
class _Job:
    request: TraceRequest
    index: int
    reserved: int
    first_token: float | None = None
    done: float | None = None


@dataclass
class _Node:
    spec: NodeSpec
    prefill_tps: float
    cache_tokens: int
    decode: dict[int, float]  # batch size -> tokens per second, summed over the batch
    # Decoding jobs as a heap of (`clock` when the job writes its last token, index, job): a job's token
    # count is the iterations it has run, so nothing is counted per job per iteration.
    running: list[tuple[int, int, _Job]] = field(default_factory=list)
    max_sequences: int = 1
    admitted: list[_Job] = field(default_factory=list)  # placed, prefilled at the next iteration
    admitted_prompts: int = 0  # their prompt tokens
    prefilling: list[_Job] = field(default_factory=list)  # admitted when this iteration began: its prefill
    local: deque[_Job] = field(default_factory=deque)  # baselines: the node's own queue
    reserved: int = 0
    active: int = 0  # jobs running, prefilling or admitted
    clock: int = 0  # iterations finished
    busy_until: float | None = None
    # A run: `steps` decode iterations of `step_s` each from `run_start`, simulated as one event (nothing
    # changes on the node between them but the token counts); `version` tells a cut run's old event.
    run_start: float = 0.0
    step_s: float = 0.0
    steps: int = 1
    version: int = 0
    left: int = 0  # tokens its jobs have still to write, as of the last iteration's end
    state: NodeState | None = None  # placement's view of the node, kept while `state_key` holds
    state_key: tuple[int, int, int] = (-1, -1, -1)

    def fits(self, job: _Job) -> bool:
        return self.active < self.max_sequences and self.reserved + job.reserved <= self.cache_tokens

    def single_stream_tps(self) -> float:
        return self.decode[1]

    def steps_done(self, now: float) -> int:
        """Iterations of the current run finished by ``now``."""
        if self.busy_until is None or self.steps == 1:
            return 0
        return min(self.steps, int((now - self.run_start) / self.step_s + 1e-9))

    def admit(self, job: _Job) -> None:
        self.admitted.append(job)
        self.admitted_prompts += job.request.prompt_tokens
        self.reserved += job.reserved
        self.active += 1
        self.left += job.request.output_tokens

    def outstanding(self, now: float) -> int:
        """Tokens its jobs have still to write, as of ``now`` (within a run, its finished iterations)."""
        return self.left - len(self.running) * self.steps_done(now)


@dataclass(frozen=True, slots=True)
class Result:
    policy: str
    completed: int
    duration_s: float
    ttft_p50: float
    ttft_p99: float
    latency_p50: float
    latency_p99: float
    goodput_rps: float  # requests per second that met the SLO
    slo_attainment: float  # share of requests that met it
    # Time per output token after the first, (done - first token) / (tokens - 1), over the requests that
    # wrote more than one token (inf when none did).
    tpot_p50: float = math.inf
    tpot_p99: float = math.inf
    # Requests waiting to be placed (the central queue; for the baselines, the nodes' own queues):
    # time-weighted mean from the first arrival to the last event, and the most at once.
    queue_mean: float = 0.0
    queue_max: int = 0


def _node(spec: NodeSpec, model: ModelSpec, bits: float, context: int) -> _Node:
    cache_bytes = spec.gpu.vram_bytes - weight_bytes(model, bits) - DEFAULT_RESERVE_BYTES
    if cache_bytes <= 0:
        raise ValueError(f"{model.name} at {bits} bpw does not fit a {spec.gpu.name}")
    cache_tokens = cache_bytes // kv_bytes_per_token(model, 16)
    decode = {
        b: decode_tokens_per_s(model, bits, spec.gpu, batch=b, context=context)
        for b in range(1, spec.max_sequences + 1)
    }
    return _Node(
        spec,
        prefill_tokens_per_s(model, spec.gpu),
        int(cache_tokens),
        decode,
        max_sequences=spec.max_sequences,
    )


class Simulation:
    def __init__(
        self,
        nodes: Sequence[NodeSpec],
        model: ModelSpec,
        *,
        bits_per_weight: float = 4.0,
        context: int = 8192,
        slo: Slo | None = None,
        seed: int = 0,
        shortcuts: bool = True,
    ) -> None:
        self._specs = list(nodes)
        self._model = model
        self._bits = bits_per_weight
        self._context = context
        self._slo = slo or Slo()
        self._seed = seed
        self._shortcuts = shortcuts
        self._ended = 0  # sequences finished in the current run, on every node

    def run(self, trace: Sequence[TraceRequest], policy: Policy) -> Result:
        rng = random.Random(self._seed)
        self._ended = 0  # sequences finished so far, on every node
        nodes = [_node(s, self._model, self._bits, self._context) for s in self._specs]
        ctx = self._context
        jobs = [
            _Job(r, i, min(ctx, r.prompt_tokens + r.output_tokens))
            for i, r in enumerate(trace)
            if servable(r, ctx)
        ]
        # Arrivals in order, and a heap of (time, order, node, version): the end of a node's iteration or run.
        # At the same time an arrival comes first.
        arrivals = sorted(jobs, key=lambda j: j.request.arrival)
        events: list[tuple[float, int, int, int]] = []
        counter = itertools.count()
        central: deque[_Job] = deque()
        turn = itertools.count()
        now = 0.0

        def start(node_index: int) -> None:
            node = nodes[node_index]
            if node.busy_until is not None and node.admitted:
                cut(node_index)
            if node.busy_until is None and (node.running or node.admitted):
                # The iteration prefills what is admitted now; a job placed while it runs waits for the
                # next one (its prompt is not in this step's time).
                prompts = node.admitted_prompts
                node.prefilling, node.admitted, node.admitted_prompts = node.admitted, [], 0
                node.steps, node.step_s = 1, self._iteration(node, prompts)
                if not node.prefilling:
                    # Decode only: every iteration is the same until a sequence ends (or a job is placed
                    # here, which cuts the run at the iteration in progress), so they are one event.
                    node.steps = max(1, node.running[0][0] - node.clock)
                node.run_start = now
                node.busy_until = now + node.steps * node.step_s
                node.version += 1
                heapq.heappush(events, (node.busy_until, next(counter), node_index, node.version))

        def cut(node_index: int) -> None:
            """End the node's run with the iteration in progress: a job placed now joins the next one."""
            node = nodes[node_index]
            if node.steps == 1 or node.busy_until is None:
                return
            steps = max(1, min(node.steps, math.ceil((now - node.run_start) / node.step_s - 1e-9)))
            if steps < node.steps:
                node.steps = steps
                node.busy_until = node.run_start + steps * node.step_s
                node.version += 1
                heapq.heappush(events, (node.busy_until, next(counter), node_index, node.version))

        local_queued = 0  # the baselines: requests in the nodes' own queues

        def pull_local(node: _Node) -> None:
            nonlocal local_queued
            while node.local and node.fits(node.local[0]):
                node.admit(node.local.popleft())
                local_queued -= 1

        # The queue's head refused when the cluster had freed capacity this many times: placement's filters
        # (cache, sequences) only pass after a sequence ends, and a refusal draws nothing from `rng`, so
        # asking again before that would get the same answer.
        blocked: tuple[int, int] | None = None
        tiers = PlacementRequest(MODEL_ID, None).tiers
        allowed = [i for i, n in enumerate(nodes) if n.spec.tier in tiers]

        def dispatch_central() -> None:
            nonlocal blocked
            while central:
                head = central[0]
                if not self._shortcuts:
                    decision = place(self._request(head), self._snapshot(nodes, range(len(nodes)), now), rng)
                elif blocked == (head.index, self._ended):
                    return
                else:
                    # Placement's own filters, in numbers: only these nodes can start the head now.
                    can = (
                        []
                        if head.request.output_tokens >= ctx
                        else [
                            i
                            for i in allowed
                            if nodes[i].active < nodes[i].max_sequences
                            and nodes[i].reserved + head.reserved <= nodes[i].cache_tokens
                        ]
                    )
                    if len(can) == 1:
                        decision = Placement(str(can[0]), 0.0)  # placement's only option: no choice to make
                    elif can:
                        decision = place(self._request(head), self._snapshot(nodes, can, now), rng)
                    else:
                        decision = None
                if not isinstance(decision, Placement):
                    blocked = (head.index, self._ended)
                    return
                job = central.popleft()
                index = int(decision.node_id)
                nodes[index].admit(job)
                start(index)

        hearth = policy == "hearth"
        arrived = 0
        # The queue waiting to be placed: its length since `last` (as the previous event left it), its
        # integral over time from the first arrival, and its most.
        queue = queue_max = 0
        area = 0.0
        first = last = arrivals[0].request.arrival if arrivals else 0.0
        while arrived < len(arrivals) or events:
            if queue != len(central) + local_queued:
                area += queue * (now - last)
                last = now
                queue = len(central) + local_queued
                queue_max = max(queue_max, queue)
            if arrived < len(arrivals) and (not events or arrivals[arrived].request.arrival <= events[0][0]):
                job = arrivals[arrived]
                arrived += 1
                now = job.request.arrival
                if hearth:
                    central.append(job)
                    dispatch_central()
                    continue
                if policy == "round-robin":
                    target = next(turn) % len(nodes)
                else:
                    loads = [n.active + len(n.local) for n in nodes]
                    least = min(loads)
                    target = rng.choice([i for i, v in enumerate(loads) if v == least])
                nodes[target].local.append(job)
                local_queued += 1
                pull_local(nodes[target])
                start(target)
                continue
            now, _, index, version = heapq.heappop(events)
            node = nodes[index]
            if version != node.version:
                continue  # a run cut short: its new end is another event
            node.busy_until = None
            self._advance(node, now)
            if hearth:
                dispatch_central()
            else:
                pull_local(node)
            start(index)
        area += queue * (now - last)
        queue_max = max(queue_max, len(central) + local_queued)
        return self._result(policy, jobs, area / (now - first) if now > first else 0.0, queue_max)

    def _iteration(self, node: _Node, prompts: int) -> float:
        """Prefill what was admitted when the iteration began (``prompts`` tokens), then one decode step for
        the whole batch."""
        prefill = prompts / node.prefill_tps
        batch = min(len(node.running) + len(node.prefilling), node.spec.max_sequences)
        return prefill + batch / node.decode[max(1, batch)]

    def _advance(self, node: _Node, now: float) -> None:
        """An iteration or run ends: each running job gained `steps` tokens, a prefilled one its first."""
        node.left -= len(node.running) * node.steps + len(node.prefilling)
        node.clock += node.steps
        for job in node.prefilling:
            job.first_token = now
            heapq.heappush(node.running, (node.clock + job.request.output_tokens - 1, job.index, job))
        node.prefilling = []
        while node.running and node.running[0][0] <= node.clock:
            last, _, job = heapq.heappop(node.running)
            node.left -= last - node.clock  # tokens written past the request's (none: a run stops there)
            job.done = now
            node.reserved -= job.reserved
            node.active -= 1
            self._ended += 1

    def _request(self, job: _Job) -> PlacementRequest:
        return PlacementRequest(MODEL_ID, job.request.output_tokens, prompt_tokens=job.request.prompt_tokens)

    def _snapshot(self, nodes: Sequence[_Node], which: Iterable[int], now: float) -> ClusterSnapshot:
        """Placement's view of the nodes ``which``; a node's state is rebuilt only when its figures change."""
        states = []
        for i in which:
            n = nodes[i]
            key = (n.active, n.reserved, n.outstanding(now))
            if n.state is None or key != n.state_key or not self._shortcuts:
                n.state_key = key
                n.state = NodeState(
                    node_id=str(i),
                    tier=n.spec.tier,
                    healthy=True,
                    memory_total_bytes=n.spec.gpu.vram_bytes,
                    models=(
                        ModelState(
                            id=MODEL_ID,
                            phase="ready",
                            context_length=self._context,
                            footprint_bytes=0,
                            cache_tokens=n.cache_tokens,
                            max_sequences=n.spec.max_sequences,
                            active=key[0],
                            reserved_tokens=key[1],
                            outstanding_tokens=key[2],
                            tokens_per_s=n.single_stream_tps(),
                        ),
                    ),
                )
            states.append(n.state)
        return ClusterSnapshot(tuple(states))

    def _result(self, policy: str, jobs: Sequence[_Job], queue_mean: float, queue_max: int) -> Result:
        done = [j for j in jobs if j.done is not None and j.first_token is not None]
        if not done:
            inf = math.inf
            return Result(policy, 0, 0.0, inf, inf, inf, inf, 0.0, 0.0, inf, inf, queue_mean, queue_max)
        ttft = sorted(j.first_token - j.request.arrival for j in done)  # type: ignore[operator]
        latency = sorted(j.done - j.request.arrival for j in done)  # type: ignore[operator]
        tpot = sorted(
            (j.done - j.first_token) / (j.request.output_tokens - 1)  # type: ignore[operator]
            for j in done
            if j.request.output_tokens > 1
        )
        good = 0
        for j in done:
            assert j.first_token is not None and j.done is not None
            first = j.first_token - j.request.arrival
            per_token = (j.done - j.first_token) / max(1, j.request.output_tokens - 1)
            if first <= self._slo.ttft_s and per_token <= self._slo.time_per_token_s:
                good += 1
        start = min(j.request.arrival for j in jobs)
        end = max(j.done or 0.0 for j in done)
        duration = max(1e-9, end - start)
        return Result(
            policy=policy,
            completed=len(done),
            duration_s=duration,
            ttft_p50=statistics.median(ttft),
            ttft_p99=_p99(ttft),
            latency_p50=statistics.median(latency),
            latency_p99=_p99(latency),
            goodput_rps=good / duration,
            slo_attainment=good / len(jobs),
            tpot_p50=statistics.median(tpot) if tpot else math.inf,
            tpot_p99=_p99(tpot) if tpot else math.inf,
            queue_mean=queue_mean,
            queue_max=queue_max,
        )


def _p99(sorted_values: Sequence[float]) -> float:
    return sorted_values[max(0, math.ceil(0.99 * len(sorted_values)) - 1)]


def scale(trace: Sequence[TraceRequest], rate_per_s: float) -> list[TraceRequest]:
    """The same requests, with arrival times stretched or squeezed to an average of ``rate_per_s``."""
    if not trace:
        return []
    first = trace[0].arrival
    span = trace[-1].arrival - first
    factor = (len(trace) - 1) / (rate_per_s * span) if span > 0 else 0.0
    return [TraceRequest((r.arrival - first) * factor, r.prompt_tokens, r.output_tokens) for r in trace]
