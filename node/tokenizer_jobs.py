"""Tokenizer jobs: ``POST /tokenize``, ``POST /detokenize`` and ``GET /tokenizer_info`` (protocol.tokenizer),
answered from the loaded model's own tokenizer and chat template, without generating.

They arrive as generation jobs do, sealed or plaintext (node.sealed, node.plain), and their answer is one
JSON body in one final frame, sealed to the user when the job was. They cost no tokens: the job's usage
(META frame and receipt) counts none. The course's system prompt is not added (node.rules): what the user
tokenizes is their own text, as the tokenizer reads it.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
from typing import Protocol

from aiohttp import web

from node.backends.base import TextModel
from node.pool import ModelPool, ModelSlot
from node.receipts import Receipts
from node.templates import Message
from protocol import frames
from protocol.errors import InvalidRequest, Unavailable
from protocol.tokenizer import DetokenizeRequest, TokenizeRequest, TokenizerRequest

NO_TOKENS: dict[str, object] = {"finish_reason": "stop", "prompt_tokens": 0, "completion_tokens": 0}


class Ending(Protocol):
    def end(self, data: bytes, meta: dict[str, object]) -> bytes: ...


async def serve(
    request: web.Request, pool: ModelPool, receipts: Receipts, req: TokenizerRequest, out: Ending, job_id: str
) -> web.StreamResponse:
    """Answer a tokenizer job; errors (an unknown model, ids outside the vocabulary) before any byte."""
    if req.model is None:  # the scheduler or the proxy names the model before the job gets here
        raise InvalidRequest("the job names no model", param="model")
    slot = pool.get(req.model)
    runner = slot.runner
    if slot.phase != "ready" or runner is None:
        raise Unavailable(f"the model '{req.model}' is not loaded here ({slot.phase})", retry_after=5)
    slot.last_used = time.monotonic()
    loop = asyncio.get_running_loop()
    body = await loop.run_in_executor(None, functools.partial(answer, slot, runner.backend, req))
    response = web.StreamResponse(headers={"Content-Type": frames.MEDIA_TYPE})
    receipts.add(job_id, 0, 0)  # a receipt all the same: the scheduler's ledger waits for one per job
    await response.prepare(request)
    await response.write(out.end(body, NO_TOKENS))
    await response.write_eof()
    return response


def answer(slot: ModelSlot, backend: TextModel, req: TokenizerRequest) -> bytes:
    """The JSON answer to ``req`` (CPU work: the caller runs it in a thread)."""
    if isinstance(req, TokenizeRequest):
        if req.messages is not None:
            assert slot.template is not None
            conversation: list[Message] = [
                {"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})}
                for m in req.messages
            ]
            text = slot.template.render(conversation, add_generation_prompt=req.add_generation_prompt)
        else:
            assert req.prompt is not None  # the request's validator wants one of the two
            text = req.prompt
        ids = backend.encode(text, add_special_tokens=req.special_tokens)
        doc: dict[str, object] = {
            "tokens": ids, "count": len(ids), "max_model_len": backend.context_length, "token_strs": None,
        }  # fmt: skip
    elif isinstance(req, DetokenizeRequest):
        try:
            doc = {"prompt": backend.decode(req.tokens)}
        except (ValueError, IndexError, KeyError, OverflowError, TypeError):
            # Each tokenizer library fails its own way on an id past its vocabulary; none quotes text.
            raise InvalidRequest(
                "the tokens are not all ids of this model's vocabulary", param="tokens"
            ) from None
    else:
        doc = {
            "bos_token": backend.bos_token or None,
            "eos_token": backend.eos_token or None,
            "pad_token": None,
            "model_max_length": backend.context_length,
            "chat_template": slot.template.source if slot.template is not None else backend.chat_template,
        }
    return json.dumps(doc, ensure_ascii=False).encode()
