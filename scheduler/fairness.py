"""Fair queueing between users by tokens: the Virtual Token Counter (Sheng et al., "Fairness in Serving
Large Language Models", OSDI 2024).

Every user has a counter of the service they received, in weighted tokens (a generated token costs more
than a prompt token, as on the GPU). The next request to dispatch is the oldest one of the backlogged user
with the smallest counter. A user who was idle is lifted to the smallest counter among the backlogged (or
to the last served user's counter when nobody waits), so idling earns no credit to burst with later: a
heavy user cannot starve a light one, and a light one cannot starve the heavy one either.

Users may have weights (their group's, from the policy): a user of weight 2 is charged half as much for the
same service, so while both wait they get twice the tokens (weighted fair queueing).

Pure data structure: no I/O, no clock. The scheduler charges a request when it is dispatched (its prompt
plus max_tokens, the most it can cost) and refunds what it did not use when the answer ends.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass
class _User(Generic[T]):
    counter: float = 0.0
    waiting: deque[T] = field(default_factory=deque)
    weight: float = 1.0  # the user's share: service counts 1/weight against them (their group's weight)


@dataclass(frozen=True, slots=True)
class Standing:
    """One user's place in the queue, as the operator sees it (a copy: reading it changes nothing)."""

    counter: float
    weight: float
    waiting: int
    ahead: float  # weighted tokens of service beyond the user served next: 0 is next in line


class VirtualTokenCounter(Generic[T]):
    def __init__(self, *, prompt_weight: float = 1.0, completion_weight: float = 2.0) -> None:
        self.prompt_weight = prompt_weight
        self.completion_weight = completion_weight
        self._users: dict[Hashable, _User[T]] = {}
        self._last_served = 0.0

    def __len__(self) -> int:
        return sum(len(u.waiting) for u in self._users.values())

    def counter(self, user: Hashable) -> float:
        return self._users[user].counter if user in self._users else 0.0

    def _backlogged(self) -> list[_User[T]]:
        return [u for u in self._users.values() if u.waiting]

    def _floor(self) -> float:
        """The counter a user who starts waiting now is lifted to: the smallest among the backlogged, or
        the last served user's when nobody waits."""
        backlogged = self._backlogged()
        return min(u.counter for u in backlogged) if backlogged else self._last_served

    def standing(self, user: Hashable) -> Standing | None:
        """``user``'s counter, weight and requests waiting, and how far they are behind the user served
        next; None for a user the counter does not know (never seen, or forgotten as idle: such a user
        would be lifted to the floor, next in line)."""
        state = self._users.get(user)
        if state is None:
            return None
        # A user who waits is compared with the other waiters; one who does not would be lifted to the
        # floor by their next request, so only service beyond the floor puts them behind.
        ahead = max(0.0, state.counter - self._floor())
        return Standing(state.counter, state.weight, len(state.waiting), ahead)

    def push(self, user: Hashable, item: T, weight: float = 1.0) -> None:
        state = self._users.setdefault(user, _User())
        state.weight = weight
        if not state.waiting:
            state.counter = max(state.counter, self._floor())
        state.waiting.append(item)

    def pop(self) -> tuple[Hashable, T] | None:
        """The next item to dispatch, or None when nobody waits."""
        best: tuple[Hashable, _User[T]] | None = None
        for user, state in self._users.items():
            if state.waiting and (best is None or state.counter < best[1].counter):
                best = (user, state)
        if best is None:
            return None
        user, state = best
        self._last_served = state.counter
        return user, state.waiting.popleft()

    def heads(self) -> list[tuple[Hashable, T]]:
        """Each backlogged user's oldest item, the user with the smallest counter first.

        The dispatcher walks this list so that a head it cannot place yet (its model is loading, its
        nodes are full) does not hold back the users behind it whose requests can run elsewhere.
        """
        backlogged = [
            (state.counter, i, user) for i, (user, state) in enumerate(self._users.items()) if state.waiting
        ]
        backlogged.sort(key=lambda entry: (entry[0], entry[1]))
        return [(user, self._users[user].waiting[0]) for _, _, user in backlogged]

    def pop_user(self, user: Hashable) -> T:
        """Dispatch ``user``'s oldest item (one that ``heads`` offered)."""
        state = self._users[user]
        self._last_served = state.counter
        return state.waiting.popleft()

    def forget_idle(self) -> None:
        """Drop users with nothing waiting whose counter is at or below the floor (bounded memory)."""
        floor = self._last_served
        for user in [u for u, s in self._users.items() if not s.waiting and s.counter <= floor]:
            del self._users[user]

    def remove(self, user: Hashable, item: T) -> bool:
        """Take back a request that left the queue without being served (its client went away)."""
        state = self._users.get(user)
        if state is None or item not in state.waiting:
            return False
        state.waiting.remove(item)
        return True

    def charge(self, user: Hashable, prompt_tokens: int, completion_tokens: int) -> None:
        """Add service (negative values refund an over-estimate)."""
        state = self._users.setdefault(user, _User())
        service = self.prompt_weight * prompt_tokens + self.completion_weight * completion_tokens
        state.counter += service / state.weight
