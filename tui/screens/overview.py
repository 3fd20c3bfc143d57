"""Overview: the cluster in one strip (nodes by state, GPUs, VRAM, requests running and queued, tokens per
second, time to first token, refusals per minute by kind) and sparklines of the last minutes."""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Label, Sparkline, Static

from protocol.admin import NodeList
from tui.format import gib
from tui.screens.nodes import node_state

HISTORY = 150  # samples kept: five minutes at the default refresh of 2 s


@dataclass(frozen=True)
class Figures:
    """What the console measured (tui.rates) beside what the scheduler's documents say."""

    tokens_per_s: float = 0.0
    ttft_ms: float | None = None
    refusals: Mapping[str, int] | None = None  # kind → refusals in the last minute
    running: int | None = None  # from the queue; None: the node list's count


def gpu_count(nodes: NodeList) -> int:
    """GPUs of healthy nodes, from their summaries ("2x NVIDIA RTX 3090, 1x NVIDIA A4000"; "cpu" is none)."""
    count = 0
    for node in nodes.nodes:
        if not node.healthy or not node.gpus or node.gpus == "cpu":
            continue
        for part in node.gpus.split(","):
            head = part.strip().split("x ", 1)[0]
            count += int(head) if head.isdigit() else 1
    return count


def summary(nodes: NodeList, figures: Figures) -> str:
    counts = {"serving": 0, "yielding": 0, "draining": 0, "offline": 0}
    for node in nodes.nodes:
        state = node_state(node).split(":")[0]
        if state in counts:
            counts[state] += 1
    total = sum(n.memory_total_bytes or 0 for n in nodes.nodes if n.healthy)
    free = sum(n.memory_free_bytes or 0 for n in nodes.nodes if n.healthy)
    running = figures.running
    if running is None:
        running = sum(m.active for n in nodes.nodes for m in n.models)
    refusals = figures.refusals or {}
    refused = ", ".join(f"{kind} {n}" for kind, n in refusals.items()) or "none"
    ttft = "-" if figures.ttft_ms is None else f"{figures.ttft_ms:,.0f} ms"
    return (
        "Nodes  " + "  ".join(f"{state} {count}" for state, count in counts.items())
        + f"\nGPUs {gpu_count(nodes)}   VRAM used {gib(total - free)} of {gib(total)} GiB"
        + f"\nRequests  running {running}  queued {nodes.queued}   {figures.tokens_per_s:,.1f} tokens/s"
        + f"   first token {ttft}"
        + f"\nRefused in the last minute: {refused}"
    )  # fmt: skip


class OverviewView(Vertical):
    def __init__(self) -> None:
        super().__init__(id="overview-view")
        self.queue: deque[float] = deque([0.0], maxlen=HISTORY)
        self.rate: deque[float] = deque([0.0], maxlen=HISTORY)
        self.ttft: deque[float] = deque([0.0], maxlen=HISTORY)
        self._latest: tuple[NodeList, Figures] | None = None

    def compose(self) -> ComposeResult:
        yield Static("waiting for the scheduler…", id="summary", markup=False)
        yield Label("Tokens per second")
        yield Sparkline(list(self.rate), id="rate-spark")
        yield Label("Queue depth")
        yield Sparkline(list(self.queue), id="queue-spark")
        yield Label("Time to first token (median of the last minute, ms)")
        yield Sparkline(list(self.ttft), id="ttft-spark")

    def sample(self, nodes: NodeList, figures: Figures) -> None:
        """One poll's figures into the history (every poll, shown or not)."""
        self.queue.append(float(nodes.queued))
        self.rate.append(figures.tokens_per_s)
        self.ttft.append(figures.ttft_ms or 0.0)
        self._latest = (nodes, figures)

    def draw(self) -> None:
        if self._latest is None:
            return
        self.query_one("#summary", Static).update(summary(*self._latest))
        self.query_one("#queue-spark", Sparkline).data = list(self.queue)
        self.query_one("#rate-spark", Sparkline).data = list(self.rate)
        self.query_one("#ttft-spark", Sparkline).data = list(self.ttft)
