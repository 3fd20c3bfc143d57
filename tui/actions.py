"""What each action the screens ask for does over the client (run by the app's action worker)."""

from __future__ import annotations

from pathlib import Path

from pydantic import ValidationError

from protocol.accounts import TokenCreateRequest, TokenSecret
from protocol.errors import ConfigError
from tui.authority import approve_enrollment
from tui.client import ConsoleClient
from tui.messages import Request


async def perform(
    client: ConsoleClient, request: Request, authority_dir: Path | None
) -> tuple[str, TokenSecret | None]:
    """Do ``request``; what happened in a line, and the secret the scheduler issued if any. Errors raise
    (HearthError with the scheduler's message)."""
    kind, target = request.kind, request.target
    if kind in ("drain", "undrain"):
        await client.drain(target, kind == "drain")
        return (f"{target}: draining" if kind == "drain" else f"{target}: takes work again"), None
    if kind == "revoke_node":
        await client.revoke_node(target)
        return f"{target}: revoked", None
    if kind == "reject":
        await client.reject(target)
        return f"{target}: rejected", None
    if kind == "approve":
        return await _approve(client, target, authority_dir), None
    if kind in ("load_model", "unload_model"):
        model = dict(request.fields).get("model", "")
        if kind == "load_model":
            done = await client.load_model(target, model)
            return f"{target}: loading {done.model}", None
        done = await client.unload_model(target, model)
        return f"{target}: {done.model} unloaded", None
    if kind == "reload_policy":
        policy = await client.reload_policy()
        return f"policy reloaded from {policy.source}", None
    if kind == "revoke_token":
        token = await client.revoke_token(target)
        return f"token {token.name} ({token.id}): revoked", None
    if kind == "rotate_token":
        secret = await client.rotate_token(target)
        return f"token {secret.token.name}: rotated", secret
    if kind == "create_token":
        fields = dict(request.fields)
        try:
            doc = TokenCreateRequest.model_validate(
                {"name": fields.get("name", ""), "group": fields.get("group") or "default",
                 "scope": fields.get("scope") or "user"}
            )  # fmt: skip
        except ValidationError as exc:
            raise ConfigError(
                f"a token needs {exc.errors()[0]['loc'][0]}: {exc.errors()[0]['msg']}"
            ) from None
        secret = await client.create_token(doc)
        return f"token {secret.token.name}: created", secret
    raise ConfigError(f"the console has no action {kind!r}")


async def _approve(client: ConsoleClient, node_id: str, authority_dir: Path | None) -> str:
    if authority_dir is None:
        raise ConfigError("approving needs the authority key: start the console with --authority DIR")
    await approve_enrollment(client, authority_dir, node_id)
    return f"{node_id}: approved"
