"""The scheduler application's typed keys and its token check, shared by the API and admin modules."""

from __future__ import annotations

import asyncio

from aiohttp import web

from protocol.errors import AuthenticationFailed
from scheduler.admission import Admission
from scheduler.enforce import Enforcer
from scheduler.events import EventBus
from scheduler.federation import Federation
from scheduler.jobs import JobBoard
from scheduler.metrics import Metrics
from scheduler.relay import Relay
from scheduler.rules import Rules
from scheduler.settings import SchedulerSettings
from scheduler.store import AsyncStore, TokenRecord, TokenRefusal
from scheduler.terms import TermsBook

SETTINGS = web.AppKey("settings", SchedulerSettings)
STORE = web.AppKey("store", AsyncStore)
FEDERATION = web.AppKey("federation", Federation)
ADMISSION = web.AppKey("admission", Admission)
RELAY = web.AppKey("relay", Relay)
METRICS = web.AppKey("metrics", Metrics)
STARTED = web.AppKey("started", int)
# The generation requests in flight (their handler tasks), and whether the scheduler is stopping: on
# shutdown they are drained, then ended with an error (scheduler.generation.drain).
IN_FLIGHT = web.AppKey("in_flight", set)
STOPPING = web.AppKey("stopping", asyncio.Event)
# Each of those requests from admission to its end, metadata only, for the operator (GET /admin/queue).
JOBS = web.AppKey("jobs", JobBoard)
# Keys each user's per-node prefix-cache scope (scheduler.generation._cache_scope); new at every start.
SCOPE_KEY = web.AppKey("scope_key", bytes)
# The policy in force (scheduler.rules), hot-reloaded from the policy file; the admin event stream.
RULES = web.AppKey("rules", Rules)
EVENTS = web.AppKey("events", EventBus)
ENFORCER = web.AppKey("enforcer", Enforcer)
# Headers every generation answer carries (x-request-id, x-ratelimit-*), set once the request is admitted and
# added as the answer is prepared, whether it streams, is whole, or is an error.
ANSWER_HEADERS = web.RequestKey("answer_headers", dict)
# Who accepted which version of the terms of use (scheduler.terms), read once at start.
TERMS = web.AppKey("terms", TermsBook)


async def authenticate(request: web.Request) -> TokenRecord:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise AuthenticationFailed("missing API token: send 'Authorization: Bearer <token>'")
    if not _could_be_a_token(token):
        # Refused before the store: such bytes could not hash, and no token was ever issued with them.
        raise AuthenticationFailed(TokenRefusal("unknown").message)
    # A revoked, expired or rotated token says which (and when it expired): its holder knows what to do,
    # and only someone holding a secret that once worked can get those answers.
    record = await request.app[STORE].verify_token(token)
    if isinstance(record, TokenRefusal):
        raise AuthenticationFailed(record.message)
    return record


def _could_be_a_token(text: str) -> bool:
    """Printable ASCII: every token Hearth issues is. aiohttp hands other header bytes over as lone
    surrogates (0x80-0xff) or as they are, and a client may send anything."""
    return text.isascii() and text.isprintable()
