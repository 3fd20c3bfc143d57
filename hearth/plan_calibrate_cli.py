"""`hearth plan calibrate`: per-card speed factors from measured figures, kept for every later plan.

Also what `hearth plan` shares with it: where the factors are stored, and reading the live cluster.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import click

from hearth.cli_common import (
    OneLineUsageCommand,
    data_dir_option,
    errors_as_one_line,
    run_admin,
    scheduler_option,
    settings_for,
    token_option,
)
from hearth.cli_common import scheduler_url as resolved_url

if TYPE_CHECKING:
    from hardware.calibration import CardCalibration, Sample, Skipped
    from hardware.model_spec import ModelSpec
    from protocol.admin import NodeList


def hf_caches() -> list[Path]:
    """Where a Hugging Face id's config.json may already be: the hub cache and the data directory's hf/."""
    hub = os.environ.get("HF_HUB_CACHE") or str(
        Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface") / "hub"
    )
    data = os.environ.get("HEARTH_DATA_DIR") or str(
        Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "hearth"
    )
    return [Path(hub), Path(data) / "hf"]


def calibration_path(data_dir: Path | None) -> Path:
    """The calibration file in the data directory (--data-dir, else the settings' data_dir)."""
    from hardware.calibration import FILE_NAME

    return settings_for(None, data_dir).data_dir / FILE_NAME


def cluster_nodes(url: str | None, token: str | None) -> NodeList:
    """The scheduler's node list (GET /admin/nodes) with an admin token; HearthError if it cannot be read."""
    return run_admin(url, token, lambda client: client.nodes())


def _resolve(model_id: str) -> ModelSpec | str:
    from hardware.plan_inputs import PlanInputError, resolve_model

    try:
        return resolve_model(model_id, hf_caches())
    except PlanInputError as exc:
        return f"model unknown to the planner ({exc.message})"


def _echo_samples(samples: list[Sample], skipped: list[Skipped]) -> None:
    for s in samples:
        click.echo(
            f"used     {s.what}: measured {s.measured_tokens_per_s:,.1f} tokens/s, estimated "
            f"{s.estimated_tokens_per_s:,.1f} ({s.ratio:.2f}×)"
        )
    for k in skipped:
        click.echo(f"skipped  {k.what}: {k.reason}")


def _echo_stored(cards: dict[str, CardCalibration], path: Path) -> None:
    if not cards:
        click.echo(f"no calibration stored ({path}): every plan uses the estimator's figures")
        return
    click.echo(f"calibration in {path}:")
    for c in cards.values():
        click.echo(
            f"  {c.card}: {c.factor:g}× the estimate, {c.samples} samples, {c.source}, {c.measured_at}"
        )


@click.command(cls=OneLineUsageCommand)
@click.option(
    "--bench",
    "bench_files",
    multiple=True,
    type=click.Path(dir_okay=False, path_type=Path),
    metavar="FILE",
    help="The GPU benchmark's JSON (tests/bench/bench_exl2.py --json); repeatable.",
)
@click.option(
    "--cluster", is_flag=True, help="Read measured speeds from the scheduler's node list (its heartbeats)."
)
@scheduler_option
@token_option
@click.option("--show", is_flag=True, help="Print the stored factors and change nothing.")
@click.option("--reset", is_flag=True, help="Forget every stored factor.")
@data_dir_option
@errors_as_one_line(2, ValueError)
def calibrate(
    bench_files: tuple[Path, ...],
    cluster: bool,
    scheduler_url: str | None,
    token: str | None,
    show: bool,
    reset: bool,
    data_dir: Path | None,
) -> None:
    """Fit per-card speed factors to measured figures; every later `hearth plan` uses them."""
    from hardware import calibration
    from hardware.measured import bench_samples, cluster_samples

    path = calibration_path(data_dir)
    actions = sum((bool(bench_files) or cluster, show, reset))
    if actions != 1:
        raise calibration.CalibrationError("choose one: --bench FILE and/or --cluster, --show, or --reset")
    if show:
        _echo_stored(calibration.load(path), path)
        return
    if reset:
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            raise calibration.CalibrationError(f"cannot remove {path}: {exc.strerror}") from None
        click.echo(f"calibration removed ({path}): plans use the estimator's figures")
        return
    calibration.load(path)  # a broken file is refused before anything is measured
    samples: list[Sample] = []
    skipped: list[Skipped] = []
    sources: list[str] = []
    for file in bench_files:
        try:
            doc = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not JSON"
            raise calibration.CalibrationError(f"cannot read {file}: {reason}") from None
        found, left = bench_samples(doc, str(file))
        samples += found
        skipped += left
        sources.append(f"bench {file.name}")
    if cluster:
        nodes = cluster_nodes(scheduler_url, token)
        found, left = cluster_samples(nodes, _resolve)
        samples += found
        skipped += left
        sources.append(f"cluster {resolved_url(scheduler_url)}")
    _echo_samples(samples, skipped)
    now = datetime.now(UTC).replace(microsecond=0).isoformat()
    fitted = calibration.fit(samples, " + ".join(sources), now)
    stored = calibration.save(path, fitted, samples)
    for c in fitted.values():
        click.echo(f"{c.card}: {c.factor:g}× the estimate (median of {c.samples} samples)")
    _echo_stored(stored, path)
