"""Logs that hold metadata only: no prompt, completion or request bytes, whoever writes the line.

Hearth's own log lines are written to say what happened, never what anyone typed. Libraries are not so
careful: aiohttp logs a malformed request with an exception that quotes the raw bytes, asyncio logs a
failed task with its exception's message, a warning can repeat a value. Three layers keep their words out:

- ``RedactExceptions``, a filter on the loggers known to carry request bytes in exceptions (aiohttp's server
  through ``hearth.http``): the record keeps its message and the exception's type, never its text;
- ``SafeFormatter``, on every handler ``configure`` installs: an exception is written as its type and its
  stack (file, line, function), never its message; a record of another library's logger keeps its message
  template and numbers, never a string argument or a multi-line message (asyncio's "Task exception was
  never retrieved" quotes the task and its exception);
- ``loop_exception_handler``, for the event loop: an unhandled error in a callback or task is logged as its
  type and stack.

Warnings are routed to logging (``py.warnings``) and kept to their category and where they were raised.
"""

from __future__ import annotations

import asyncio
import logging
import re
import sys
import traceback
from typing import Any

OWN = "hearth"  # loggers under this name are Hearth's own: their arguments are metadata by construction
_LEADING_WORDS = re.compile(r"[A-Za-z ]{0,80}")


def describe_exception(exc: BaseException) -> str:
    """An exception as its types and stack, chained causes included, without a word of its messages."""
    lines: list[str] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        stack = traceback.extract_tb(current.__traceback__)
        block = [f"  {frame.filename}:{frame.lineno} in {frame.name}" for frame in stack]
        lines[:0] = [f"{type(current).__module__}.{type(current).__qualname__} (message withheld)", *block]
        nxt = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
        if nxt is not None:
            lines[:0] = ["  (while handling the exception below)"]
        current = nxt
    return "\n".join(lines)


class RedactExceptions(logging.Filter):
    """Keep a record's exception to its type: its message may quote what a client sent."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            record.msg = f"{record.getMessage()}: {type(exc).__name__}"
            record.args = None
            record.exc_info = None
            record.exc_text = None
        return True


class SafeFormatter(logging.Formatter):
    """Formats records so that no message of an exception, and no string a library passed, is written."""

    def format(self, record: logging.LogRecord) -> str:
        if not (record.name == OWN or record.name.startswith(OWN + ".")):
            record = _foreign(record)
        return super().format(record)

    def formatException(self, ei: Any) -> str:
        exc = ei[1] if isinstance(ei, tuple) else None
        if not isinstance(exc, BaseException):
            return "(exception withheld)"
        return describe_exception(exc)


def _foreign(record: logging.LogRecord) -> logging.LogRecord:
    """A copy of another library's record with only its message template, its numbers and its first line."""
    copy = logging.makeLogRecord(record.__dict__)
    if record.name == "py.warnings":
        category = getattr(record, "category", None)
        copy.msg, copy.args = "a warning was raised (%s)", (category or "its text withheld",)
        return copy
    template = record.msg if isinstance(record.msg, str) else type(record.msg).__name__
    args = record.args if isinstance(record.args, tuple) else ()
    safe = tuple(a if isinstance(a, int | float) and not isinstance(a, bool) else "…" for a in args)
    try:
        text = template % safe if safe else template
    except (TypeError, ValueError):
        text = template
    first, _, rest = text.partition("\n")
    copy.msg, copy.args = first + (" […]" if rest else ""), None
    return copy


def _showwarning(
    message: Warning | str, category: type[Warning], filename: str, lineno: int, *_: Any, **__: Any
) -> None:
    logging.getLogger("py.warnings").warning(
        "%s", "", extra={"category": f"{category.__name__} at {filename}:{lineno}"}
    )


def loop_exception_handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """The event loop's handler: what failed, by type and stack, never by message or task repr."""
    exc = context.get("exception")
    # asyncio's message names the callback with its arguments' reprs ("Exception in callback f(…)"): only
    # its leading words are kept.
    words = _LEADING_WORDS.match(str(context.get("message", "")))
    where = (words.group(0).strip() if words else "") or "event loop"
    if isinstance(exc, BaseException):
        logging.getLogger("hearth.loop").error(
            "unexpected %s (%s)\n%s", type(exc).__name__, where, describe_exception(exc)
        )
    else:
        logging.getLogger("hearth.loop").error("%s", where)


def install_loop_handler() -> None:
    asyncio.get_running_loop().set_exception_handler(loop_exception_handler)


def configure(level: str | int = "INFO") -> None:
    """Log to stderr through SafeFormatter, and route warnings there too (kept to their category)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(SafeFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    import warnings

    warnings.showwarning = _showwarning
