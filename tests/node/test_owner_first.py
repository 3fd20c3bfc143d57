"""Owner first: a volunteer's node yields when its owner needs the machine, and comes back by itself.

``assess`` is checked on GPU probes recorded as JSON (tests/fixtures/nodes/); the whole cycle runs on a real
node and scheduler in this process, the node reading those probes instead of NVML: serving → an owner's
process appears → yielding (no new work, the scheduler places around it, a running answer is cancelled after
``drain_seconds``) → models unloaded → the process goes → serving again, models reloaded.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from datetime import datetime
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner
from pydantic import ValidationError

from hardware.probe import NodeProbe
from hearth.cli import main
from node.app import load_transformers
from node.backends.base import Backend, SamplingParams
from node.owner import Reason, Window, assess, parse_window
from node.settings import ModelSettings, NodeSettings, OwnerFirstSettings
from tests.support import LoopThread, Stack, WrappedBackend, start_stack, stop_stack, wait_for

FIXTURES = Path(__file__).parent.parent / "fixtures" / "nodes"
VOLUNTEER = NodeProbe.from_json(
    (FIXTURES / "volunteer-2x3090.json").read_text()
)  # Xorg + the owner's python3
QUIET = NodeProbe.from_json((FIXTURES / "h100-x1-recorded.json").read_text())  # recorded: no other process
OWNER_PID = 23817
GIB = 1 << 30

# 2026-12-01 was a Tuesday.
TUE_1000 = datetime(2026, 12, 1, 10, 0)
TUE_2100 = datetime(2026, 12, 1, 21, 0)
WED_0300 = datetime(2026, 12, 2, 3, 0)
SAT_1200 = datetime(2026, 12, 5, 12, 0)
MON_0300 = datetime(2026, 11, 30, 3, 0)


@pytest.mark.parametrize(
    ("text", "window"),
    [
        ("19:00-08:00", Window(frozenset(range(7)), 19 * 60, 8 * 60)),
        ("Mon-Fri 19:00-08:00", Window(frozenset(range(5)), 19 * 60, 8 * 60)),
        ("sat,sun 00:00-24:00", Window(frozenset({5, 6}), 0, 24 * 60)),
        ("Fri-Mon 9:30-17:00", Window(frozenset({4, 5, 6, 0}), 9 * 60 + 30, 17 * 60)),
        ("Tuesday 08:00 - 09:00", Window(frozenset({1}), 8 * 60, 9 * 60)),
    ],
)
def test_windows_parse(text: str, window: Window) -> None:
    assert parse_window(text) == window


@pytest.mark.parametrize(
    "text",
    [
        "",
        "19-08",
        "25:00-08:00",
        "10:60-11:00",
        "Funday 10:00-11:00",
        "Mon-Tue-Wed 10:00-11:00",
        "24:00-08:00",
        "M 10:00-11:00",
    ],
)
def test_bad_windows_say_what_is_wrong(text: str) -> None:
    with pytest.raises(ValueError, match=r"window|time|day"):
        parse_window(text)
    with pytest.raises(ValidationError, match="hours"):
        NodeSettings(owner_first={"hours": [text]})


@pytest.mark.parametrize(
    ("hours", "now", "covered"),
    [
        (["Mon-Fri 19:00-08:00"], TUE_2100, True),
        (["Mon-Fri 19:00-08:00"], WED_0300, True),  # Tuesday's window, past midnight
        (["Mon-Fri 19:00-08:00"], MON_0300, False),  # would be Sunday's window: Sunday is not listed
        (["Mon-Fri 19:00-08:00"], TUE_1000, False),
        (["Mon-Fri 19:00-08:00", "Sat-Sun 00:00-24:00"], SAT_1200, True),
        (["09:00-17:00"], TUE_1000, True),
    ],
)
def test_hours_decide_alone_on_a_box_without_gpus(hours: list[str], now: datetime, covered: bool) -> None:
    reasons = assess(
        OwnerFirstSettings(hours=hours), now, None, own_pids=(), resident_bytes=0, planned_bytes=0
    )
    assert (reasons == ()) == covered
    if not covered:
        assert reasons == (Reason("hours", f"outside its hours ({', '.join(hours)})"),)


def test_the_owners_gpu_process_makes_the_node_yield_and_the_desktop_does_not() -> None:
    settings = OwnerFirstSettings()
    reasons = assess(settings, TUE_1000, VOLUNTEER, own_pids=(), resident_bytes=0, planned_bytes=0)
    assert reasons == (
        Reason("owner_process", f"the owner's python3 (pid {OWNER_PID}) uses 6.0 GiB on GPU 0"),
    )  # Xorg is ignored
    # The same process is the node's own: nothing to yield to.
    assert (
        assess(settings, TUE_1000, VOLUNTEER, own_pids={OWNER_PID}, resident_bytes=0, planned_bytes=0) == ()
    )
    # A small GPU process does not count; nor does any when the owner turned the check off.
    assert (
        assess(
            OwnerFirstSettings(process_min_bytes=8 * GIB),
            TUE_1000,
            VOLUNTEER,
            own_pids=(),
            resident_bytes=0,
            planned_bytes=0,
        )
        == ()
    )
    assert (
        assess(
            OwnerFirstSettings(owner_processes=False),
            TUE_1000,
            VOLUNTEER,
            own_pids=(),
            resident_bytes=0,
            planned_bytes=0,
        )
        == ()
    )
    assert assess(settings, TUE_1000, QUIET, own_pids=(), resident_bytes=0, planned_bytes=0) == ()


def test_the_vram_ceiling_counts_what_hearth_holds_and_will_hold() -> None:
    # The two 3090s: 48 GiB in all, 6.8 GiB used by others. 90 % of it is 43.2 GiB.
    ceiling = OwnerFirstSettings(owner_processes=False, vram_ceiling=0.9)
    assert assess(ceiling, TUE_1000, VOLUNTEER, own_pids=(), resident_bytes=0, planned_bytes=30 * GIB) == ()
    (reason,) = assess(ceiling, TUE_1000, VOLUNTEER, own_pids=(), resident_bytes=0, planned_bytes=40 * GIB)
    assert reason.kind == "vram_ceiling"
    assert (
        reason.detail.startswith("other processes use 6.8 GiB of 48.0 GiB VRAM")
        and "90% ceiling" in reason.detail
    )
    # The node's own process is not "other": its memory is in planned_bytes already.
    assert (
        assess(ceiling, TUE_1000, VOLUNTEER, own_pids={OWNER_PID}, resident_bytes=0, planned_bytes=40 * GIB)
        == ()
    )
    # A node in a container (NVML does not show its pid): its resident models' estimate stands in for it.
    assert (
        assess(ceiling, TUE_1000, VOLUNTEER, own_pids=(), resident_bytes=6 * GIB, planned_bytes=40 * GIB)
        == ()
    )


class Paced(WrappedBackend):
    """The real demo backend at 10 ms a token, so an answer is still running when the owner arrives."""

    def generate(
        self, prompt_ids: Sequence[int], params: SamplingParams, cancelled: threading.Event
    ) -> Iterator[int]:
        for token in super().generate(prompt_ids, params, cancelled):
            time.sleep(0.01)
            yield token


class Gpus:
    """What NVML would say now: the test switches it between recorded probes."""

    def __init__(self) -> None:
        self.now = QUIET

    def __call__(self) -> NodeProbe:
        return self.now


LONG = {
    "model": "hearth-demo", "messages": [{"role": "user", "content": "go on"}], "max_tokens": 1500,
    "ignore_eos": True, "stream": True,
}  # fmt: skip


def test_a_volunteer_node_yields_to_its_owner_and_comes_back(
    servers: LoopThread, demo_model: ModelSettings, tmp_path: Path
) -> None:
    gpus = Gpus()
    owner = {
        "enabled": True, "check_interval": 0.05, "drain_seconds": 0.5, "release_after": 0.2, "resume_after": 0.5,
    }  # fmt: skip

    def loader(model: ModelSettings, settings: NodeSettings) -> Backend:
        return Paced(load_transformers(model, settings))  # type: ignore[return-value]

    stack = servers.call(
        start_stack(tmp_path, [demo_model], loader=loader, node={"owner_first": owner}, probe=gpus)
    )
    headers = {"Authorization": f"Bearer {stack.token}"}
    cli = CliRunner()
    try:
        status = cli.invoke(main, ["node", "status", "--data-dir", str(tmp_path)])
        assert status.exit_code == 0, status.output
        assert "state: serving" in status.output and "owner first: on; serves any time" in status.output

        with (
            httpx.Client(timeout=30) as client,
            client.stream("POST", stack.api + "/chat/completions", json=LONG, headers=headers) as running,
        ):
            assert running.status_code == 200
            lines = running.iter_lines()
            assert any(line.startswith("data: ") for line in (next(lines) for _ in range(4)))
            gpus.now = VOLUNTEER  # the owner starts their own work on GPU 0
            # The scheduler hears of it in a heartbeat and places around the node.
            servers.call(wait_for(_yielding(stack, True), within=10))
            refused = client.post(
                stack.api + "/chat/completions", json={**LONG, "stream": False}, headers=headers
            )
            assert refused.status_code == 503, refused.text
            # The club learns that the owner needs the machine, not what the owner runs.
            message = refused.json()["error"]["message"]
            assert (
                "yielding to its owner (its owner is using the GPU)" in message and "python3" not in message
            )
            # The running answer may finish for drain_seconds; this one is too long, so it is cancelled.
            assert '"code": "generation_failed"' in "\n".join(lines)

        servers.call(
            wait_for(_model_phase(stack, "available"), within=10)
        )  # unloaded: the VRAM is the owner's
        status = cli.invoke(main, ["node", "status", "--data-dir", str(tmp_path)])
        assert status.exit_code == 0, status.output
        assert "yielding to its owner" in status.output and "models unloaded" in status.output
        assert f"because the owner's python3 (pid {OWNER_PID}) uses 6.0 GiB on GPU 0" in status.output
        assert "reloaded when it serves again: hearth-demo" in status.output
        # The operator sees it too, with the reason.
        listed = cli.invoke(main, ["node", "list", "--scheduler", stack.base_url, "--token", stack.token])
        assert listed.exit_code == 0, listed.output
        assert "yes: its owner is using the GPU" in listed.output and "python3" not in listed.output

        gpus.now = QUIET  # the owner is done
        servers.call(wait_for(_yielding(stack, False), within=10))
        servers.call(wait_for(_model_phase(stack, "ready"), within=60))
        answer = httpx.post(
            stack.api + "/chat/completions",
            json={**LONG, "max_tokens": 5, "stream": False},
            headers=headers,
            timeout=30,
        )
        assert answer.status_code == 200, answer.text
        assert "state: serving" in cli.invoke(main, ["node", "status", "--data-dir", str(tmp_path)]).output
    finally:
        servers.call(stop_stack(stack))
    gone = cli.invoke(main, ["node", "status", "--data-dir", str(tmp_path)])
    assert gone.exit_code != 0 and "no node is running" in gone.output


def _yielding(stack: Stack, flag: bool) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return any(n.yielding == flag for n in stack.snapshot().nodes)

    return check


def _model_phase(stack: Stack, phase: str) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return any(m.phase == phase for n in stack.snapshot().nodes for m in n.models)

    return check


def test_a_node_started_outside_its_hours_loads_nothing_until_they_begin(
    servers: LoopThread, demo_model: ModelSettings, tmp_path: Path
) -> None:
    now = datetime.now().astimezone()
    # A one-minute window twelve hours from now: whatever the time, the node starts outside it.
    start = (now.hour + 12) % 24
    hours = [f"{start:02d}:00-{start:02d}:01"]
    node = {"owner_first": {"enabled": True, "hours": hours, "check_interval": 0.05}}
    stack = servers.call(start_stack(tmp_path, [demo_model], node=node, wait_ready=False))
    try:
        servers.call(wait_for(_yielding(stack, True), within=10))
        node_doc = httpx.get(stack.node_url + "/local/status", timeout=5).json()
        assert node_doc["owner_first"]["phase"] == "released"
        assert node_doc["owner_first"]["reasons"] == [f"outside its hours ({hours[0]})"]
        assert [m["phase"] for m in node_doc["models"]] == ["available"]
        assert node_doc["yield_reason"] == "outside the hours its owner lends it"
    finally:
        servers.call(stop_stack(stack))
