"""Per-card speed factors fitted to measured figures (`hearth plan calibrate`), and the cards they make.

A factor is measured speed over estimated speed for one catalog card, the median over its samples (each
sample estimated at its own batch and context, see `hardware.measured`). It scales the card's bandwidth,
compute and boost clock together: every term of the estimator's decode and prefill times is divided by one
of the three, so each estimate of that card (the fit's speed table, the sweep's capacity, the simulator's
devices, the report's curves) moves by exactly the factor, and nothing has to know it is calibrated.

The factors live in the data directory as ``plan-calibration.json`` (format 1):
``{"format": 1, "cards": {CARD: {"factor", "samples", "source", "measured_at", "measurements": [...]}}}``,
one entry per catalog card name; a later calibration replaces the cards it measured and keeps the others.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hardware.catalog import GpuSpec, UnknownHardware, gpu
from hardware.plan_inputs import FleetEntry, PlanInputError

__all__ = [
    "FILE_NAME",
    "MAX_FACTOR",
    "MIN_FACTOR",
    "CalibrationError",
    "CardCalibration",
    "Sample",
    "Skipped",
    "apply",
    "calibrated_gpu",
    "fit",
    "load",
    "save",
]

FORMAT_VERSION = 1
FILE_NAME = "plan-calibration.json"
# A card 5× slower or 3× faster than its datasheet says is not a card the estimator describes: more likely
# the wrong card, a throttled one, another engine, or a model read wrongly. Refused rather than stored.
MIN_FACTOR, MAX_FACTOR = 0.2, 3.0


class CalibrationError(PlanInputError):
    """Measured figures that cannot be fitted, an absurd factor, or a calibration file that is unreadable."""


@dataclass(frozen=True, slots=True)
class Sample:
    """One measured figure and the estimate for the same card, model, batch and context."""

    card: str  # catalog name
    what: str  # what was measured, in words ("Llama-3.1-8B at 16 bpw, 128-token prompts × 4 streams")
    batch: int
    context: int
    measured_tokens_per_s: float
    estimated_tokens_per_s: float

    @property
    def ratio(self) -> float:
        return self.measured_tokens_per_s / self.estimated_tokens_per_s


@dataclass(frozen=True, slots=True)
class Skipped:
    """A figure that could not be read as a sample, and why."""

    what: str
    reason: str


@dataclass(frozen=True, slots=True)
class CardCalibration:
    card: str
    factor: float
    samples: int
    source: str  # "bench FILE" or "cluster URL"
    measured_at: str  # ISO 8601, UTC

    def summary(self) -> dict[str, Any]:
        """What a plan's inputs carry about this card's figures."""
        return {
            "factor": self.factor,
            "source": self.source,
            "samples": self.samples,
            "when": self.measured_at,
        }


def _in_band(factor: float) -> bool:
    return math.isfinite(factor) and MIN_FACTOR <= factor <= MAX_FACTOR


def fit(samples: Sequence[Sample], source: str, measured_at: str) -> dict[str, CardCalibration]:
    """One factor per card: the median of its samples' measured/estimated ratios.

    CalibrationError when there is no sample, or when a card's factor is outside MIN_FACTOR..MAX_FACTOR
    (nothing is fitted then: a run that measured something wrongly should not half-apply).
    """
    if not samples:
        raise CalibrationError("no measured figure could be used, so nothing was calibrated (see above)")
    by_card: dict[str, list[Sample]] = {}
    for s in samples:
        by_card.setdefault(s.card, []).append(s)
    fitted: dict[str, CardCalibration] = {}
    for card, own in by_card.items():
        factor = statistics.median(s.ratio for s in own)
        if not _in_band(factor):
            raise CalibrationError(
                f"{card} measured {factor:.2f}× its estimated speed (median of {len(own)} samples), outside "
                f"{MIN_FACTOR:g}–{MAX_FACTOR:g}: not stored; check that the figures are this card's and this "
                "model's"
            )
        fitted[card] = CardCalibration(card, round(factor, 4), len(own), source, measured_at)
    return fitted


def calibrated_gpu(card: GpuSpec, factor: float) -> GpuSpec:
    """The card with bandwidth, compute and clock scaled by `factor`: every speed estimate moves by it."""
    return dataclasses.replace(
        card,
        bandwidth_gbs=card.bandwidth_gbs * factor,
        fp16_tflops=card.fp16_tflops * factor,
        boost_clock_ghz=card.boost_clock_ghz * factor,
    )


def apply(fleet: Iterable[FleetEntry], calibration: Mapping[str, CardCalibration]) -> tuple[FleetEntry, ...]:
    """The fleet with each calibrated card replaced by its calibrated spec (same name, price and memory)."""
    return tuple(
        FleetEntry(calibrated_gpu(e.gpu, calibration[e.gpu.name].factor), e.count)
        if e.gpu.name in calibration
        else e
        for e in fleet
    )


def load(path: Path) -> dict[str, CardCalibration]:
    """The stored factors by card name; none when the file does not exist."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise CalibrationError(f"cannot read {path}: {exc.strerror}") from None
    fix = "fix it or run `hearth plan calibrate --reset`"
    try:
        doc = json.loads(text)
        if doc.get("format") != FORMAT_VERSION:
            raise CalibrationError(f"{path}: not a calibration file of format {FORMAT_VERSION}; {fix}")
        found: dict[str, CardCalibration] = {}
        for name, entry in doc["cards"].items():
            card = gpu(name).name
            factor = float(entry["factor"])
            if not _in_band(factor):
                raise CalibrationError(
                    f"{path}: {card}'s factor {factor:g} is outside {MIN_FACTOR:g}–{MAX_FACTOR:g}; {fix}"
                )
            found[card] = CardCalibration(
                card, factor, int(entry["samples"]), str(entry["source"]), str(entry["measured_at"])
            )
    except CalibrationError:
        raise
    except UnknownHardware as exc:
        raise CalibrationError(f"{path}: {exc.message}; {fix}") from None
    except (ValueError, TypeError, KeyError, AttributeError):
        raise CalibrationError(f"{path}: not a readable calibration file; {fix}") from None
    return found


def save(
    path: Path, cards: Mapping[str, CardCalibration], measurements: Sequence[Sample] = ()
) -> dict[str, CardCalibration]:
    """Store `cards` over what `path` holds (other cards' factors stay), with the samples behind them.

    Written to a temporary file and renamed, so a plan never reads half a file. Returns all stored cards.
    """
    merged = {**load(path), **cards}
    old: dict[str, Any] = {}
    if path.is_file():
        old = json.loads(path.read_text(encoding="utf-8")).get("cards", {})
    entries: dict[str, Any] = {}
    for name, c in sorted(merged.items()):
        if name in cards:
            own = [
                dataclasses.asdict(s) | {"ratio": round(s.ratio, 4)} for s in measurements if s.card == name
            ]
        else:
            own = old.get(name, {}).get("measurements", [])
        entries[name] = {
            "factor": c.factor, "samples": c.samples, "source": c.source, "measured_at": c.measured_at,
            "measurements": own,
        }  # fmt: skip
    text = json.dumps({"format": FORMAT_VERSION, "cards": entries}, indent=2) + "\n"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        part = path.with_name(path.name + ".part")
        part.write_text(text, encoding="utf-8")
        part.replace(path)
    except OSError as exc:
        raise CalibrationError(f"cannot write {path}: {exc.strerror}") from None
    return merged
