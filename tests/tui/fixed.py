"""A console client with fixed data, for what a live cluster cannot give reproducibly: the SVG snapshots
(every screen, the same pixels every run) and the console benchmark (100 nodes, 1,000 tokens, events at
50 per second). Everything the console does with a real scheduler is tested against one (test_console*.py).

The documents are the protocol's own models, built as a scheduler would send them; times are relative to
``now`` so ages and expiries print the same on every run.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from protocol.accounts import Token, TokenList, UsageReport, UsageRow
from protocol.admin import (
    Enrollment,
    EnrollmentList,
    EnrollmentState,
    ModelHost,
    ModelPlacement,
    ModelPlacements,
    Node,
    NodeList,
    NodeModel,
    QueueJob,
    QueueState,
    QueueUser,
)
from protocol.policy import AdminEvent, GroupView, Limits, PolicyState
from protocol.terms import TermsStatus, TermsStatusList
from tui.client import ConsoleClient

GIB = 1 << 30
AT = 1_780_000_000.0  # a fixed Unix time for events and the policy's reload (the tests print them in UTC)
MODELS = ("llama-3.1-8b-instruct", "qwen2.5-14b-instruct", "mistral-7b-instruct")
GPUS = ("1x NVIDIA GeForce RTX 3090", "2x NVIDIA RTX A6000", "1x NVIDIA GeForce RTX 4090", "cpu")
POLICY_TEXT = """\
[terms]
file = "terms.md"
version = "2026-09"

[groups.default]
models = ["*"]
tiers = ["club", "community"]
each = { tokens_per_day = 200000, tokens_per_month = 2000000 }

