"""Tool calls out of the model's text, as OpenAI sends them: ``message.tool_calls`` with ids and
``finish_reason: "tool_calls"``, or, streamed, one delta that opens each call (its ``id``, ``type`` and
``function.name``, with empty ``arguments``) and then the arguments in fragments as they are generated.

Under tools, node.constrain holds the answer to either plain text (or the response_format) or calls in the
compact form ``<tool_call>{"name":"…","arguments":{…}}</tool_call>``, one after another. So the first
characters decide which it is, and a call's name is known as soon as its ``"arguments":`` key is.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from node.constrain import CALL_CLOSE, CALL_OPEN
from node.openai_format import ResponseWriter
from node.resume import Resume
from node.runner import TokenLogprob
from protocol.schemas import ChatCompletionRequest, CompletionRequest, Endpoint

# Function names are [A-Za-z0-9_-]{1,64} (protocol.messages): nothing in them needs escaping.
_HEAD = re.compile(r'\{"name":"([A-Za-z0-9_-]{1,64})","arguments":')


@dataclass
class Call:
    id: str
    name: str
    arguments: list[str] = field(default_factory=list)


@dataclass
class _Scan:
    """Where a call's arguments (one JSON value) stand: nesting depth, inside a string, after a backslash."""

    depth: int = 0
    in_string: bool = False
    escaped: bool = False
    done: bool = False

    def take(self, text: str) -> int:
        """How many characters of ``text`` still belong to the value (all, unless it ends within)."""
        for i, ch in enumerate(text):
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif ch == "\\":
                    self.escaped = True
                elif ch == '"':
                    self.in_string = False
            elif ch == '"':
                self.in_string = True
            elif ch in "{[":
                self.depth += 1
            elif ch in "}]":
                self.depth -= 1
                if self.depth == 0:
                    self.done = True
                    return i + 1
        return len(text)


class ToolCallReader:
    """Reads an answer as it grows: plain content, or tool calls. Each ``push`` returns the events it
    completes: ``("content", text)``, ``("open", (index, call))``, ``("arguments", (index, fragment))``,
    ``index`` being the call's place in the answer (one push may complete several calls)."""

    def __init__(self) -> None:
        self.mode: str | None = None  # "content" or "calls", once the first characters tell
        self.calls: list[Call] = []
        self.content: list[str] = []
        self._pending = ""
        self._scan: _Scan | None = None  # the current call's arguments, once its head is read
        self._closing = ""  # what is left of the current call's closing characters

    def push(self, text: str) -> list[tuple[str, Any]]:
        self._pending += text
        events: list[tuple[str, Any]] = []
        if self.mode is None:
            start = self._pending.lstrip()
            if start.startswith(CALL_OPEN):
                self.mode = "calls"
            elif CALL_OPEN.startswith(start):
                return events  # still undecided: "", or the opening tag's first characters
            else:
                self.mode = "content"
        if self.mode == "content":
            if self._pending:
                self.content.append(self._pending)
                events.append(("content", self._pending))
            self._pending = ""
            return events
        while self._pending:
            if self._closing:  # the call's "}</tool_call>", as the grammar has it
                n = min(len(self._closing), len(self._pending))
                self._closing, self._pending = self._closing[n:], self._pending[n:]
            elif self._scan is None:
                rest = self._pending.lstrip()
                if not rest.startswith(CALL_OPEN):
                    if not CALL_OPEN.startswith(rest):
                        self._pending = ""  # between calls: nothing the grammar allows; dropped
                    break  # else the next call's tag is still arriving
                head = _HEAD.match(rest, len(CALL_OPEN))
                if head is None:
                    self._pending = rest
                    break  # its head is still arriving
                call = Call(f"call_{secrets.token_hex(12)}", head.group(1))
                self.calls.append(call)
                events.append(("open", (len(self.calls) - 1, call)))
                self._pending = rest[head.end() :]
                self._scan = _Scan()
            else:
                n = self._scan.take(self._pending)
                fragment, self._pending = self._pending[:n], self._pending[n:]
                if fragment:
                    self.calls[-1].arguments.append(fragment)
                    events.append(("arguments", (len(self.calls) - 1, fragment)))
                if self._scan.done:
                    self._scan, self._closing = None, "}" + CALL_CLOSE
        return events

    def finish(self) -> list[tuple[str, Any]]:
        """What is left at the end: undecided text is content."""
        if self.mode is None and self._pending:
            self.mode = "content"
            self.content.append(self._pending)
            events: list[tuple[str, Any]] = [("content", self._pending)]
            self._pending = ""
            return events
        return []


class ToolResponseWriter(ResponseWriter):
    """A chat answer under tools: each choice's content as ResponseWriter writes it, or its tool calls."""

    def __init__(self, endpoint: Endpoint, **kwargs: Any) -> None:
        super().__init__(endpoint, **kwargs)
        self._readers = [ToolCallReader() for _ in self._choices]

    def resume(self, sent: Resume) -> None:
        # The reader takes the answer so far as if it had just been generated, and its calls keep the ids
        # the client has (the events it makes were sent by the node this one replaces).
        super().resume(sent)
        reader = self._readers[0]
        reader.push(sent.text)
        for call, known in zip(reader.calls, sent.calls, strict=False):
            call.id = known.id

    def delta(
        self, text: str, index: int = 0, logprobs: Sequence[TokenLogprob] = (),
        prompt: Sequence[TokenLogprob] | None = None,
    ) -> bytes:  # fmt: skip
        # A tool call's tokens carry no logprobs out (they are the call's arguments, not content).
        return self._events(index, self._readers[index].push(text), logprobs) if text else b""

    def _events(
        self, index: int, events: list[tuple[str, Any]], logprobs: Sequence[TokenLogprob] = ()
    ) -> bytes:
        out = b""
        for kind, value in events:
            if kind == "content":
                out += super().delta(value, index, logprobs)
                logprobs = ()
            elif self.stream and kind == "open":
                at, opened = value
                function = {"name": opened.name, "arguments": ""}
                out += self._call_delta(
                    index, {"index": at, "id": opened.id, "type": "function", "function": function}
                )
            elif self.stream and kind == "arguments":
                at, fragment = value
                out += self._call_delta(index, {"index": at, "function": {"arguments": fragment}})
        return out

    def _call_delta(self, index: int, call: dict[str, Any]) -> bytes:
        choice = {"index": index, "delta": {"tool_calls": [call]}, "logprobs": None, "finish_reason": None}
        return self._event([choice])

    def finish_choice(self, index: int, finish_reason: str) -> bytes:
        head = self._events(index, self._readers[index].finish())
        calls = self._readers[index].calls
        return head + super().finish_choice(
            index, "tool_calls" if calls and finish_reason == "stop" else finish_reason
        )

    def _whole(self, index: int) -> dict[str, Any]:
        out = super()._whole(index)
        calls = self._readers[index].calls
        if calls:
            out["message"]["content"] = None
            out["message"]["tool_calls"] = [
                {
                    "id": c.id,
                    "type": "function",
                    "function": {"name": c.name, "arguments": "".join(c.arguments)},
                }
                for c in calls
            ]
        return out


def response_writer(
    endpoint: Endpoint, req: ChatCompletionRequest | CompletionRequest, **kwargs: Any
) -> ResponseWriter:
    """The writer for a request's answer: with tool calls where the request offers tools."""
    if isinstance(req, ChatCompletionRequest) and req.tool_mode != "none":
        return ToolResponseWriter(endpoint, **kwargs)
    return ResponseWriter(endpoint, **kwargs)
