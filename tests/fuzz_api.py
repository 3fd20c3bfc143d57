"""API fuzzing with Schemathesis against a real `hearth up`, shared by tests/test_fuzz_api.py (short, fixed
seed) and tests/bench/fuzz_api.py (long, random seed).

`hearth up` runs as the command runs it (``serve_up``: scheduler, local node, demo model), in this process;
the `schemathesis run` command fuzzes every operation of the OpenAPI document it serves, admin ones too,
with the admin token `hearth up` printed, and checks every answer: not a server error, a documented status,
a documented media type, a body its schema describes.

The fuzzer is steered (tests/fuzz_hooks.py), so that its requests get past the first refusal and reach
what is behind it; nothing else is changed, and no operation is left out:

- Decoys: volunteers' machines enrolled for the run through the real `POST /v1/enroll` (community tier,
  pending). A node id in a path is the generated one or, as often, a decoy's, and an approval of a decoy
  carries, half the time, a certificate the operator's authority signed: approvals, rejections,
  revocations and drains meet real nodes in real states (200 once, then 409), not only unknown ids (404).
- The signer: one more decoy, approved at the start. Heartbeats are signed with its key, so they are read
  (unsigned, each would be a 401) and it becomes a node with whatever status the fuzzer sends. Requests
  are placed on club nodes only (`scheduler.policy.tiers`), so whatever it claims to serve, no request is
  sent to it.
- Kept whole: the node that serves the demo model and the signer are never named in a path (revoking or
  draining them would leave nothing behind the routes to test), nor is the fuzzer's own token (revoking or
  rotating it would lock the fuzzer out). Decoy tokens stand in: a token id in a path is the generated
  one (unknown: 404), one read in an earlier answer, or a decoy's, so revocations and rotations meet real
  tokens too; a new token names the default group half the time (the only group of `hearth up`'s policy).
- The served model: a generation request names the demo model a third of the time (an unknown model is a
  404 before any node is reached) and asks for at most two tokens, so the random-weight model answers in
  milliseconds. Fresh enrollment codes let some enrollments through.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from hearth.config import HearthSettings
from hearth.up import serve_up
from node.settings import ModelSettings
from protocol.federation import proof_message
from protocol.identity import (
    Identity,
    b64d,
    b64e,
    encryption_public_b64,
    fingerprint,
    issue_certificate,
    load_authority,
)
from tests.support import LoopThread

SIGNER = "fuzz-signer"
DECOYS = tuple(f"decoy-{i}" for i in range(8))
TOKEN_DECOYS = 4
CHECKS = (
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
)
ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 120.0
DECOY_TIER = "community"


@dataclass
class Target:
    """A running `hearth up`: its URL, the admin token it printed, its own node and the enrolled decoys."""

    url: str
    token: str
    node_id: str
    model: str
    data_dir: Path
    machines: dict[str, tuple[Identity, str]] = field(default_factory=dict)  # keys, by node id
    token_id: str = ""  # the fuzzer's own token's id
    token_decoys: list[str] = field(default_factory=list)  # ids of tokens the fuzzer may revoke or rotate

    def admin(self, method: str, path: str, body: Any = None) -> Any:
        headers = {"Authorization": f"Bearer {self.token}"}
        r = httpx.request(method, self.url + path, json=body, headers=headers, timeout=30)
        r.raise_for_status()
        return r.json()

    def certificate(self, node_id: str) -> dict[str, Any]:
        """What `hearth enroll approve` signs with the operator's key (`hearth up` keeps its own)."""
        identity, encryption_key = self.machines[node_id]
        return issue_certificate(
            load_authority(self.data_dir / "authority"),
            node_id=node_id,
            tier=DECOY_TIER,
            identity_key=identity.public_b64,
            encryption_key=encryption_key,
            scheduler_key=self.admin("GET", "/admin/authority")["scheduler_key"],
        )


