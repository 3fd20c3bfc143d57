"""HTTP plumbing shared by the Hearth services: the error middleware, JSON bodies, and serving an app.

Every error leaves a service in OpenAI's shape (see ``protocol.errors``). Unexpected exceptions are logged by
type and stack only: an exception's message may quote request text, so it is never logged or returned.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import json
import logging
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from aiohttp import ClientResponse, web

from protocol.errors import (
    HearthError,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
)
from protocol.logs import describe_exception
from protocol.server import GUARD
from protocol.server import start_site as start_site  # where the services import it from

log = logging.getLogger("hearth.web")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


T = TypeVar("T")


@functools.lru_cache(maxsize=1024)
def is_loopback(host: str | None) -> bool:
    """Whether ``host`` (an address, or a URL's host name) names this machine's loopback interface."""
    if not host:
        return False
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # ::ffff:127.0.0.1, as a dual-stack socket reports an IPv4 peer
    return address.is_loopback


def in_daemon_thread(fn: Callable[[], T], name: str) -> asyncio.Future[T]:
    """Run a long blocking step (a model load, a download) in a daemon thread.

    Unlike ``asyncio.to_thread``, the process need not wait for it on exit: Ctrl-C during a 10-minute
    download stops the program now, not after the download.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(ok: bool, value: Any) -> None:
        if not future.done():
            future.set_result(value) if ok else future.set_exception(value)

    def run() -> None:
        try:
            outcome: tuple[bool, Any] = (True, fn())
        except BaseException as exc:
            outcome = (False, exc)
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits for this any more
            loop.call_soon_threadsafe(settle, *outcome)

    threading.Thread(target=run, name=name, daemon=True).start()
    return future


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
    log.error("unexpected %s in %s\n%s", type(exc).__name__, where, describe_exception(exc))


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    guard = request.app.get(GUARD)
    if guard is not None:
        guard.request_started(request.transport)
    try:
        limit = request.app._client_max_size
        if request.content_length is not None and request.content_length > limit:
            # Refused on its header: a client announcing 10 GiB must not hold a handler while it trickles.
            # Its body is never read, so the connection cannot carry another request.
            response = error_response(_too_large(limit))
            response.force_close()
            return response
        return await handler(request)
    except HearthError as exc:
        return error_response(exc)
    except web.HTTPRequestEntityTooLarge:
        return error_response(_too_large(request.app._client_max_size))
    except web.HTTPNotFound:
        return error_response(NotFound(f"no such endpoint: {request.method} {request.path}"))
    except web.HTTPMethodNotAllowed:
        return error_response(MethodNotAllowed(f"{request.method} is not allowed on {request.path}"))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        # Other refusals aiohttp raises itself (a malformed request line, say): same shape, its status.
        return error_response(HearthError.from_body(exc.status, {"error": {"message": exc.reason}}))
    except Exception as exc:
        log_unexpected(f"{request.method} {request.path}", exc)
        return error_response(HearthError("internal error; the operator can find it in the server log"))
    finally:
        if guard is not None:
            guard.request_finished(request.transport)


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"the request body is larger than the limit of {limit} bytes")


BODY_READ_TIMEOUT_S = 30.0


async def read_body(request: web.Request) -> bytes:
    """The raw body, size-limited by the app (413) and time-limited, so a client trickling bytes cannot
    hold a handler forever."""
    try:
        async with asyncio.timeout(BODY_READ_TIMEOUT_S):
            return await request.read()
    except TimeoutError:
        raise InvalidRequest(f"the request body did not arrive within {BODY_READ_TIMEOUT_S:.0f} s") from None


def parse_json(raw: bytes) -> Any:
    if not raw:
        raise InvalidRequest("the request body is empty; send a JSON object")
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise InvalidRequest("the request body is not valid JSON") from None
    except RecursionError:
        raise InvalidRequest("the request body is nested too deeply") from None


async def read_json(request: web.Request) -> Any:
    """The request's JSON body; raise InvalidRequest (or PayloadTooLarge via aiohttp) when it is not."""
    return parse_json(await read_body(request))


async def read_capped(response: ClientResponse, cap: int) -> bytes:
    """A whole response body of at most ``cap`` bytes (``content.read(n)`` may return less than n)."""
    body = bytearray()
    async for chunk in response.content.iter_any():
        body += chunk
        if len(body) > cap:
            raise ValueError("response body over the limit")
    return bytes(body)
