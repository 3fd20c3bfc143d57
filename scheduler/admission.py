"""Admission: every request waits here, fairly, until placement finds it a node.

The scheduler holds the queue, not the nodes: a node is sent only what it can start now (placement's
cache and sequence admission), so the order in which users are served is decided here, by the virtual
token counter (scheduler.fairness), and one heavy user cannot starve a light one.

A dispatch pass runs whenever something changes (a request arrives or ends, a heartbeat lands, a load
finishes). It walks the backlogged users, smallest counter first, and places each one's oldest request;
a request that cannot run yet stays queued without holding back those behind it. A placement that needs a
cold load asks the node to load the model once, and the request waits for it like any other.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from protocol.errors import (
    ContextLengthExceeded,
    HearthError,
    ModelNotFound,
    PermissionDenied,
    Unavailable,
    Unprocessable,
)
from scheduler.fairness import Standing, VirtualTokenCounter
from scheduler.placement import ClusterSnapshot, Placement, PlacementRequest, Refusal, place
from scheduler.placement.filters.cache import tokens_needed
from scheduler.registry import Registry, Ticket

log = logging.getLogger("hearth.scheduler.admission")


@dataclass(eq=False)
class _Waiter:
    user: str
    request: PlacementRequest
    future: asyncio.Future[Ticket]
    refusal: Refusal | None = None
    enqueued: float = field(default_factory=time.monotonic)


def refusal_error(refusal: Refusal, retry_after: float) -> HearthError:
    """The API error for a cluster-level refusal: the reason reaches the client as placement wrote it."""
    if refusal.kind == "unknown_model":
        return ModelNotFound(f"{refusal.reason}; see /v1/models", param="model", code="model_not_found")
    if refusal.kind == "never":
        if refusal.resource == "tier":
            return PermissionDenied(refusal.reason, code="tier_not_allowed")
        if refusal.resource == "context":
            return ContextLengthExceeded(refusal.reason, param="max_tokens")
        return Unprocessable(refusal.reason, code=f"{refusal.resource}_too_small")
    return Unavailable(refusal.reason, code="no_capacity", retry_after=retry_after)


class Admission:
    def __init__(
        self,
        registry: Registry,
        *,
        max_wait: float,
        max_queued: int,
        retry_after: float,
        start_load: Callable[[str, str, tuple[str, ...]], None],
        warm_up: float = 0.0,
    ) -> None:
        self._registry = registry
        # For this long after a start, a model no node serves yet may be one whose node has not sent its
        # first heartbeat: its requests wait (a restart is then invisible) instead of getting 404.
        self._warm_until = time.monotonic() + warm_up
        self._max_wait = max_wait
        self._max_queued = max_queued
        self._retry_after = retry_after
        self._start_load = start_load
        self._fair: VirtualTokenCounter[_Waiter] = VirtualTokenCounter()
        self._pending = False
        self.dispatched = 0

    @property
    def queued(self) -> int:
        return len(self._fair)

    def standing(self, user: str) -> Standing | None:
        """``user``'s fair-share standing (scheduler.fairness), for the operator's view of the queue."""
        return self._fair.standing(user)

    async def acquire(self, user: str, request: PlacementRequest, weight: float = 1.0) -> Ticket:
        """Wait for a node that can run ``request``; raise the refusal's HearthError when none will.
        ``weight`` is the user's share of the fair queue (their group's)."""
        if len(self._fair) >= self._max_queued:
            raise Unavailable(
                f"{len(self._fair)} requests are already waiting; try again shortly",
                code="queue_full",
                retry_after=self._retry_after,
            )
        waiter = _Waiter(user, request, asyncio.get_running_loop().create_future())
        self._fair.push(user, waiter, weight)
        self._dispatch()
        try:
            async with asyncio.timeout(self._max_wait):
                return await asyncio.shield(waiter.future)
        except TimeoutError:
            if _placed(waiter.future):
                return waiter.future.result()
            why = f": {waiter.refusal.reason}" if waiter.refusal else ""
            raise Unavailable(
                f"no node could take this request within {self._max_wait:.0f} s{why}",
                code="queue_timeout",
                retry_after=self._retry_after,
            ) from None
        except asyncio.CancelledError:
            # The client left; if dispatch placed it in the same loop turn, give the capacity back.
            if _placed(waiter.future):
                self.release(waiter.future.result(), 0, 0)
            raise
        finally:
            if not waiter.future.done():
                self._fair.remove(user, waiter)
                waiter.future.cancel()

    def release(self, ticket: Ticket, prompt_tokens: int, completion_tokens: int) -> None:
        """The request ended: free its capacity and charge what it really used."""
        self._registry.end(ticket)
        # Dispatch charged the reservation; refund the difference now that the real counts are known.
        self._fair.charge(
            ticket.user,
            prompt_tokens - ticket.prompt,
            completion_tokens - ticket.max_new,
        )
        self.wake()

    def wake(self) -> None:
        """Something changed: run a dispatch pass soon (many changes in one loop turn make one pass)."""
        if not self._pending and len(self._fair):
            self._pending = True
            asyncio.get_running_loop().call_soon(self._dispatch)

    def _dispatch(self) -> None:
        self._pending = False
        snapshot = self._registry.snapshot()
        for user, waiter in self._fair.heads():
            if waiter.future.done():
                self._fair.remove(user, waiter)
                continue
            decision = place(waiter.request, snapshot)
            if isinstance(decision, Refusal):
                waiter.refusal = decision
                if decision.kind == "unknown_model" and time.monotonic() < self._warm_until:
                    continue
                if decision.kind != "busy":
                    self._fair.remove(user, waiter)
                    waiter.future.set_exception(refusal_error(decision, self._retry_after))
                continue
            if decision.action == "load":
                self._cold_load(decision, waiter)
                snapshot = self._registry.snapshot()
                continue
            self._fair.pop_user(user)
            ticket = self._begin(waiter.user, waiter, decision, snapshot)
            waiter.future.set_result(ticket)
            self.dispatched += 1
            snapshot = self._registry.snapshot()
        self._fair.forget_idle()

    def _cold_load(self, decision: Placement, waiter: _Waiter) -> None:
        model = waiter.request.model
        if self._registry.start_load(decision.node_id, model):
            log.info("asking %s to load %s", decision.node_id, model)
            self._start_load(decision.node_id, model, decision.evict)
        waiter.refusal = Refusal("busy", "loading", f"{model} is being loaded on {decision.node_id}")

    def _begin(self, user: str, waiter: _Waiter, decision: Placement, snapshot: ClusterSnapshot) -> Ticket:
        request = waiter.request
        model = next((n.model(request.model) for n in snapshot.nodes if n.node_id == decision.node_id), None)
        max_new = request.max_tokens
        if max_new is None:
            max_new = model.default_max_tokens if model is not None else 1024
        reserved = request.prompt_tokens + max_new
        if model is not None and model.context_length:
            max_new = min(max_new, model.context_length)
            reserved = min(reserved, model.context_length)
        prompt = reserved - max_new
        self._fair.charge(user, prompt, max_new)
        # The node's cache holds whole pages for it (exllamav2: 256 tokens each), as placement counted.
        cache = tokens_needed(request, model) if model is not None else reserved
        return self._registry.begin(decision.node_id, request.model, cache, max_new, user=user, prompt=prompt)


def _placed(future: asyncio.Future[Ticket]) -> bool:
    return future.done() and not future.cancelled() and future.exception() is None


def exclude(request: PlacementRequest, node_id: str) -> PlacementRequest:
    """The same request, never again on ``node_id`` (failover)."""
    return replace(request, exclude=request.exclude | {node_id})
