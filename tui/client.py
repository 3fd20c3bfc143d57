"""The console's headless client for the scheduler's admin API and its live event stream.

Async (aiohttp), no Textual: the console's workers, the `hearth` admin commands and the tests all use it.
Every reply is parsed into its document in ``protocol``, so a field the scheduler renames fails here, in
one place, not in a widget. Errors:

    HearthError (protocol.errors)   the scheduler's own answer (HearthError.from_body): 401, 403, 404, 409…
    ├── Unreachable                 503: refused connection, timeout, a gateway's page, a stream that broke
    └── ProtocolError               502: a JSON answer that is not the document this route answers

Only the operator's token travels; the client keeps no state beyond its connection pool.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping, Sequence
from types import TracebackType
from typing import Any, ClassVar, TypeVar
from urllib.parse import quote

import aiohttp
from pydantic import BaseModel, ValidationError

from protocol.accounts import (
    AuditLog,
    Token,
    TokenCreateRequest,
    TokenList,
    TokenSecret,
    UsageDimension,
    UsageReport,
)
from protocol.admin import (
    AuthorityKeys,
    Enrollment,
    EnrollmentCode,
    EnrollmentList,
    EnrollmentState,
    ModelAction,
    ModelPlacements,
    NodeList,
    QueueState,
)
from protocol.errors import HearthError, ProtocolError
from protocol.federation import Tier
from protocol.policy import AdminEvent, PolicyState
from protocol.terms import TermsDocument, TermsStatusList

M = TypeVar("M", bound=BaseModel)

MAX_REPLY_BYTES = 8 * 1024 * 1024  # the largest admin document (a long audit log) is far below this
MAX_EVENT_BYTES = 64 * 1024  # one event is a few hundred bytes of metadata
# The scheduler writes a keepalive comment every 15 s (scheduler.admin_policy.KEEPALIVE_S): three missed
# mean the connection is dead, even where no RST ever arrives (a laptop that slept, a NAT that forgot it).
EVENTS_READ_TIMEOUT_S = 45.0


class Unreachable(HearthError):
    """The scheduler cannot be reached: refused, timed out, a proxy's error page, or a stream that broke.
    The console shows a banner and reconnects; the CLI prints the message."""

    status: ClassVar[int] = 503
    error_type: ClassVar[str] = "server_error"
    default_code: ClassVar[str | None] = "unreachable"


class ConsoleClient:
    """One operator's session with one scheduler. Use as ``async with ConsoleClient(url, token) as c``
    (or call ``close``); the HTTP session is opened at the first call, in the caller's event loop."""

    def __init__(self, url: str, token: str, *, timeout: float = 10.0) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self._token = token
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> ConsoleClient:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    # ----- reads -----

    async def nodes(self) -> NodeList:
        return await self._get("/admin/nodes", NodeList)

    async def enrollments(self, state: EnrollmentState | None = None) -> EnrollmentList:
        params = {"state": state} if state is not None else None
        return await self._get("/admin/enrollments", EnrollmentList, params)

    async def models(self) -> ModelPlacements:
        return await self._get("/admin/models", ModelPlacements)

    async def authority(self) -> AuthorityKeys:
        return await self._get("/admin/authority", AuthorityKeys)

    async def tokens(self) -> TokenList:
        return await self._get("/admin/tokens", TokenList)

    async def usage(self, by: UsageDimension = "user", since: str = "7d") -> UsageReport:
        return await self._get("/admin/usage", UsageReport, {"by": by, "since": since})

    async def audit(self, since: str = "7d", limit: int = 1000) -> AuditLog:
        return await self._get("/admin/audit", AuditLog, {"since": since, "limit": str(limit)})

    async def policy(self) -> PolicyState:
        return await self._get("/admin/policy", PolicyState)

    async def queue(self) -> QueueState:
        return await self._get("/admin/queue", QueueState)

    async def terms_status(self) -> TermsStatusList:
        return await self._get("/admin/terms", TermsStatusList)

    async def metrics_text(self) -> str:
        """The Prometheus text of ``/metrics`` (tokens per second, time to first token, queue depth)."""
        status, _, raw = await self._request("GET", "/metrics")
        if status != 200:
            raise self._error(status, raw, {})
        return raw.decode("utf-8", "replace")

    # ----- actions -----

    async def approve(self, node_id: str, certificate: dict[str, Any]) -> Enrollment:
        """Approve a pending node with a certificate signed on this machine (tui.authority)."""
        path = f"/admin/enrollments/{_segment(node_id)}/approve"
        return await self._post(path, Enrollment, {"certificate": certificate})

    async def reject(self, node_id: str) -> Enrollment:
        return await self._post(f"/admin/enrollments/{_segment(node_id)}/reject", Enrollment)

    async def revoke_node(self, node_id: str) -> Enrollment:
        return await self._post(f"/admin/nodes/{_segment(node_id)}/revoke", Enrollment)

    async def drain(self, node_id: str, drain: bool = True) -> Enrollment:
        return await self._post(f"/admin/nodes/{_segment(node_id)}/drain", Enrollment, {"drain": drain})

    async def load_model(self, node_id: str, model: str, evict: Sequence[str] = ()) -> ModelAction:
        """Have a node load one of its models now, unloading ``evict`` first if its memory is short."""
        path = f"/admin/nodes/{_segment(node_id)}/models/{_segment(model)}/load"
        return await self._post(path, ModelAction, {"evict": list(evict)})

    async def unload_model(self, node_id: str, model: str) -> ModelAction:
        """Unload a node's model; ConflictError (model_busy) while it has work: drain the node first."""
        return await self._post(
            f"/admin/nodes/{_segment(node_id)}/models/{_segment(model)}/unload", ModelAction
        )

    async def create_code(
        self, tier: Tier, ttl_seconds: float | None = None, note: str = ""
    ) -> EnrollmentCode:
        doc: dict[str, Any] = {"tier": tier, "note": note}
        if ttl_seconds is not None:
            doc["ttl_seconds"] = float(ttl_seconds)
        return await self._post("/admin/enrollment-codes", EnrollmentCode, doc)

    async def create_token(self, request: TokenCreateRequest) -> TokenSecret:
        doc = request.model_dump(mode="json", exclude_none=True)
        return await self._post("/admin/tokens", TokenSecret, doc)

    async def revoke_token(self, token_id: str) -> Token:
        return await self._post(f"/admin/tokens/{_segment(token_id)}/revoke", Token)

    async def rotate_token(self, token_id: str, grace_seconds: float = 0) -> TokenSecret:
        doc = {"grace_seconds": float(grace_seconds)}
        return await self._post(f"/admin/tokens/{_segment(token_id)}/rotate", TokenSecret, doc)

    async def put_policy(self, text: str, digest: str | None = None) -> PolicyState:
        """Replace the policy file; with ``digest`` (from ``policy()``) only if nobody changed it since."""
        doc: dict[str, Any] = {"text": text}
        if digest is not None:
            doc["digest"] = digest
        return await self._call("PUT", "/admin/policy", PolicyState, json_body=doc)

    async def reload_policy(self) -> PolicyState:
        """Read the policy file now; InvalidRequest (invalid_policy) names the line of a bad one, which
        leaves the policy in force as it was."""
        return await self._post("/admin/policy/reload", PolicyState)

    # ----- a user's own routes (any token): the terms of use -----

    async def terms(self) -> TermsDocument:
        """``GET /v1/terms``: the terms in force and where this client's token stands with them."""
        return await self._get("/v1/terms", TermsDocument)

    async def accept_terms(self, version: str) -> TermsDocument:
        return await self._post("/v1/terms/accept", TermsDocument, {"version": version})

    # ----- the live event stream -----

    async def events(self) -> AsyncIterator[AdminEvent]:
        """Events as the scheduler publishes them, from now on, until the connection ends; then (the
        stream is endless by design, so any end means the scheduler went away) Unreachable is raised and
        the caller reconnects. An event this client does not know (a newer scheduler's) is skipped."""
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=self.timeout, sock_read=EVENTS_READ_TIMEOUT_S
        )
        url = self.url + "/admin/events"
        try:
            async with self._open().get(
                url, timeout=timeout, headers={"Accept": "text/event-stream"}
            ) as resp:
                if resp.status != 200:
                    raw = await _read_bounded(resp.content, MAX_REPLY_BYTES, resp.content_length)
                    raise self._error(resp.status, raw, resp.headers)
                data: list[bytes] = []
                while line := await resp.content.readline():
                    if len(line) > MAX_EVENT_BYTES or not line.endswith(b"\n"):
                        break  # cut off mid-line (the connection dropped), or not an event stream
                    line = line.rstrip(b"\r\n")
                    if line.startswith(b"data:"):
                        data.append(line[5:].removeprefix(b" "))
                    elif not line and data:
                        event = _event(b"\n".join(data))
                        data = []
                        if event is not None:
                            yield event
                    # other lines: comments (": keepalive") and fields this stream does not use
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
            raise self._unreachable(exc) from None
        raise Unreachable(f"the scheduler at {self.url} closed the event stream")

    # ----- the wire -----

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(headers={"Authorization": f"Bearer {self._token}"})
        return self._session

    async def _get(self, path: str, model: type[M], params: Mapping[str, str] | None = None) -> M:
        return await self._call("GET", path, model, params=params)

    async def _post(self, path: str, model: type[M], doc: dict[str, Any] | None = None) -> M:
        return await self._call("POST", path, model, json_body=doc or {})

    async def _call(
        self,
        method: str,
        path: str,
        model: type[M],
        *,
        params: Mapping[str, str] | None = None,
        json_body: dict[str, Any] | None = None,
    ) -> M:
        status, headers, raw = await self._request(method, path, params=params, json_body=json_body)
        if status >= 400:
            raise self._error(status, raw, headers)
        doc = _json(raw)
        if doc is None:
            raise Unreachable(
                f"the scheduler at {self.url} answered {status} with something that is not JSON: "
                "is the URL a Hearth scheduler?"
            )
        try:
            return model.model_validate(doc)
        except ValidationError:
            raise ProtocolError(
                f"the scheduler at {self.url} answered {path} with a document this console does not read "
                "(another version of Hearth?)"
            ) from None

    async def _request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        json_body: dict[str, Any] | None = None,
    ) -> tuple[int, Mapping[str, str], bytes]:
        timeout = aiohttp.ClientTimeout(total=self.timeout)
        try:
            async with self._open().request(
                method, self.url + path, params=params, json=json_body, timeout=timeout
            ) as resp:
                raw = await _read_bounded(resp.content, MAX_REPLY_BYTES, resp.content_length)
                return resp.status, resp.headers, raw
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise self._unreachable(exc) from None

    def _error(self, status: int, raw: bytes, headers: Mapping[str, str]) -> HearthError:
        """The scheduler's error in its own words, or Unreachable when something else answered (a proxy's
        502 page, a web server that is not Hearth)."""
        body = _json(raw)
        if isinstance(body, dict) and isinstance(body.get("error"), dict):
            return HearthError.from_body(status, body, headers)
        return Unreachable(f"the scheduler at {self.url} answered {status}, not with a Hearth error")

    def _unreachable(self, exc: BaseException) -> Unreachable:
        return Unreachable(f"cannot reach the scheduler at {self.url}: {_reason(exc, self.timeout)}")


