"""HTTP plumbing shared by the Hearth services: the error middleware, JSON bodies, and serving an app.

Every error leaves a service in OpenAI's shape (see ``protocol.errors``). Unexpected exceptions are logged by
type and stack only: an exception's message may quote request text, so it is never logged or returned.
"""

from __future__ import annotations

import json
import logging
import traceback
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from protocol.errors import (
    HearthError,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
)

log = logging.getLogger("hearth.web")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_response(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        body=json.dumps(obj, separators=(",", ":")).encode(),
        status=status,
        headers=headers,
        content_type="application/json",
    )


def error_response(exc: HearthError) -> web.Response:
    return json_response(exc.to_body(), status=exc.status, headers=exc.headers())


def log_unexpected(where: str, exc: BaseException) -> None:
    """Log an unexpected exception without its message, which may contain user text."""
    stack = "".join(traceback.format_tb(exc.__traceback__))
    log.error("unexpected %s in %s\n%s", type(exc).__name__, where, stack)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except HearthError as exc:
        return error_response(exc)
    except web.HTTPRequestEntityTooLarge:
        limit = request.app._client_max_size
        return error_response(PayloadTooLarge(f"the request body is larger than the limit of {limit} bytes"))
    except web.HTTPNotFound:
        return error_response(NotFound(f"no such endpoint: {request.method} {request.path}"))
    except web.HTTPMethodNotAllowed:
        return error_response(MethodNotAllowed(f"{request.method} is not allowed on {request.path}"))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error_response(_status_error(exc.status, exc.reason))
    except Exception as exc:
        log_unexpected(f"{request.method} {request.path}", exc)
        return error_response(HearthError("internal error; the operator can find it in the server log"))


def _status_error(status: int, reason: str) -> HearthError:
    err = HearthError(reason)
    err.status = status  # type: ignore[misc]
    return err


async def read_json(request: web.Request) -> Any:
    """The request's JSON body; raise InvalidRequest (or PayloadTooLarge via aiohttp) when it is not."""
    raw = await request.read()
    if not raw:
        raise InvalidRequest("the request body is empty; send a JSON object")
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise InvalidRequest("the request body is not valid JSON") from None


async def start_site(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, str]:
    """Serve ``app`` on host:port (0 picks a free port); return the runner and the base URL."""
    # handler_cancellation: a client that goes away cancels its handler at once, which is how a
    # disconnected stream reaches the generation job and frees the backend.
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise HearthError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    bound_host, bound_port = runner.addresses[0][:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    return runner, f"http://{shown}:{bound_port}"