@contextlib.contextmanager
def hearth_up(servers: LoopThread, data_dir: Path, model: ModelSettings) -> Iterator[Target]:
    """`hearth up` (``serve_up``, as the command calls it) on ``servers``' loop until the block ends."""
    lines: list[str] = []
    stop = servers.call(_new_event())
    settings = HearthSettings(
        data_dir=data_dir,
        scheduler={
            "port": 0,
            # The default is 60 s: were the node lost, each request would say so only after that.
            "max_queue_wait": 10.0,
            "policy": {"tiers": ["club"]},  # `hearth up`'s node; never the fuzzer's (community)
        },
    )
    running = asyncio.run_coroutine_threadsafe(
        serve_up(settings, lambda: [model], out=lines.append, stop=stop), servers.loop
    )
    try:
        url = _printed(lines, running, r"API base URL: (\S+)/v1$")
        token = _printed(lines, running, r"API token:\s+(hth_\S+)")
        target = Target(url, token, settings.node.node_id, model.model_id, data_dir)
        for node_id in (SIGNER, *DECOYS):
            target.machines[node_id] = _enroll(target, node_id)
        target.admin(
            "POST", f"/admin/enrollments/{SIGNER}/approve", {"certificate": target.certificate(SIGNER)}
        )
        target.token_id = next(
            t["id"] for t in target.admin("GET", "/admin/tokens")["tokens"] if t["scope"] == "admin"
        )
        target.token_decoys = [
            target.admin("POST", "/admin/tokens", {"name": f"decoy-{i}"})["token"]["id"]
            for i in range(TOKEN_DECOYS)
        ]
        yield target
    finally:
        servers.loop.call_soon_threadsafe(stop.set)
        running.result(timeout=60)


async def _new_event() -> asyncio.Event:
    return asyncio.Event()  # made on the servers' loop, which sets and waits on it


def _printed(lines: list[str], running: Any, pattern: str) -> str:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        for line in list(lines):
            if found := re.search(pattern, line):
                return found.group(1)
        if running.done():
            running.result()  # raises what stopped it
            raise AssertionError(f"hearth up stopped before printing {pattern!r}: {lines}")
        time.sleep(0.05)
    raise AssertionError(f"hearth up did not print {pattern!r} in time: {lines}")


def _enroll(target: Target, node_id: str) -> tuple[Identity, str]:
    """A volunteer's machine enrolls, as `hearth node enroll` does, and is pending."""
    code = target.admin("POST", "/admin/enrollment-codes", {"tier": DECOY_TIER})["code"]
    identity = Identity.generate()
    encryption_key = encryption_public_b64(X25519PrivateKey.generate())
    proof = identity.sign(proof_message(code, node_id, identity.public_b64, encryption_key))
    doc = {
        "code": code,
        "node_id": node_id,
        "identity_key": identity.public_b64,
        "encryption_key": encryption_key,
        "proof": b64e(proof),
    }
    httpx.post(target.url + "/v1/enroll", json=doc, timeout=30).raise_for_status()
    return identity, encryption_key


@dataclass
class Outcome:
    """What `schemathesis run` did: its exit code, its output, and its JSON report."""

    exit_code: int
    output: str
    report: dict[str, Any]
    seconds: float

    @property
    def cases(self) -> int:
        return int(self.report["test_cases"]["generated"])

    @property
    def failures(self) -> int:
        return sum(int(f["count"]) for f in self.report["failures"])

    def accepted(self, operation: str) -> int:
        """Valid requests the server answered with a 2xx, in every phase."""
        return sum(phase["accepted"] for phase in self.report["valid_rates"].get(operation, {}).values())


