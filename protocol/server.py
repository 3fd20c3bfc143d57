"""Serving a Hearth app to clients that may be slow, greedy or hostile, with logs that hold no request bytes.

aiohttp bounds a request's body (``client_max_size``) but not the time its request line and headers take,
nor how many connections one address holds: 100 connections sending a byte a second would each be held
as long as the client likes. Each connection here goes through a ``ConnectionGuard``:

- its request line and headers must be complete within ``header_timeout`` of the request's first byte
  (a keep-alive connection's next request included), or the connection is closed;
- an idle keep-alive connection is closed after ``idle_timeout`` (aiohttp's keep-alive timer);
- one address holds at most ``max_connections_per_address`` connections; another one is answered 503 with
  Retry-After, in OpenAI's error shape, and closed.

aiohttp's server logs a malformed request ("Error handling request") with the parser's exception, whose
message quotes the raw bytes it choked on: part of a request, perhaps a whole prompt. Here a message that
cannot be parsed is answered in OpenAI's error shape, naming none of its bytes, and not logged at all; the
rest of aiohttp's lines (``aiohttp.server``) keep an exception's type and nothing of its message
(``protocol.logs``).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import Counter

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from pydantic import BaseModel, ConfigDict, Field

from protocol.errors import HearthError, Unavailable
from protocol.logs import RedactExceptions, describe_exception, install_loop_handler

log = logging.getLogger("hearth.http")
# aiohttp's own lines (its debug chatter, an unhandled exception) stay under its name, without exception text.
_aiohttp_log = logging.getLogger("aiohttp.server")
_aiohttp_log.addFilter(RedactExceptions())

SHUTDOWN_TIMEOUT_S = 2.0
REFUSED_LINGER_S = 2.0  # a refused connection stays open this long at most, so its 503 is read, not reset


class ServerLimits(BaseModel):
    """What one client connection may take of a service."""

    model_config = ConfigDict(extra="forbid")

    header_timeout: float = Field(
        default=20.0,
        gt=0,
        le=600,
        description="Seconds a client has, from its request's first byte, to send the request line and "
        "headers; a slower connection is closed.",
    )
    idle_timeout: float = Field(
        default=75.0,
        gt=0,
        le=3600,
        description="Seconds an idle keep-alive connection stays open (longer than clients' pools keep "
        "theirs, so a client never reuses a connection the server is closing).",
    )
    max_connections_per_address: int = Field(
        default=256,
        ge=0,
        description="Open connections one client address may hold; another is answered 503 and closed. 0: "
        "no limit. Users behind one NAT share an address, so keep it well above one user's needs.",
    )


class ConnectionGuard:
    """The connections of one served app: per-address counts and each connection's header timer."""

    def __init__(self, limits: ServerLimits) -> None:
        self.limits = limits
        self._per_address: Counter[str] = Counter()
        self._open: dict[asyncio.BaseTransport, _Guarded] = {}

    def protocol(self, inner: _Handler) -> asyncio.Protocol:
        return _Guarded(self, inner)

    def request_started(self, transport: asyncio.BaseTransport | None) -> None:
        """The app has the request's headers (called by the error middleware): its timer stops."""
        guarded = self._open.get(transport) if transport is not None else None
        if guarded is not None:
            guarded.request_started()

    def request_finished(self, transport: asyncio.BaseTransport | None) -> None:
        """The app answered: a keep-alive connection's next request is timed from its first byte."""
        guarded = self._open.get(transport) if transport is not None else None
        if guarded is not None:
            guarded.request_finished()

    def _admit(self, guarded: _Guarded, transport: asyncio.BaseTransport) -> bool:
        limit = self.limits.max_connections_per_address
        guarded.address = _address(transport)
        if limit and self._per_address[guarded.address] >= limit:
            return False
        self._per_address[guarded.address] += 1
        self._open[transport] = guarded
        return True

    def _release(self, guarded: _Guarded, transport: asyncio.BaseTransport | None) -> None:
        if transport is not None and self._open.pop(transport, None) is not None:
            self._per_address[guarded.address] -= 1
            if self._per_address[guarded.address] <= 0:
                del self._per_address[guarded.address]


