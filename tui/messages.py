"""The typed messages the console's workers post: what the scheduler said, or that it could not be reached.

Workers (in ``tui.app``) do all the I/O through the headless client and post these; widgets only render
them. Snapshots of state (the node list, the tokens, ...) replace one another when several wait in the
queue (``can_replace``): only the newest matters, so a burst of polls costs one repaint.
"""

from __future__ import annotations

from dataclasses import dataclass

from textual.message import Message

from protocol.accounts import TokenList, TokenSecret, UsageReport
from protocol.admin import EnrollmentList, ModelPlacements, NodeList, QueueState
from protocol.policy import AdminEvent, PolicyState
from protocol.terms import TermsStatusList


class _Snapshot(Message):
    """A whole document that supersedes an older one of its kind still waiting in the queue."""

    def can_replace(self, message: Message) -> bool:
        return type(message) is type(self)


@dataclass(frozen=True)
class Cluster:
    """Everything one poll read, at once: the screens join documents (the queue names tokens, the users
    screen shows quotas from the policy), so they are drawn from one consistent read."""

    nodes: NodeList
    enrollments: EnrollmentList
    models: ModelPlacements
    tokens: TokenList
    policy: PolicyState
    queue: QueueState | None  # None: a scheduler older than the queue route
    terms: TermsStatusList | None
    today: UsageReport | None  # tokens by user since midnight UTC
    why_no_authority: str | None  # None: approvals can be signed here


class ClusterLoaded(_Snapshot):
    def __init__(self, cluster: Cluster) -> None:
        super().__init__()
        self.cluster = cluster


class EventsArrived(Message):
    """Events of the live stream, batched: the stream can carry dozens a second, the screen repaints once."""

    def __init__(self, events: list[AdminEvent]) -> None:
        super().__init__()
        self.events = events


class Reachability(Message):
    """Whether the scheduler answered the last call; ``reason`` says why not."""

    def __init__(self, reachable: bool, reason: str = "") -> None:
        super().__init__()
        self.reachable = reachable
        self.reason = reason


class ActionDone(Message):
    """An action finished: ``text`` says what happened, ``error`` whether it failed."""

    def __init__(self, text: str, *, error: bool = False) -> None:
        super().__init__()
        self.text = text
        self.error = error


class SecretIssued(Message):
    """A token secret the scheduler shows once: the console shows it once, in a modal."""

    def __init__(self, secret: TokenSecret, verb: str) -> None:
        super().__init__()
        self.secret = secret
        self.verb = verb


@dataclass(frozen=True)
class Request:
    """An action a screen asks for (widgets do no I/O): the app checks read-only mode and runs it.

    ``kind``: drain, undrain, revoke_node, approve, reject, load_model, unload_model, revoke_token,
    rotate_token, create_token, reload_policy.
    ``target``: the node or token id. ``fields``: what a form gathered."""

    kind: str
    target: str = ""
    fields: tuple[tuple[str, str], ...] = ()


class OpenNode(Message):
    """Enter on a node: the app opens its detail."""

    def __init__(self, node_id: str) -> None:
        super().__init__()
        self.node_id = node_id


class ActionRequested(Message):
    def __init__(self, request: Request) -> None:
        super().__init__()
        self.request = request
