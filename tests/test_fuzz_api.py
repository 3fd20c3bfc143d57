"""API fuzzing: Schemathesis sends valid and invalid requests to every operation of the OpenAPI document a
real `hearth up` serves, admin ones included, with its admin token, and checks every answer: never a 5xx,
a status the document lists, in a media type it lists, with a body its schema describes.

A fixed seed, deterministic generation and a few examples per operation keep it repeatable and short (the
coverage phase sends the deep operations their valid boundary values only); tests/bench/fuzz_api.py is the
long, random run. Left out or kept whole, on purpose (tests/fuzz_api.py says how and why):

- GET /openapi.json itself: Schemathesis reads it to start, and does not fuzz it.
- The node serving the demo model and the fuzzer's heartbeat signer are never named in a path: revoking or
  draining them would leave nothing behind the generation and heartbeat routes. Decoy enrollments stand in.
- The fuzzer's own token: no operation revokes tokens (only `hearth tokens revoke` does).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from node.settings import ModelSettings
from scheduler.openapi import openapi_document
from tests import fuzz_api
from tests.support import LoopThread

SEED = 20260601
EXAMPLES = 10


@pytest.fixture(scope="module")
def target(
    servers: LoopThread, demo_model: ModelSettings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[fuzz_api.Target]:
    with fuzz_api.hearth_up(servers, tmp_path_factory.mktemp("fuzz") / "data", demo_model) as running:
        yield running


def test_every_operation_answers_as_documented(target: fuzz_api.Target, tmp_path: Path) -> None:
    outcome = fuzz_api.run(target, tmp_path, max_examples=EXAMPLES, seed=SEED)
    assert outcome.exit_code == 0, outcome.output[-12000:]
    report = outcome.report
    # Every documented operation but the document's own (GET /openapi.json: Schemathesis read it to start)
    # and the endless streams.
    paths = openapi_document()["paths"]
    operations = sum(len(ops) for path, ops in paths.items() if path not in fuzz_api.NOT_FUZZED) - 1
    assert report["operations"]["selected"] == report["operations"]["tested"] == operations, report
    assert report["operations"]["skipped"] == report["operations"]["errored"] == 0, report
    assert report["failures"] == [] and report["errors"] == [], report
    assert outcome.cases >= operations * EXAMPLES, report  # it did send what it was asked to
    # The steering works: valid requests got past the first refusal to the code behind it.
    for operation, least in [
        ("POST /v1/chat/completions", 10),  # the demo model answered
        ("POST /v1/completions", 10),
        ("POST /v1/nodes/heartbeat", 1),  # signed, and read
        ("POST /admin/nodes/{node_id}/drain", 1),  # a decoy
    ]:
        assert outcome.accepted(operation) >= least, (operation, report["valid_rates"].get(operation))
