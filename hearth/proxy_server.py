"""The local OpenAI-compatible server of `hearth proxy`: every request is sealed by a ``SealedClient``
(hearth.proxy) and every answer opened by it; errors leave in OpenAI's shape, also mid-stream. The
scheduler's Retry-After, x-ratelimit-* and x-request-id headers reach the client, on answers and refusals.

    POST /v1/chat/completions, /v1/completions   sealed to the scheduler, answered in plaintext here
    GET  /v1/models                              the scheduler's list, as it answered
    GET  /v1/models/{id}                         one model of it, as the scheduler answered
    POST /tokenize, /detokenize,                 sealed to the scheduler like chat requests (their text is
    GET  /tokenizer_info                         the user's), answered by the node from its tokenizer
    GET  /v1/terms, POST /v1/terms/accept,       passed to the scheduler with the user's token, and its
    GET  /v1/policy                              answer back as it is (hearth.proxy_forward)
    GET  /healthz                                liveness
"""

from __future__ import annotations

import contextlib
import functools
import json
from typing import Any

from aiohttp import web

from hearth import proxy_forward
from hearth.proxy import MAX_ANSWER_BYTES, SealedClient
from hearth.sealed_answer import Answer
from protocol.envelope import MAX_BODY_BYTES
from protocol.errors import HearthError, UpstreamFailed
from protocol.schemas import Endpoint
from protocol.tokenizer import PATHS as TOKENIZER_PATHS
from protocol.tokenizer import default_model, parse_tokenizer_request
from protocol.web import error_middleware, json_response, log_unexpected, parse_json, read_body, start_site

CLIENT = web.AppKey("client", SealedClient)


def create_app(client: SealedClient) -> web.Application:
    app = web.Application(middlewares=[error_middleware], client_max_size=MAX_BODY_BYTES // 2)
    app[CLIENT] = client
    app.router.add_post("/v1/chat/completions", _chat)
    app.router.add_post("/v1/completions", _completion)
    app.router.add_get("/v1/models", _models)
    for kind, path in TOKENIZER_PATHS.items():
        if kind == "tokenizer_info":
            app.router.add_get(path, functools.partial(_tokenizer, kind=kind))
        else:
            app.router.add_post(path, functools.partial(_tokenizer, kind=kind))
    proxy_forward.add_routes(app, client)
    app.router.add_get("/healthz", _healthz)
    return app


async def _healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def _chat(request: web.Request) -> web.StreamResponse:
    return await _relay(request, "chat")


async def _completion(request: web.Request) -> web.StreamResponse:
    return await _relay(request, "completion")


async def _models(request: web.Request) -> web.Response:
    raw, headers = await request.app[CLIENT].models_document()
    return web.Response(body=raw, content_type="application/json", headers=headers)


async def _tokenizer(request: web.Request, *, kind: str) -> web.StreamResponse:
    """A tokenizer request, sealed as a chat request is; a request naming no model goes to the one model
    the directory says is served (protocol.tokenizer.default_model)."""
    client = request.app[CLIENT]
    if request.method == "GET":
        doc: Any = {"model": request.query["model"]} if "model" in request.query else {}
    else:
        doc = parse_json(await read_body(request))
    req = parse_tokenizer_request(kind, doc)
    model = req.model
    if model is None:
        await client.refresh()
        model = doc["model"] = default_model(m for m, nodes in client.hints.items() if nodes)
    body = json.dumps(doc, separators=(",", ":")).encode()
    answer = await client.send_sealed(kind, body, model=model, max_tokens=None, stream=False)
    return await _answer(request, answer)


async def _relay(request: web.Request, endpoint: Endpoint) -> web.StreamResponse:
    client = request.app[CLIENT]
    return await _answer(request, await client.send(endpoint, await read_body(request)))


async def _answer(request: web.Request, answer: Answer) -> web.StreamResponse:
    # Closed as soon as this handler ends, also when its client leaves: the scheduler sees it go at once.
    async with contextlib.aclosing(answer.payloads) as payloads:
        if not answer.stream:
            parts, size = [], 0
            async for payload in payloads:
                size += len(payload)
                if size > MAX_ANSWER_BYTES:
                    raise UpstreamFailed("the answer is over the size limit")
                parts.append(payload)
            return web.Response(body=b"".join(parts), content_type="application/json", headers=answer.headers)
        out = web.StreamResponse(
            headers={**answer.headers, "Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await out.prepare(request)
        try:
            async for payload in payloads:
                if payload:
                    await out.write(payload)
        except ConnectionResetError:
            raise  # the client left: nobody to tell
        except HearthError as exc:
            await _end_with(out, exc)
        except Exception as exc:
            log_unexpected(f"{request.method} {request.path}", exc)
            await _end_with(out, HearthError("internal error; the proxy's log has it"))
        await out.write_eof()
        return out


async def _end_with(out: web.StreamResponse, exc: HearthError) -> None:
    """Headers are out: end the stream with an error event, as OpenAI's clients expect; never a silent
    cut."""
    await out.write(b"data: " + json.dumps(exc.to_body()).encode() + b"\n\n")


async def serve(client: SealedClient, host: str, port: int) -> tuple[web.AppRunner, str]:
    return await start_site(create_app(client), host, port)
