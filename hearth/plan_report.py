"""`hearth plan --report DIR`: the plan as one self-contained HTML page with its plots (docs/planning.md).

The page holds the verdict, then the same four answers as the terminal (fit, speed, simulation, cost), each
a table and a plot. The plots are PNGs drawn with matplotlib's Agg renderer, written beside the page and
embedded in it as data URIs, so the page can be mailed or archived alone: no external CSS, script or font.
matplotlib is imported only here, and only when a report is asked for.
"""

from __future__ import annotations

import base64
import html
import io
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hardware.catalog import gpu
from hardware.estimator import DEFAULT_RESERVE_BYTES, decode_tokens_per_s
from hardware.plan import PlanInput, _effective, form_copies
from hardware.plan_inputs import PlanInputError
from hearth.plan_tables import Section, sections

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["PLOTS", "decode_curves", "write_report"]

# The plots, in the order the page shows them: file name and what each shows (the image's alt text).
PLOTS = {
    "vram": "VRAM per card: weights, cache, reserve and free memory",
    "throughput": "Decode tokens per second against the batch, per copy",
    "ttft": "TTFT p50 and p99 against the number of users, with the service level",
    "cost": "Cost per month of owning, renting and an API",
}
_RESERVE_GIB = DEFAULT_RESERVE_BYTES / 2**30
_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 62rem; margin: 2rem auto; padding: 0 1rem;
       color: #222; line-height: 1.4; }
.verdict { font-size: 1.2rem; font-weight: 600; border-left: 4px solid #3a7; padding-left: 0.8rem; }
table { border-collapse: collapse; margin: 0.6rem 0; font-size: 0.9rem; }
th, td { border-bottom: 1px solid #ddd; padding: 0.2rem 0.6rem; text-align: right; }
th:first-child, td:first-child { text-align: left; }
img { max-width: 100%; display: block; margin: 0.6rem 0 1.4rem; }
"""


@dataclass(frozen=True, slots=True)
class Curve:
    copy: str
    batches: tuple[int, ...]
    tokens_per_s: tuple[float, ...]  # decode, summed over the batch


def decode_curves(request: PlanInput, doc: dict[str, Any]) -> tuple[Curve, ...]:
    """Each distinct copy's decode tokens/s from batch 1 to the batch its cache allows (as the plan's speed).

    The copies are formed again from the request (it is cheap and deterministic) to get the device that
    stands for each; the context per sequence is the demand's mean request size, as in the speed table.
    """
    copies, _ = form_copies(request)
    mean_tokens = statistics.fmean(
        min(request.context, r.prompt_tokens + r.output_tokens) for r in request.trace
    )
    ctx = min(request.context, round(mean_tokens))
    curves: dict[str, Curve] = {}
    for copy, fit in zip(copies, doc["fit"], strict=True):
        if copy.label in curves:
            continue
        device = _effective(copy, request)
        batches = tuple(range(1, int(fit["batch"]) + 1))
        speeds = tuple(
            decode_tokens_per_s(request.model, request.bits, device, b, ctx, cache_bits=request.cache_bits)
            for b in batches
        )
        curves[copy.label] = Curve(copy.label, batches, speeds)
    return tuple(curves.values())


def write_report(directory: Path, doc: dict[str, Any], json_text: str, curves: Sequence[Curve]) -> None:
    """Write report.html, plan.json and one PNG per plot into `directory` (created if missing)."""
    pngs = _plots(doc, curves)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        for name, data in pngs.items():
            (directory / f"{name}.png").write_bytes(data)
        (directory / "plan.json").write_text(json_text, encoding="utf-8")
        (directory / "report.html").write_text(_page(doc, pngs), encoding="utf-8")
    except OSError as exc:
        raise PlanInputError(f"cannot write the report to {directory}: {exc.strerror}") from None


# ----- the page -----


def _page(doc: dict[str, Any], pngs: dict[str, bytes]) -> str:
    e = html.escape
    fit, speed, simulation, cost = sections(doc, wide=True)
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>hearth plan: {e(str(doc['inputs']['model']))} on {e(str(doc['inputs']['fleet']))}</title>",
        f"<style>{_STYLE}</style></head><body>",
        f'<p class="verdict">{e(doc["verdict"])}</p>',
        "<h2>Inputs</h2>",
        _table(("input", "value"), [(k, _plain(v)) for k, v in doc["inputs"].items()]),
    ]
    for heading, section, plot in (
        ("Fit", fit, "vram"),
        ("Speed", speed, "throughput"),
        ("Simulation", simulation, "ttft"),
        ("Cost", cost, "cost"),
    ):
        parts += [f"<h2>{e(heading)}</h2>", *_section(section), _img(plot, pngs[plot])]
    parts.append("<p><small>Estimates, not measurements: see docs/planning.md.</small></p></body></html>")
    return "\n".join(parts) + "\n"


def _section(section: Section) -> list[str]:
    return [
        f"<p>{html.escape(section.title)}</p>",
        _table(section.header, section.rows),
        *(f"<p>{html.escape(note)}</p>" for note in section.notes),
    ]


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _plain(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k}: {_plain(v)}" for k, v in value.items()) or "-"
    return "-" if value is None else str(value)


def _img(name: str, png: bytes) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(PLOTS[name])}">'


# ----- the plots -----


def _plots(doc: dict[str, Any], curves: Sequence[Curve]) -> dict[str, bytes]:
    # The Agg canvas is attached to each figure by hand: no pyplot, so no global backend or figure list.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    def figure() -> tuple[Figure, Axes]:
        fig = Figure(figsize=(7.5, 3.8), dpi=100, layout="constrained")
        FigureCanvasAgg(fig)
        return fig, fig.add_subplot()

    drawn: dict[str, bytes] = {}
    for name in PLOTS:
        fig, ax = figure()
        if name == "vram":
            _vram(ax, doc)
        elif name == "throughput":
            _throughput(ax, curves)
        elif name == "ttft":
            _ttft(ax, doc)
        else:
            _cost(ax, doc)
        drawn[name] = _png(fig)
    return drawn


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _vram(ax: Axes, doc: dict[str, Any]) -> None:
    """Stacked GiB per card; a copy's weights and cache are shared out over its cards in one proportion."""
    labels: list[str] = []
    stacks: dict[str, list[float]] = {"weights": [], "cache": [], "reserve": [], "free": []}
    for i, fit in enumerate(doc["fit"], 1):
        model = fit["weights_gib"] + fit["cache_gib"]
        for card, held in zip(fit["cards"], fit["gib_per_card"], strict=True):
            own = max(0.0, held - _RESERVE_GIB)
            labels.append(f"copy {i}\n{card}")
            stacks["weights"].append(own * fit["weights_gib"] / model if model else 0.0)
            stacks["cache"].append(own * fit["cache_gib"] / model if model else 0.0)
            stacks["reserve"].append(min(held, _RESERVE_GIB))
            stacks["free"].append(max(0.0, gpu(card).vram_gib - held))
    for card in doc["unused_cards"]:
        labels.append(f"unused\n{card}")
        for key in ("weights", "cache", "reserve"):
            stacks[key].append(0.0)
        stacks["free"].append(gpu(card).vram_gib)
    bottom = [0.0] * len(labels)
    colours = {"weights": "#3b6ea5", "cache": "#6ab187", "reserve": "#d9a441", "free": "#dddddd"}
    where = range(len(labels))  # positions, not the labels: the two cards of one copy share a label
    for key, values in stacks.items():
        ax.bar(where, values, bottom=bottom, label=key, color=colours[key])
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax.set_xticks(where, labels)
    ax.set_ylabel("GiB")
    ax.set_title("VRAM per card")
    ax.tick_params(axis="x", labelsize=8)
    ax.legend(fontsize=8, ncols=4, loc="upper left")
    ax.set_ylim(0, max(bottom) * 1.2)


def _throughput(ax: Axes, curves: Sequence[Curve]) -> None:
    for curve in curves:
        ax.plot(curve.batches, curve.tokens_per_s, marker="o", markersize=3, label=curve.copy)
        ax.annotate(
            f"batch {curve.batches[-1]}: {curve.tokens_per_s[-1]:,.0f}",
            (curve.batches[-1], curve.tokens_per_s[-1]),
            textcoords="offset points", xytext=(-4, 6), ha="right", fontsize=8,
        )  # fmt: skip
    ax.set_xlabel("sequences decoded at once (up to the batch the cache allows)")
    ax.set_ylabel("decode tokens/s, whole batch")
    ax.set_title("Throughput against batch, per copy")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)


