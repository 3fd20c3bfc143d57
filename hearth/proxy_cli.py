"""`hearth proxy` (a local OpenAI-compatible API that seals everything) and `hearth chat` (a terminal chat
through the same sealing)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import aiohttp
import click

from hearth.cli_common import data_dir_option, one_line_errors
from hearth.config import default_data_dir
from hearth.proxy import DEFAULT_CANDIDATES, SealedClient, state_path
from hearth.proxy_server import serve
from hearth.terms_cli import how_to_accept
from protocol.envelope import MAX_CANDIDATES
from protocol.errors import ConfigError, HearthError
from protocol.federation import TIERS

DEFAULT_URL = "http://127.0.0.1:8000"


def _common(fn: Any) -> Any:
    for option in reversed(
        [
            click.option("--scheduler", "scheduler_url", metavar="URL", default=None,
                         help="The scheduler's URL (default: $HEARTH_SCHEDULER_URL, else http://127.0.0.1:8000)."),
            click.option("--token", default=None, help="Your API token (default: $HEARTH_TOKEN)."),
            click.option("--candidates", type=click.IntRange(1, MAX_CANDIDATES), default=DEFAULT_CANDIDATES,
                         show_default=True, help="Nodes each request is sealed to; the scheduler picks one."),
            click.option("--tier", "tiers", type=click.Choice(TIERS), multiple=True,
                         help="Seal only to nodes of this tier (repeatable; default: any tier)."),
            click.option("--authority", metavar="FINGERPRINT", default=None,
                         help="The federation authority's fingerprint as the club publishes it; without "
                         "it the first one seen is pinned."),
            data_dir_option,
        ]
    ):  # fmt: skip
        fn = option(fn)
    return fn


def _client(
    session: aiohttp.ClientSession, scheduler_url: str | None, token: str | None, candidates: int,
    tiers: tuple[str, ...], authority: str | None, data_dir: Path | None,
) -> SealedClient:  # fmt: skip
    url = (scheduler_url or os.environ.get("HEARTH_SCHEDULER_URL") or DEFAULT_URL).rstrip("/")
    token = token or os.environ.get("HEARTH_TOKEN")
    if not token:
        raise ConfigError("this needs your API token: pass --token or set HEARTH_TOKEN")
    if authority is not None and (
        len(authority) != 20 or any(c not in "0123456789abcdef" for c in authority)
    ):
        raise ConfigError("--authority takes the 20-character fingerprint `hearth authority show` prints")
    where = state_path(data_dir or default_data_dir(), url)
    return SealedClient(
        url, token, where, session, candidates=candidates, tiers=frozenset(tiers) or None, authority=authority
    )


@click.command()
@_common
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to serve on (keep it local).")
@click.option(
    "--port", type=click.IntRange(0, 65535), default=8080, show_default=True, help="Port to serve on."
)
@one_line_errors
def proxy(
    scheduler_url: str | None, token: str | None, candidates: int, tiers: tuple[str, ...],
    authority: str | None, data_dir: Path | None, host: str, port: int,
) -> None:  # fmt: skip
    """Serve an OpenAI-compatible API here that seals every request end to end."""

    async def run() -> None:
        async with aiohttp.ClientSession() as session:
            client = _client(session, scheduler_url, token, candidates, tiers, authority, data_dir)
            directory = await client.refresh(force=True)
            runner, url = await serve(client, host, port)
            from protocol.identity import KEY_BYTES, b64d, fingerprint

            fp = fingerprint(b64d(directory.authority_key, length=KEY_BYTES))
            click.echo(f"hearth proxy: sealing to {client.scheduler_url}; federation authority {fp}")
            click.echo(f"  point any OpenAI client at {url}/v1 (any API key); nothing leaves unsealed")
            try:
                await asyncio.Event().wait()
            finally:
                await runner.cleanup()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())


@click.command()
@_common
@click.option("--model", default=None, help="The model to talk to (default: the first the cluster serves).")
@click.option("--max-tokens", type=click.IntRange(1, 1 << 20), default=512, show_default=True,
              help="Longest answer.")  # fmt: skip
@one_line_errors
def chat(
    scheduler_url: str | None, token: str | None, candidates: int, tiers: tuple[str, ...],
    authority: str | None, data_dir: Path | None, model: str | None, max_tokens: int,
) -> None:  # fmt: skip
    """Chat in the terminal, sealed end to end (an empty line or Ctrl-D ends it)."""

    async def run() -> None:
        async with aiohttp.ClientSession() as session:
            client = _client(session, scheduler_url, token, candidates, tiers, authority, data_dir)
            await client.refresh(force=True)
            name = model or await _first_model(client)
            click.echo(f"hearth chat: {name}, sealed end to end (empty line to quit)")
            history: list[dict[str, str]] = []
            while True:
                line = await asyncio.to_thread(_prompt)
                if not line:
                    return
                history.append({"role": "user", "content": line})
                body = {"model": name, "messages": history, "max_tokens": max_tokens, "stream": True}
                try:
                    sent = await client.send("chat", json.dumps(body).encode())
                    answer = await _print_stream(sent.payloads)
                except HearthError as exc:
                    if exc.code == "terms_not_accepted":  # every later line would be refused alike
                        version = await _terms_version(client)
                        raise ConfigError(how_to_accept(version, client.scheduler_url)) from None
                    click.echo(f"\n[error: {exc.message}]", err=True)
                    history.pop()
                    continue
                history.append({"role": "assistant", "content": answer})

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())


async def _terms_version(client: SealedClient) -> str | None:
    """The terms version in force, to name in the how-to line (None if the scheduler does not say)."""
    try:
        async with client.session.get(
            client.scheduler_url + "/v1/terms", headers=client.auth_headers(),
            timeout=aiohttp.ClientTimeout(total=30),
        ) as resp:  # fmt: skip
            doc = await resp.json() if resp.status == 200 else None
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return None
    version = doc.get("version") if isinstance(doc, dict) else None
    return version if isinstance(version, str) else None


def _prompt() -> str:
    try:
        return input("> ").strip()
    except EOFError:
        return ""


async def _first_model(client: SealedClient) -> str:
    try:
        async with client.session.get(
            client.scheduler_url + "/v1/models", headers=client.auth_headers()
        ) as resp:
            doc = await resp.json()
    except (aiohttp.ClientError, TimeoutError, ValueError):
        raise ConfigError("the scheduler did not list its models; pass --model") from None
    data = doc.get("data") if isinstance(doc, dict) else None
    models = [m.get("id") for m in data if isinstance(m, dict)] if isinstance(data, list) else []
    if not models:
        raise ConfigError("the cluster serves no model right now; pass --model")
    return str(models[0])


async def _print_stream(payloads: Any) -> str:
    parts: list[str] = []
    async for payload in payloads:
        for event in payload.split(b"\n\n"):
            if not event.startswith(b"data: {"):
                continue
            try:
                chunk = json.loads(event[6:])
            except ValueError:
                continue  # not an event this chat can show
            for choice in chunk.get("choices", []):
                piece = choice.get("delta", {}).get("content")
                if piece:
                    parts.append(piece)
                    sys.stdout.write(piece)
                    sys.stdout.flush()
    sys.stdout.write("\n")
    return "".join(parts)


def register(main: click.Group) -> None:
    main.add_command(proxy)
    main.add_command(chat)
