"""The `hearth` command."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from hearth import federation_cli, policy_cli, proxy_cli, terms_cli
from hearth.cli_common import config_option, data_dir_option, one_line_errors, settings_for
from protocol import logs
from protocol.errors import ConfigError
from protocol.federation import TIERS


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="hearth-llm")
def main() -> None:
    """Hearth: your community's own OpenAI-compatible LLM service."""


federation_cli.register(main)
policy_cli.register(main)
proxy_cli.register(main)
terms_cli.register(main)


@main.command()
@click.option("--demo", is_flag=True, help="Serve a small generated model (offline, seconds to build).")
@click.option(
    "--model", "model_spec", metavar="PATH_OR_HF_ID", help="A model directory or a Hugging Face id."
)
@click.option("--host", default=None, help="Address of the API (default 127.0.0.1).")
@click.option("--port", type=int, default=None, help="Port of the API (default 8000; 0 picks a free one).")
@data_dir_option
@config_option
@one_line_errors
def up(
    demo: bool,
    model_spec: str | None,
    host: str | None,
    port: int | None,
    data_dir: Path | None,
    config: Path | None,
) -> None:
    """Run a scheduler and a local node on this machine.

    The node serves --demo, --model, or else the [[node.models]] of the config file.
    """
    from hearth.models import demo_model, resolve_model
    from hearth.up import serve_up

    if demo and model_spec is not None:
        raise ConfigError("choose one: --demo, or --model PATH_OR_HF_ID")
    scheduler: dict[str, Any] = {}
    if host is not None:
        scheduler["host"] = host
    if port is not None:
        scheduler["port"] = port
    settings = settings_for(config, data_dir, **({"scheduler": scheduler} if scheduler else {}))
    logs.configure(settings.log_level)
    data = settings.data_dir
    if demo:
        models = lambda: [demo_model(data)]  # noqa: E731
    elif model_spec is not None:
        models = lambda: [resolve_model(model_spec, data)]  # noqa: E731
    elif settings.node.models:
        models = lambda: settings.node.models  # noqa: E731
    else:
        raise ConfigError("choose one: --demo, --model PATH_OR_HF_ID, or list [[node.models]] in the config")
    asyncio.run(serve_up(settings, models, out=lambda line: click.echo(line)))


@main.group()
def tokens() -> None:
    """Create, list and revoke API tokens."""


def _store(config: Path | None, data_dir: Path | None) -> Any:
    from scheduler.store import Store

    settings = settings_for(config, data_dir)
    return Store(settings.data_dir / "hearth.db")


@tokens.command("create")
@click.option("--name", default="user", show_default=True, help="A label to recognise the token by.")
@click.option("--admin", is_flag=True, help="Give the token admin scope.")
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
    name: str, admin: bool, tiers: tuple[str, ...], data_dir: Path | None, config: Path | None
) -> None:
    """Create a token and print it alone on stdout (it is stored only as a hash)."""
    store = _store(config, data_dir)
    token, record = store.create_token(name, "admin" if admin else "user", tuple(sorted(set(tiers))) or None)
    click.echo(token)
    click.echo(f"created {record.id} ({record.scope})", err=True)


@tokens.command("list")
@data_dir_option
@config_option
@one_line_errors
def tokens_list(data_dir: Path | None, config: Path | None) -> None:
    """List tokens (ids and names; the tokens themselves are not stored)."""
    rows = _store(config, data_dir).list_tokens()
    click.echo(f"{'ID':<17} {'SCOPE':<6} {'TIERS':<16} {'CREATED':<20} {'REVOKED':<20} NAME")
    for r in rows:
        tiers = ",".join(r.tiers) if r.tiers else "all"
        click.echo(
            f"{r.id:<17} {r.scope:<6} {tiers:<16} {_when(r.created):<20} {_when(r.revoked):<20} {r.name}"
        )


@tokens.command("revoke")
@click.argument("token_id")
@data_dir_option
@config_option
@one_line_errors
def tokens_revoke(token_id: str, data_dir: Path | None, config: Path | None) -> None:
    """Revoke a token by its id; requests with it fail from now on."""
    record = _store(config, data_dir).revoke_token(token_id)
    click.echo(f"revoked {record.id} ({record.name})")


def _when(ts: float | None) -> str:
    return "-" if ts is None else datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S")
