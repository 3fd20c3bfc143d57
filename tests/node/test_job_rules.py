"""A real node applying the rules its scheduler sends with a job: the course's system prompt reaches the
model (plaintext, sealed, resumed, chat and completions, through context fitting), the token budget cuts the
answer or refuses a prompt that alone is too large, and malformed rules are refused in OpenAI's shape.

Each job is posted to the node as its scheduler would (signed, over loopback), and what the model read is
shown by the node's own count of prompt tokens: exactly the count of the conversation with the course's
prompt, rendered with the model's template and tokenized with its tokenizer here.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

from node.backends.transformers_backend import TransformersBackend
from node.demo import DEMO_MODEL_ID
from node.templates import ChatTemplate, Message, resolve_template
from protocol import frames
from protocol.envelope import SEALED_JOB, Candidate, ResponseOpener, response_secret, seal_request, to_wire
from protocol.identity import b64d
from protocol.schemas import parse_request
from tests.support import Stack

COURSE = "You are the tutor of Biology 101. Explain, never write the student's essay."
HI = [{"role": "user", "content": "hi"}]
GREEDY = {"temperature": 0, "ignore_eos": True}  # the same answer every time, as long as allowed


@dataclass(frozen=True)
class Tokens:
    """The demo model's tokenizer and template, to count what the node should have fed its model."""

    backend: TransformersBackend
    template: ChatTemplate

    def chat(self, messages: Sequence[Message]) -> int:
        return len(self.backend.encode(self.template.render(messages), add_special_tokens=False))

    def completion(self, prompt: str) -> int:
        return len(self.backend.encode(prompt, add_special_tokens=True))

    def text(self, text: str) -> int:
        return len(self.backend.encode(text, add_special_tokens=False))


@pytest.fixture(scope="module")
def tokens(demo_model_dir: Path) -> Iterator[Tokens]:
    backend = TransformersBackend.load(demo_model_dir)
    template = resolve_template(
        None, backend.chat_template, bos_token=backend.bos_token, eos_token=backend.eos_token
    )
    yield Tokens(backend, template)
    backend.close()


@dataclass
class Answer:
    status: int
    meta: dict[str, Any]  # the node's final token counts, as the scheduler reads them
    body: bytes  # what the client gets: SSE events or one JSON body
    error: dict[str, Any] | None = None  # a refusal before any work, in OpenAI's shape

    @property
    def total(self) -> int:
        return int(self.meta["prompt_tokens"]) + int(self.meta["completion_tokens"])

    def client_usage(self) -> dict[str, Any]:
        """The usage the client reads (a streamed answer's comes with include_usage)."""
        if not self.body.startswith(b"data: "):
            return dict(json.loads(self.body)["usage"])
        events = [json.loads(e[6:]) for e in self.body.split(b"\n\n") if e.startswith(b"data: {")]
        return next(dict(e["usage"]) for e in events if e.get("usage"))


def _frames(r: httpx.Response) -> list[frames.Frame]:
    decoder = frames.FrameDecoder()
    got = decoder.feed(r.content)
    decoder.close()
    return got


def run_plain(stack: Stack, endpoint: str, request: dict[str, Any], **job: Any) -> Answer:
    doc = {"endpoint": endpoint, "request_id": f"r{time.monotonic_ns()}", "job_id": "j1", "request": request}
    raw = json.dumps({**doc, **job}).encode()
    r = httpx.post(
        stack.node_url + "/jobs", content=raw, headers=stack.node_headers("POST", "/jobs", raw), timeout=60
    )
    if r.status_code != 200:
        return Answer(r.status_code, {}, b"", r.json()["error"])
    got = _frames(r)
    assert got[-1].final and got[-1].kind == frames.META
    body = b"".join(f.payload for f in got if f.kind == frames.DATA)
    return Answer(r.status_code, got[-1].json(), body)


def _node_key(stack: Stack) -> Candidate:
    status = httpx.get(stack.node_url + "/status", headers=stack.node_headers("GET", "/status"), timeout=30)
    statement = status.json()["key_statement"]["statement"]
    public = X25519PublicKey.from_public_bytes(b64d(statement["public_key"], length=32))
    return Candidate(statement["node_id"], statement["key_id"], public)


