"""Owner first: a volunteer's machine serves the club only while its owner does not need it.

Every few seconds the node looks at the clock and, through NVML, at its GPUs (``assess``, a pure function
over a probe, tested on recorded fixtures). Any reason to yield — outside the hours it serves, a GPU process
of the owner's, VRAM above the ceiling — and the node **yields**:

1. it takes no new work (jobs and loads get 503 ``node_yielding``; its heartbeats say ``yielding`` with the
   reason, so the scheduler places around it at once);
2. running answers may finish for ``drain_seconds``, then are cancelled (a sealed stream fails over to
   another candidate);
3. once nothing runs and ``release_after`` has passed, its models are unloaded: the memory goes back to the
   owner.

When every reason has been gone for ``resume_after`` seconds it serves again by itself, reloading what it
unloaded. ``hearth node status`` on the box prints the phase and the reasons.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import datetime
from pathlib import PurePath
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, Protocol

from node.settings import OwnerFirstSettings

if TYPE_CHECKING:
    from hardware.probe import NodeProbe
    from node.pool import ModelPool

log = logging.getLogger("hearth.node.owner")


class Served(Protocol):
    """What yielding needs of the node: its models, and a way to say its status changed (node.state's
    NodeState is one; the owner-first part never sees the rest)."""

    @property
    def pool(self) -> ModelPool: ...

    def touch(self) -> None: ...


DAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
_WINDOW = re.compile(
    r"^\s*(?:(?P<days>[A-Za-z][A-Za-z,\- ]*?)\s+)?(?P<start>\d{1,2}:\d{2})\s*-\s*(?P<end>\d{1,2}:\d{2})\s*$"
)
MAX_REASON = 300

Phase = Literal["serving", "yielding", "released"]


@dataclass(frozen=True, slots=True)
class Window:
    """Days (0 = Monday) and minutes after midnight; a window whose end is not after its start runs past
    midnight, into the next day."""

    days: frozenset[int]
    start: int
    end: int

    def covers(self, now: datetime) -> bool:
        minute, day = now.hour * 60 + now.minute, now.weekday()
        if self.start < self.end:
            return day in self.days and self.start <= minute < self.end
        return (day in self.days and minute >= self.start) or (
            (day - 1) % 7 in self.days and minute < self.end
        )


def parse_window(text: str) -> Window:
    """``"19:00-08:00"``, ``"Mon-Fri 19:00-08:00"``, ``"Sat,Sun 00:00-24:00"``; ValueError saying what is
    wrong."""
    found = _WINDOW.match(text)
    if found is None:
        raise ValueError(f"{text!r} is not a time window like 'Mon-Fri 19:00-08:00'")
    start, end = _minutes(found["start"], text), _minutes(found["end"], text)
    if start == 24 * 60:
        raise ValueError(f"{text!r}: a window cannot start at 24:00")
    return Window(_days(found["days"], text), start, end)


def _minutes(hhmm: str, text: str) -> int:
    hours, minutes = (int(p) for p in hhmm.split(":"))
    if minutes > 59 or hours > 24 or (hours == 24 and minutes):
        raise ValueError(f"{text!r}: {hhmm} is not a time of day")
    return hours * 60 + minutes


def _days(spec: str | None, text: str) -> frozenset[int]:
    if spec is None:
        return frozenset(range(7))
    days: set[int] = set()
    for part in spec.replace(" ", "").lower().split(","):
        ends = [_day(e) for e in part.split("-")]
        if len(ends) > 2 or None in ends:
            raise ValueError(f"{text!r}: {part!r} is not a day or a range of days like Mon-Fri")
        first, last = ends[0], ends[-1]
        assert first is not None and last is not None
        days.update((first + i) % 7 for i in range((last - first) % 7 + 1))
    return frozenset(days)


def _day(name: str) -> int | None:
    """Monday = 0; a day's name or its first three letters or more ("Mon", "Tues")."""
    for i, day in enumerate(DAYS):
        if len(name) >= 3 and day.startswith(name):
            return i
    return None


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.1f} GiB"


def _program(name: str) -> str:
    return PurePath(name.split(" ")[0]).name or name


