"""Usage receipts: the jobs this node ran and the tokens it counted, until a heartbeat has carried them.

The token counts a node streams to the scheduler (META frames) are for the moment: fairness, metrics, and
what the scheduler records when the job ends. The node's account of record is the list of receipts it puts
in its next heartbeat, which it signs like every heartbeat (protocol.federation), so one signature covers
every job of the last few seconds. Receipts wait here until a heartbeat that carried them was accepted; a
scheduler that stays unreachable for very long loses the oldest (counted in ``dropped``).
"""

from __future__ import annotations

from collections import deque

from protocol.federation import MAX_RECEIPTS

MAX_KEPT = 100_000


class Receipts:
    def __init__(self, limit: int = MAX_KEPT) -> None:
        self._items: deque[tuple[int, dict[str, object]]] = deque()
        self._limit = limit
        self._seq = 0
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._items)

    def add(self, job_id: str, prompt_tokens: int, completion_tokens: int) -> None:
        self._seq += 1
        entry = {"job_id": job_id, "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens}
        self._items.append((self._seq, entry))
        if len(self._items) > self._limit:
            self._items.popleft()
            self.dropped += 1

    def batch(self) -> tuple[int, list[dict[str, object]]]:
        """The oldest receipts (at most MAX_RECEIPTS) and a mark to pass to `sent` once they arrived."""
        taken = [self._items[i] for i in range(min(len(self._items), MAX_RECEIPTS))]
        return (taken[-1][0] if taken else 0), [entry for _, entry in taken]

    def sent(self, mark: int) -> None:
        """The scheduler accepted a heartbeat with every receipt up to ``mark``."""
        while self._items and self._items[0][0] <= mark:
            self._items.popleft()
