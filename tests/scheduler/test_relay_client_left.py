"""A client that leaves mid-answer is the client's doing: the node that was answering stays in service.

aiohttp reports a write to a departed client with ``ClientConnectionResetError``, which is also an
``aiohttp.ClientConnectionError`` — the very error a failing node's connection raises. The scheduler's own
server cancels the handler when the client goes (protocol.web), but a write can land between the socket
closing and that cancellation; under load it does (a CI run saw a healthy node refused for seconds after a
client hung up). Here the handler is not cancelled at all, so every write after the client leaves meets
the closed socket, and the relay must tell it apart from the node failing.
"""

from __future__ import annotations

import asyncio
import time

import aiohttp
from aiohttp import web

from protocol import frames
from protocol.web import start_site
from scheduler.relay import ClientLeft, Relay, RelayJob, Target
from scheduler.store import UsageRecord
from scheduler.streams import PlainStream

FRAMES = 200  # the node's answer: a frame every 10 ms, far longer than the client stays


async def _node(request: web.Request) -> web.StreamResponse:
    """A node answering at a steady pace (it never fails)."""
    await request.read()
    resp = web.StreamResponse(headers={"Content-Type": frames.MEDIA_TYPE})
    await resp.prepare(request)
    for i in range(FRAMES):
        await resp.write(frames.encode(b'data: {"n": %d}\n\n' % i))
        await asyncio.sleep(0.01)
    await resp.write(
        frames.encode(b'{"prompt_tokens": 1, "completion_tokens": 200}', frames.META | frames.FINAL)
    )
    await resp.write_eof()
    return resp


async def test_a_client_leaving_mid_stream_does_not_fail_the_node() -> None:
    failed_nodes: list[str] = []
    records: list[UsageRecord] = []
    raised: asyncio.Future[BaseException | None] = asyncio.get_running_loop().create_future()

    node_app = web.Application()
    node_app.router.add_post("/jobs", _node)
    node_runner, node_url = await start_site(node_app, "127.0.0.1", 0)

    async with aiohttp.ClientSession() as session:
        relay = Relay(
            session, idle_timeout=10, retry_after=1,
            on_done=lambda job_id, record: records.append(record), on_node_failed=failed_nodes.append,
        )  # fmt: skip
        job = RelayJob("r1", "t1", "chat", "m", True, b'{"stream": true}', time.time(), job_id="j1")

        async def handler(request: web.Request) -> web.StreamResponse:
            stream = PlainStream(stream=True)
            try:
                await relay.run(request, Target("n1", node_url, {}), job, {"prompt_tokens": 0,
                                "completion_tokens": 0}, stream)  # fmt: skip
                raised.set_result(None)
            except BaseException as exc:  # what the relay let out is the test's subject
                raised.set_result(exc)
                raise
            return stream.out or web.Response()

        front = web.Application()
        front.router.add_post("/", handler)
        # Not cancelled when the client goes: every later write meets the closed socket.
        runner = web.AppRunner(front, handler_cancellation=False, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
            await writer.drain()
            seen = b""
            while b'"n": 2' not in seen:  # the answer is streaming: the client has three events
                seen += await asyncio.wait_for(reader.read(4096), 10)
            writer.close()
            await writer.wait_closed()
            exc = await asyncio.wait_for(raised, 10)
        finally:
            await runner.cleanup()
            await node_runner.cleanup()

    assert isinstance(exc, ClientLeft), repr(exc)
    assert isinstance(exc, ConnectionResetError)  # what the generation path stops on quietly
    assert failed_nodes == []
    assert [r.status for r in records] == ["cancelled"]