class Reason(NamedTuple):
    """Why the node yields: ``kind`` (its words for the club, PUBLIC) and ``detail`` for the owner alone."""

    kind: Literal["hours", "owner_process", "vram_ceiling"]
    detail: str


# What the scheduler and the operator are told: that the owner needs the machine, not what they run on it.
PUBLIC = {
    "hours": "outside the hours its owner lends it",
    "owner_process": "its owner is using the GPU",
    "vram_ceiling": "its owner needs the GPU's memory",
}


def assess(
    settings: OwnerFirstSettings,
    now: datetime,
    found: NodeProbe | None,
    *,
    own_pids: Collection[int],
    resident_bytes: int,
    planned_bytes: int,
) -> tuple[Reason, ...]:
    """Why the node must yield now; empty when it may serve.

    ``found`` is the GPUs as NVML sees them (None on a box without them: only the hours apply);
    ``own_pids`` the node's own processes; ``resident_bytes`` what its models hold now, ``planned_bytes``
    what they hold once those it unloaded for the owner are back (the ceiling counts that, so it does not
    flip back and forth as they are unloaded and reloaded)."""
    reasons: list[Reason] = []
    windows = [parse_window(h) for h in settings.hours]
    if windows and not any(w.covers(now) for w in windows):
        reasons.append(Reason("hours", f"outside its hours ({', '.join(settings.hours)})"))
    if found is None or not found.gpus:
        return tuple(reasons)
    if settings.owner_processes:
        ignored = {n.lower() for n in settings.ignore_processes}
        for gpu in found.gpus:
            for proc in gpu.other_processes(own_pids):
                if proc.name is None:
                    continue  # in another PID namespace (a node in a container): see docs/volunteers.md
                program = _program(proc.name)
                if program.lower() in ignored:
                    continue
                if proc.used_bytes is not None and proc.used_bytes < settings.process_min_bytes:
                    continue
                use = f"uses {_gib(proc.used_bytes)} on" if proc.used_bytes is not None else "is using"
                detail = f"the owner's {program} (pid {proc.pid}) {use} GPU {gpu.index}"
                reasons.append(Reason("owner_process", detail))
    if settings.vram_ceiling is not None:
        total = sum(g.vram_total_bytes for g in found.gpus)
        # Hearth's own use: as NVML attributes it to this process, or (a node in a container, whose pid
        # NVML does not show) what its resident models are estimated to hold.
        own = sum(p.used_bytes or 0 for g in found.gpus for p in g.processes if p.pid in own_pids)
        others = max(0, sum(g.vram_used_bytes for g in found.gpus) - max(own, resident_bytes))
        if others + planned_bytes > settings.vram_ceiling * total:
            detail = (
                f"other processes use {_gib(others)} of {_gib(total)} VRAM: with Hearth's "
                f"{_gib(planned_bytes)} that is over the {settings.vram_ceiling:.0%} ceiling"
            )
            reasons.append(Reason("vram_ceiling", detail))
    return tuple(reasons)