def sealed_job(stack: Stack, endpoint: str, request: dict[str, Any]) -> tuple[dict[str, Any], bytes, str]:
    """A sealed job for the node, as a client's proxy seals it and its scheduler forwards it."""
    request_id = f"s{time.monotonic_ns()}"
    sealed, seed = seal_request(
        json.dumps(request).encode(), endpoint=endpoint, model=request["model"],
        max_tokens=request.get("max_tokens"), stream=bool(request.get("stream")), request_id=request_id,
        issued_at=int(time.time()), ttl_s=60, candidates=[_node_key(stack)],
        choices=parse_request(endpoint, request).choices,
    )  # fmt: skip
    return {"envelope": to_wire(sealed), "resume": None, "job_id": "j1"}, seed, request_id


def post_sealed(stack: Stack, doc: dict[str, Any], seed: bytes, request_id: str) -> Answer:
    raw = json.dumps(doc).encode()
    headers = {**stack.node_headers("POST", "/jobs", raw), "Content-Type": SEALED_JOB}
    r = httpx.post(stack.node_url + "/jobs", content=raw, headers=headers, timeout=60)
    if r.status_code != 200:
        return Answer(r.status_code, {}, b"", r.json()["error"])
    opener = ResponseOpener(response_secret(seed, stack.node_id, request_id), request_id)
    got = _frames(r)
    metas = [f.json() for f in got if f.kind == frames.META]
    body = b"".join(opener.open(f.payload, final=f.final) for f in got if f.kind == frames.DATA)
    assert opener.finished, "the sealed answer ends with its final frame"
    return Answer(r.status_code, metas[-1], body)


def chat(messages: list[dict[str, str]], **extra: Any) -> dict[str, Any]:
    return {"model": DEMO_MODEL_ID, "messages": messages, "max_tokens": 1, **extra}


def completion(prompt: str | list[str], **extra: Any) -> dict[str, Any]:
    return {"model": DEMO_MODEL_ID, "prompt": prompt, "max_tokens": 1, **extra}


@pytest.mark.parametrize(
    ("endpoint", "request_", "rules", "read"),
    [
        # no rules: the model reads the client's conversation
        ("chat", chat(HI), None, [("user", "hi")]),
        # the course's prompt, as the first system message
        ("chat", chat(HI), {"system_prompt": COURSE}, [("system", COURSE), ("user", "hi")]),
        # before the client's own system prompt, which stays
        (
            "chat",
            chat([{"role": "system", "content": "Be brief."}, *HI]),
            {"system_prompt": COURSE},
            [("system", COURSE), ("system", "Be brief."), ("user", "hi")],
        ),
        # streamed alike
        ("chat", chat(HI, stream=True), {"system_prompt": COURSE}, [("system", COURSE), ("user", "hi")]),
        # completions: the prompt as sent
        ("completion", completion("Once upon a time"), None, "Once upon a time"),
        # with the course's prompt in front, a blank line between
        (
            "completion",
            completion("Once upon a time"),
            {"system_prompt": COURSE},
            f"{COURSE}\n\nOnce upon a time",
        ),
    ],
)
def test_the_course_prompt_reaches_the_model(
    stack: Stack, tokens: Tokens, endpoint: str, request_: dict[str, Any], rules: Any, read: Any
) -> None:
    answer = run_plain(stack, endpoint, request_, **({"rules": rules} if rules else {}))
    assert answer.status == 200, answer.error
    if endpoint == "chat":
        expected = tokens.chat([{"role": role, "content": text} for role, text in read])
    else:
        expected = tokens.completion(read)
    assert answer.meta["prompt_tokens"] == expected


@pytest.mark.parametrize(
    "rules",
    [
        {"rules": None},  # null
        {"rules": {}},  # empty
        {"rules": {"system_prompt": None, "max_total_tokens": None}},  # every rule null
    ],
)
def test_rules_that_set_nothing_change_nothing(stack: Stack, rules: dict[str, Any]) -> None:
    request = chat(HI, max_tokens=6, **GREEDY)
    without, with_ = run_plain(stack, "chat", request), run_plain(stack, "chat", request, **rules)
    assert without.status == with_.status == 200
    assert with_.meta == without.meta

    def same(body: bytes) -> dict[str, Any]:
        doc = dict(json.loads(body))
        del doc["created"], doc["id"]  # the clock's, and the job's own id
        return doc

    assert same(with_.body) == same(without.body)


