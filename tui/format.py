"""How the console writes values: ages, sizes, bars (pure functions; the screens and tests share them)."""

from __future__ import annotations

import time

from rich.text import Text

# A node whose last heartbeat is older than this is shown dimmed: it may be gone, the scheduler has not
# yet decided (its own node_timeout does that, and then the row says offline).
STALE_AFTER_S = 5.0


def age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m"
    if seconds < 86400:
        return f"{seconds / 3600:.0f}h"
    return f"{seconds / 86400:.0f}d"


def since(unix: float | None, now: float | None = None) -> str:
    return "-" if unix is None else age(max(0.0, (now if now is not None else time.time()) - unix))


def until(unix: float | None, now: float | None = None) -> str:
    if unix is None:
        return "never"
    left = unix - (now if now is not None else time.time())
    return "expired" if left <= 0 else f"in {age(left)}"


def gib(n: int | None) -> str:
    return "-" if n is None else f"{n / (1 << 30):.1f}"


def bar(used: int | None, total: int | None, width: int = 10) -> Text:
    """A VRAM bar: filled cells for what is used, then "used/total GiB"."""
    if used is None or not total:
        return Text("-")
    share = min(1.0, max(0.0, used / total))
    filled = round(share * width)
    style = "red" if share > 0.9 else "yellow" if share > 0.7 else "green"
    out = Text("█" * filled, style=style)
    out.append("░" * (width - filled), style="dim")
    out.append(f" {gib(used)}/{gib(total)} GiB")
    return out
