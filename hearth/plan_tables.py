"""The terminal tables of `hearth plan`, drawn from its JSON-ready result document."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Section:
    """One answer of the plan as a table, and the lines that follow it (the HTML report draws the same)."""

    title: str
    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    notes: tuple[str, ...] = ()


def _table(title: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> Iterator[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    yield ""
    yield title
    yield "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip()
    for row in rows:
        yield "  ".join(
            c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )


def _n(value: Any, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def tables(doc: dict[str, Any]) -> Iterator[str]:
    """Fit, speed, the simulation sweep and cost, in that order."""
    for section in sections(doc):
        yield from _table(section.title, section.header, section.rows)
        yield from section.notes


def sections(doc: dict[str, Any], *, wide: bool = False) -> tuple[Section, Section, Section, Section]:
    """The fit, speed, simulation and cost tables of a plan's result document, formatted.

    The terminal's simulation table leaves out the whole request's median latency to stay within about 110
    columns (the JSON document has it); ``wide`` (the HTML report) shows it too.
    """
    fit = Section(
        "Fit (each copy of the model, split over its cards)",
        ("copy", "GiB per card", "weights GiB", "cache GiB", "cache tokens", "full contexts", "batch"),
        tuple(
            (
                f["copy"],
                " / ".join(f"{g:.1f}" for g in f["gib_per_card"]),
                f"{f['weights_gib']:.1f}",
                f"{f['cache_gib']:.1f}",
                str(f["cache_tokens"]),
                str(f["sequences_at_context"]),
                str(f["batch"]),
            )
            for f in doc["fit"]
        ),
        ("unused: " + ", ".join(doc["unused_cards"]) + " (too small to add a copy)",)
        if doc["unused_cards"]
        else (),
    )
    calibrated = doc["inputs"].get("calibration") or {}
    speed = Section(
        "Speed (tokens per second, "
        + ("measured where a card is calibrated, else estimated)" if calibrated else "estimated)"),
        ("copy", "prefill", "decode batch 1", "batch", "decode at batch", "per stream", "figures"),
        tuple(
            (
                s["copy"],
                f"{s['prefill_tokens_per_s']:.0f}",
                f"{s['decode_batch1_tokens_per_s']:.1f}",
                str(s["batch"]),
                f"{s['decode_batch_tokens_per_s']:.0f}",
                f"{s['stream_tokens_per_s_at_batch']:.1f}",
                s.get("figures", "estimated"),
            )
            for s in doc["speed"]
        ),
        tuple(
            f"{card}: {c['factor']:g}× the estimate, from {c['samples']} measurements ({c['source']}, "
            f"{c['when']})"
            for card, c in calibrated.items()
        ),
    )
    notes = [
        "TTFT, TPOT (each output token after the first) and latency in seconds; "
        "queue: requests not yet placed",
        f"most users within the service level: {doc['max_users']}",
    ]
    if doc["dropped_requests"]:
        notes.append(
            f"{doc['dropped_requests']} requests had a prompt or an answer as long as the context (the "
            "service would refuse them) and were left out"
        )
    simulation = Section(
        f"Simulation ({doc['inputs']['demand']}; {doc['inputs']['requests_per_user_hour']:g} requests per "
        "user-hour)",
        (
            "users",
            "req/s",
            "TTFT p50",
            "TTFT p99",
            "TPOT p50",
            "TPOT p99",
            *(
                ("latency p50", "latency p99", "queue mean", "queue max")
                if wide
                else ("latency p99", "queue mean/max")
            ),
            "goodput/s",
            "within SLO",
            "",
        ),
        tuple(
            (
                str(p["users"]),
                f"{p['requests_per_s']:.2f}",
                _n(p["ttft_p50_s"], ".2f"),
                _n(p["ttft_p99_s"], ".2f"),
                _n(p["tpot_p50_s"], ".3f"),
                _n(p["tpot_p99_s"], ".3f"),
                *((_n(p["latency_p50_s"], ".1f"),) if wide else ()),
                _n(p["latency_p99_s"], ".1f"),
                *(
                    (f"{p['queue_mean']:.1f}", str(p["queue_max"]))
                    if wide
                    else (f"{p['queue_mean']:.1f}/{p['queue_max']}",)
                ),
                f"{p['goodput_rps']:.2f}",
                f"{p['within_slo']:.1%}",
                "ok" if p["ok"] else "no",
            )
            for p in doc["sweep"]
        ),
        tuple(notes),
    )
    cost = doc["cost"]
    money = Section(
        f"Cost for {doc['cost_users']} users ({cost['tokens_per_month'] / 1e6:,.0f} M tokens a month, "
        f"cards {cost['utilisation']:.0%} busy)",
        ("option", "$ per month", "$ per M tokens", "how"),
        tuple(
            (o["name"], _n(o["usd_per_month"], ",.0f"), _n(o["usd_per_million_tokens"], ".2f"), o["note"])
            for o in cost["options"]
        ),
    )
    return fit, speed, simulation, money


SEARCH_ROWS = 12  # fleets the terminal lists at most; the JSON document has them all


def search_table(search: dict[str, Any]) -> Iterator[str]:
    """The fleets `--search` simulated, cheapest first, and which serve the users asked; a long run of
    cheaper fleets that fell short is shortened to its dearest few."""
    users = search["users"]
    rows = [
        [
            c["fleet"],
            f"{c['usd_per_month']:,.0f}",
            str(c["estimated_users"]),
            _served(c, users),
            ("ok, cheapest" if c == search["best"] else "ok") if c["ok"] else "no",
        ]
        for c in search["tried"]
    ]
    if len(rows) > SEARCH_ROWS:
        hidden = len(rows) - SEARCH_ROWS + 1
        rows = [[f"… {hidden} cheaper fleets", "", "", f"<{users}", "no"], *rows[hidden:]]
    yield from _table(
        f"Search ({search['fleets_in_list']} fleets in the list, {search['fleets_costed']} costed, "
        f"{search['simulations']} simulation runs; $ per month to own)",
        ["fleet", "$ per month", "est. capacity", "max users", f"{users} users"],
        rows,
    )


def _served(candidate: dict[str, Any], users: int) -> str:
    """The users a fleet serves: the sweep's figure, or what the check at N users showed (≥N or <N)."""
    if candidate["swept"]:
        return str(candidate["max_users"])
    return f"≥{users}" if candidate["ok"] else f"<{users}"
