"""The official `openai` client, sync and async, streaming and not, against a real node and scheduler."""

from __future__ import annotations

import asyncio

import openai
import pytest

from tests.support import Stack

MODEL = "hearth-demo"
HELLO = [{"role": "user", "content": "Hello there"}]


@pytest.fixture
def client(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=stack.api, api_key=stack.token, max_retries=0)


@pytest.fixture
def aclient(stack: Stack) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=stack.api, api_key=stack.token, max_retries=0)


def test_models_lists_the_demo_model(client: openai.OpenAI) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert models[0].model_extra == {"context_length": 2048}


def test_chat_non_streaming(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=12)
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage is not None and 0 < r.usage.completion_tokens <= 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.usage.prompt_tokens > 5  # the chat template wraps the message


def test_chat_streaming_with_usage(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=HELLO, max_tokens=10, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1
    usage = chunks[-1].usage
    assert usage is not None and chunks[-1].choices == []
    assert 0 < usage.completion_tokens <= 10
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text  # the demo model writes something


def test_stream_equals_non_stream_for_the_same_seed(client: openai.OpenAI) -> None:
    args = {"model": MODEL, "messages": HELLO, "max_tokens": 16, "seed": 7, "temperature": 0.8}
    whole = client.chat.completions.create(**args).choices[0].message.content  # type: ignore[call-overload]
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(stream=True, **args)  # type: ignore[call-overload]
        if c.choices
    )
    assert whole == streamed


def test_greedy_is_deterministic_and_seed_changes_sampling(client: openai.OpenAI) -> None:
    def run(**kw: object) -> str:
        r = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=16, **kw)  # type: ignore[call-overload]
        return str(r.choices[0].message.content)

    assert run(temperature=0) == run(temperature=0)
    assert run(seed=1) == run(seed=1)
    assert len({run(seed=s) for s in range(4)}) > 1


def test_stop_sequence_cuts_the_output(client: openai.OpenAI) -> None:
    full = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=24, seed=11)
    text = str(full.choices[0].message.content)
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert len(stop) == 3
    cut = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=24, seed=11, stop=[stop])
    assert cut.choices[0].message.content == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_max_tokens_gives_finish_reason_length(client: openai.OpenAI) -> None:
    # The demo model's random weights make an early end-of-text token a 1-in-2000 event per step, and this
    # seed is fixed, so the answer runs into the limit.
    r = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=3, seed=1)
    assert r.usage is not None
    assert r.usage.completion_tokens == 3
    assert r.choices[0].finish_reason == "length"


def test_null_optional_fields_mean_defaults(client: openai.OpenAI) -> None:
    """OpenAI's API accepts null for optional fields; clients such as LiteLLM pass None through."""
    r = client.chat.completions.create(
        model=MODEL, messages=HELLO, max_tokens=2,
        extra_body={"temperature": None, "top_p": None, "n": None, "presence_penalty": None, "stream": None,
                    "ignore_eos": True},  # (the random demo model could end first)
    )  # fmt: skip
    assert r.usage is not None and r.usage.completion_tokens == 2


def test_top_p_and_penalties_are_accepted(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model=MODEL,
        messages=HELLO,
        max_tokens=8,
        top_p=0.5,
        presence_penalty=1.0,
        frequency_penalty=0.5,
        seed=3,
    )
    assert r.usage is not None and r.usage.completion_tokens > 0


def test_completions_non_streaming_and_streaming(client: openai.OpenAI) -> None:
    r = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=8, seed=5)
    assert r.object == "text_completion"
    assert r.usage is not None and 0 < r.usage.completion_tokens <= 8
    streamed = list(
        client.completions.create(
            model=MODEL,
            prompt="Once upon a time",
            max_tokens=8,
            seed=5,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == r.choices[0].text
    assert streamed[-1].usage is not None
    assert streamed[-1].usage.completion_tokens == r.usage.completion_tokens


def test_completions_default_max_tokens_is_16(client: openai.OpenAI) -> None:
    r = client.completions.create(model=MODEL, prompt="The club meets on")
    assert r.usage is not None and r.usage.completion_tokens <= 16


async def test_async_client_streaming_and_not(aclient: openai.AsyncOpenAI) -> None:
    r = await aclient.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=6)
    assert r.usage is not None and r.usage.completion_tokens > 0
    stream = await aclient.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=6, stream=True)
    chunks = [c async for c in stream]
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    await aclient.close()


async def test_concurrent_requests_are_all_served(aclient: openai.AsyncOpenAI) -> None:
    async def one(i: int) -> tuple[int, str]:
        msgs = [{"role": "user", "content": f"request number {i}"}]
        r = await aclient.chat.completions.create(model=MODEL, messages=msgs, max_tokens=8, seed=i)  # type: ignore[arg-type]
        assert r.usage is not None
        return r.usage.completion_tokens, str(r.choices[0].message.content)

    results = await asyncio.gather(*(one(i) for i in range(12)))
    assert all(0 < n <= 8 for n, _ in results)
    # Each request got its own answer, not a neighbour's (different seeds and prompts).
    assert len({text for _, text in results}) > 6
    await aclient.close()


def test_long_conversation_is_truncated_when_asked(client: openai.OpenAI) -> None:
    turns = [{"role": "system", "content": "You are terse."}]
    for i in range(200):
        turns.append({"role": "user", "content": f"question {i} " + "words " * 10})
        turns.append({"role": "assistant", "content": f"answer {i} " + "more " * 10})
    turns.append({"role": "user", "content": "last question"})
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model=MODEL, messages=turns, max_tokens=8)  # type: ignore[arg-type]
    assert refused.value.code == "context_length_exceeded"
    r = client.chat.completions.create(
        model=MODEL,
        messages=turns,
        max_tokens=8,
        extra_body={"truncation": "auto"},  # type: ignore[arg-type]
    )
    assert r.usage is not None and r.usage.prompt_tokens <= 2048 - 8


# Extreme values a client may send within the documented ranges: each is answered, none breaks sampling
# (a temperature of 1e-300 used to overflow the logits and fail on every node in turn).
@pytest.mark.parametrize(
    "extreme",
    [
        {"temperature": 1e-300},  # greedy in effect
        {"temperature": 5e-5, "seed": 1},  # under the greedy threshold, with a seed
        {"temperature": 2.0, "top_p": 1e-300},  # the likeliest token alone survives top_p
        {"temperature": 2.0, "min_p": 1.0},  # the likeliest token alone survives min_p
        {"temperature": 1.0, "top_k": 1},  # one candidate
        {"repetition_penalty": 0.01},  # the lower bound
        {
            "repetition_penalty": 2.0,
            "presence_penalty": 2.0,
            "frequency_penalty": 2.0,
        },  # every penalty at its top
        {"presence_penalty": -2.0, "frequency_penalty": -2.0},  # negative penalties
    ],
)
def test_extreme_sampling_values_are_answered(client: openai.OpenAI, extreme: dict[str, float]) -> None:
    r = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=4, extra_body=extreme)
    assert r.usage is not None and r.usage.completion_tokens > 0


def test_a_repetition_penalty_under_its_range_is_refused(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=MODEL, messages=HELLO, max_tokens=4, extra_body={"repetition_penalty": 1e-300}
        )
    assert caught.value.body["param"] == "repetition_penalty"  # type: ignore[index]