class OwnerFirst:
    """The node's yield state, moved by ``check`` (called every ``check_interval`` by ``run``)."""

    def __init__(
        self,
        settings: OwnerFirstSettings,
        *,
        tier: str,
        own_pids: Collection[int],
        probe: Callable[[], NodeProbe] | None = None,
        clock: Callable[[], float] = time.monotonic,
        now: Callable[[], datetime] = lambda: datetime.now().astimezone(),
    ) -> None:
        self.settings = settings
        self.enabled = settings.enabled if settings.enabled is not None else tier == "community"
        self.own_pids = frozenset(own_pids)
        self._probe = probe
        self._clock = clock
        self._now = now
        self.phase: Phase = "serving"
        self.reasons: tuple[Reason, ...] = ()
        self.since: datetime | None = None  # when the node began to yield
        self.released: list[str] = []  # models unloaded for the owner, reloaded on return
        self._yielded_at = 0.0
        self._clear_since: float | None = None
        self._cancelled = False

    @property
    def yielding(self) -> bool:
        return self.phase != "serving"

    @property
    def reason(self) -> str | None:
        """Why, as the club is told it (the kinds of reasons, not the owner's programs)."""
        if not self.yielding:
            return None
        kinds = dict.fromkeys(PUBLIC[r.kind] for r in self.reasons)
        text = "; ".join(kinds) or "coming back once its owner's use has stayed away"
        return text if len(text) <= MAX_REASON else text[: MAX_REASON - 1] + "…"

    def _needs_probe(self) -> bool:
        return self._probe is not None and (
            self.settings.owner_processes or self.settings.vram_ceiling is not None
        )

    async def check(self, node: Served) -> None:
        if not self.enabled:
            return
        found = await asyncio.to_thread(self._probe) if self._needs_probe() and self._probe else None
        pool = node.pool
        resident = pool.used_bytes
        planned = resident + sum(pool.get(m).footprint_bytes for m in self.released)
        reasons = assess(
            self.settings, self._now(), found, own_pids=self.own_pids, resident_bytes=resident,
            planned_bytes=planned,
        )  # fmt: skip
        now = self._clock()
        # Heartbeats carry the reason as it is at each beat; a change of kind is worth one at once.
        kinds_changed = {r.kind for r in reasons} != {r.kind for r in self.reasons}
        self.reasons = reasons
        if reasons:
            self._clear_since = None
            if self.phase == "serving":
                self.phase, self._yielded_at, self._cancelled = "yielding", now, False
                self.since = self._now()
                log.warning("yielding to the owner: %s", "; ".join(r.detail for r in reasons))
            if kinds_changed:
                node.touch()
        elif self.yielding:
            if kinds_changed:
                node.touch()
            if self._clear_since is None:
                self._clear_since = now
            if now - self._clear_since >= self.settings.resume_after:
                self._resume(node)
                return
        if self.phase == "yielding":
            self._drain(node, now)

    def _drain(self, node: Served, now: float) -> None:
        pool = node.pool
        waited = now - self._yielded_at
        if pool.load and waited >= self.settings.drain_seconds:
            # Again at every look: a job that was being prepared as the node began to yield comes later.
            if not self._cancelled:
                log.warning("cancelling %d answers still running %.0f s after yielding", pool.load, waited)
                self._cancelled = True
            pool.cancel_all()
        if any(s.phase == "loading" for s in pool.slots.values()):
            return  # a load in flight would bring its model back once done: unload after it finishes
        if not pool.load and waited >= self.settings.release_after:
            self.released = [s.id for s in pool.slots.values() if s.phase == "ready" and not s.busy]
            for model_id in self.released:
                pool.unload(model_id)
            self.phase = "released"
            if self.released:
                log.info(
                    "unloaded %s: the memory is the owner's until the node serves again",
                    ", ".join(self.released),
                )
            node.touch()

    def _resume(self, node: Served) -> None:
        self.phase, self.reasons, self.since, self._clear_since = "serving", (), None, None
        for model_id in self.released:
            try:
                node.pool.request_load(model_id, ())
            except Exception as exc:  # reported, and the scheduler may ask again later
                log.error("could not reload %s: %s", model_id, exc)
        self.released = []
        log.info("the owner's machine is free again: serving")
        node.touch()

    def hold_at_start(self, preload: list[str]) -> None:
        """The node starts while it must yield: the models it would preload wait for its return."""
        self.phase, self.released = "released", list(preload)
        self.since = self._now()

    def doc(self) -> dict[str, Any]:
        return {
            "enabled": self.enabled,
            "phase": self.phase if self.enabled else "serving",
            "reasons": [r.detail for r in self.reasons],
            "reason": self.reason,
            "since": self.since.isoformat(timespec="seconds") if self.since else None,
            "hours": list(self.settings.hours),
            "released": list(self.released),
        }

    async def look(self, node: Served) -> None:
        """``check``, logging a failure instead of raising it: a probe that fails now may work next time."""
        try:
            await self.check(node)
        except Exception as exc:
            log.error("owner-first check failed: %s: %s", type(exc).__name__, exc)

    async def run(self, node: Served) -> None:
        while True:
            await self.look(node)
            await asyncio.sleep(self.settings.check_interval)