[groups."6.s898"]
inherit = "default"
weight = 2
require_e2e = true
system_prompt = "You are a teaching assistant for 6.S898."
each = { tokens_per_day = 50000 }
"""


def _node(i: int, now: float) -> Node:
    gpus = GPUS[i % len(GPUS)]
    total = (24 if "3090" in gpus or "4090" in gpus else 96 if "A6000" in gpus else 16) * GIB
    busy = i % 5
    models = [
        NodeModel(
            id=MODELS[(i + k) % len(MODELS)],
            phase="ready" if k == 0 else "loading" if i % 7 == 3 else "available",
            active=busy if k == 0 else 0,
            context_length=8192,
            cache_tokens=32768 if k == 0 else 0,
            page_tokens=256,
            max_sequences=8,
        )
        for k in range(2)
    ]
    offline = i % 11 == 10
    return Node(
        node_id=f"node-{i:03d}",
        state="approved",
        source="code" if i % 3 else "discovered",
        tier="club" if i % 2 == 0 else "community",
        fingerprint=f"{i:04x}9c1e5a7b3d2f10",
        identity_key="k" * 43,
        encryption_key="e" * 43,
        url=f"http://10.0.{i // 250}.{i % 250 + 1}:8300",
        drain=i % 13 == 4,
        created=now - 86400 * 30,
        updated=now - 3600,
        gpus=gpus,
        memory_total_bytes=total,
        memory_free_bytes=total - (busy + 2) * total // 9,
        healthy=not offline,
        draining=i % 13 == 4,
        yielding=i % 9 == 5,
        yield_reason="its owner is using the GPU" if i % 9 == 5 else None,
        last_heartbeat_seconds=95.0 if offline else 8.0 if i % 6 == 1 else 1.0,
        alarm=None,
        key_id=f"key-{i}",
        models=models,
    )


def _enrollment(i: int, now: float, state: EnrollmentState = "pending") -> Enrollment:
    return Enrollment(
        node_id=f"volunteer-{i}",
        state=state,
        source="code",
        tier="community",
        fingerprint=f"a1b2c3d4e5f6a7b8c9{i:02d}",
        identity_key="i" * 43,
        encryption_key="x" * 43,
        url=f"http://192.168.1.{20 + i}:8300",
        drain=False,
        created=now - 600 * (i + 1),
        updated=now - 60,
        gpus="1x NVIDIA GeForce RTX 4070",
        memory_total_bytes=12 * GIB,
        memory_free_bytes=11 * GIB,
        models=[MODELS[0]],
    )


def _token(i: int, now: float) -> Token:
    group = "6.s898" if i % 4 == 1 else "default"
    return Token(
        id=f"tok{i:05d}",
        name=f"user{i}@club.example",
        scope="admin" if i == 0 else "user",
        group=group,
        tiers=None,
        state="revoked" if i % 17 == 16 else "active",
        created=now - 86400 * 60,
        expires=None if i % 3 else now + 86400 * 30,
        revoked=now - 7200 if i % 17 == 16 else None,
        last_used=now - 3600 * (i % 5) - 300 if i % 6 else None,
        tokens_this_month=(i * 7919) % 2_100_000,
    )


class FixedClient(ConsoleClient):
    """A scheduler's documents, the same on every call (``queued`` steps so the sparklines move)."""

    def __init__(
        self,
        *,
        nodes: int = 6,
        tokens: int = 12,
        pending: int = 2,
        events: list[AdminEvent] | None = None,
        event_rate: float = 0.0,
        hold_first_read: bool = False,
        churn: bool = False,
    ) -> None:
        super().__init__("http://scheduler.club.example:8000", "fixed")
        now = time.time()
        self._nodes = [_node(i, now) for i in range(nodes)]
        self._tokens = TokenList(tokens=[_token(i, now) for i in range(tokens)])
        self._pending = EnrollmentList(enrollments=[_enrollment(i, now) for i in range(pending)])
        self._events = events if events is not None else sample_events()
        self._event_rate = event_rate
        self.reads = 0
        self.churn = churn  # documents that change from read to read (the benchmark), or not (snapshots)
        # Set by the caller to let the first read through: the snapshots draw the node list only after the
        # console has the events, so the first samples of the sparklines are the same on every run.
        self.answer = asyncio.Event()
        if not hold_first_read:
            self.answer.set()

    async def nodes(self) -> NodeList:
        await self.answer.wait()
        self.reads += 1
        nodes = self._nodes
        if self.churn:  # a live cluster: heartbeats age and come in, jobs start and end
            nodes = [self._churned(n, i) for i, n in enumerate(nodes)]
        return NodeList(nodes=nodes, queued=(3, 5, 8, 6, 4, 2, 1, 0, 2, 3)[self.reads % 10])

    def _churned(self, node: Node, i: int) -> Node:
        step = self.reads + i
        models = [node.models[0].model_copy(update={"active": step % 5}), *node.models[1:]]
        return node.model_copy(update={"last_heartbeat_seconds": float(step % 3), "models": models})

    async def enrollments(self, state: EnrollmentState | None = None) -> EnrollmentList:
        return self._pending

    async def models(self) -> ModelPlacements:
        where: dict[str, list[ModelHost]] = {}
        for n in self._nodes:
            for m in n.models:
                if m.phase != "available":
                    where.setdefault(m.id, []).append(
                        ModelHost(node_id=n.node_id, phase=m.phase, active=m.active, healthy=n.healthy)
                    )
        return ModelPlacements(models=[ModelPlacement(id=k, nodes=where[k]) for k in sorted(where)])

    async def tokens(self) -> TokenList:
        if not self.churn:
            return self._tokens
        return TokenList(
            tokens=[
                t.model_copy(update={"tokens_this_month": t.tokens_this_month + self.reads * 100})
                if i % 10 == self.reads % 10
                else t
                for i, t in enumerate(self._tokens.tokens)
            ]
        )

    async def policy(self) -> PolicyState:
        default = GroupView(
            name="default",
            models=None,
            max_tokens=4096,
            max_prompt_tokens=None,
            tiers=["club", "community"],
            require_e2e=False,
            weight=1.0,
            system_prompt=None,
            each=Limits(tokens_per_day=200_000, tokens_per_month=2_000_000),
            total=Limits(),
        )
        course = default.model_copy(
            update={
                "name": "6.s898",
                "weight": 2.0,
                "require_e2e": True,
                "system_prompt": "(course prompt)",
                "each": Limits(tokens_per_day=50_000, tokens_per_month=2_000_000),
            }
        )
        return PolicyState(
            source="/etc/hearth/policies.toml",
            digest="5f0c3a9e" * 8,
            text=POLICY_TEXT,
            terms_version="2026-09",
            groups=[default, course],
            loaded_at=AT - 3600,
            last_error='policies.toml line 14: groups."6.s898".each.tokens_per_day: must be a whole number',
        )

    async def queue(self) -> QueueState:
        tokens = [t for t in self._tokens.tokens if t.state == "active"]
        running, waiting = [], []
        for i, n in enumerate(n for n in self._nodes if n.healthy):
            for k in range(n.models[0].active):
                t = tokens[(i + k) % len(tokens)]
                running.append(
                    QueueJob(
                        request_id=f"req-{i:03d}{k}",
                        token_id=t.id,
                        group=t.group,
                        model=n.models[0].id,
                        sealed=k % 2 == 0,
                        state="running",
                        node_id=n.node_id,
                        age_seconds=3.0 + k,
                        waited_seconds=0.2,
                        streamed=40 * (k + 1),
                        attempts=2 if (i + k) % 19 == 7 else 1,
                    )
                )
        for j in range(min(8, len(tokens))):
            t = tokens[j % 3]
            waiting.append(
                QueueJob(
                    request_id=f"req-w{j:02d}",
                    token_id=t.id,
                    group=t.group,
                    model=MODELS[j % 2],
                    sealed=j % 2 == 1,
                    state="waiting",
                    node_id=None,
                    age_seconds=1.0 + j,
                    waited_seconds=1.0 + j,
                    streamed=0,
                    attempts=1,
                )
            )
        users = [
            QueueUser(
                token_id=t.id,
                group=t.group,
                weight=2.0 if t.group == "6.s898" else 1.0,
                waiting=sum(w.token_id == t.id for w in waiting),
                running=sum(r.token_id == t.id for r in running),
                ahead_tokens=float(k * 1250),
            )
            for k, t in enumerate(tokens[:6])
        ]
        return QueueState(waiting=waiting, running=running, users=users, max_queued=1000)

    async def terms_status(self) -> TermsStatusList:
        return TermsStatusList(
            version="2026-09",
            tokens=[
                TermsStatus(
                    token_id=t.id,
                    name=t.name,
                    accepted_version=None if i % 5 == 2 else "2026-09" if i % 4 else "2026-01",
                    accepted_at=None if i % 5 == 2 else AT - 86400,
                    current=i % 5 != 2 and i % 4 != 0,
                )
                for i, t in enumerate(self._tokens.tokens)
            ],
        )

    async def usage(self, by: str = "user", since: str = "7d") -> UsageReport:  # type: ignore[override]
        rows = [
            UsageRow(
                key=t.id,
                name=t.name,
                requests=i * 3,
                errors=i % 2,
                prompt_tokens=i * 900,
                completion_tokens=i * 1500 + (48_000 if i == 5 else 0),
                total_tokens=i * 2400 + (48_000 if i == 5 else 0),
            )
            for i, t in enumerate(self._tokens.tokens)
        ]
        return UsageReport(by="user", since=AT - 3600, rows=sorted(rows, key=lambda r: -r.total_tokens))

    async def events(self) -> AsyncIterator[AdminEvent]:
        for event in self._events:
            yield event
        if self._event_rate <= 0:
            await asyncio.Event().wait()  # a quiet stream stays open
        seq = len(self._events)
        while True:
            await asyncio.sleep(1 / self._event_rate)
            seq += 1
            yield busy_event(seq, self._nodes[seq % len(self._nodes)].node_id)

    async def close(self) -> None:
        return None


