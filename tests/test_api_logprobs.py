"""Logprobs, echo, prompt forms, n and logit_bias with the real `openai` client, plaintext to the scheduler
and sealed through `hearth proxy`, on one stack (scheduler, node, demo model) whose policy counts tokens
(so the node gets a token budget to share between choices). The loglikelihoods a scoring request returns
(echo, max_tokens 0) are checked against the model's own log-softmax, computed here in-process: what
lm-evaluation-harness relies on."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch

from node.backends.transformers_backend import TransformersBackend
from node.settings import ModelSettings
from tests.support import LoopThread, SealedStack, start_sealed_stack, stop_stack

MODEL = "hearth-demo"
HELLO = [{"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def env(
    servers: LoopThread, demo_model: ModelSettings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SealedStack]:
    """The demo model's stack, plaintext allowed, and `hearth proxy` in front of it (``env.url``)."""
    data = tmp_path_factory.mktemp("logprobs")
    policy = data / "policies.toml"
    policy.write_text("[groups.default]\ntokens_per_day = 100000000\n", encoding="utf-8")
    got = servers.call(start_sealed_stack(data, [demo_model], scheduler={"policy_file": policy}))
    yield got
    servers.call(stop_stack(got.stack))


@pytest.fixture(params=["plain", "sealed"])
def client(env: SealedStack, request: pytest.FixtureRequest) -> openai.OpenAI:
    if request.param == "plain":
        return openai.OpenAI(base_url=env.stack.api, api_key=env.stack.token, max_retries=0)
    return openai.OpenAI(base_url=env.url, api_key="unused-locally", max_retries=0)


@pytest.fixture(scope="module")
def model(demo_model_dir: Path) -> Iterator[TransformersBackend]:
    """The demo model in this process: the reference the node's numbers must equal."""
    backend = TransformersBackend.load(demo_model_dir)
    yield backend
    backend.close()


def log_softmax(model: TransformersBackend, ids: Sequence[int]) -> torch.Tensor:
    with torch.inference_mode():
        logits = model._model(input_ids=torch.tensor([list(ids)])).logits[0]
    return torch.log_softmax(logits.double(), dim=-1)


def loglikelihood(model: TransformersBackend, context: list[int], continuation: list[int]) -> float:
    """What lm-eval computes in-process for a multiple-choice answer."""
    rows = log_softmax(model, context + continuation)
    return sum(float(rows[len(context) - 1 + i][t]) for i, t in enumerate(continuation))


def test_scoring_with_echo_equals_the_models_own_loglikelihood(
    client: openai.OpenAI, model: TransformersBackend
) -> None:
    context = model.encode("The capital of France is", add_special_tokens=True)
    answers = [
        model.encode(" Paris", add_special_tokens=False),
        model.encode(" a cat", add_special_tokens=False),
    ]
    # lm-eval's loglikelihood request: token ids, echo, max_tokens 0, logprobs; batched, one per answer.
    r = client.completions.create(
        model=MODEL, prompt=[context + a for a in answers], echo=True, max_tokens=0, logprobs=1, temperature=0
    )
    assert [c.index for c in r.choices] == [0, 1]
    assert r.usage is not None and r.usage.completion_tokens == 0
    assert r.usage.prompt_tokens == sum(len(context) + len(a) for a in answers)
    for choice, answer in zip(r.choices, answers, strict=True):
        lp = choice.logprobs
        assert lp is not None and choice.finish_reason == "length"
        assert lp.token_logprobs is not None and lp.tokens is not None and lp.top_logprobs is not None
        assert len(lp.tokens) == len(context) + len(answer)
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # as OpenAI: nothing before it
        served = sum(v for v in lp.token_logprobs[len(context) :] if v is not None)
        assert math.isclose(served, loglikelihood(model, context, answer), abs_tol=1e-4)
        assert choice.text == model.decode(context + answer)
        assert lp.text_offset is not None and lp.text_offset[0] == 0
        assert lp.text_offset == sorted(lp.text_offset)


