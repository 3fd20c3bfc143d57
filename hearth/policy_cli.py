"""`hearth policy`: check a policy file before it is applied, show or replace the one in force."""

from __future__ import annotations

import json
from pathlib import Path

import click

from hearth.cli_common import admin_command, one_line_errors, run_admin
from protocol.errors import ConfigError
from protocol.policy import GroupView


def register(main: click.Group) -> None:
    main.add_command(policy)


@click.group()
def policy() -> None:
    """The club's rules: groups, quotas, rate limits, course prompts, terms (docs/policies.md)."""


@policy.command("check")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@one_line_errors
def policy_check(file: Path) -> None:
    """Validate FILE as the scheduler would, without applying it."""
    from scheduler.rules import load_policy

    loaded = load_policy(file)
    groups = ", ".join(sorted(loaded.groups))
    terms = f"; terms version {loaded.terms_version}" if loaded.terms_version else "; no terms of use"
    click.echo(f"{file}: valid: groups {groups}{terms}")


@policy.command("show")
@click.option("--json", "as_json", is_flag=True, help="Print the admin API's document as JSON.")
@admin_command
def policy_show(as_json: bool, scheduler_url: str | None, token: str | None) -> None:
    """Print the policy the scheduler has in force, each group's rules as they apply."""
    state = run_admin(scheduler_url, token, lambda c: c.policy())
    if as_json:
        click.echo(json.dumps(state.model_dump(mode="json"), indent=2))
        return
    click.echo(f"source: {state.source}  digest: {state.digest[:16]}  terms: {state.terms_version or '-'}")
    for group in state.groups:
        click.echo(_group_line(group))


def _group_line(group: GroupView) -> str:
    parts = [f"models={','.join(group.models) if group.models else '*'}", f"max_tokens={group.max_tokens}"]
    if group.max_prompt_tokens:
        parts.append(f"max_prompt_tokens={group.max_prompt_tokens}")
    parts.append(f"tiers={','.join(group.tiers)}")
    if group.require_e2e:
        parts.append("e2e")
    if group.weight != 1:
        parts.append(f"weight={group.weight:g}")
    for scope, limits in (("each", group.each), ("total", group.total)):
        set_ = limits.model_dump(exclude_none=True)
        if set_:
            parts.append(f"{scope}:" + ",".join(f"{k}={v}" for k, v in set_.items()))
    if group.system_prompt:
        parts.append("course prompt")
    return f"{group.name:<20} " + " ".join(parts)


@policy.command("apply")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@admin_command
def policy_apply(file: Path, scheduler_url: str | None, token: str | None) -> None:
    """Send FILE to the scheduler, which validates, writes and applies it (audited)."""
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{file}: not UTF-8 text") from None
    state = run_admin(scheduler_url, token, lambda c: c.put_policy(text))
    click.echo(f"applied: {len(state.groups)} groups, digest {state.digest[:16]}")