def busy_event(seq: int, node_id: str) -> AdminEvent:
    """A finished answer: what a busy cluster sends most."""
    return AdminEvent(
        seq=seq,
        at=AT + seq / 50,
        kind="finished",
        node_id=node_id,
        model=MODELS[seq % 3],
        status="ok",
        prompt_tokens=120,
        completion_tokens=60,
        ttft_ms=180.0 + seq % 40,
        request_id=f"bench-{seq}",
    )


def sample_events() -> list[AdminEvent]:
    kinds = [
        AdminEvent(seq=1, at=AT, kind="node_joined", node_id="node-000"),
        AdminEvent(seq=2, at=AT + 1, kind="admitted", group="default", model=MODELS[0]),
        AdminEvent(
            seq=3,
            at=AT + 2,
            kind="finished",
            node_id="node-000",
            model=MODELS[0],
            status="ok",
            prompt_tokens=412,
            completion_tokens=256,
            ttft_ms=212.0,
            request_id="req-a",
        ),
        AdminEvent(seq=4, at=AT + 3, kind="refused", group="6.s898", refusal="tokens_per_day", status=429),
        AdminEvent(seq=5, at=AT + 4, kind="node_yielding", node_id="node-005"),
        AdminEvent(seq=6, at=AT + 5, kind="policy_reloaded", outcome="refused"),
        AdminEvent(
            seq=7, at=AT + 6, kind="refused", group="default", refusal="requests_per_minute", status=429
        ),
        AdminEvent(seq=8, at=AT + 7, kind="node_left", node_id="node-010"),
        AdminEvent(
            seq=9,
            at=AT + 8,
            kind="finished",
            node_id="node-002",
            model=MODELS[2],
            status="ok",
            prompt_tokens=88,
            completion_tokens=512,
            ttft_ms=340.0,
            request_id="req-b",
        ),
    ]
    return kinds