def test_echo_of_a_string_prompt_with_an_answer(client: openai.OpenAI, model: TransformersBackend) -> None:
    prompt = "Once upon a time"
    ids = model.encode(prompt, add_special_tokens=True)
    r = client.completions.create(
        model=MODEL, prompt=prompt, echo=True, max_tokens=4, logprobs=3, temperature=0,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    choice = r.choices[0]
    assert choice.text.startswith(prompt)
    lp = choice.logprobs
    assert lp is not None and lp.tokens is not None and lp.token_logprobs is not None
    assert lp.top_logprobs is not None and lp.text_offset is not None
    assert len(lp.tokens) == len(ids) + 4
    rows = log_softmax(model, ids)
    for i, value in enumerate(lp.token_logprobs[1 : len(ids)]):
        assert value is not None and math.isclose(value, float(rows[i][ids[i + 1]]), abs_tol=1e-4)
    # The answer's tokens: offsets go on from the prompt's end; greedy picks the most likely of each top.
    assert lp.text_offset[len(ids)] == len(prompt)
    for token, value, top in zip(
        lp.tokens[len(ids) :], lp.token_logprobs[len(ids) :], lp.top_logprobs[len(ids) :], strict=True
    ):
        assert top is not None and len(top) >= 3 and value == max(top.values()) and top[token] == value
    # Without echo: the answer alone, with the same numbers.
    plain = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=4, logprobs=3, temperature=0, extra_body={"ignore_eos": True}
    )
    assert plain.choices[0].text == choice.text[len(prompt) :]
    assert plain.choices[0].logprobs is not None
    assert plain.choices[0].logprobs.token_logprobs == lp.token_logprobs[len(ids) :]
    assert plain.choices[0].logprobs.text_offset == [o - len(prompt) for o in lp.text_offset[len(ids) :]]


def test_chat_logprobs_streamed_and_whole_are_the_same(client: openai.OpenAI) -> None:
    args: dict[str, Any] = {
        "model": MODEL, "messages": HELLO, "max_tokens": 6, "temperature": 0, "logprobs": True,
        "top_logprobs": 3, "extra_body": {"ignore_eos": True},
    }  # fmt: skip
    whole = client.chat.completions.create(**args)
    content = whole.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == 6
    assert "".join(e.token for e in content) == whole.choices[0].message.content
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.top_logprobs[0].logprob == entry.logprob <= 0
        assert entry.bytes == list(entry.token.encode())
    chunks = list(client.chat.completions.create(stream=True, **args))
    streamed = [
        e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content or []
    ]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]
    # Without logprobs: none, as before.
    assert (
        client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2).choices[0].logprobs is None
    )  # type: ignore[arg-type]


