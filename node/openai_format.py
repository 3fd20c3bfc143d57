"""OpenAI response bodies, built on the node (the only place that sees the text).

The node writes the exact bytes the client will receive, so the scheduler relays them untouched: with
end-to-end encryption those bytes are sealed here and opened only by the user's proxy.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from node.resume import Resume
from node.runner import TokenLogprob
from protocol.schemas import Endpoint


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


@dataclass
class _Choice:
    """One choice's answer so far (the text is kept only when the answer goes out whole)."""

    parts: list[str] = field(default_factory=list)
    logprobs: list[dict[str, Any]] = field(default_factory=list)  # chat's entries
    legacy: dict[str, list[Any]] | None = None  # completions' lists
    offset: int = 0  # completions' text_offset of the next token
    echoed: bool = False  # the prompt went out first (echo)
    finish_reason: str | None = None


class ResponseWriter:
    """Turns text deltas into SSE events (streaming) or one JSON body (not streaming).

    ``choices`` answers go out together, each under its index; ``logprobs`` adds each token's log
    probabilities (chat's shape or completions' legacy one, by endpoint); ``echo`` (completions) puts each
    choice's prompt first."""

    def __init__(
        self,
        endpoint: Endpoint,
        *,
        model: str,
        request_id: str,
        stream: bool,
        include_usage: bool,
        created: int | None = None,
        choices: int = 1,
        logprobs: bool = False,
        echo: Sequence[str] | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.stream = stream
        self.include_usage = include_usage
        self.logprobs = logprobs
        self._echo = echo
        self._choices = [_Choice() for _ in range(choices)]
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

    def _choice(
        self, text: str | None, finish_reason: str | None, *, role: bool = False, index: int = 0,
        logprobs: Any = None,
    ) -> dict[str, Any]:  # fmt: skip
        if self.endpoint == "chat":
            delta: dict[str, Any] = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            # "logprobs" is always there, null unless asked for, as OpenAI sends it.
            return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        return {"index": index, "text": text or "", "finish_reason": finish_reason, "logprobs": logprobs}

    def start(self) -> bytes:
        if self.stream and self.endpoint == "chat":
            return b"".join(
                self._event([self._choice("", None, role=True, index=i)]) for i in range(len(self._choices))
            )
        return b""

    def resume(self, sent: Resume) -> None:
        """Go on from what the client has of the answer (blind failover: one choice, streamed, no echo),
        saying nothing of it again."""
        self._choices[0].offset = len(sent.text)  # completions' text_offset counts from the answer's start

    def delta(
        self, text: str, index: int = 0, logprobs: Sequence[TokenLogprob] = (),
        prompt: Sequence[TokenLogprob] | None = None,
    ) -> bytes:  # fmt: skip
        choice = self._choices[index]
        lp: Any = None
        if self._echo is not None and not choice.echoed:
            # The choice's first delta: the prompt goes first, its tokens' offsets from 0, the answer's
            # from the end of the prompt's text.
            choice.echoed = True
            echoed = self._echo[index]
            text = echoed + text
            if self.logprobs:
                head = self._logprobs(choice, prompt or ())
                choice.offset = len(echoed)
                tail = self._logprobs(choice, logprobs)
                lp = {key: head[key] + tail[key] for key in head}
        elif self.logprobs:
            lp = self._logprobs(choice, logprobs) if logprobs else None
        if not text and lp is None:
            return b""
        if self.stream:
            return self._event([self._choice(text, None, index=index, logprobs=lp)])
        choice.parts.append(text)
        return b""

    def _logprobs(self, choice: _Choice, entries: Sequence[TokenLogprob]) -> Any:
        if self.endpoint == "chat":
            content = [_chat_entry(e) for e in entries]
            if not self.stream:
                choice.logprobs.extend(content)
            return {"content": content}
        legacy: dict[str, list[Any]] = {
            "tokens": [],
            "token_logprobs": [],
            "top_logprobs": [],
            "text_offset": [],
        }
        for entry in entries:
            legacy["tokens"].append(entry.token)
            legacy["token_logprobs"].append(entry.logprob)
            legacy["top_logprobs"].append(_legacy_top(entry))
            legacy["text_offset"].append(choice.offset)
            choice.offset += len(entry.token)
        if not self.stream:
            if choice.legacy is None:
                choice.legacy = {k: [] for k in legacy}
            for key, values in legacy.items():
                choice.legacy[key].extend(values)
        return legacy

    def keepalive(self) -> bytes:
        """Bytes that say "still working": an SSE comment, which clients and proxies skip, or nothing."""
        return b": keepalive\n\n" if self.stream else b""

    def finish_choice(self, index: int, finish_reason: str) -> bytes:
        """One choice ended (streaming: its last event)."""
        self._choices[index].finish_reason = finish_reason
        if self.stream:
            return self._event(
                [self._choice(None if self.endpoint == "chat" else "", finish_reason, index=index)]
            )
        return b""

    def finish(self, finish_reason: str, prompt_tokens: int, completion_tokens: int) -> bytes:
        """The only choice ended, and with it the answer."""
        return self.finish_choice(0, finish_reason) + self.end(prompt_tokens, completion_tokens)

    def end(self, prompt_tokens: int, completion_tokens: int) -> bytes:
        """Every choice ended: the usage (when asked for) and [DONE], or the whole answer."""
        used = usage(prompt_tokens, completion_tokens)
        if self.stream:
            tail = self._event([], {"usage": used}) if self.include_usage else b""
            return tail + b"data: [DONE]\n\n"
        return _dumps(
            {**self._head, "choices": [self._whole(i) for i in range(len(self._choices))], "usage": used}
        )

    def _whole(self, index: int) -> dict[str, Any]:
        choice = self._choices[index]
        text = "".join(choice.parts)
        if self.endpoint == "chat":
            return {
                "index": index,
                "message": {"role": "assistant", "content": text},
                "logprobs": {"content": choice.logprobs} if self.logprobs else None,
                "finish_reason": choice.finish_reason,
            }
        legacy = choice.legacy
        if self.logprobs and legacy is None:
            legacy = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        return {"index": index, "text": text, "finish_reason": choice.finish_reason, "logprobs": legacy}


def _chat_entry(entry: TokenLogprob) -> dict[str, Any]:
    top_raw = entry.top_raw or tuple(t.encode() for t, _ in entry.top)
    return {
        "token": entry.token,
        "logprob": entry.logprob,
        "bytes": list(entry.raw if entry.raw is not None else entry.token.encode()),
        "top_logprobs": [
            {"token": t, "logprob": v, "bytes": list(raw)}
            for (t, v), raw in zip(entry.top, top_raw, strict=True)
        ],
    }


def _legacy_top(entry: TokenLogprob) -> dict[str, float] | None:
    """Completions' top_logprobs: the most likely tokens, and the chosen one (as vLLM); null for the
    prompt's first token."""
    if entry.logprob is None:
        return None
    top = dict(entry.top)
    top.setdefault(entry.token, entry.logprob)
    return top
