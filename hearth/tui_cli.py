"""`hearth tui`: the operator console (the package ``tui``), over the scheduler's admin API."""

from __future__ import annotations

from pathlib import Path

import click

from hearth.cli_common import admin_command, run_admin


def register(main: click.Group) -> None:
    main.add_command(tui_command)


@click.command("tui")
@click.option("--read-only", is_flag=True, help="Show everything, change nothing: every action is hidden.")
@click.option(
    "--authority", "authority_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
    help="Where the authority key lives, to approve nodes (default: ~/.config/hearth/authority).",
)  # fmt: skip
@admin_command
def tui_command(
    read_only: bool, authority_dir: Path | None, scheduler_url: str | None, token: str | None
) -> None:
    """The operator console: nodes, approvals, models, queue, users, policy and live events, in the
    terminal."""
    from protocol.identity import default_authority_dir
    from tui.app import make_app
    from tui.client import ConsoleClient

    async def run(client: ConsoleClient) -> None:
        where = authority_dir or default_authority_dir()
        app = make_app(client, read_only=read_only, authority_dir=where, settle_gc=True)
        await app.run_async()

    run_admin(scheduler_url, token, run)  # the URL and token, from the options or the environment
