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
