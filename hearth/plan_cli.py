"""`hearth plan`: which GPUs, how many, at what cost, for N users of model M (docs/planning.md)."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from click.core import ParameterSource

from hearth.cli_common import (
    OneLineUsageGroup,
    data_dir_option,
    errors_as_one_line,
    scheduler_option,
    token_option,
)
from hearth.cli_common import scheduler_url as scheduler_url_for
from hearth.plan_calibrate_cli import calibrate, calibration_path, cluster_nodes, hf_caches
from protocol.errors import ConfigError

if TYPE_CHECKING:
    from hardware.plan_inputs import FleetEntry

# The traces ship beside the repository (../shared/traces), not inside the package; $HEARTH_TRACE_DIR or
# --trace-dir points elsewhere.
_DEFAULT_TRACE_DIR = Path(__file__).resolve().parents[2] / "shared" / "traces"


def register(main: click.Group) -> None:
    main.add_command(plan)
    plan.add_command(calibrate)


# A bad input is the user's to fix: one line on stderr, exit status 2 (as for usage errors); ValueError
# carries the estimator's own checks (bits, cache bits, prices).
_errors_exit_2 = errors_as_one_line(2, ValueError)


def _prices_by_card(values: Sequence[str], option: str) -> dict[str, float]:
    from hardware.catalog import UnknownHardware, gpu
    from hardware.plan_inputs import PlanInputError

    table: dict[str, float] = {}
    for value in values:
        name, sep, amount = value.rpartition("=")
        try:
            price = float(amount)
            card = gpu(name)
        except ValueError:
            raise PlanInputError(
                f"{option} {value!r}: write CARD=PRICE, e.g. '{option} \"RTX 4090=1800\"'"
            ) from None
        except UnknownHardware as exc:
            raise PlanInputError(f"{option} {value!r}: {exc.message}") from None
        if not sep:
            raise PlanInputError(f"{option} {value!r}: write CARD=PRICE")
        table[card.name] = price
    return table


@click.group(cls=OneLineUsageGroup, invoke_without_command=True)
@click.option(
    "--model",
    "model_name",
    metavar="NAME_OR_PATH",
    help="A catalog model (Llama-3.1-70B), a model directory or config.json, or a cached HF id.",
)
@click.option("--gpus", metavar="LIST", help='Cards and counts, e.g. "4090x3,3090x4,A100-80GBx1".')
@click.option(
    "--cluster",
    is_flag=True,
    help="Plan the live cluster's cards (the approved nodes', from the scheduler's admin API).",
)
@scheduler_option
@token_option
@click.option("--no-calibration", is_flag=True, help="Ignore the stored calibration: every figure estimated.")
@data_dir_option
@click.option("--bits", type=float, default=4.0, show_default=True, help="Bits per weight (EXL2 2-8, or 16).")
@click.option("--cache-bits", type=int, default=16, show_default=True, help="Cache precision: 16, 8, 6 or 4.")
@click.option("--context", type=int, default=8192, show_default=True, help="Context length per sequence.")
@click.option(
    "--users", type=int, default=None, help="Users to plan for (the verdict says whether they fit)."
)
@click.option("--rate", type=float, default=6.0, show_default=True, help="Requests per user-hour at peak.")
@click.option(
    "--trace",
    default=None,
    metavar="NAME_OR_CSV",
    help="Demand shape: azure-conv, azure-code or a CSV (default: Poisson arrivals of one size).",
)
@click.option(
    "--trace-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where the named traces are (default: $HEARTH_TRACE_DIR, else ../shared/traces).",
)
@click.option(
    "--requests",
    type=int,
    default=2000,
    show_default=True,
    help="Requests replayed per simulated user count (at most 10000 recommended).",
)
@click.option(
    "--prompt-tokens", type=int, default=1000, show_default=True, help="Prompt size without --trace."
)
@click.option(
    "--output-tokens", type=int, default=250, show_default=True, help="Answer size without --trace."
)
@click.option("--slo-ttft", type=float, default=2.0, show_default=True, help="TTFT p99 target in seconds.")
@click.option(
    "--slo-tps", type=float, default=10.0, show_default=True, help="Tokens per second each stream must get."
)
@click.option("--price-card", multiple=True, metavar="CARD=USD", help="A card's price (repeatable).")
@click.option(
    "--price-cloud", multiple=True, metavar="CARD=USD", help="A card's rental per GPU-hour (repeatable)."
)
@click.option("--price-kwh", type=float, default=None, help="Electricity in $ per kWh (default 0.17).")
@click.option("--price-api", type=float, default=None, help="An API's $ per million tokens (default 0.88).")
@click.option("--hours", type=float, default=None, help="Hours of use per day (default 24).")
@click.option("--years", type=float, default=None, help="Years the cards are amortised over (default 3).")
@click.option(
    "--search",
    is_flag=True,
    help="Read --gpus as a shopping list (at most so many of each); find the cheapest fleet for --users.",
)
@click.option(
    "--json",
    "json_file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also write the whole result as JSON to this file.",
)
@click.option(
    "--report",
    "report_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    metavar="DIR",
    help="Also write an HTML report with plots (report.html, plan.json, *.png) into this directory.",
)
@_errors_exit_2
def plan(
    model_name: str | None,
    gpus: str | None,
    cluster: bool,
    scheduler_url: str | None,
    token: str | None,
    no_calibration: bool,
    data_dir: Path | None,
    bits: float,
    cache_bits: int,
    context: int,
    users: int | None,
    rate: float,
    trace: str | None,
    trace_dir: Path | None,
    requests: int,
    prompt_tokens: int,
    output_tokens: int,
    slo_ttft: float,
    slo_tps: float,
    price_card: tuple[str, ...],
    price_cloud: tuple[str, ...],
    price_kwh: float | None,
    price_api: float | None,
    hours: float | None,
    years: float | None,
    search: bool,
    json_file: Path | None,
    report_dir: Path | None,
) -> None:
    """Whether a fleet of GPUs serves a model to N users within a service level, and what it costs."""
    ctx = click.get_current_context()
    if ctx.invoked_subcommand is not None:
        options = [
            p.opts[0] for p in ctx.command.params
            if ctx.get_parameter_source(p.name or "") == ParameterSource.COMMANDLINE
        ]  # fmt: skip
        if options:
            raise ConfigError(
                f"{options[0]} is an option of `hearth plan`, not of `hearth plan {ctx.invoked_subcommand}`"
            )
        return
    from hardware import calibration
    from hardware import plan_inputs as inputs
    from hardware.plan import PlanInput, ServiceLevel
    from hardware.prices import Prices

    if model_name is None:
        raise inputs.PlanInputError("missing --model: the model to plan for (e.g. --model Llama-3.1-70B)")
    if (gpus is None) == (not cluster):
        raise inputs.PlanInputError(
            "choose one: --gpus LIST (cards and counts) or --cluster (the live cluster)"
        )
    if requests < 1 or prompt_tokens < 1 or output_tokens < 1:
        raise inputs.PlanInputError("--requests, --prompt-tokens and --output-tokens must be at least 1")
    given = {
        "electricity_usd_per_kwh": price_kwh,
        "api_usd_per_million_tokens": price_api,
        "hours_per_day": hours,
        "amortisation_years": years,
    }
    prices = Prices(
        card_usd=_prices_by_card(price_card, "--price-card"),
        cloud_usd_per_gpu_hour=_prices_by_card(price_cloud, "--price-cloud"),
        **{k: v for k, v in given.items() if v is not None},
    )
    if trace is None:
        shape = inputs.poisson_trace(requests, prompt_tokens, output_tokens)
        demand = f"Poisson arrivals, {prompt_tokens}-token prompts, {output_tokens}-token answers"
    else:
        where = trace_dir or Path(os.environ.get("HEARTH_TRACE_DIR") or _DEFAULT_TRACE_DIR)
        shape = inputs.load_trace(inputs.resolve_trace(trace, where), requests)
        demand = f"trace {trace}, {len(shape)} requests"
    spec = inputs.resolve_model(model_name, hf_caches())
    fleet = inputs.parse_fleet(gpus) if gpus is not None else _cluster_fleet(scheduler_url, token)
    stored = {} if no_calibration else calibration.load(calibration_path(data_dir))
    used = {e.gpu.name: stored[e.gpu.name] for e in fleet if e.gpu.name in stored}
    request = PlanInput(
        model=spec,
        fleet=calibration.apply(fleet, used),
        calibration=used,
        trace=tuple(shape),
        demand=demand,
        bits=bits,
        cache_bits=cache_bits,
        context=context,
        users=users,
        requests_per_user_hour=rate,
        slo=ServiceLevel(slo_ttft, slo_tps),
        prices=prices,
    )
    if report_dir is not None:  # a directory that cannot be made fails now, not after the simulation
        try:
            report_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise inputs.PlanInputError(f"cannot write the report to {report_dir}: {exc.strerror}") from None
    if search:
        found = _run(request, search=True)
        result = found.plan
        doc = {**result.to_dict(), "search": found.to_dict()}
    else:
        result = _run(request)
        doc = result.to_dict()
    json_text = json.dumps(doc, indent=2) + "\n"
    if json_file is not None:
        try:
            json_file.write_text(json_text, encoding="utf-8")
        except OSError as exc:
            raise inputs.PlanInputError(f"cannot write {json_file}: {exc.strerror}") from None
    if report_dir is not None:
        from hearth.plan_report import decode_curves, write_report

        write_report(report_dir, doc, json_text, decode_curves(request, doc))
    from hearth.plan_tables import search_table, tables

    if search:
        click.echo(found.verdict)
        for line in search_table(doc["search"]):
            click.echo(line)
        click.echo("")
        click.echo(f"The plan for {result.inputs['fleet']}:")
    click.echo(result.verdict)
    for line in tables(doc):
        click.echo(line)


def _cluster_fleet(url: str | None, token: str | None) -> tuple[FleetEntry, ...]:
    """The approved nodes' cards; nodes whose cards are unknown are left out, one line each on stderr."""
    from hardware.measured import cluster_fleet
    from hardware.plan_inputs import PlanInputError

    fleet, skipped = cluster_fleet(cluster_nodes(url, token))
    for k in skipped:
        click.echo(f"hearth: warning: {k.what} left out of the fleet: {k.reason}", err=True)
    if not fleet:
        raise PlanInputError(
            f"the cluster at {scheduler_url_for(url)} has no approved node with a card the catalog knows"
        )
    return fleet


def _run(request: Any, *, search: bool = False) -> Any:
    """The plan (or search), with a progress bar on stderr once a sweep starts (not before an error)."""
    from hardware.plan import plan as plan_fleet
    from hardware.search import search as search_list

    compute = search_list if search else plan_fleet

    with contextlib.ExitStack() as stack:
        bars: list[Any] = []

        def tick(done: int, total: int) -> None:
            if not bars:
                bars.append(
                    stack.enter_context(click.progressbar(length=total, label="simulating", file=sys.stderr))
                )
            bars[0].length = total
            bars[0].update(done - bars[0].pos)

        return compute(request, tick)
