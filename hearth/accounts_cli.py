"""The accounts commands: `hearth tokens`, `hearth usage` and `hearth audit`.

They read and write the scheduler's database directly (WAL lets them run beside the server, which sees a
change at its next request), so they run on the scheduler's machine, as its operator. Every change is
written to the audit log as ``cli:<os user>`` from ``local``; a secret is printed once, alone on stdout,
and never stored.
"""

from __future__ import annotations

import csv
import getpass
import io
import json
import os
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, get_args

import click

from hearth.cli_common import config_option, data_dir_option, one_line_errors, settings_for
from hearth.config import HearthSettings
from protocol.accounts import MAX_EXPIRY_S, MAX_SINCE_S, UsageDimension, parse_duration
from protocol.errors import ConfigError
from protocol.federation import TIERS
from scheduler.rules import builtin, load_policy
from scheduler.store import Store, TokenSummary
from scheduler.store_tokens import DEFAULT_GROUP

FORMATS = ("table", "csv", "json")
_format = click.option(
    "--format", "fmt", type=click.Choice(FORMATS), default="table", show_default=True,
    help="A table to read, or csv or json to export.",
)  # fmt: skip
_since = click.option(
    "--since", default="7d", show_default=True, metavar="DURATION",
    help='How far back: "7d", "12h", "30m", "90s".',
)  # fmt: skip


def register(main: click.Group) -> None:
    main.add_command(tokens)
    main.add_command(usage)
    main.add_command(audit)


def _settings(config: Path | None, data_dir: Path | None) -> HearthSettings:
    return settings_for(config, data_dir)


def _store(settings: HearthSettings) -> Store:
    return Store(settings.data_dir / "hearth.db")


def actor() -> str:
    """Who runs the command, as the audit log names them."""
    try:
        return "cli:" + getpass.getuser()
    except (KeyError, OSError):  # no user name for this uid (a container)
        return f"cli:uid-{os.getuid()}"


def seconds(option: str, text: str, most: float = MAX_EXPIRY_S) -> float:
    """A duration given on the command line, in seconds: more than zero and at most ``most`` (ten years:
    further than any date the machine can write is a mistake, not a wish)."""
    try:
        value = parse_duration(text)
    except ValueError as exc:
        raise ConfigError(f"{option}: {exc}") from None
    if value <= 0:
        raise ConfigError(f"{option}: {text!r} is no time at all")
    if value > most:
        raise ConfigError(f"{option}: {text!r} is longer than {most / 86400:.0f} days")
    return value


def check_group(settings: HearthSettings, group: str) -> None:
    """Refuse a group the policy in force does not define (the scheduler reads the same file)."""
    if group == DEFAULT_GROUP:
        return  # every policy has it, even one whose file is broken now
    path = settings.scheduler.model_copy(update={"data_dir": settings.data_dir}).policy_path
    policy = load_policy(path) if path.exists() else builtin()
    if group not in policy.groups:
        raise ConfigError(
            f"no group {group!r} in the policy {policy.source}; groups: {', '.join(sorted(policy.groups))}"
        )


def when(ts: float | None) -> str:
    return "-" if ts is None else datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S")


