"""The console application: ``make_app(client)`` builds it for `hearth tui` and for the tests alike.

Workers do every call to the scheduler through the headless ``ConsoleClient`` and post typed messages
(``tui.messages``); the screens only render them. One worker polls the admin documents every
``refresh_s`` seconds, another follows the event stream and reconnects with backoff; while the scheduler
cannot be reached a banner says so, and both keep trying until it answers again.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from textual import work
from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding, BindingType
from textual.css.query import NoMatches
from textual.message import Message
from textual.screen import Screen
from textual.widgets import Footer, Header, Static, TabbedContent, TabPane

from protocol.admin import QueueJob
from protocol.errors import HearthError, NotFound
from protocol.identity import AUTHORITY_FILE
from protocol.policy import AdminEvent
from tui.actions import perform
from tui.client import ConsoleClient, Unreachable
from tui.messages import (
    ActionDone,
    ActionRequested,
    Cluster,
    ClusterLoaded,
    EventsArrived,
    OpenNode,
    Reachability,
    Request,
    SecretIssued,
)
from tui.rates import Rates
from tui.screens.approvals import ApprovalsView
from tui.screens.events import EventsView
from tui.screens.models import ModelsView
from tui.screens.node_detail import NodeDetailScreen
from tui.screens.nodes import NodesView
from tui.screens.overview import Figures, OverviewView
from tui.screens.policy import PolicyView
from tui.screens.queue import QueueView
from tui.screens.secret import SecretScreen
from tui.screens.users import Accounts, UsersView

# (tab id, title): the number keys follow this order.
TABS = (
    ("overview", "Overview"), ("nodes", "Nodes"), ("approvals", "Approvals"), ("models", "Models"),
    ("queue", "Queue"), ("users", "Users"), ("policy", "Policy"), ("events", "Events"),
)  # fmt: skip
EVENT_BATCH_S = 0.5  # events arriving closer together than this repaint once (a tail at 2 Hz)
MAX_BACKOFF_S = 10.0


M = TypeVar("M", bound=Message)
D = TypeVar("D")


def _while_shown(handler: Callable[[Any, M], None]) -> Callable[[Any, M], None]:
    """A document that arrives while the views are not there (the console is closing, or not yet
    composed) has nothing to draw on: it is dropped, the next one redraws everything."""

    @functools.wraps(handler)
    def handle(app: Any, message: M) -> None:
        with contextlib.suppress(NoMatches):
            handler(app, message)

    return handle


class HearthConsole(App[None]):
    CSS_PATH = Path(__file__).parent / "console.tcss"  # absolute: a subclass elsewhere finds it too
    TITLE = "Hearth console"
    BINDINGS: ClassVar[list[BindingType]] = [
        *(Binding(str(i), f"show_tab('{tab}')", title, show=False) for i, (tab, title) in enumerate(TABS, 1)),
        Binding("question_mark", "toggle_keys", "Keys", key_display="?"),
        Binding("ctrl+r", "read_again", "Read again", show=False),
        Binding("q", "quit", "Quit"),
    ]

    def __init__(
        self,
        client: ConsoleClient,
        *,
        read_only: bool,
        refresh_s: float,
        authority_dir: Path | None,
        clock: Callable[[], float] = time.monotonic,
        settle_gc: bool = False,
    ) -> None:
        super().__init__()
        self.settle_gc = settle_gc
        self.client = client
        self.read_only = read_only
        self.refresh_s = refresh_s
        self.authority_dir = authority_dir
        self.reachable: bool | None = None
        self.loads = 0  # node lists rendered so far (tests wait for fresh reads by it)
        self._pending_events: list[AdminEvent] = []
        self.rates = Rates(clock)
        self.cluster: Cluster | None = None
        self.sub_title = client.url + ("  (read-only)" if read_only else "")

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static("", id="banner", markup=False)
        with TabbedContent(initial="nodes"):
            with TabPane("Overview", id="overview"):
                yield OverviewView()
            with TabPane("Nodes", id="nodes"):
                yield NodesView(read_only=self.read_only)
            with TabPane("Approvals", id="approvals"):
                yield ApprovalsView(read_only=self.read_only)
            with TabPane("Models", id="models"):
                yield ModelsView()
            with TabPane("Queue", id="queue"):
                yield QueueView()
            with TabPane("Users", id="users"):
                yield UsersView(read_only=self.read_only)
            with TabPane("Policy", id="policy"):
                yield PolicyView(read_only=self.read_only)
            with TabPane("Events", id="events"):
                yield EventsView()
        yield Footer()

    def on_mount(self) -> None:
        if self.settle_gc:
            self.call_after_refresh(_settle_gc)
        self.poll()
        self.follow_events()
        self.query_one(NodesView).table.focus()

    # ----- workers: all I/O -----

    @work(exclusive=True, group="poll")
    async def poll(self) -> None:
        """Every ``refresh_s``, the documents the screens show; the banner while the scheduler is away."""
        while True:
            await self.refresh_documents()
            await asyncio.sleep(self.refresh_s)

    async def refresh_documents(self) -> None:
        try:
            cluster = await self.read_cluster()
        except Unreachable as exc:
            self.post_message(Reachability(False, exc.message))
            return
        except HearthError as exc:  # reachable, but refusing (a wrong or revoked admin token)
            self.post_message(Reachability(False, f"the scheduler refused: {exc.message}"))
            return
        self.post_message(ClusterLoaded(cluster))
        self.post_message(Reachability(True))

    async def read_cluster(self) -> Cluster:
        """Every document the screens show, read together."""
        c = self.client
        midnight = time.time() // 86400 * 86400
        nodes, pending, models, tokens, policy = await asyncio.gather(
            c.nodes(), c.enrollments("pending"), c.models(), c.tokens(), c.policy()
        )
        queue, terms, today, why_not = await asyncio.gather(
            _optional(c.queue()), _optional(c.terms_status()), _optional(c.usage("user", f"{midnight:.0f}")),
            asyncio.to_thread(self._why_no_authority),
        )  # fmt: skip
        return Cluster(nodes, pending, models, tokens, policy, queue, terms, today, why_not)

    def _why_no_authority(self) -> str | None:
        if self.authority_dir is None:
            return "approving needs the authority key: start the console with --authority DIR"
        if not (self.authority_dir / AUTHORITY_FILE).is_file():
            return f"no authority key in {self.authority_dir}: approve on the machine that holds it"
        return None

    @work(exclusive=True, group="events")
    async def follow_events(self) -> None:
        """The live event stream; reconnects with backoff when it ends or the scheduler is away."""
        backoff = 0.5
        while True:
            try:
                async for event in self.client.events():
                    backoff = 0.5
                    if not self._pending_events:
                        self.set_timer(EVENT_BATCH_S, self._flush_events)
                    self._pending_events.append(event)
            except HearthError:
                pass  # the poll worker shows the banner; here we only reconnect
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF_S)

    def _flush_events(self) -> None:
        batch, self._pending_events = self._pending_events, []
        if batch:
            self.post_message(EventsArrived(batch))

    @work(group="actions")
    async def run_request(self, request: Request) -> None:
        try:
            text, secret = await perform(self.client, request, self.authority_dir)
        except HearthError as exc:
            self.post_message(ActionDone(exc.message, error=True))
            return
        if secret is not None:
            self.post_message(SecretIssued(secret, text))
        self.post_message(ActionDone(text))
        await self.refresh_documents()

    # ----- messages: render -----

    @_while_shown
    def on_cluster_loaded(self, message: ClusterLoaded) -> None:
        """A poll's documents: the figures are sampled every time (the sparklines' history), and only
        what is on screen is drawn; a tab draws the newest documents when it is shown."""
        self.cluster = cluster = message.cluster
        self.loads += 1
        if cluster.queue is not None:
            self.rates.queue(cluster.queue)
        running = None if cluster.queue is None else len(cluster.queue.running)
        figures = Figures(
            tokens_per_s=self.rates.tokens_per_s(), ttft_ms=self.rates.ttft_ms(),
            refusals=self.rates.refusals_per_min(), running=running,
        )  # fmt: skip
        self.query_one(OverviewView).sample(cluster.nodes, figures)
        self._draw(self.query_one(TabbedContent).active)
        top = self.screen
        if isinstance(top, NodeDetailScreen):
            for node in cluster.nodes.nodes:
                if node.node_id == top.node.node_id:
                    rate = self.rates.tokens_per_s(node.node_id)
                    top.update(node, self._jobs_on(node.node_id), tokens_per_s=rate)

    def _draw(self, tab: str) -> None:
        cluster = self.cluster
        if cluster is None:
            return
        if tab == "overview":
            self.query_one(OverviewView).draw()
        elif tab == "nodes":
            self.query_one(NodesView).update(cluster.nodes, self.rates.per_node())
        elif tab == "approvals":
            self.query_one(ApprovalsView).update(cluster.enrollments, cluster.why_no_authority)
        elif tab == "models":
            queued: dict[str, int] = {}
            for job in cluster.queue.waiting if cluster.queue is not None else ():
                queued[job.model] = queued.get(job.model, 0) + 1
            self.query_one(ModelsView).update(cluster.models, queued)
        elif tab == "queue" and cluster.queue is not None:
            self.query_one(QueueView).update(cluster.queue, {t.id: t.name for t in cluster.tokens.tokens})
        elif tab == "users":
            today = {row.key: row.total_tokens for row in cluster.today.rows} if cluster.today else {}
            groups = {g.name: g for g in cluster.policy.groups}
            self.query_one(UsersView).update(Accounts(cluster.tokens, cluster.terms, today, groups))
        elif tab == "policy":
            self.query_one(PolicyView).update(cluster.policy)

    @_while_shown
    def on_tabbed_content_tab_activated(self, event: TabbedContent.TabActivated) -> None:
        if event.pane.id is not None:
            self._draw(event.pane.id)

    def _jobs_on(self, node_id: str) -> list[QueueJob]:
        queue = self.cluster.queue if self.cluster is not None else None
        return [j for j in queue.running if j.node_id == node_id] if queue is not None else []

    @_while_shown
    def on_events_arrived(self, message: EventsArrived) -> None:
        self.rates.events(message.events)
        self.query_one(EventsView).add(message.events)

    @_while_shown
    def on_reachability(self, message: Reachability) -> None:
        if message.reachable == self.reachable and message.reachable:
            return
        self.reachable = message.reachable
        banner = self.query_one("#banner", Static)
        banner.set_class(not message.reachable, "-shown")
        if not message.reachable:
            banner.update(f"Cannot reach the scheduler at {self.client.url}: {message.reason}. Retrying…")

    def on_action_done(self, message: ActionDone) -> None:
        self.notify(message.text, severity="error" if message.error else "information", markup=False)

    def on_secret_issued(self, message: SecretIssued) -> None:
        self.push_screen(SecretScreen(message.secret, message.verb))

    def on_open_node(self, message: OpenNode) -> None:
        node = self.query_one(NodesView).nodes.get(message.node_id)
        if node is not None:
            self.push_screen(
                NodeDetailScreen(
                    node, self._jobs_on(node.node_id), tokens_per_s=self.rates.tokens_per_s(node.node_id),
                    read_only=self.read_only,
                )
            )  # fmt: skip

    def action_read_again(self) -> None:
        self.refresh_now()

    @work(group="refresh")
    async def refresh_now(self) -> None:
        await self.refresh_documents()
        self.post_message(ActionDone("read again from the scheduler"))

    def on_action_requested(self, message: ActionRequested) -> None:
        if self.read_only:
            self.notify("read-only console: actions are off", severity="warning")
            return
        self.run_request(message.request)

    # ----- keys -----

    def action_show_tab(self, tab: str) -> None:
        if isinstance(self.screen, NodeDetailScreen):
            return
        self.query_one(TabbedContent).active = tab
        focusable = self.query_one(f"#{tab}", TabPane).query("DataTable, RichLog")
        if focusable:
            focusable.first().focus()

    def action_toggle_keys(self) -> None:
        if self.screen.query("HelpPanel"):
            self.action_hide_help_panel()
        else:
            self.action_show_help_panel()

    def get_system_commands(self, screen: Screen[object]) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        for tab, title in TABS:
            yield SystemCommand(title, f"Show the {title} screen", lambda tab=tab: self.action_show_tab(tab))


def _settle_gc() -> None:
    """Once the console is up, what it has built (Textual's widgets, the modules) lives as long as it does:
    moved out of the collector's way, a full collection scans only the documents of recent polls and no
    longer stalls a frame by a tenth of a second or more (tests/bench/bench_tui.py)."""
    gc.collect()
    gc.freeze()


async def _optional(call: Awaitable[D]) -> D | None:
    """A document an older scheduler may not serve (404): the screen that shows it stays as it was."""
    try:
        return await call
    except NotFound:
        return None


def make_app(
    client: ConsoleClient,
    *,
    read_only: bool = False,
    refresh_s: float = 2.0,
    authority_dir: Path | None = None,
    clock: Callable[[], float] = time.monotonic,
    settle_gc: bool = False,
) -> HearthConsole:
    """The console over ``client``: what `hearth tui` runs and what the tests drive (``clock``: the
    monotonic clock its rates are measured with; snapshots fix it. ``settle_gc``: freeze what is built
    once the console is up, for a process that runs only the console, as `hearth tui` does)."""
    return HearthConsole(
        client, read_only=read_only, refresh_s=refresh_s, authority_dir=authority_dir, clock=clock,
        settle_gc=settle_gc,
    )  # fmt: skip


__all__ = ["HearthConsole", "make_app"]
