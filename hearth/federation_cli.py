"""The federation's commands: roles (`scheduler start`, `node start|enroll`), the authority, enrollment
and node management, and `models`. Operator commands talk to the scheduler's admin API."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import click

from hearth.cli_common import (
    admin_command,
    config_option,
    data_dir_option,
    gib,
    one_line_errors,
    run_admin,
    settings_for,
)
from protocol import logs
from protocol.admin import Node
from protocol.errors import ConfigError
from protocol.federation import TIERS, Tier


def _logging(level: str) -> None:
    logs.configure(level)


def _size(text: str) -> int:
    units = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    cleaned = text.strip().lower().removesuffix("ib").removesuffix("b")
    number, unit = (cleaned[:-1], cleaned[-1]) if cleaned[-1:] in units and cleaned[-1:] else (cleaned, "")
    try:
        value = float(number) * units[unit]
    except (ValueError, KeyError):
        raise click.BadParameter(f"{text!r} is not a size like 8GiB or 512M") from None
    if value < 1:
        raise click.BadParameter("a memory budget must be positive")
    return int(value)


def _echo_rows(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        click.echo("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def register(main: click.Group) -> None:
    main.add_command(scheduler)
    main.add_command(node)
    main.add_command(authority)
    main.add_command(enroll)
    main.add_command(models)


# roles


@click.group()
def scheduler() -> None:
    """Run the central scheduler."""


@scheduler.command("start")
@click.option("--host", default=None, help="Address of the API (default 127.0.0.1).")
@click.option("--port", type=int, default=None, help="Port of the API (default 8000; 0 picks a free one).")
@data_dir_option
@config_option
@one_line_errors
def scheduler_start(host: str | None, port: int | None, data_dir: Path | None, config: Path | None) -> None:
    """Serve the OpenAI-compatible API and the admin API; nodes join it by enrollment."""
    from hearth.serve import serve_scheduler

    overrides = {k: v for k, v in (("host", host), ("port", port)) if v is not None}
    settings = settings_for(config, data_dir, **({"scheduler": overrides} if overrides else {}))
    _logging(settings.log_level)
    asyncio.run(serve_scheduler(settings, out=click.echo))


@click.group()
def node() -> None:
    """Run a GPU (or CPU) node, enroll it, and manage nodes (revoke, drain)."""


@node.command("start")
@click.option("--model", "model_paths", multiple=True, metavar="PATH", help="A model directory (repeatable).")
@click.option("--demo", is_flag=True, help="Serve the demo model (as `hearth up --demo` does).")
@click.option("--host", default=None, help="Address the node listens on (default 127.0.0.1).")
@click.option("--port", type=int, default=None, help="Port (default: a free one).")
@click.option("--memory-budget", default=None, help="CPU node: memory its models may use, e.g. 8GiB.")
@click.option(
    "--backend", type=click.Choice(["auto", "exllamav2", "transformers"]), default=None,
    help="What runs the models (default: node.backend, auto).",
)  # fmt: skip
@data_dir_option
@config_option
@one_line_errors
def node_start(
    model_paths: tuple[str, ...], demo: bool, host: str | None, port: int | None, memory_budget: str | None,
    backend: str | None, data_dir: Path | None, config: Path | None,
) -> None:  # fmt: skip
    """Serve models to the scheduler this node enrolled with."""
    from hearth.models import demo_model, resolve_model
    from hearth.serve import serve_node

    overrides: dict[str, Any] = {
        k: v for k, v in (("host", host), ("port", port), ("backend", backend)) if v is not None
    }
    if memory_budget is not None:
        overrides["memory_budget_bytes"] = _size(memory_budget)
    settings = settings_for(config, data_dir, **({"node": overrides} if overrides else {}))
    extra = [resolve_model(p, settings.data_dir) for p in model_paths]
    if demo:
        extra.append(demo_model(settings.data_dir, settings.demo_model, out=click.echo))
    if extra:
        settings = settings.model_copy(
            update={"node": settings.node.model_copy(update={"models": [*settings.node.models, *extra]})}
        )
    _logging(settings.log_level)
    asyncio.run(serve_node(settings, out=click.echo))


@node.command("enroll")
@click.option("--scheduler", "scheduler_url", required=True, metavar="URL", help="The scheduler's URL.")
@click.option("--code", required=True, help="The one-time code the operator gave you.")
@click.option("--node-id", default=None, help="This machine's name in the cluster (default: its host name).")
@click.option("--public-url", default=None, help="The URL the scheduler can reach this node at.")
@data_dir_option
@config_option
@one_line_errors
def node_enroll(
    scheduler_url: str, code: str, node_id: str | None, public_url: str | None, data_dir: Path | None,
    config: Path | None,
) -> None:  # fmt: skip
    """Ask to join a scheduler; the operator then approves (or rejects) this machine."""
    from hearth.serve import node_settings
    from node.enroll import default_node_id
    from node.enroll import enroll as do_enroll
    from protocol.identity import valid_node_id

    settings = node_settings(settings_for(config, data_dir))
    name = node_id or (settings.node_id if settings.node_id != "local" else default_node_id())
    if not valid_node_id(name):
        raise ConfigError(f"{name!r} is not a valid node id: use lower-case letters, digits and '-'")
    assert settings.data_dir is not None
    reply = do_enroll(settings.data_dir, scheduler_url, code, name, public_url or settings.public_url)
    click.echo(f"enrolled as {reply.node_id} (tier {reply.tier}); waiting for the operator's approval")
    click.echo("start serving with: hearth node start" + (f" --data-dir {data_dir}" if data_dir else ""))


@node.command("list")
@admin_command
def node_list(scheduler_url: str | None, token: str | None) -> None:
    """Approved nodes: health, drain, owner first, models, their current encryption key and any alarm."""
    rows = run_admin(scheduler_url, token, lambda c: c.nodes()).nodes
    _echo_rows(
        [
            [
                r.node_id, r.tier, "yes" if r.healthy else "no", "yes" if r.draining else "no",
                _yielding(r), ",".join(m.id for m in r.models) or "-", r.key_id or "-", r.alarm or "-",
            ]
            for r in rows
        ],
        ["NODE", "TIER", "HEALTHY", "DRAINING", "YIELDING", "MODELS", "KEY", "ALARM"],
    )  # fmt: skip


def _yielding(row: Node) -> str:
    if not row.yielding:
        return "no"
    return f"yes: {row.yield_reason}" if row.yield_reason else "yes"


@node.command("revoke")
@click.argument("node_id")
@admin_command
def node_revoke(node_id: str, scheduler_url: str | None, token: str | None) -> None:
    """Take a node out of the cluster now; it learns of it at its next heartbeat."""
    run_admin(scheduler_url, token, lambda c: c.revoke_node(node_id))
    click.echo(f"revoked {node_id}: it gets no more work")


@node.command("drain")
@click.argument("node_id")
@click.option("--undo", is_flag=True, help="Let the node take work again.")
@admin_command
def node_drain(node_id: str, undo: bool, scheduler_url: str | None, token: str | None) -> None:
    """Let a node finish its running jobs and take no new ones (e.g. before maintenance)."""
    run_admin(scheduler_url, token, lambda c: c.drain(node_id, not undo))
    click.echo(f"{node_id} {'takes work again' if undo else 'is draining: no new work'}")


@node.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print the node's status document as JSON.")
@data_dir_option
@config_option
@one_line_errors
def node_status(as_json: bool, data_dir: Path | None, config: Path | None) -> None:
    """What the node on this machine is doing, and why (serving, draining, yielding to its owner)."""
    import json

    from hearth.node_status import fetch_local_status, render_status
    from hearth.serve import node_settings

    settings = node_settings(settings_for(config, data_dir))
    assert settings.data_dir is not None
    doc = fetch_local_status(settings.data_dir)
    click.echo(json.dumps(doc, indent=2) if as_json else render_status(doc))


# authority


_authority_dir = click.option(
    "--dir", "directory", type=click.Path(file_okay=False, path_type=Path), default=None,
    help="Where the authority key lives (default: ~/.config/hearth/authority).",
)  # fmt: skip


@click.group()
def authority() -> None:
    """The federation authority: the operator's key that certifies nodes."""


