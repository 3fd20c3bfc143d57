"""The tokenizer endpoints, as vLLM serves them (protocol.tokenizer):

POST /tokenize          text or messages → token ids
POST /detokenize        token ids → text
GET  /tokenizer_info    the tokenizer's special tokens and chat template (?model=…)
POST /tokenizer_info    the same, sealed by `hearth proxy` (its body: {"model"})

They carry the user's text, so they take the generation path (scheduler.generation): the same
authentication, policy (the group's models, request rates, concurrency) and fair queue, placed on a node
serving the model, which answers from the model's own tokenizer. Sealed (through `hearth proxy`) the
scheduler sees only the envelope's header: the kind, the model, the padded length. In plaintext it reads
the body as the client sent it, as it reads a plaintext chat request, and forwards it unchanged but for the
model it names when the client named none. They count as requests, never as tokens (policies.Visible).
"""

from __future__ import annotations

import json
import secrets
import time

from aiohttp import web

from policies import Visible
from protocol.errors import PermissionDenied
from protocol.tokenizer import default_model, parse_tokenizer_request
from protocol.web import parse_json, read_body
from scheduler import generation
from scheduler.generation import TOKENIZER_PLACEMENT_TOKENS, Admitted
from scheduler.placement import PlacementRequest
from scheduler.relay import RelayJob
from scheduler.state import ENFORCER, FEDERATION, authenticate


def add_routes(app: web.Application) -> None:
    app.router.add_post("/tokenize", tokenize)
    app.router.add_post("/detokenize", detokenize)
    app.router.add_get("/tokenizer_info", tokenizer_info)
    app.router.add_post("/tokenizer_info", tokenizer_info)


async def tokenize(request: web.Request) -> web.StreamResponse:
    return await generation.serve_kind(request, "tokenize", _admit)


async def detokenize(request: web.Request) -> web.StreamResponse:
    return await generation.serve_kind(request, "detokenize", _admit)


async def tokenizer_info(request: web.Request) -> web.StreamResponse:
    return await generation.serve_kind(request, "tokenizer_info", _admit)


async def _admit(request: web.Request, kind: str) -> Admitted:
    """A plaintext tokenizer request, authenticated, validated and past the policy, ready to queue."""
    token = await authenticate(request)
    started = time.time()
    if request.method == "GET":
        doc: object = {"model": request.query["model"]} if "model" in request.query else {}
    else:
        doc = parse_json(await read_body(request))
    req = parse_tokenizer_request(kind, doc)
    assert isinstance(doc, dict)  # parse_tokenizer_request refuses anything else
    model = req.model
    if model is None:
        group = request.app[ENFORCER].group_of(token)
        served = {
            m.id
            for node in request.app[FEDERATION].registry.snapshot().nodes
            for m in node.models
            if m.phase != "failed"
        }
        allowed = {m for m in served if group.allows_model(m)}
        if served and not allowed:
            # As a request naming one of them would be answered (policies: model_not_allowed).
            raise PermissionDenied(
                f"the {group.name} group may use none of the models served here now",
                param="model", code="model_not_allowed",
            )  # fmt: skip
        model = doc["model"] = default_model(allowed)
    raw = json.dumps(doc, separators=(",", ":")).encode()
    request_id = secrets.token_hex(12)
    visible = Visible(model, None, sealed=False, generates=False)
    grant = request.app[ENFORCER].admit(token, visible, request_id)
    preq = PlacementRequest(
        model=model, max_tokens=TOKENIZER_PLACEMENT_TOKENS, prompt_tokens=0, tiers=grant.tiers
    )
    body = b'{"endpoint":"%s","request_id":"%s","request":%s}' % (kind.encode(), request_id.encode(), raw)
    job = RelayJob(
        request_id, token.id, kind, model, False, body, started, rules=grant.rules, group=grant.group
    )
    return Admitted(token.id, preq, job, sealed=False, grant=grant, raw=raw)
