"""Options and error handling shared by every `hearth` command."""

from __future__ import annotations

import asyncio
import functools
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from hearth.config import HearthSettings, load_settings
from protocol.errors import ConfigError, HearthError
from tui.client import ConsoleClient

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")

DEFAULT_URL = "http://127.0.0.1:8000"
ADMIN_TIMEOUT_S = 30.0  # a CLI waits longer than the console, which refreshes anyway


def errors_as_one_line(status: int, *also: type[Exception]) -> Callable[[F], F]:
    """Errors reach the user as one line on stderr and exit ``status``, never a traceback: Hearth's own
    errors, and ``also`` (a command whose inputs are checked by ValueError, like the planner's)."""

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except HearthError as exc:
                click.echo(f"hearth: error: {exc.message}", err=True)
                sys.exit(status)
            except also as exc:
                click.echo(f"hearth: error: {exc}", err=True)
                sys.exit(status)
            except KeyboardInterrupt:  # Ctrl-C before the command installed its own handler
                click.echo("hearth: interrupted", err=True)
                sys.exit(130)

        return wrapper  # type: ignore[return-value]

    return decorate


one_line_errors = errors_as_one_line(1)  # the admin commands: exit status 1


data_dir_option = click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Data directory (default: $HEARTH_DATA_DIR, else $XDG_DATA_HOME/hearth).",
)
config_option = click.option(
    "--config", type=click.Path(dir_okay=False, path_type=Path), default=None, help="TOML settings file."
)


def gib(value: Any) -> str:
    """A byte count as the CLI prints it ("-" when unknown)."""
    return "-" if not isinstance(value, int) else f"{value / (1 << 30):.1f} GiB"


def settings_for(config: Path | None, data_dir: Path | None, **overrides: Any) -> HearthSettings:
    if data_dir is not None:
        overrides["data_dir"] = data_dir
    return load_settings(config, **overrides)


scheduler_option = click.option(
    "--scheduler", "scheduler_url", metavar="URL", default=None,
    help="The scheduler's URL (default: $HEARTH_SCHEDULER_URL, else http://127.0.0.1:8000).",
)  # fmt: skip
token_option = click.option("--token", default=None, help="An admin token (default: $HEARTH_TOKEN).")


def admin_command(fn: F) -> F:
    """A command that calls the scheduler's admin API: --scheduler and --token, errors in one line."""
    return scheduler_option(token_option(one_line_errors(fn)))  # type: ignore[no-any-return]


def _usage_in_one_line(make: Callable[[], click.Context]) -> click.Context:
    try:
        return make()
    except click.UsageError as exc:
        click.echo(f"hearth: error: {exc.format_message()}", err=True)
        sys.exit(2)


class OneLineUsageCommand(click.Command):
    """Usage errors (a word where a number goes) as one line and exit 2, like the planner's own errors."""

    def make_context(
        self, info_name: str | None, args: list[str], parent: click.Context | None = None, **extra: Any
    ) -> click.Context:
        return _usage_in_one_line(lambda: super(OneLineUsageCommand, self).make_context(
            info_name, args, parent=parent, **extra
        ))  # fmt: skip


class OneLineUsageGroup(click.Group):
    """A group whose usage errors, an unknown subcommand's included, are one line and exit 2."""

    def make_context(
        self, info_name: str | None, args: list[str], parent: click.Context | None = None, **extra: Any
    ) -> click.Context:
        return _usage_in_one_line(lambda: super(OneLineUsageGroup, self).make_context(
            info_name, args, parent=parent, **extra
        ))  # fmt: skip

    def resolve_command(
        self, ctx: click.Context, args: list[str]
    ) -> tuple[str | None, click.Command | None, list[str]]:
        try:
            return super().resolve_command(ctx, args)
        except click.UsageError as exc:
            click.echo(f"hearth: error: {exc.format_message()}", err=True)
            sys.exit(2)


def scheduler_url(url: str | None) -> str:
    """--scheduler, else $HEARTH_SCHEDULER_URL, else the local default; refused unless http(s)."""
    resolved = (url or os.environ.get("HEARTH_SCHEDULER_URL") or DEFAULT_URL).rstrip("/")
    if not resolved.startswith(("http://", "https://")):
        raise ConfigError(f"{resolved} is not a scheduler URL (it starts with http:// or https://)")
    return resolved


def run_admin(
    url: str | None,
    token: str | None,
    fn: Callable[[ConsoleClient], Awaitable[T]],
    *,
    needs: str = "an admin token",
) -> T:
    """Run ``fn`` with the console's client for the scheduler at ``url`` (or $HEARTH_SCHEDULER_URL) and
    ``token`` (or $HEARTH_TOKEN), from a blocking command. ``needs`` names the token in the error when none
    is given (the terms commands take a user's own token)."""
    base = scheduler_url(url)
    secret = token or os.environ.get("HEARTH_TOKEN")
    if not secret:
        raise ConfigError(f"this needs {needs}: pass --token or set HEARTH_TOKEN")

    async def session() -> T:
        async with ConsoleClient(base, secret, timeout=ADMIN_TIMEOUT_S) as client:
            return await fn(client)

    return asyncio.run(session())
