"""What `hearth proxy` passes to the scheduler as it is: the terms of use and the policy that applies to
the user. OpenAI clients pointed at the proxy reach these with the proxy's address alone.

    GET  /v1/terms           the terms in force, and whether the user's token accepted them
    POST /v1/terms/accept    accept them
    GET  /v1/policy          the rules (and course prompt) that apply to the user
    GET  /v1/models/{id}     one model the scheduler lists (its id may contain "/")

None of them carries a prompt, so nothing is sealed: the request goes on with the user's token, and the
scheduler's answer (its status, its body, and the headers the proxy passes on) comes back unchanged.
"""

from __future__ import annotations

import aiohttp
from aiohttp import web

from hearth.proxy import MAX_ANSWER_BYTES, SealedClient, relayed_headers, scheduler_error, unreachable
from protocol.errors import InvalidRequest, UpstreamFailed
from protocol.web import parse_json, read_body, read_capped

FORWARD_TIMEOUT_S = 30
GETS = ("/v1/terms", "/v1/policy", "/v1/models/{model_id:.+}")
POSTS = ("/v1/terms/accept",)


def add_routes(app: web.Application, client: SealedClient) -> None:
    async def forward(request: web.Request) -> web.Response:
        return await _forward(client, request)

    for path in GETS:
        app.router.add_get(path, forward)
    for path in POSTS:
        app.router.add_post(path, forward)


async def _forward(client: SealedClient, request: web.Request) -> web.Response:
    body = await read_body(request) if request.method == "POST" else None
    headers = client.auth_headers()
    if body is not None:
        headers["Content-Type"] = "application/json"
    try:
        async with client.session.request(
            request.method, client.scheduler_url + request.raw_path, data=body, headers=headers,
            timeout=aiohttp.ClientTimeout(total=FORWARD_TIMEOUT_S),
        ) as resp:  # fmt: skip
            raw = await read_capped(resp, MAX_ANSWER_BYTES)
            status, kept, media = resp.status, relayed_headers(resp.headers), resp.content_type
            upstream = resp.headers
    except (aiohttp.ClientError, TimeoutError):
        raise unreachable() from None
    except ValueError:
        raise UpstreamFailed("the scheduler's answer is over the size limit") from None
    if status >= 400 and not _hearth_error(raw):
        # A gateway's page in front of the scheduler, not the scheduler's words: the proxy's own error.
        raise scheduler_error(status, None, upstream)
    return web.Response(status=status, body=raw, content_type=media, headers=kept)


def _hearth_error(raw: bytes) -> bool:
    try:
        doc = parse_json(raw)
    except InvalidRequest:
        return False
    return isinstance(doc, dict) and isinstance(doc.get("error"), dict)
