"""`hearth terms show|accept`: a user reads the club's terms of use and accepts them, with their own token.

Both talk to the scheduler's `GET /v1/terms` and `POST /v1/terms/accept` (scheduler.terms_api). A token
cannot generate until its holder has accepted the version in force; `hearth chat` and `hearth proxy` point
here when the scheduler refuses for that reason (403 terms_not_accepted).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import click

from hearth.cli_common import DEFAULT_URL, one_line_errors, run_admin
from protocol.errors import ConfigError, ProtocolError
from tui.client import ConsoleClient

T = TypeVar("T")


def how_to_accept(version: str | None, scheduler_url: str) -> str:
    """What a user whose token was refused for the terms is told to run (`hearth chat`)."""
    where = "" if scheduler_url.rstrip("/") == DEFAULT_URL else f" --scheduler {scheduler_url}"
    which = f"version {version} of the terms of use" if version else "the terms of use"
    return (
        f"this token has not accepted {which} yet: read them with `hearth terms show{where}`, then accept "
        f"them with `hearth terms accept{where}" + (f" --version {version}`" if version else "`")
    )


def _options(fn: Any) -> Any:
    fn = click.option("--token", default=None, help="Your API token (default: $HEARTH_TOKEN).")(fn)
    return click.option(
        "--scheduler", "scheduler_url", metavar="URL", default=None,
        help="The scheduler's URL (default: $HEARTH_SCHEDULER_URL, else http://127.0.0.1:8000).",
    )(fn)  # fmt: skip


def _call(scheduler_url: str | None, token: str | None, fn: Callable[[ConsoleClient], Awaitable[T]]) -> T:
    """``fn`` with the user's own token (the terms routes are a user's, not the admin API)."""
    try:
        return run_admin(scheduler_url, token, fn, needs="your API token")
    except ProtocolError:
        raise ConfigError("the answer is not a terms document: is the URL a Hearth scheduler?") from None


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M UTC")


@click.group()
def terms() -> None:
    """Read and accept the club's terms of use."""


@terms.command("show")
@_options
@one_line_errors
def terms_show(scheduler_url: str | None, token: str | None) -> None:
    """Print the terms of use in force and whether your token accepted them."""
    doc = _call(scheduler_url, token, lambda c: c.terms())
    if doc.version is None:
        click.echo("This scheduler has no terms of use: there is nothing to accept.")
        return
    if doc.accepted and doc.accepted_at is not None:
        state = f"you accepted it on {_when(doc.accepted_at)}"
    elif doc.accepted_version is not None:
        state = f"not accepted yet (you accepted version {doc.accepted_version}): run `hearth terms accept`"
    else:
        state = "not accepted yet: run `hearth terms accept`"
    click.echo(f"Terms of use, version {doc.version} ({state})\n")
    click.echo(doc.text or "")


@terms.command("accept")
@_options
@click.option(
    "--version", "version", metavar="V", default=None,
    help="Accept only this version (refused if another is in force). Default: the version in force.",
)  # fmt: skip
@click.option("--yes", is_flag=True, help="Accept without showing the text and asking.")
@one_line_errors
def terms_accept(scheduler_url: str | None, token: str | None, version: str | None, yes: bool) -> None:
    """Accept the terms of use in force, after reading them (asks first unless --yes)."""
    doc = _call(scheduler_url, token, lambda c: c.terms())
    if doc.version is None:
        raise ConfigError("this scheduler has no terms of use to accept")
    if version is not None and version != doc.version:
        raise ConfigError(
            f"the terms in force are version {doc.version}, not {version}: read them with `hearth terms show`"
        )
    if doc.accepted and doc.accepted_at is not None:
        click.echo(f"You accepted version {doc.version} of the terms of use on {_when(doc.accepted_at)}.")
        return
    if not yes:
        click.echo(f"Terms of use, version {doc.version}:\n")
        click.echo(doc.text or "")
        click.echo()
        try:
            agreed = click.confirm(f"Do you accept version {doc.version} of these terms?", default=False)
        except click.Abort:  # end of input or Ctrl-C: no answer is no
            agreed = False
        if not agreed:
            raise ConfigError("not accepted: nothing was recorded")
    in_force = doc.version
    _call(scheduler_url, token, lambda c: c.accept_terms(in_force))
    click.echo(f"Accepted version {doc.version} of the terms of use.")


def register(main: click.Group) -> None:
    main.add_command(terms)
