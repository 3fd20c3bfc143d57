"""Errors relayed from another Hearth service keep their status, shape, and the headers that say when to
come back."""

from __future__ import annotations

import pytest

from protocol.errors import HearthError, RateLimited, Unavailable, UpstreamFailed, come_back_headers

BODY = {"error": {"message": "busy", "type": "server_error", "param": None, "code": "no_capacity"}}


@pytest.mark.parametrize(
    ("upstream", "relayed"),
    [
        # whole seconds: kept as the error's retry_after, written back the same
        ({"Retry-After": "7"}, {"Retry-After": "7"}),
        # any spelling of the name
        ({"retry-after": "12"}, {"Retry-After": "12"}),
        # an HTTP date: passed on as written
        ({"Retry-After": "Wed, 21 Oct 2026 07:28:00 GMT"}, {"Retry-After": "Wed, 21 Oct 2026 07:28:00 GMT"}),
        # rate-limit headers pass, with their names as the upstream spelled them
        (
            {"x-ratelimit-remaining-requests": "0", "X-RateLimit-Reset-Requests": "20s", "Retry-After": "20"},
            {"x-ratelimit-remaining-requests": "0", "X-RateLimit-Reset-Requests": "20s", "Retry-After": "20"},
        ),
        # nothing else does
        ({"Content-Type": "application/json", "Set-Cookie": "a=b", "Server": "x"}, {}),
    ],
)
def test_a_relayed_error_keeps_the_headers_that_say_when_to_come_back(
    upstream: dict[str, str], relayed: dict[str, str]
) -> None:
    exc = HearthError.from_body(503, BODY, upstream)
    assert isinstance(exc, Unavailable)
    assert exc.headers() == relayed
    assert exc.to_body() == BODY


def test_without_headers_nothing_is_invented() -> None:
    exc = HearthError.from_body(429, {"error": {"message": "slow down", "code": "rate_limit_exceeded"}})
    assert isinstance(exc, RateLimited) and exc.headers() == {}


def test_a_malformed_body_is_an_upstream_failure() -> None:
    assert isinstance(HearthError.from_body(503, "<html>", {"Retry-After": "3"}), UpstreamFailed)


def test_come_back_headers_picks_only_retry_after_and_rate_limits() -> None:
    assert come_back_headers({"Retry-After": "1", "x-ratelimit-limit-tokens": "9", "Date": "now"}) == {
        "Retry-After": "1",
        "x-ratelimit-limit-tokens": "9",
    }
