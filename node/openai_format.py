"""OpenAI response bodies, built on the node (the only place that sees the text).

The node writes the exact bytes the client will receive, so the scheduler relays them untouched: with
end-to-end encryption those bytes are sealed here and opened only by the user's proxy.
"""

from __future__ import annotations

import json
import time
from typing import Any

from protocol.schemas import Endpoint


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


class ResponseWriter:
    """Turns text deltas into SSE events (streaming) or one JSON body (not streaming)."""

    def __init__(
        self,
        endpoint: Endpoint,
        *,
        model: str,
        request_id: str,
        stream: bool,
        include_usage: bool,
        created: int | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.stream = stream
        self.include_usage = include_usage
        self._parts: list[str] = []
        chat = endpoint == "chat"
        self._head = {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{request_id}",
            "object": ("chat.completion.chunk" if stream else "chat.completion")
            if chat
            else "text_completion",
            "created": int(time.time()) if created is None else created,
            "model": model,
        }

    def _event(self, choices: list[dict[str, Any]], extra: dict[str, Any] | None = None) -> bytes:
        body = {**self._head, "choices": choices, **(extra or {})}
        return b"data: " + _dumps(body) + b"\n\n"

    def _choice(self, text: str | None, finish_reason: str | None, *, role: bool = False) -> dict[str, Any]:
        if self.endpoint == "chat":
            delta: dict[str, Any] = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            return {"index": 0, "delta": delta, "finish_reason": finish_reason}
        return {"index": 0, "text": text or "", "finish_reason": finish_reason, "logprobs": None}

    def start(self) -> bytes:
        if self.stream and self.endpoint == "chat":
            return self._event([self._choice("", None, role=True)])
        return b""

    def delta(self, text: str) -> bytes:
        if not text:
            return b""
        if self.stream:
            return self._event([self._choice(text, None)])
        self._parts.append(text)
        return b""

    def keepalive(self) -> bytes:
        """Bytes that say "still working": an SSE comment, which clients and proxies skip, or nothing."""
        return b": keepalive\n\n" if self.stream else b""

    def finish(self, finish_reason: str, prompt_tokens: int, completion_tokens: int) -> bytes:
        used = usage(prompt_tokens, completion_tokens)
        if self.stream:
            tail = self._event([self._choice(None if self.endpoint == "chat" else "", finish_reason)])
            if self.include_usage:
                tail += self._event([], {"usage": used})
            return tail + b"data: [DONE]\n\n"
        text = "".join(self._parts)
        if self.endpoint == "chat":
            choice: dict[str, Any] = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish_reason,
            }
        else:
            choice = {"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}
        return _dumps({**self._head, "choices": [choice], "usage": used})