def _ttft(ax: Axes, doc: dict[str, Any]) -> None:
    slo = float(doc["inputs"]["slo"]["ttft_p99_s"])
    seen: list[float] = [slo]
    for key, label, style in (("ttft_p99_s", "TTFT p99", "o-"), ("ttft_p50_s", "TTFT p50", "s--")):
        points = [(p["users"], p[key]) for p in doc["sweep"] if p[key] is not None and p[key] > 0]
        if points:
            ax.plot([u for u, _ in points], [t for _, t in points], style, markersize=4, label=label)
            seen += [t for _, t in points]
    ax.axhline(slo, color="#c0392b", linewidth=1, label=f"service level {slo:g} s")
    if doc["max_users"]:
        ax.axvline(doc["max_users"], color="#3a7", linestyle=":", label=f"{doc['max_users']} users within it")
    if max(seen) / min(seen) > 20:  # a queue that has run away would flatten everything else
        ax.set_yscale("log")
    ax.set_xlabel("users")
    ax.set_ylabel("seconds to first token")
    ax.set_title("Time to first token against users (simulated)")
    ax.legend(fontsize=8)


def _cost(ax: Axes, doc: dict[str, Any]) -> None:
    options = doc["cost"]["options"]
    values = [o["usd_per_month"] or 0.0 for o in options]
    bars = ax.bar(
        [o["name"] for o in options], values, color=["#3b6ea5", "#d9a441", "#8e6bb1"][: len(values)]
    )
    ax.bar_label(
        bars,
        labels=["no price" if o["usd_per_month"] is None else f"${o['usd_per_month']:,.0f}" for o in options],
        fontsize=8,
    )
    ax.set_ylabel("$ per month")
    ax.set_title(f"Cost per month for {doc['cost_users']} users")
    top = max(values) if values and math.isfinite(max(values)) else 0.0
    ax.set_ylim(0, top * 1.2 or 1.0)
