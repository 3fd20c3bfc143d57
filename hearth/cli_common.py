"""Options and error handling shared by every `hearth` command."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from hearth.config import HearthSettings, load_settings
from protocol.errors import HearthError

F = TypeVar("F", bound=Callable[..., Any])


def one_line_errors(fn: F) -> F:
    """Errors reach the user as one line on stderr and exit status 1, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except HearthError as exc:
            click.echo(f"hearth: error: {exc.message}", err=True)
            sys.exit(1)
        except KeyboardInterrupt:  # Ctrl-C before the command installed its own handler
            click.echo("hearth: interrupted", err=True)
            sys.exit(130)

    return wrapper  # type: ignore[return-value]


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


_scheduler_url = click.option(
    "--scheduler", "scheduler_url", metavar="URL", default=None,
    help="The scheduler's URL (default: $HEARTH_SCHEDULER_URL, else http://127.0.0.1:8000).",
)  # fmt: skip
_token = click.option("--token", default=None, help="An admin token (default: $HEARTH_TOKEN).")


def admin_command(fn: F) -> F:
    """A command that calls the scheduler's admin API: --scheduler and --token, errors in one line."""
    return _scheduler_url(_token(one_line_errors(fn)))  # type: ignore[no-any-return]
