"""A sealed request's answer as `hearth proxy` reads it: the scheduler's frames, opened here.

The scheduler relays the node's frames and says, in ROUTE frames, which node each part comes from (blind
failover: another candidate may go on where one failed). Each candidate's secret comes from the request's
response seed, so the proxy opens whichever candidate the scheduler routes to, as long as the envelope was
sealed to it, and checks that the answer starts at its beginning, is numbered without gaps and ends. An
ERROR frame is the scheduler's or node's refusal, in the API's shape; anything else is a broken answer.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass

import aiohttp

from protocol import frames
from protocol.envelope import Candidate, ResponseOpener, response_secret
from protocol.errors import HearthError, ProtocolError, UpstreamFailed


@dataclass(frozen=True)
class Answer:
    """A sealed request's answer: whether it streams, its plaintext payloads as they open, and the headers
    of the scheduler's answer to pass on (``relayed_headers``)."""

    stream: bool
    payloads: AsyncGenerator[bytes, None]
    headers: dict[str, str]


def derive_openers(
    openers: dict[str, ResponseOpener], seed: bytes, request_id: str, chosen: list[Candidate]
) -> None:
    for c in chosen:
        openers.setdefault(
            c.node_id, ResponseOpener(response_secret(seed, c.node_id, request_id), request_id)
        )


async def open_stream(
    resp: aiohttp.ClientResponse,
    seed: bytes,
    request_id: str,
    candidates: set[str],
    openers: dict[str, ResponseOpener],
) -> AsyncGenerator[bytes, None]:
    decoder = frames.FrameDecoder(max_payload=1024 * 1024)
    opener: ResponseOpener | None = None
    try:
        async for chunk in resp.content.iter_any():
            for frame in decoder.feed(chunk):
                if frame.kind == frames.ROUTE:
                    route = frame.json()
                    node_id = route.get("node_id") if isinstance(route, dict) else None
                    seq = route.get("seq") if isinstance(route, dict) else None
                    if node_id not in candidates or type(seq) is not int:
                        raise ProtocolError("the scheduler routed the answer to a node it was not sealed to")
                    if opener is None:
                        if seq != 0:
                            raise ProtocolError("the answer does not start at its beginning")
                        opener = openers.get(node_id) or ResponseOpener(
                            response_secret(seed, node_id, request_id), request_id
                        )
                    else:
                        opener.switch(response_secret(seed, node_id, request_id), at=seq)
                elif frame.kind == frames.ERROR:
                    err = frame.json()
                    raise HearthError.from_body(
                        int(err.get("status", 502)) if isinstance(err, dict) else 502, err
                    )
                elif frame.kind == frames.DATA:
                    if opener is None:
                        raise ProtocolError("an answer frame came before its route")
                    yield opener.open(frame.payload, final=frame.final)
                else:
                    raise ProtocolError("an unexpected frame in a sealed answer")
        if not decoder.finished:
            raise _cut()  # the connection ended cleanly, but before the answer did
        decoder.close()
        if opener is None:
            raise ProtocolError("the answer is empty")
        opener.finish()
    except (aiohttp.ClientError, TimeoutError):
        raise _cut() from None
    finally:
        resp.close()


def _cut() -> UpstreamFailed:
    return UpstreamFailed(
        "the connection to the scheduler broke mid-answer; the answer is incomplete",
        code="scheduler_disconnected",
    )