@authority.command("init")
@_authority_dir
@one_line_errors
def authority_init(directory: Path | None) -> None:
    """Create the authority key (keep it off the scheduler's machine if you can)."""
    from protocol.identity import default_authority_dir, init_authority

    where = directory or default_authority_dir()
    key = init_authority(where)
    click.echo(key.public_b64)
    click.echo(f"authority key written to {where / 'authority.key'} (mode 0600)", err=True)
    click.echo(
        f'put the public key above in the scheduler\'s config: authority_key = "{key.public_b64}"', err=True
    )


@authority.command("show")
@_authority_dir
@one_line_errors
def authority_show(directory: Path | None) -> None:
    """Print the authority's public key."""
    from protocol.identity import default_authority_dir, load_authority

    click.echo(load_authority(directory or default_authority_dir()).public_b64)


# enrollment


@click.group()
def enroll() -> None:
    """Enrollment codes and approvals."""


@enroll.command("create")
@click.option("--tier", type=click.Choice(TIERS), required=True, help="The tier the node will have.")
@click.option("--ttl", type=float, default=None, help="Seconds the code stays valid (default 24 h).")
@click.option("--note", default="", help="A note to remember whom the code is for.")
@admin_command
def enroll_create(
    tier: str, ttl: float | None, note: str, scheduler_url: str | None, token: str | None
) -> None:
    """Create a one-time enrollment code and print it alone on stdout."""
    which: Tier = tier  # type: ignore[assignment]  # click.Choice(TIERS) checked it
    reply = run_admin(scheduler_url, token, lambda c: c.create_code(which, ttl, note))
    click.echo(reply.code)
    expires = time.strftime("%Y-%m-%d %H:%M", time.localtime(reply.expires))
    click.echo(f"one-time code for a {tier} node, valid until {expires}", err=True)


