"""The planner's inputs as people write them: a model name or path, a fleet string, a trace.

Reads only local files the caller names (a config.json, a trace CSV); downloads nothing.
"""

from __future__ import annotations

import csv
import json
import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from hardware.catalog import GpuSpec, UnknownHardware, gpu, model
from hardware.model_spec import ModelSpec
from hardware.simulator import TraceRequest
from protocol.errors import ConfigError

__all__ = [
    "TRACES",
    "FleetEntry",
    "PlanInputError",
    "load_trace",
    "parse_fleet",
    "poisson_trace",
    "resolve_model",
    "resolve_trace",
]

# Trace names and their files (in the shared traces directory; see its README for the licence).
TRACES = {"azure-conv": "azure_llm_2023_conv.csv", "azure-code": "azure_llm_2023_code.csv"}
_FLEET_ITEM = re.compile(r"^\s*(?P<name>.+?)\s*[x×*]\s*(?P<count>\d+)\s*$", re.IGNORECASE)


class PlanInputError(ConfigError, ValueError):
    """An input the planner cannot read: a malformed fleet, a missing trace, a model it cannot find."""


@dataclass(frozen=True, slots=True)
class FleetEntry:
    gpu: GpuSpec
    count: int


def parse_fleet(text: str) -> tuple[FleetEntry, ...]:
    """ "4090x3,3090x4,A100-80GBx1" as catalog cards and counts (a name without a count means one)."""
    entries: dict[str, FleetEntry] = {}
    for item in text.split(","):
        if not item.strip():
            raise PlanInputError(
                f"--gpus {text!r}: an empty item; write cards as NAMExCOUNT, comma-separated"
            )
        m = _FLEET_ITEM.match(item)
        name, count = (m["name"], int(m["count"])) if m else (item.strip(), 1)
        if count < 1:
            raise PlanInputError(
                f"--gpus {text!r}: {item.strip()!r} has no cards (the count must be 1 or more)"
            )
        try:
            card = gpu(name)
        except UnknownHardware as exc:
            raise PlanInputError(exc.message) from None
        prior = entries.get(card.name)
        entries[card.name] = FleetEntry(card, count + (prior.count if prior else 0))
    return tuple(entries.values())


def resolve_model(text: str, search: Sequence[Path] = ()) -> ModelSpec:
    """A catalog model, a model directory or config.json path, or a Hugging Face id found in a local cache.

    `search` lists Hugging Face cache directories (layout ``models--org--name/snapshots/REV/config.json``)
    where an id's config.json may already be; nothing is downloaded.
    """
    try:
        return model(text)
    except UnknownHardware as unknown:
        path = Path(text).expanduser()
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            path = _cached_config(text, search) or path
        if not path.is_file():
            raise PlanInputError(
                f"{unknown.message.removesuffix('?')}, nor a model directory or config.json, nor a Hugging "
                "Face id with a config.json in the local cache"
            ) from None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PlanInputError(f"{path}: not a readable config.json ({exc})") from None
    if not isinstance(config, dict):
        raise PlanInputError(f"{path}: not a config.json (no JSON object)")
    name = text if not Path(text).expanduser().exists() else None
    return ModelSpec.from_hf_config(config, name=name or path.parent.name)


def _cached_config(hf_id: str, search: Sequence[Path]) -> Path | None:
    if not re.match(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$", hf_id):
        return None
    folder = "models--" + hf_id.replace("/", "--")
    for root in search:
        found = sorted((root / folder / "snapshots").glob("*/config.json"))
        if found:
            return found[-1]
    return None


def resolve_trace(text: str, trace_dir: Path) -> Path:
    """A trace name (`azure-conv`, `azure-code`) in `trace_dir`, or a CSV path."""
    path = trace_dir / TRACES[text] if text in TRACES else Path(text).expanduser()
    if not path.is_file():
        where = f"in {trace_dir}" if text in TRACES else "(names: " + ", ".join(TRACES) + ")"
        raise PlanInputError(f"trace {text!r}: no file {path} {where}")
    return path


def load_trace(path: Path, limit: int) -> list[TraceRequest]:
    """The first `limit` requests of a trace CSV, arrival times from its first request.

    Two layouts: the Azure 2023 one (TIMESTAMP, ContextTokens, GeneratedTokens) and a plain one
    (arrival_s, prompt_tokens, output_tokens), so a club can replay its own logs.
    """
    rows: list[TraceRequest] = []
    first: datetime | None = None
    try:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            cols = set(reader.fieldnames or ())
            azure = {"TIMESTAMP", "ContextTokens", "GeneratedTokens"} <= cols
            if not azure and not {"arrival_s", "prompt_tokens", "output_tokens"} <= cols:
                raise PlanInputError(
                    f"{path}: a trace needs the columns TIMESTAMP, ContextTokens, GeneratedTokens or "
                    "arrival_s, prompt_tokens, output_tokens"
                )
            for line, row in enumerate(reader, start=2):
                if len(rows) >= limit:
                    break
                try:
                    if azure:
                        when = datetime.fromisoformat(row["TIMESTAMP"][:26])
                        first = first or when
                        arrival = (when - first).total_seconds()
                        prompt, output = int(row["ContextTokens"]), int(row["GeneratedTokens"])
                    else:
                        arrival = float(row["arrival_s"])
                        prompt, output = int(row["prompt_tokens"]), int(row["output_tokens"])
                except (TypeError, ValueError):
                    raise PlanInputError(f"{path}, line {line}: not a time and two token counts") from None
                if prompt < 0 or output < 0 or not math.isfinite(arrival):
                    raise PlanInputError(f"{path}, line {line}: negative token count or odd time")
                rows.append(TraceRequest(arrival, max(1, prompt), max(1, output)))
    except (OSError, UnicodeDecodeError) as exc:
        raise PlanInputError(f"{path}: cannot read the trace ({exc})") from None
    if not rows:
        raise PlanInputError(f"{path}: the trace has no requests")
    rows.sort(key=lambda r: r.arrival)
    return rows


def poisson_trace(count: int, prompt_tokens: int, output_tokens: int, seed: int = 0) -> list[TraceRequest]:
    """`count` requests of one size arriving as a Poisson process of rate 1/s (scaled later)."""
    rng = random.Random(seed)
    now, rows = 0.0, []
    for _ in range(count):
        now += rng.expovariate(1.0)
        rows.append(TraceRequest(now, prompt_tokens, output_tokens))
    return rows