def emit(
    rows: Sequence[dict[str, Any]], columns: Sequence[str], fmt: str, show: Callable[[Any], str]
) -> None:
    """Print ``rows`` as an aligned table (values through ``show``), or as CSV or JSON as they are."""
    if fmt == "json":
        click.echo(json.dumps(list(rows), indent=2))
        return
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        click.echo(out.getvalue(), nl=False)
        return
    cells = [[c.upper().replace("_", " ") for c in columns]] + [[show(r[c]) for c in columns] for r in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    for line in cells:
        click.echo("  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip())


def _plain(value: Any) -> str:
    return "-" if value is None else str(value)


# ----- tokens -----


@click.group()
def tokens() -> None:
    """Create, list, revoke and rotate API tokens."""


@tokens.command("create")
@click.option("--name", default="user", show_default=True, help="A label to recognise the token by.")
@click.option(
    "--group", default=DEFAULT_GROUP, show_default=True, help="The policy group whose rules apply to it."
)
@click.option("--expires", metavar="DURATION", help='Refused after this long: "30d", "12h" (default: never).')
@click.option("--scope", type=click.Choice(["user", "admin"]), help="admin may also use the admin API.")
@click.option("--admin", is_flag=True, help="Same as --scope admin.")
@click.option(
    "--tier",
    "tiers",
    multiple=True,
    type=click.Choice(TIERS),
    help="Node tiers this token's requests may reach (repeatable; default: those the policy allows).",
)
@data_dir_option
@config_option
@one_line_errors
def tokens_create(
    name: str,
    group: str,
    expires: str | None,
    scope: str | None,
    admin: bool,
    tiers: tuple[str, ...],
    data_dir: Path | None,
    config: Path | None,
) -> None:
    """Create a token and print it alone on stdout (it is stored only as a hash)."""
    if admin and scope == "user":
        raise ConfigError("--admin and --scope user contradict each other; choose one")
    settings = _settings(config, data_dir)
    lasts = seconds("--expires", expires) if expires is not None else None
    check_group(settings, group)
    store = _store(settings)
    token, record = store.create_token(
        name,
        "admin" if admin or scope == "admin" else "user",
        tuple(sorted(set(tiers))) or None,
        group=group,
        expires=time.time() + lasts if lasts is not None else None,
        actor=actor(),
    )
    click.echo(token)
    until = f", expires {when(record.expires)} UTC" if record.expires is not None else ""
    click.echo(f"created {record.id} ({record.scope}, group {record.group}{until})", err=True)


@tokens.command("list")
@data_dir_option
@config_option
@one_line_errors
def tokens_list(data_dir: Path | None, config: Path | None) -> None:
    """List tokens: scope, group, expiry, last use and tokens used this month (the secrets are not stored)."""
    now = time.time()
    summaries = _store(_settings(config, data_dir)).token_summaries(now)
    emit([_token_row(s, now) for s in summaries], _TOKEN_COLUMNS, "table", _cell)


# The name last: it is the one of any length, and scripts find a token's row by it.
_TOKEN_COLUMNS = ("id", "scope", "group", "state", "expires", "last_used", "month_tokens", "tiers", "name")


def _token_row(summary: TokenSummary, now: float) -> dict[str, Any]:
    r = summary.record
    return {
        "id": r.id, "name": r.name, "scope": r.scope, "group": r.group, "state": r.state(now),
        "expires": r.expires, "last_used": summary.last_used, "month_tokens": summary.month_tokens,
        "tiers": ",".join(r.tiers) if r.tiers else "all",
    }  # fmt: skip


def _cell(value: Any) -> str:
    return when(value) if isinstance(value, float) else _plain(value)


@tokens.command("revoke")
@click.argument("token_id")
@data_dir_option
@config_option
@one_line_errors
def tokens_revoke(token_id: str, data_dir: Path | None, config: Path | None) -> None:
    """Revoke a token by its id; requests with it fail from the next one on."""
    record = _store(_settings(config, data_dir)).revoke_token(token_id, actor=actor())
    click.echo(f"revoked {record.id} ({record.name})")


@tokens.command("rotate")
@click.argument("token_id")
@click.option(
    "--grace", metavar="DURATION", help='How long the old secret keeps working, e.g. "10m" (default: none).'
)
@data_dir_option
@config_option
@one_line_errors
def tokens_rotate(token_id: str, grace: str | None, data_dir: Path | None, config: Path | None) -> None:
    """Give a token a new secret and print it alone on stdout; its id, group and usage stay."""
    settings = _settings(config, data_dir)
    grace_s = seconds("--grace", grace) if grace is not None else 0.0
    token, record = _store(settings).rotate_token(token_id, grace_s, actor=actor())
    click.echo(token)
    old = f"works until {when(time.time() + grace_s)} UTC" if grace_s else "stopped working"
    click.echo(f"rotated {record.id} ({record.name}); the old secret {old}", err=True)


# ----- usage and audit -----

# Each dimension's key column, as CSV and JSON name it.
_KEY_COLUMN = {"user": "token_id", "group": "group", "model": "model", "node": "node_id", "day": "day"}


@click.command()
@click.option(
    "--by", type=click.Choice(get_args(UsageDimension)), default="user", show_default=True,
    help="Totals per token (user), group, model, node or day (UTC).",
)  # fmt: skip
@_since
@_format
@data_dir_option
@config_option
@one_line_errors
def usage(by: UsageDimension, since: str, fmt: str, data_dir: Path | None, config: Path | None) -> None:
    """Tokens and requests per user, group, model, node or day (metadata only: never any text)."""
    start = time.time() - seconds("--since", since, MAX_SINCE_S)
    totals = _store(_settings(config, data_dir)).usage_report(by, start)
    key = _KEY_COLUMN[by]
    columns = [key, *(["name"] if by == "user" else []), "requests", "errors", "prompt_tokens",
               "completion_tokens", "total_tokens"]  # fmt: skip
    rows = [
        {key: t.key, "name": t.name, "requests": t.requests, "errors": t.errors,
         "prompt_tokens": t.prompt_tokens, "completion_tokens": t.completion_tokens,
         "total_tokens": t.total_tokens}
        for t in totals
    ]  # fmt: skip
    emit([{c: r[c] for c in columns} for r in rows], columns, fmt, _plain)


@click.command()
@_since
@click.option("--limit", type=click.IntRange(1, 100_000), default=1000, show_default=True,
              help="The newest this many entries at most.")  # fmt: skip
@_format
@data_dir_option
@config_option
@one_line_errors
def audit(since: str, limit: int, fmt: str, data_dir: Path | None, config: Path | None) -> None:
    """The audit log: who changed what, when and from where (oldest first)."""
    start = time.time() - seconds("--since", since, MAX_SINCE_S)
    entries = _store(_settings(config, data_dir)).audit_log(start, limit)
    columns = ("at", "actor", "origin", "action", "subject", "detail")
    rows = [{c: getattr(e, c) for c in columns} for e in entries]
    emit(rows, columns, fmt, _cell)