@enroll.command("list")
@click.option("--all", "show_all", is_flag=True, help="Also show approved, rejected and revoked nodes.")
@admin_command
def enroll_list(show_all: bool, scheduler_url: str | None, token: str | None) -> None:
    """Nodes waiting for approval (enrolled with a code, or discovered on the LAN)."""
    rows = run_admin(
        scheduler_url, token, lambda c: c.enrollments(None if show_all else "pending")
    ).enrollments
    _echo_rows(
        [
            [
                r.node_id,
                r.state,
                r.tier,
                r.source,
                r.fingerprint,
                r.gpus or "-",
                gib(r.memory_total_bytes),
                r.url or "-",
            ]
            for r in rows
        ],
        ["NODE", "STATE", "TIER", "SOURCE", "FINGERPRINT", "GPUS", "MEMORY", "URL"],
    )


@enroll.command("approve")
@click.argument("node_id")
@_authority_dir
@admin_command
def enroll_approve(
    node_id: str, directory: Path | None, scheduler_url: str | None, token: str | None
) -> None:
    """Approve a node: the authority key signs its certificate here, on the operator's machine."""
    from tui.authority import approve_enrollment, default_authority_dir

    where = directory or default_authority_dir()
    record = run_admin(scheduler_url, token, lambda c: approve_enrollment(c, where, node_id))
    click.echo(f"approved {node_id} ({record.tier}, key {record.fingerprint})")


@enroll.command("reject")
@click.argument("node_id")
@admin_command
def enroll_reject(node_id: str, scheduler_url: str | None, token: str | None) -> None:
    """Refuse a pending node."""
    run_admin(scheduler_url, token, lambda c: c.reject(node_id))
    click.echo(f"rejected {node_id}")


# models


@click.command()
@admin_command
def models(scheduler_url: str | None, token: str | None) -> None:
    """Where each model runs: node, state and jobs in flight."""
    doc = run_admin(scheduler_url, token, lambda c: c.models())
    rows = [
        [m.id, n.node_id, n.phase, str(n.active), "yes" if n.healthy else "no"]
        for m in doc.models
        for n in m.nodes
    ]
    _echo_rows(rows, ["MODEL", "NODE", "STATE", "ACTIVE", "HEALTHY"])
