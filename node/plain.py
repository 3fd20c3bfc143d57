"""Plaintext jobs: what a scheduler that may read a request sends its node over loopback.

A plaintext job is ``{"endpoint", "request_id", "job_id", "request", "cache_scope"?, "resume"?, "rules"?}``:
the OpenAI request as the client sent it, the user's prefix-cache scope as the scheduler names it, for an
answer another node began and failed mid-stream ``resume``: the SSE bytes the client already has (the
scheduler relayed them, so it may read them), which this node continues, and the rules of the user's group
(node.rules) (docs/protocol.md). Sealed jobs carry the same in sealed form (node.sealed).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from node.backends.base import CacheScope
from node.resume import Resume, said
from node.rules import parse_rules
from protocol.envelope import JOB_KINDS, EnvelopeError
from protocol.errors import InvalidRequest
from protocol.rules import JobRules
from protocol.schemas import ChatCompletionRequest, CompletionRequest, Endpoint
from protocol.tokenizer import TOKENIZER_REQUESTS, TokenizerRequest, parse_job_request
from protocol.web import parse_json

_REQUEST_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_CACHE_SCOPE = re.compile(r"^[0-9a-f]{32}$")


@dataclass(frozen=True)
class PlainJob:
    endpoint: str  # protocol.envelope.JOB_KINDS
    request_id: str
    request: ChatCompletionRequest | CompletionRequest | TokenizerRequest
    job_id: str
    scope: CacheScope | None  # None: a private one (shared with no other job)
    resume: Resume
    rules: JobRules | None


def plain_job(raw: bytes) -> PlainJob:
    body: Any = parse_json(raw)
    if not isinstance(body, dict) or body.get("endpoint") not in JOB_KINDS:
        raise InvalidRequest(f"a job needs an endpoint (one of {', '.join(JOB_KINDS)}) and a request")
    endpoint: str = body["endpoint"]
    request_id, job_id = str(body.get("request_id", "")), str(body.get("job_id", ""))
    if not _REQUEST_ID.match(request_id) or not _REQUEST_ID.match(job_id):
        raise InvalidRequest("a job needs a request_id and a job_id of 1-64 letters, digits, '-' or '_'")
    scope = body.get("cache_scope")
    if scope is not None and (not isinstance(scope, str) or not _CACHE_SCOPE.match(scope)):
        raise InvalidRequest("cache_scope must be 32 hexadecimal digits")
    # The user's scope as the scheduler names it (it reads these requests anyway); none: shared with no one.
    cache = CacheScope(b"user:" + scope.encode()) if scope else None
    req = parse_job_request(endpoint, body.get("request"))
    rules = parse_rules(body.get("rules"))
    # Blind failover's plaintext twin: the SSE bytes the client received from a node that failed mid-answer
    # (the scheduler relayed them, so it may read them), which this node continues.
    resume = Resume()
    if body.get("resume") is not None:
        if isinstance(req, TOKENIZER_REQUESTS) or not isinstance(body["resume"], str) or not req.stream:
            raise InvalidRequest("resume is the text of a streamed answer's events so far")
        kind: Endpoint = "chat" if isinstance(req, ChatCompletionRequest) else "completion"
        try:
            resume = said(body["resume"].encode(), kind)
        except EnvelopeError:
            raise InvalidRequest("resume is not the events of an answer") from None
    return PlainJob(endpoint, request_id, req, job_id, cache, resume, rules)
