"""Schemathesis hooks for API fuzzing (tests/fuzz_api.py says what they steer and why). The `schemathesis`
command loads them through SCHEMATHESIS_HOOKS=tests.fuzz_hooks, in its own process; what they need to know
of the running `hearth up` comes in HEARTH_FUZZ_* variables.

Each choice is a function of the generated case (a CRC of it), never a random draw, so that a run with a
fixed seed makes the same choices for the same cases.
"""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path
from typing import Any, TypeVar

import schemathesis
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from schemathesis import Case, HookContext
from schemathesis.core import NOT_SET

from protocol.federation import proof_message
from protocol.identity import Identity, b64e, encryption_public_b64, sign_request

T = TypeVar("T")

GENERATION = ("/v1/chat/completions", "/v1/completions")
HEARTBEAT = "/v1/nodes/heartbeat"
ENROLL = "/v1/enroll"
NODE_PATHS = ("/admin/enrollments/{node_id}/", "/admin/nodes/{node_id}/")
MODEL = os.environ.get("HEARTH_FUZZ_MODEL", "hearth-demo")
MAX_TOKENS = 2
KEEP = frozenset(n for n in os.environ.get("HEARTH_FUZZ_KEEP", "").split(",") if n)
DECOYS = tuple(n for n in os.environ.get("HEARTH_FUZZ_DECOYS", "").split(",") if n)
TOKEN_PATHS = "/admin/tokens/{token_id}/"
KEEP_TOKEN = os.environ.get("HEARTH_FUZZ_KEEP_TOKEN", "")
TOKEN_DECOYS = tuple(t for t in os.environ.get("HEARTH_FUZZ_TOKEN_DECOYS", "").split(",") if t)
SIGNER_ID = os.environ.get("HEARTH_FUZZ_SIGNER", "")
AUDIENCE = os.environ.get("HEARTH_FUZZ_AUDIENCE", "")
_signer_key = os.environ.get("HEARTH_FUZZ_SIGNER_KEY")
SIGNER = Identity.load(Path(_signer_key)) if _signer_key else None
_material = os.environ.get("HEARTH_FUZZ_MATERIAL")
MATERIAL: dict[str, Any] = json.loads(Path(_material).read_text()) if _material else {}
CERTIFICATES: dict[str, Any] = MATERIAL.get("certificates", {})
CODES: tuple[str, ...] = tuple(MATERIAL.get("codes", ()))

# A sealed request's envelope is JSON on the wire, under its own media type.
schemathesis.serializer.alias("application/x-hearth-envelope", "application/json")


def _pick(case_value: Any, options: tuple[T, ...]) -> T:
    return options[zlib.crc32(json.dumps(case_value, sort_keys=True, default=repr).encode()) % len(options)]


@schemathesis.hook
def map_case(ctx: HookContext, case: Case) -> Case:
    """Every phase's case, before it is sent."""
    path = case.operation.path
    params = case.path_parameters
    body = case.body
    if DECOYS and path.startswith(NODE_PATHS) and isinstance(params, dict) and "node_id" in params:
        # The generated id (most likely unknown: 404), or one the fuzzer read in an earlier answer, or a
        # decoy's; never a node that must stay as it is.
        chosen = _pick(params, (params["node_id"], *DECOYS))
        params["node_id"] = DECOYS[0] if chosen in KEEP else chosen
        signed = CERTIFICATES.get(params["node_id"])
        # Half the time a certificate the authority signed; else the generated one, read in any state.
        if path.endswith("/approve") and isinstance(body, dict) and signed and _pick(body, (False, True)):
            body["certificate"] = signed
    if TOKEN_DECOYS and path.startswith(TOKEN_PATHS) and isinstance(params, dict) and "token_id" in params:
        # The generated id, one read in an earlier answer, or a decoy's; never the fuzzer's own token.
        chosen = _pick(params, (params["token_id"], *TOKEN_DECOYS))
        params["token_id"] = TOKEN_DECOYS[0] if chosen == KEEP_TOKEN else chosen
    new_token = path == "/admin/tokens" and case.method.upper() == "POST"
    if new_token and isinstance(body, dict) and _pick(body, (False, True)):
        body["group"] = "default"  # else the generated name: most likely not in the policy, 400
    if path in GENERATION and isinstance(body, dict):
        if _pick(body, (True, False, False)):
            body["model"] = MODEL  # else the generated name: most likely unknown, 404
        for name in ("max_tokens", "max_completion_tokens"):
            value = body.get(name)
            # type(...): True is an int to isinstance, and worth sending as it is; 7e7 is an integer to
            # JSON Schema
            if (value is None and name == "max_tokens") or (
                type(value) in (int, float) and value > MAX_TOKENS
            ):
                body[name] = MAX_TOKENS
    if path == GENERATION[0] and isinstance(body, dict):
        _steer_tool_use(body)
    if path == HEARTBEAT and isinstance(body, dict) and _pick(body, (False, True)):
        body["node_id"] = SIGNER_ID  # the node reports on itself, past "only on itself"
    if path == ENROLL and CODES and isinstance(body, dict) and _pick(body, (False, True)):
        _enrollable(body)
    return case


def _steer_tool_use(body: dict[str, Any]) -> None:
    """What the document cannot say about tool use, kept so that valid requests reach the model: a tool
    message answers a call (tool_call_id), and half the time no tools, tool_choice or response_format (a
    generated tool_choice rarely names a generated tool, a generated schema is rarely one a node can
    enforce; the rest go as generated, to be refused with 400)."""
    messages = body.get("messages")
    for message in messages if isinstance(messages, list) else ():
        if isinstance(message, dict) and message.get("role") == "tool" and not message.get("tool_call_id"):
            message["tool_call_id"] = "call_fuzz"
    if _pick(body, (False, True)):
        for name in ("tools", "tool_choice", "response_format"):
            body.pop(name, None)


def _enrollable(body: dict[str, Any]) -> None:
    """A real code, and keys the body proves it holds: the generated node id (and URL) enroll if valid."""
    identity = Identity.generate()
    body["code"] = _pick(body, CODES)
    body["identity_key"] = identity.public_b64
    body["encryption_key"] = encryption_public_b64(X25519PrivateKey.generate())
    node_id = body.get("node_id")
    if isinstance(node_id, str):
        message = proof_message(body["code"], node_id, body["identity_key"], body["encryption_key"])
        body["proof"] = b64e(identity.sign(message))


@schemathesis.hook
def before_call(ctx: HookContext, case: Case, kwargs: dict[str, Any]) -> None:
    """Heartbeats are signed with the key of a node the operator approved, so that their bodies are read
    (unsigned, each is a 401 first). The signature covers the exact bytes: they are sent as signed."""
    if case.operation.path != HEARTBEAT or SIGNER is None:
        return
    try:
        raw = b"" if case.body is NOT_SET else json.dumps(case.body).encode()
    except (TypeError, ValueError):  # not JSON at all: sent unsigned, as generated
        return
    if raw:
        kwargs["data"] = raw
    case.headers = {**(case.headers or {}), **sign_request(SIGNER, "POST", HEARTBEAT, raw, audience=AUDIENCE)}
