"""Overview: the cluster in one strip (nodes by state, VRAM, queue, tokens/s) and sparklines of the last
minutes (queue depth, finished tokens per second, from the event stream)."""

from __future__ import annotations

from collections import deque

from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import Label, Sparkline, Static

from protocol.admin import NodeList
from tui.format import gib
from tui.screens.nodes import node_state

HISTORY = 150  # samples kept: five minutes at the default refresh of 2 s


def summary(nodes: NodeList, tokens_per_s: float) -> str:
    counts = {"serving": 0, "yielding": 0, "draining": 0, "offline": 0}
    for node in nodes.nodes:
        state = node_state(node).split(":")[0]
        if state in counts:
            counts[state] += 1
    total = sum(n.memory_total_bytes or 0 for n in nodes.nodes if n.healthy)
    free = sum(n.memory_free_bytes or 0 for n in nodes.nodes if n.healthy)
    jobs = sum(m.active for n in nodes.nodes for m in n.models)
    return (
        "  ".join(f"{state} {count}" for state, count in counts.items())
        + f"   VRAM {gib(total - free)} of {gib(total)} GiB   running {jobs}   queued {nodes.queued}"
        + f"   {tokens_per_s:.1f} tokens/s"
    )


class OverviewView(Vertical):
    def __init__(self) -> None:
        super().__init__(id="overview-view")
        self.queue: deque[float] = deque([0.0], maxlen=HISTORY)
        self.rate: deque[float] = deque([0.0], maxlen=HISTORY)

    def compose(self) -> ComposeResult:
        yield Static("waiting for the scheduler…", id="summary")
        yield Label("Queue depth")
        yield Sparkline(list(self.queue), id="queue-spark")
        yield Label("Finished tokens per second")
        yield Sparkline(list(self.rate), id="rate-spark")

    def update_nodes(self, nodes: NodeList, *, tokens_per_s: float) -> None:
        self.queue.append(float(nodes.queued))
        self.rate.append(tokens_per_s)
        self.query_one("#summary", Static).update(summary(nodes, tokens_per_s))
        self.query_one("#queue-spark", Sparkline).data = list(self.queue)
        self.query_one("#rate-spark", Sparkline).data = list(self.rate)