def _address(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return "local"  # a Unix socket: every peer is this machine


class _Guarded(asyncio.Protocol):
    """aiohttp's protocol for one connection, with the guard in front of it."""

    def __init__(self, guard: ConnectionGuard, inner: _Handler) -> None:
        self._guard = guard
        self._inner = inner
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._refused = False
        self._headers_done = False  # the request being read has its whole head (line and headers)
        self.address = ""
        self.busy = False  # the app is handling a request of this connection

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        if not self._guard._admit(self, transport):
            self._refuse(transport)
            return
        self._inner.connection_made(transport)

    def _refuse(self, transport: asyncio.Transport) -> None:
        self._refused = True
        err = Unavailable(
            "too many connections from this address; close some and try again",
            code="too_many_connections",
            retry_after=REFUSED_LINGER_S,
        )
        transport.write(_raw_response(err))
        # Closing at once with the client's request unread would reset the connection before it reads the
        # 503: wait for its first bytes (or a moment), then close.
        self._timer = asyncio.get_running_loop().call_later(REFUSED_LINGER_S, transport.close)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            assert self._transport is not None
            self._transport.close()
            return
        timing = not self.busy and not self._headers_done and bool(data)
        if timing and self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(
                self._guard.limits.header_timeout, self._too_slow
            )
        heads = self._inner.heads
        self._inner.data_received(data)
        if timing and self._inner.heads > heads:
            # aiohttp's parser has the whole head: the timer stops here, as the bytes arrive, however long
            # a loaded event loop then takes to start the request's handler. (Scanning for the blank line
            # ourselves would be fooled by the empty lines a parser skips before a request line.)
            self._headers_done = True
            self._stop_timer()

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def request_started(self) -> None:
        self.busy = True
        self._stop_timer()

    def request_finished(self) -> None:
        """A keep-alive connection's next request is timed from its own first byte."""
        self.busy = False
        self._headers_done = False

    def _too_slow(self) -> None:
        self._timer = None
        if self.busy or self._transport is None:
            return
        # Debug only: a client's slowness must not be a way to fill the log.
        log.debug("closed a connection from %s: its request headers took too long", self.address)
        self._transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_timer()
        if self._refused:
            return
        self._guard._release(self, self._transport)
        self._inner.connection_lost(exc)

    def eof_received(self) -> bool | None:
        if not self._refused:
            self._inner.eof_received()
        return None  # aiohttp's handler closes on end of input, as asyncio then does

    def pause_writing(self) -> None:
        if not self._refused:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if not self._refused:
            self._inner.resume_writing()


def _raw_response(err: HearthError) -> bytes:
    body = json.dumps(err.to_body(), separators=(",", ":")).encode()
    head = [
        f"HTTP/1.1 {err.status} Service Unavailable",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        "Connection: close",
        *(f"{k}: {v}" for k, v in err.headers().items()),
    ]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


class _Handler(RequestHandler):
    """aiohttp's connection handler, answering a message it cannot parse in OpenAI's error shape.

    A malformed request is the client's mistake: it gets a 4xx naming no byte it sent, and the log gets
    nothing (an unauthenticated client could otherwise fill it). A fault of aiohttp's own (5xx) is logged
    by type and stack."""

    @property
    def heads(self) -> int:
        """Request heads aiohttp's parser has read on this connection (its own count)."""
        return self._request_count

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status >= 500:
            log.error(
                "unexpected %s in aiohttp\n%s", type(exc).__name__, describe_exception(exc or Exception())
            )
        if request.writer.output_size > 0:
            raise ConnectionError("the response had begun; no error can be sent")
        what, code = (
            ("the request is not valid HTTP/1.1", "malformed_request")
            if status < 500
            else ("internal error; the operator can find it in the server log", "internal_error")
        )
        err = HearthError.from_body(status, {"error": {"message": what, "code": code}})
        response = web.Response(
            status=status,
            body=json.dumps(err.to_body(), separators=(",", ":")).encode(),
            content_type="application/json",
        )
        response.force_close()
        return response


GUARD = web.AppKey("connection_guard", ConnectionGuard)


class _GuardedSite(web.TCPSite):
    """A TCP site whose connections go through the app's ConnectionGuard."""

    def __init__(self, runner: web.AppRunner, guard: ConnectionGuard, host: str, port: int) -> None:
        super().__init__(runner, host, port, reuse_address=True)
        self._guard = guard

    async def start(self) -> None:
        await web.BaseSite.start(self)
        server = self._runner.server
        assert server is not None
        loop = asyncio.get_running_loop()
        # aiohttp's Server makes a RequestHandler from its keyword arguments the same way.
        self._server = await loop.create_server(
            lambda: self._guard.protocol(_Handler(server, loop=loop, **server._kwargs)),
            self._host,
            self._port,
            reuse_address=True,
            backlog=self._backlog,
        )


async def start_site(
    app: web.Application, host: str, port: int, limits: ServerLimits | None = None
) -> tuple[web.AppRunner, str]:
    """Serve ``app`` on host:port (0 picks a free port) within ``limits``; return the runner and base URL."""
    limits = limits or ServerLimits()
    install_loop_handler()
    guard = ConnectionGuard(limits)
    app[GUARD] = guard
    # handler_cancellation: a client that goes away cancels its handler at once, which is how a
    # disconnected stream reaches the generation job and frees the backend.
    # A short shutdown_timeout: on Ctrl-C, streams still running are cut after it rather than awaited.
    runner = web.AppRunner(
        app,
        handler_cancellation=True,
        access_log=None,
        shutdown_timeout=SHUTDOWN_TIMEOUT_S,
        keepalive_timeout=limits.idle_timeout,
        logger=_aiohttp_log,
    )
    await runner.setup()
    site = _GuardedSite(runner, guard, host, port)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise HearthError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    bound_host, bound_port = runner.addresses[0][:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    return runner, f"http://{shown}:{bound_port}"
