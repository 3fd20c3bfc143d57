"""The one error hierarchy every Hearth part raises and every API speaks.

    HearthError                      500 server_error        (root; internal faults)
    ├── InvalidRequest               400 invalid_request_error
    │   └── ContextLengthExceeded    400 invalid_request_error / context_length_exceeded
    ├── AuthenticationFailed         401 authentication_error / invalid_api_key
    ├── PermissionDenied             403 permission_error
    ├── NotFound                     404 invalid_request_error / not_found
    │   └── ModelNotFound            404 invalid_request_error / model_not_found
    ├── ConflictError                409 invalid_request_error / conflict
    │   └── Reseal                   409 invalid_request_error / reseal (+ fresh candidates)
    ├── PayloadTooLarge              413 invalid_request_error / payload_too_large
    ├── Unprocessable                422 invalid_request_error
    ├── RateLimited                  429 rate_limit_error (+ Retry-After)
    ├── Unavailable                  503 server_error / no_capacity (+ Retry-After)
    ├── UpstreamFailed               502 server_error / node_failed
    └── ConfigError                  CLI and start-up problems (one line on stderr, exit 1)

Messages are written for the person who sent the request. They must never quote prompt or completion
text: an error message can end up in a client's log, and the server logs only the error code.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar


def come_back_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The headers of an upstream answer that tell a client when to come back: ``Retry-After`` and every
    ``x-ratelimit-*``. A service relaying an answer passes them on."""
    return {
        name: value
        for name, value in headers.items()
        if name.lower() == "retry-after" or name.lower().startswith("x-ratelimit-")
    }


class HearthError(Exception):
    """Root of every error Hearth raises on purpose."""

    status: ClassVar[int] = 500
    error_type: ClassVar[str] = "server_error"
    default_code: ClassVar[str | None] = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code if code is not None else self.default_code
        self.retry_after = retry_after
        self.relayed_headers: dict[str, str] = {}

    def to_body(self) -> dict[str, Any]:
        """OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}``."""
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }

    def headers(self) -> dict[str, str]:
        out = dict(self.relayed_headers)
        if self.retry_after is not None:
            out["Retry-After"] = str(max(1, round(self.retry_after)))
        return out

    def keep_headers(self, headers: Mapping[str, str]) -> None:
        """Keep what the upstream answer said about when to come back: ``Retry-After`` (seconds, or an HTTP
        date kept as written) and every ``x-ratelimit-*`` header."""
        for name, value in come_back_headers(headers).items():
            seconds = value.strip()
            if name.lower() != "retry-after":
                self.relayed_headers[name] = value
            elif seconds.isdigit() and len(seconds) <= 9:
                self.retry_after = float(seconds)
            else:
                self.relayed_headers["Retry-After"] = value

    @classmethod
    def from_body(cls, status: int, body: Any, headers: Mapping[str, str] | None = None) -> HearthError:
        """Rebuild an error relayed from another Hearth service (node → scheduler, scheduler → proxy), with
        the upstream answer's ``headers`` that say when to come back (see ``keep_headers``)."""
        err = body.get("error") if isinstance(body, dict) else None
        if not isinstance(err, dict):
            return UpstreamFailed("the node returned a malformed error")
        klass = _BY_STATUS.get(status) or (InvalidRequest if 400 <= status < 500 else HearthError)
        message = str(err.get("message") or "error")
        param = err.get("param")
        code = err.get("code")
        exc = klass(
            message,
            param=param if isinstance(param, str) else None,
            code=code if isinstance(code, str) else None,
        )
        if headers is not None:
            exc.keep_headers(headers)
        return exc


class InvalidRequest(HearthError):
    status = 400
    error_type = "invalid_request_error"
    default_code: ClassVar[str | None] = None


class ContextLengthExceeded(InvalidRequest):
    default_code = "context_length_exceeded"


class AuthenticationFailed(HearthError):
    status = 401
    error_type = "authentication_error"
    default_code = "invalid_api_key"


class PermissionDenied(HearthError):
    status = 403
    error_type = "permission_error"
    default_code = "permission_denied"


class NotFound(HearthError):
    status = 404
    error_type = "invalid_request_error"
    default_code = "not_found"


class ModelNotFound(NotFound):
    default_code = "model_not_found"


class MethodNotAllowed(HearthError):
    status = 405
    error_type = "invalid_request_error"
    default_code = "method_not_allowed"


class ConflictError(HearthError):
    status = 409
    error_type = "invalid_request_error"
    default_code = "conflict"


class Reseal(ConflictError):
    """None of a sealed request's candidates can take it: seal again to ``candidates`` (docs/protocol.md)."""

    default_code = "reseal"

    def __init__(self, message: str, candidates: list[str]) -> None:
        super().__init__(message)
        self.candidates = candidates

    def to_body(self) -> dict[str, Any]:
        body = super().to_body()
        body["error"]["candidates"] = self.candidates
        return body


class PayloadTooLarge(HearthError):
    status = 413
    error_type = "invalid_request_error"
    default_code = "payload_too_large"


class Unprocessable(HearthError):
    status = 422
    error_type = "invalid_request_error"
    default_code = None


class RateLimited(HearthError):
    status = 429
    error_type = "rate_limit_error"
    default_code = "rate_limit_exceeded"


class UpstreamFailed(HearthError):
    status = 502
    error_type = "server_error"
    default_code = "node_failed"


class Unavailable(HearthError):
    status = 503
    error_type = "server_error"
    default_code = "no_capacity"


class ConfigError(HearthError):
    """A problem with settings, files or the command line; the CLI prints it as one line."""

    default_code = "config_error"


class ProtocolError(HearthError):
    """Malformed bytes between Hearth services (frames, status documents)."""

    status = 502
    default_code = "protocol_error"


_BY_STATUS: dict[int, type[HearthError]] = {
    400: InvalidRequest,
    401: AuthenticationFailed,
    403: PermissionDenied,
    404: NotFound,
    405: MethodNotAllowed,
    409: ConflictError,
    413: PayloadTooLarge,
    422: Unprocessable,
    429: RateLimited,
    502: UpstreamFailed,
    503: Unavailable,
}