def test_a_sealed_job_gets_the_course_prompt_and_the_budget(stack: Stack, tokens: Tokens) -> None:
    prompt = tokens.chat([{"role": "system", "content": COURSE}, *HI])
    request = chat(HI, max_tokens=20, **GREEDY)
    doc, seed, request_id = sealed_job(stack, "chat", request)
    doc["rules"] = {"system_prompt": COURSE, "max_total_tokens": prompt + 3}
    answer = post_sealed(stack, doc, seed, request_id)
    assert answer.status == 200, answer.error
    assert answer.meta == {"finish_reason": "length", "prompt_tokens": prompt, "completion_tokens": 3}
    body = json.loads(answer.body)
    assert body["usage"] == {"prompt_tokens": prompt, "completion_tokens": 3, "total_tokens": prompt + 3}
    assert body["choices"][0]["finish_reason"] == "length"


def test_a_sealed_job_without_rules_is_as_before(stack: Stack, tokens: Tokens) -> None:
    doc, seed, request_id = sealed_job(stack, "chat", chat(HI, max_tokens=2, **GREEDY))
    answer = post_sealed(stack, doc, seed, request_id)
    assert answer.status == 200, answer.error
    assert answer.meta["prompt_tokens"] == tokens.chat(HI)


@pytest.mark.parametrize(
    ("endpoint", "extra"),
    [
        ("chat", {}),  # one JSON body
        ("chat", {"stream": True, "stream_options": {"include_usage": True}}),  # streamed, with usage
        ("completion", {}),  # completions alike
        ("completion", {"stream": True, "stream_options": {"include_usage": True}}),
    ],
)
@pytest.mark.parametrize(
    ("left", "completion_tokens"),
    [
        (3, 3),  # the answer is cut to what the budget leaves after the prompt
        (1, 1),  # one token left: one token
    ],
)
def test_the_budget_cuts_the_answer(
    stack: Stack, tokens: Tokens, endpoint: str, extra: dict[str, Any], left: int, completion_tokens: int
) -> None:
    if endpoint == "chat":
        request, prompt = chat(HI, max_tokens=30, **GREEDY, **extra), tokens.chat(HI)
    else:
        request, prompt = (
            completion("Once upon", max_tokens=30, **GREEDY, **extra),
            tokens.completion("Once upon"),
        )
    answer = run_plain(stack, endpoint, request, rules={"max_total_tokens": prompt + left})
    assert answer.status == 200, answer.error
    assert answer.meta == {
        "finish_reason": "length",
        "prompt_tokens": prompt,
        "completion_tokens": completion_tokens,
    }
    assert answer.total <= prompt + left
    assert answer.client_usage()["total_tokens"] == prompt + completion_tokens


def test_a_budget_larger_than_the_answer_changes_nothing(stack: Stack) -> None:
    request = chat(HI, max_tokens=5, **GREEDY)
    free = run_plain(stack, "chat", request)
    budgeted = run_plain(stack, "chat", request, rules={"max_total_tokens": 10_000})
    assert free.meta == budgeted.meta and free.meta["completion_tokens"] == 5


@pytest.mark.parametrize("over", [0, 1, 40], ids=["equal", "one-over", "far-over"])
@pytest.mark.parametrize("sealed", [False, True], ids=["plaintext", "sealed"])
def test_a_prompt_the_budget_cannot_hold_is_refused_before_any_work(
    stack: Stack, tokens: Tokens, over: int, sealed: bool
) -> None:
    prompt = tokens.chat([{"role": "system", "content": COURSE}, *HI])
    budget = prompt - over
    rules = {"system_prompt": COURSE, "max_total_tokens": budget}
    request = chat(HI, max_tokens=5)
    if sealed:
        doc, seed, request_id = sealed_job(stack, "chat", request)
        answer = post_sealed(stack, {**doc, "rules": rules}, seed, request_id)
    else:
        answer = run_plain(stack, "chat", request, rules=rules)
    assert answer.status == 429
    assert answer.error == {
        "message": f"this request's prompt is {prompt} tokens; the quota left for it is {budget} tokens",
        "type": "rate_limit_error",
        "param": None,
        "code": "quota_exceeded",
    }


@pytest.mark.parametrize(
    "rules",
    [
        {"system_prompt": ""},  # empty
        {"max_total_tokens": 0},  # no tokens at all
        {"max_total_tokens": "100"},  # text
        {"course": "x"},  # a rule the node does not know
        "be nice",  # not an object
    ],
)
def test_malformed_rules_are_refused_with_400(stack: Stack, rules: Any) -> None:
    answer = run_plain(stack, "chat", chat(HI), rules=rules)
    assert answer.status == 400 and answer.error is not None
    assert (answer.error["type"], answer.error["code"], answer.error["param"]) == (
        "invalid_request_error",
        "invalid_rules",
        "rules",
    )


