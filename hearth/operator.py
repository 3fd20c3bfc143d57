"""The operator's client for the scheduler's admin API, used by `hearth enroll`, `hearth node revoke|drain`
and `hearth models`, and with a user's token by `hearth terms`. Blocking (it runs in a CLI); errors come back
as HearthError with the server's words.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from typing import Any

from protocol.errors import ConfigError, HearthError

DEFAULT_URL = "http://127.0.0.1:8000"
TIMEOUT_S = 30.0
MAX_REPLY_BYTES = 8 * 1024 * 1024


class AdminClient:
    def __init__(self, url: str | None, token: str | None, *, needs: str = "an admin token") -> None:
        self.url = (url or os.environ.get("HEARTH_SCHEDULER_URL") or DEFAULT_URL).rstrip("/")
        if not self.url.startswith(("http://", "https://")):
            raise ConfigError(f"{self.url} is not a scheduler URL (it starts with http:// or https://)")
        token = token or os.environ.get("HEARTH_TOKEN")
        if not token:
            raise ConfigError(f"this needs {needs}: pass --token or set HEARTH_TOKEN")
        self.token = token

    def get(self, path: str) -> Any:
        return self._call("GET", path, None)

    def post(self, path: str, doc: dict[str, Any] | None = None) -> Any:
        return self._call("POST", path, doc or {})

    def put(self, path: str, doc: dict[str, Any]) -> Any:
        return self._call("PUT", path, doc)

    def _call(self, method: str, path: str, doc: dict[str, Any] | None) -> Any:
        data = None if doc is None else json.dumps(doc).encode()
        req = urllib.request.Request(
            self.url + path,
            data=data,
            method=method,
            headers={"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=TIMEOUT_S) as resp:
                return json.loads(resp.read(MAX_REPLY_BYTES))
        except urllib.error.HTTPError as exc:
            raise _server_error(exc) from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ConfigError(f"cannot reach the scheduler at {self.url}: {reason}") from None
        except ValueError:
            raise ConfigError(f"the scheduler at {self.url} sent a reply that is not JSON") from None


def _server_error(exc: urllib.error.HTTPError) -> HearthError:
    try:
        body = json.loads(exc.read(64 * 1024))
    except ValueError:
        body = None
    err = HearthError.from_body(exc.code, body)
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return err
    return ConfigError(f"the scheduler answered {exc.code} {exc.reason}")
