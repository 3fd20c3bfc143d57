"""Placement: pure functions over a frozen snapshot of the cluster.

    snapshot.py   what placement decides over (ClusterSnapshot, NodeState, ModelState) and decides
                  (Placement, Refusal)
    filters/      one rule per module: may this node take this request? (a structured Refusal if not)
    scorers/      one preference per module, 0..100, combined by weight
    pipeline.py   place(): filter, score, choose; cluster-wide rules (cold loads, ties, the refusal)

No I/O happens here: the registry builds the snapshot before, admission applies the decision after.
"""

from __future__ import annotations

from scheduler.placement.filters import FILTERS
from scheduler.placement.pipeline import evictions, place
from scheduler.placement.scorers import SCORERS, score
from scheduler.placement.snapshot import (
    ClusterSnapshot,
    ModelState,
    NodeState,
    Placement,
    PlacementRequest,
    Refusal,
)

__all__ = [
    "FILTERS",
    "SCORERS",
    "ClusterSnapshot",
    "ModelState",
    "NodeState",
    "Placement",
    "PlacementRequest",
    "Refusal",
    "evictions",
    "place",
    "score",
]