def run(
    target: Target,
    workdir: Path,
    *,
    max_examples: int,
    seed: int | None,
    thorough: bool = False,
    timeout: float = 600.0,
    extra: tuple[str, ...] = (),
) -> Outcome:
    """Run `schemathesis run` against ``target``. ``seed`` None: a random one, and random generation.
    ``thorough``: every phase in full (see ``_config``)."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "schemathesis.toml"
    config.write_text(_config(thorough=thorough))
    report = workdir / "report.json"
    phases = ("examples", "coverage", "fuzzing", *(("stateful",) if thorough else ()))
    command = [
        str(Path(sys.executable).with_name("schemathesis")),
        "--config-file", str(config), "--no-color",
        "run", target.url + "/openapi.json",
        "--checks", ",".join(CHECKS),
        "--phases", ",".join(phases),
        "--max-examples", str(max_examples),
        "--header", f"Authorization: Bearer {target.token}",
        "--workers", "1",  # one request at a time: the admin operations change what the next one meets
        *(arg for path in NOT_FUZZED for arg in ("--exclude-path", path)),
        "--report", "json", "--report-json-path", str(report),
    ]  # fmt: skip
    if seed is not None:
        command += ["--seed", str(seed), "--generation-deterministic"]
    command += extra
    signer = workdir / "signer.key"
    if not signer.exists():
        target.machines[SIGNER][0].save(signer)
    material = workdir / "material.json"
    material.write_text(json.dumps(_material(target, codes=max(8, 2 * max_examples))))
    scheduler_key = target.admin("GET", "/admin/authority")["scheduler_key"]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "SCHEMATHESIS_HOOKS": "tests.fuzz_hooks",
        "HEARTH_FUZZ_MODEL": target.model,
        "HEARTH_FUZZ_KEEP": ",".join((target.node_id, SIGNER)),
        "HEARTH_FUZZ_DECOYS": ",".join(DECOYS),
        "HEARTH_FUZZ_KEEP_TOKEN": target.token_id,
        "HEARTH_FUZZ_TOKEN_DECOYS": ",".join(target.token_decoys),
        "HEARTH_FUZZ_SIGNER": SIGNER,
        "HEARTH_FUZZ_SIGNER_KEY": str(signer),
        "HEARTH_FUZZ_AUDIENCE": fingerprint(b64d(scheduler_key, length=32)),
        "HEARTH_FUZZ_MATERIAL": str(material),
    }
    started = time.monotonic()
    done = subprocess.run(
        command,
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    seconds = time.monotonic() - started
    output = done.stdout + done.stderr
    if not report.exists():
        raise AssertionError(f"schemathesis wrote no report (exit {done.returncode}):\n{output[-4000:]}")
    return Outcome(done.returncode, output, json.loads(report.read_text()), seconds)


def _material(target: Target, codes: int) -> dict[str, Any]:
    """What lets some generated requests through: certificates for the decoys, fresh enrollment codes."""
    return {
        "certificates": {node_id: target.certificate(node_id) for node_id in DECOYS},
        "codes": [
            target.admin("POST", "/admin/enrollment-codes", {"tier": DECOY_TIER})["code"]
            for _ in range(codes)
        ],
    }


# Schemathesis warnings that say the run could not test what it seems to (no working token, a media type
# it cannot read, a schema it cannot resolve or generate for, ...): they fail the run. Three are left out:
# missing_test_data, validation_mismatch and low_valid_rate judge how many of a few generated cases the
# server accepted, which varies from run to run (the fuzzer reuses values from earlier answers: codes,
# keys, times); they are still printed, and the test checks what was accepted itself.
FAIL_ON = (
    "missing_auth",
    "base_url_mismatch",
    "missing_deserializer",
    "unused_openapi_auth",
    "unsupported_regex",
    "method_not_allowed",
    "constants_extraction",
    "unmatched_filter",
    "unresolvable_reference",
    "rate_limited",
    "dictionary_mismatch",
    "timeout_units",
)
# Operations whose documents are deep (a request's thirty options, a node's status): their coverage phase
# alone is two thirds of a run's cases, mostly invalid ones that pydantic refuses alike.
# Endless streams: their answers never end to be checked (tests/test_policies.py reads the events).
NOT_FUZZED = ("/admin/events",)
DEEP = r"^/v1/(chat/completions|completions|nodes/heartbeat)$"


def _config(*, thorough: bool) -> str:
    """schemathesis.toml: what the command line does not say. Not ``thorough`` (the test, which must stay
    short): the coverage phase sends the deep operations valid boundary values only (invalid values reach
    them at random in the fuzzing phase, and by kind in tests/scheduler/test_errors.py), and no methods
    the document does not list (405)."""
    fail_on = ", ".join(f'"{name}"' for name in FAIL_ON)
    lines = [
        "[generation]",
        'database = "none"',  # no example database written anywhere
        "[warnings]",
        f"fail-on = [{fail_on}]",
    ]
    if not thorough:
        lines += [
            "[phases.coverage]",
            "unexpected-methods = []",
            "[[operations]]",
            f"include-path-regex = '{DEEP}'",
            'phases.coverage.generation.mode = "positive"',
        ]
    return "\n".join([*lines, ""])