def test_a_sealed_job_with_malformed_rules_is_refused_before_its_envelope_is_opened(stack: Stack) -> None:
    doc, seed, request_id = sealed_job(stack, "chat", chat(HI, max_tokens=2))
    refused = post_sealed(stack, {**doc, "rules": {"max_total_tokens": -1}}, seed, request_id)
    assert refused.status == 400 and refused.error is not None and refused.error["code"] == "invalid_rules"
    # The envelope was not opened, so it is not spent: the same one, with good rules, is answered.
    answer = post_sealed(stack, {**doc, "rules": {"max_total_tokens": 10_000}}, seed, request_id)
    assert answer.status == 200, answer.error


def test_a_resumed_answer_keeps_the_course_prompt_and_counts_against_the_budget(
    stack: Stack, tokens: Tokens
) -> None:
    # Another node streamed "Hello there" and failed; this one continues, reading the same course prompt.
    sent = "Hello there"
    events = [
        {"id": "x", "created": 123, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]},
        {"id": "x", "created": 123, "choices": [{"index": 0, "delta": {"content": "Hello"}}]},
        {"id": "x", "created": 123, "choices": [{"index": 0, "delta": {"content": " there"}}]},
    ]
    resume = "".join(f"data: {json.dumps(e)}\n\n" for e in events)
    prompt = tokens.chat([{"role": "system", "content": COURSE}, *HI])
    already = tokens.text(sent)
    rules = {"system_prompt": COURSE, "max_total_tokens": prompt + already + 2}
    request = chat(HI, max_tokens=30, stream=True, **GREEDY)
    answer = run_plain(stack, "chat", request, resume=resume, rules=rules)
    assert answer.status == 200, answer.error
    # The answer so far counts as completion (the client received it), the prompt as the course's own.
    assert answer.meta == {
        "finish_reason": "length",
        "prompt_tokens": prompt,
        "completion_tokens": already + 2,
    }
    assert answer.total == rules["max_total_tokens"]


def test_context_fitting_keeps_the_course_prompt(stack: Stack, tokens: Tokens) -> None:
    # A conversation far longer than the demo model's 2048-token context, and max_tokens leaving the prompt
    # room for exactly the course's prompt and the last message: every earlier turn goes, the course stays.
    history = [
        {"role": role, "content": f"turn {i} " + "lorem ipsum dolor " * 300}
        for i, role in enumerate(["user", "assistant", "user", "assistant"])
    ]
    last = {"role": "user", "content": "so, what now?"}
    kept = tokens.chat([{"role": "system", "content": COURSE}, last])
    context = tokens.backend.context_length
    request = chat([*history, last], max_tokens=context - kept, truncation="auto", **GREEDY)
    answer = run_plain(stack, "chat", request, rules={"system_prompt": COURSE, "max_total_tokens": kept + 2})
    assert answer.status == 200, answer.error
    assert answer.meta == {"finish_reason": "length", "prompt_tokens": kept, "completion_tokens": 2}


@pytest.mark.parametrize(
    ("n", "prompts", "left", "each"),
    [
        (3, 1, 7, 2),  # three samples share what the budget leaves: 7 // 3 tokens each
        (2, 2, 4, 1),  # two prompts × two samples: each prompt counted once, 4 // 4 each
    ],
)
def test_choices_share_the_budget(
    stack: Stack, tokens: Tokens, n: int, prompts: int, left: int, each: int
) -> None:
    # A budget smaller than the choices would use (a scheduler reserves for all of them, but a group's
    # quota may have less left): the node shares it between the choices rather than use more.
    texts = ["Once upon", "Far away"][:prompts]
    read = sum(tokens.completion(t) for t in texts)
    request = completion(texts if prompts > 1 else texts[0], max_tokens=30, n=n, **GREEDY)
    answer = run_plain(stack, "completion", request, rules={"max_total_tokens": read + left})
    assert answer.status == 200, answer.error
    assert answer.meta == {
        "finish_reason": "length",
        "prompt_tokens": read,
        "completion_tokens": each * n * prompts,
    }
    assert answer.total <= read + left
    assert [c["index"] for c in json.loads(answer.body)["choices"]] == list(range(n * prompts))


def test_choices_without_room_are_refused(stack: Stack, tokens: Tokens) -> None:
    read = tokens.completion("Once upon")
    answer = run_plain(
        stack, "completion", completion("Once upon", n=4, **GREEDY), rules={"max_total_tokens": read + 3}
    )
    assert answer.status == 429 and answer.error["code"] == "quota_exceeded"