async def _read_bounded(stream: aiohttp.StreamReader, limit: int, declared: int | None) -> bytes:
    """The whole body, refused past ``limit`` bytes (a console must not fill its memory on a bad URL)."""
    too_large = ProtocolError(f"the scheduler's reply is larger than {limit // (1024 * 1024)} MiB")
    if declared is not None and declared > limit:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    async for chunk in stream.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def _json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:  # UnicodeDecodeError included
        return None


def _event(data: bytes) -> AdminEvent | None:
    try:
        return AdminEvent.model_validate_json(data)
    except ValidationError:
        return None


def _segment(value: str) -> str:
    """An id as one path segment: a "/" or "?" in it must not reach another route."""
    return quote(value, safe="")


def _reason(exc: BaseException, timeout: float) -> str:
    """Why a connection failed, in a few words (aiohttp's own messages run to a paragraph)."""
    if isinstance(exc, TimeoutError):
        return f"no answer within {timeout:g} s"
    if isinstance(exc, aiohttp.ClientConnectorError):
        if isinstance(exc.os_error, ConnectionRefusedError):
            return "connection refused (is it running, on this port?)"
        return exc.os_error.strerror or str(exc.os_error) or "connection refused"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "the connection closed"
    if isinstance(exc, aiohttp.ClientPayloadError):
        return "the connection closed mid-answer"
    text = str(exc).splitlines()[0] if str(exc) else ""
    return text or type(exc).__name__
