"""Every screen of the console, at 80×24 and 160×48, as SVG snapshots (pytest-textual-snapshot).

The console here reads fixed data (tests.tui.fixed): a live cluster's ages, rates and ids change from run
to run, and a picture must not. What the console does against a real scheduler is tested in
test_console*.py. After a deliberate change to a screen, redraw and review the pictures:

    .venv/bin/pytest tests/tui/test_snapshots.py --snapshot-update

and open the report pytest-textual-snapshot writes when one differs (snapshot_report.html).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest

from tests.tui.scenes import SCENES, SIZES, console, settle


@pytest.fixture(autouse=True)
def _utc(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Event times print in local time: the pictures are drawn in UTC."""
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize(("name", "keys"), SCENES, ids=[name for name, _ in SCENES])
def test_screen(
    snap_compare: Callable[..., bool], name: str, keys: tuple[str, ...], size: tuple[int, int]
) -> None:
    app = console()
    assert snap_compare(app, terminal_size=size, run_before=settle(app, keys))


def test_read_only_console_shows_no_action_keys(snap_compare: Callable[..., bool]) -> None:
    app = console(read_only=True)
    assert snap_compare(app, terminal_size=(120, 30), run_before=settle(app, ("6",)))