def test_n_choices_and_batched_prompts(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model=MODEL, messages=HELLO, max_tokens=8, n=3, seed=5, extra_body={"ignore_eos": True},  # type: ignore[arg-type]
    )  # fmt: skip
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert len({c.message.content for c in r.choices}) > 1  # three samples, not one thrice
    assert r.usage is not None and r.usage.completion_tokens == 24
    # Streaming: each chunk names its choice; each choice ends once; together, the same answers.
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=HELLO, max_tokens=8, n=3, seed=5, stream=True,  # type: ignore[arg-type]
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
        )
    )  # fmt: skip
    texts = ["", "", ""]
    ends = [0, 0, 0]
    for chunk in chunks:
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
            ends[c.index] += c.finish_reason is not None
    assert texts == [c.message.content for c in r.choices] and ends == [1, 1, 1]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 24
    # Completions: two prompts × n=2, index = prompt × n + sample; echo shows which prompt each is.
    prompts = ["First prompt", "Second one"]
    c = client.completions.create(model=MODEL, prompt=prompts, n=2, max_tokens=3, echo=True, seed=1)
    assert [ch.index for ch in c.choices] == [0, 1, 2, 3]
    assert [ch.text.startswith(prompts[ch.index // 2]) for ch in c.choices] == [True] * 4
    streamed = ["", "", "", ""]
    for chunk in client.completions.create(
        model=MODEL, prompt=prompts, n=2, max_tokens=3, echo=True, seed=1, stream=True
    ):
        for ch in chunk.choices:
            streamed[ch.index] += ch.text
    assert streamed == [ch.text for ch in c.choices]


def test_every_choice_gets_all_of_max_tokens_under_a_token_quota(client: openai.OpenAI) -> None:
    """The scheduler reserves quota for every choice, sealed too (the envelope's header counts them): no
    choice is cut to a share of one answer's reservation. 3 × 600 tokens is more than one answer's
    reservation holds (its 1 KiB prompt bound and 600)."""
    r = client.chat.completions.create(
        model=MODEL, messages=HELLO, max_tokens=600, n=3, seed=2, extra_body={"ignore_eos": True},  # type: ignore[arg-type]
    )  # fmt: skip
    assert [c.finish_reason for c in r.choices] == ["length"] * 3
    assert r.usage is not None and r.usage.completion_tokens == 1800


def test_a_token_that_is_part_of_a_character_says_its_own_bytes(
    client: openai.OpenAI, model: TransformersBackend
) -> None:
    """The demo tokenizer spells "é" in two byte tokens; each decodes alone to U+FFFD, and ``bytes`` says
    which byte it is, as OpenAI's do, so a client can join them."""
    first, _ = model.encode("é", add_special_tokens=False)
    assert model.decode([first]) == "\ufffd"
    r = client.chat.completions.create(
        model=MODEL, messages=HELLO, max_tokens=2, logprobs=True, top_logprobs=3,  # type: ignore[arg-type]
        logit_bias={str(first): 100}, extra_body={"ignore_eos": True, "min_p": 0, "top_k": 0},
    )  # fmt: skip
    assert r.choices[0].logprobs is not None and r.choices[0].logprobs.content
    entry = r.choices[0].logprobs.content[0]
    assert (entry.token, entry.bytes) == ("\ufffd", list("é".encode()[:1]))
    for top in entry.top_logprobs:
        assert top.bytes is not None and bytes(top.bytes).decode(errors="replace") == top.token


def test_logit_bias_forces_a_token(client: openai.OpenAI, model: TransformersBackend) -> None:
    token = model.encode(" zebra", add_special_tokens=False)[0]
    r = client.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=3, logit_bias={str(token): 100}, logprobs=0,
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    assert r.choices[0].logprobs is not None
    assert r.choices[0].logprobs.tokens == [model.decode([token])] * 3


# fmt: off
REFUSED = [
    # (endpoint, body, param): set but impossible, or a companion without its switch
    ("chat", {"top_logprobs": 2}, "top_logprobs"),
    ("chat", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("chat", {"n": 9}, "n"),
    ("chat", {"logit_bias": {"999999": 5}}, "logit_bias"),  # an id the demo model lacks
    ("completions", {"logprobs": 6}, "logprobs"),
    ("completions", {"best_of": 3}, "best_of"),  # ranking hidden samples is not supported
    ("completions", {"max_tokens": 0}, "max_tokens"),  # generates nothing without echo
    ("completions", {"prompt": [1, 999999]}, "prompt"),  # a token id the model lacks
    ("completions", {"prompt": ["a"] * 9, "n": 8}, "n"),  # 72 choices
]
# fmt: on


@pytest.mark.parametrize(("endpoint", "body", "param"), REFUSED)
def test_fields_that_cannot_be_honoured_are_refused_naming_them(
    env: SealedStack, client: openai.OpenAI, endpoint: str, body: dict[str, Any], param: str
) -> None:
    base: dict[str, Any] = (
        {"model": MODEL, "messages": HELLO} if endpoint == "chat" else {"model": MODEL, "prompt": "Hi"}
    )
    path = "/chat/completions" if endpoint == "chat" else "/completions"
    r = httpx.post(
        str(client.base_url).rstrip("/") + path, json={**base, **body},
        headers={"Authorization": f"Bearer {client.api_key}"}, timeout=60,
    )  # fmt: skip
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
