"""protocol.logs: what reaches a log line of an exception, a library's record, a warning or the event loop."""

from __future__ import annotations

import asyncio
import io
import logging

import pytest

from protocol.logs import RedactExceptions, SafeFormatter, describe_exception, loop_exception_handler

SECRET = "CANARY-the-words-nobody-may-read"


def _raised() -> BaseException:
    try:
        try:
            raise KeyError(SECRET)
        except KeyError:
            raise ValueError(f"while parsing {SECRET!r}") from None
    except ValueError as exc:
        return exc


def _format(record: logging.LogRecord) -> str:
    return SafeFormatter("%(name)s %(message)s").format(record)


def test_an_exception_is_its_types_and_stack_never_its_message() -> None:
    exc = _raised()
    text = describe_exception(exc)
    assert "ValueError" in text and "_raised" in text and SECRET not in text


def test_a_chained_exception_shows_both_types_without_messages() -> None:
    try:
        try:
            raise OSError(SECRET)
        except OSError as inner:
            raise RuntimeError(SECRET) from inner
    except RuntimeError as exc:
        text = describe_exception(exc)
    assert "OSError" in text and "RuntimeError" in text and SECRET not in text


@pytest.mark.parametrize(
    ("name", "msg", "args", "kept"),
    [
        (
            "aiohttp.server",
            "Error handling request from %s",
            (SECRET,),
            "Error handling request from …",
        ),  # a string argument
        (
            "asyncio",
            "Task exception was never retrieved\nfuture: <Task %s>",
            (SECRET,),
            "Task exception was never retrieved […]",
        ),  # second line
        ("some.lib", "took %d ms", (12,), "took 12 ms"),  # numbers stay
        (
            "hearth.scheduler",
            "node %s failed",
            ("n1",),
            "node n1 failed",
        ),  # Hearth's own: metadata by construction
    ],
)
def test_records_keep_only_what_cannot_hold_text(
    name: str, msg: str, args: tuple[object, ...], kept: str
) -> None:
    record = logging.LogRecord(name, logging.ERROR, __file__, 1, msg, args, None)
    out = _format(record)
    assert out == f"{name} {kept}"


def test_a_records_exception_is_formatted_without_its_message() -> None:
    exc = _raised()
    record = logging.LogRecord(
        "aiohttp.web", logging.ERROR, __file__, 1, "oops", None, (type(exc), exc, exc.__traceback__)
    )
    out = _format(record)
    assert "ValueError" in out and SECRET not in out


def test_the_redacting_filter_drops_the_exception_at_its_source() -> None:
    logger = logging.getLogger("hearth.test-redact")
    logger.addFilter(RedactExceptions())
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)  # a plain formatter: the filter alone must be enough
    logger.addHandler(handler)
    try:
        logger.error("Error handling request from %s", "127.0.0.1", exc_info=_raised())
    finally:
        logger.removeHandler(handler)
    assert stream.getvalue().strip() == "Error handling request from 127.0.0.1: ValueError"


def test_a_warning_keeps_its_category_and_place_only() -> None:
    record = logging.LogRecord(
        "py.warnings", logging.WARNING, __file__, 1, "%s", (f"x.py:1: UserWarning: {SECRET}",), None
    )
    record.category = "UserWarning at x.py:1"
    out = _format(record)
    assert "UserWarning at x.py:1" in out and SECRET not in out


async def test_the_event_loop_handler_names_the_type_not_the_task(caplog: pytest.LogCaptureFixture) -> None:
    exc = _raised()
    with caplog.at_level(logging.ERROR, logger="hearth.loop"):
        loop_exception_handler(
            asyncio.get_running_loop(),
            {"message": f"Exception in callback f({SECRET!r})", "exception": exc},
        )
    text = "\n".join(_format(r) for r in caplog.records)
    assert "ValueError" in text and "Exception in callback f" in text and SECRET not in text
