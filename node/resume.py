"""What the client already has of an answer another node began and failed mid-stream (blind failover).

The scheduler hands the replacement node the SSE events the client received (node.plain, as they are;
node.sealed, in the frames that carried them). ``said`` reads them back into what the model wrote so far,
which the replacement puts after the prompt and goes on from:

- the text of the content deltas (a completion's ``text``);
- tool calls (node.tool_calls streams them as an opening delta with the call's ``id`` and name, then
  argument fragments) rebuilt in the grammar's form, ``<tool_call>{"name":"…","arguments":…``, each call
  but the last closed with ``}</tool_call>``. The last one is left open where the client's copy ends, so
  the model finishes it, under the same grammar (node.constrain follows these tokens first), and the
  writer (primed with the calls and their ids) streams only what is new, under the ids the client knows.

Characters the failed node generated but had not sent (a tag still arriving, a call's closing
characters) are not in the events; the replacement generates them again.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from node.constrain import CALL_CLOSE, CALL_OPEN
from protocol.envelope import EnvelopeError

_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # a function's name (protocol.messages)
_CALL_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")  # node.tool_calls writes call_ + 24 hex digits


@dataclass(frozen=True)
class SentCall:
    id: str
    name: str
    arguments: str


@dataclass(frozen=True)
class Resume:
    """What the client has of an answer another node began: the stream's "created" time, its text, and
    the tool calls it opened (with their ids)."""

    content: str = ""
    created: int | None = None
    calls: tuple[SentCall, ...] = ()

    @property
    def began(self) -> bool:
        """The client has the stream's first event (the role) already; keepalives alone do not count."""
        return self.created is not None

    @property
    def text(self) -> str:
        """What the model wrote so far, as it wrote it: the content, or the calls in the grammar's form."""
        calls = [
            CALL_OPEN + '{"name":' + json.dumps(c.name) + ',"arguments":' + c.arguments for c in self.calls
        ]
        return self.content + ("}" + CALL_CLOSE).join(calls)


def said(stream: bytes, endpoint: str) -> Resume:
    """The answer so far, out of the SSE events a node streamed before it failed (``endpoint``: "chat" or
    "completion"); EnvelopeError when they are not such events."""
    content: list[str] = []
    calls: list[dict[str, Any]] = []
    created = None
    for event in stream.split(b"\n\n"):
        if not event.startswith(b"data: {"):
            continue  # keepalive comments, [DONE]
        try:
            chunk = json.loads(event[6:])
            choice = chunk["choices"][0] if chunk["choices"] else None
            created = created if created is not None else int(chunk["created"])
            if choice is None:
                continue
            if endpoint != "chat":
                piece = choice.get("text")
            else:
                delta = choice.get("delta", {})
                piece = delta.get("content")
                for part in delta.get("tool_calls") or ():
                    _take_call(part, calls)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError):
            raise EnvelopeError() from None
        if isinstance(piece, str):
            content.append(piece)
    sent = tuple(SentCall(c["id"], c["name"], "".join(c["arguments"])) for c in calls)
    # Under tools an answer is text or calls, never both (node.constrain): text before calls is blank.
    return Resume("" if sent else "".join(content), created, sent)


def _take_call(part: Any, calls: list[dict[str, Any]]) -> None:
    index, function = part["index"], part["function"]
    if not isinstance(index, int) or not isinstance(function, dict):
        raise ValueError("a tool call delta needs an index and a function")
    if "id" in part:  # a call's opening delta: its id and name, in order
        name = function["name"]
        if index != len(calls) or not _valid(_CALL_ID, part["id"]) or not _valid(_NAME, name):
            raise ValueError("not a tool call's opening")
        calls.append({"id": part["id"], "name": name, "arguments": []})
    if not 0 <= index < len(calls) or not isinstance(function.get("arguments", ""), str):
        raise ValueError("arguments of a call not opened")
    calls[index]["arguments"].append(function.get("arguments", ""))


def _valid(pattern: re.Pattern[str], value: Any) -> bool:
    return isinstance(value, str) and pattern.fullmatch(value) is not None
