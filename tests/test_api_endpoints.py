"""The endpoints tools look for beside generation: ``GET /v1/models/{id}`` and the tokenizer endpoints
(``POST /tokenize``, ``POST /detokenize``, ``GET /tokenizer_info``, as vLLM serves them), against a real
scheduler and node, in plaintext and through a real `hearth proxy` (end-to-end encrypted)."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import openai
import pytest

from hearth.proxy import SealedClient, state_path
from hearth.proxy_server import serve
from tests.support import LoopThread, Stack, wait_for

MODEL = "hearth-demo"
TEXT = "The quick brown fox jumps over the lazy dog."


@pytest.fixture(scope="module")
def proxy(servers: LoopThread, stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`hearth proxy` in front of the shared stack: its base URL (without /v1)."""
    data = tmp_path_factory.mktemp("proxy")
    holder: dict[str, object] = {}

    async def start() -> str:
        session = aiohttp.ClientSession()
        client = SealedClient(stack.base_url, stack.token, state_path(data, stack.base_url), session)

        async def has_node() -> bool:
            directory = await client.refresh(force=True)
            return stack.node_id in directory.usable(time.time()) and bool(client.hints.get(MODEL))

        await wait_for(has_node, within=60, interval=0.2)
        runner, url = await serve(client, "127.0.0.1", 0)
        holder.update(runner=runner, session=session)
        return url

    url = servers.call(start())
    yield url

    async def stop() -> None:
        runner = holder["runner"]
        session = holder["session"]
        assert isinstance(runner, aiohttp.web.AppRunner) and isinstance(session, aiohttp.ClientSession)
        await runner.cleanup()
        await session.close()

    servers.call(stop())


@pytest.fixture(params=["plaintext", "proxy"])
def base(request: pytest.FixtureRequest, stack: Stack) -> str:
    """The service's root URL: the scheduler itself, or `hearth proxy` in front of it."""
    if request.param == "plaintext":
        return stack.base_url
    url: str = request.getfixturevalue("proxy")
    return url


def _headers(stack: Stack) -> dict[str, str]:
    return {"Authorization": f"Bearer {stack.token}"}


# ----- GET /v1/models/{id} -----


def test_the_openai_client_retrieves_a_model(base: str, stack: Stack) -> None:
    client = openai.OpenAI(base_url=base + "/v1", api_key=stack.token, max_retries=0)
    model = client.models.retrieve(MODEL)
    assert model.id == MODEL and model.object == "model" and model.owned_by == "hearth"
    assert model.model_extra == {"context_length": 2048}


@pytest.mark.parametrize(
    "model_id",
    [
        "no-such-model",  # an id nobody serves
        "org/no-such-model",  # ids may contain '/': the rest of the path is the id
    ],
)
def test_an_unknown_model_is_404_in_openais_shape(base: str, stack: Stack, model_id: str) -> None:
    r = httpx.get(f"{base}/v1/models/{model_id}", headers=_headers(stack), timeout=30)
    assert r.status_code == 404
    assert r.json() == {
        "error": {
            "message": f"the model '{model_id}' does not exist here; see /v1/models",
            "type": "invalid_request_error",
            "param": "model",
            "code": "model_not_found",
        }
    }
    client = openai.OpenAI(base_url=base + "/v1", api_key=stack.token, max_retries=0)
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve(model_id)


def test_retrieving_a_model_needs_a_token(stack: Stack) -> None:
    r = httpx.get(f"{stack.api}/models/{MODEL}", timeout=30)
    assert r.status_code == 401
    assert r.json()["error"]["type"] == "authentication_error"


# ----- the tokenizer endpoints -----


@pytest.fixture(scope="module")
def tokenizer(demo_model_dir: Path) -> Any:
    """The demo model's own tokenizer, read here: what the node's answers must equal."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo_model_dir)


def test_tokenize_a_prompt_as_lm_eval_asks(base: str, stack: Stack, tokenizer: Any) -> None:
    # lm-evaluation-harness's remote tokenizer names no model and asks for no special tokens.
    r = httpx.post(
        base + "/tokenize", json={"prompt": TEXT, "add_special_tokens": False}, headers=_headers(stack),
        timeout=30,
    )  # fmt: skip
    assert r.status_code == 200, r.text
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    assert r.json() == {"tokens": ids, "count": len(ids), "max_model_len": 2048, "token_strs": None}


def test_tokenize_adds_special_tokens_by_default_for_a_prompt(
    base: str, stack: Stack, tokenizer: Any
) -> None:
    r = httpx.post(
        base + "/tokenize", json={"model": MODEL, "prompt": TEXT}, headers=_headers(stack), timeout=30
    )
    assert r.status_code == 200, r.text
    assert r.json()["tokens"] == tokenizer.encode(TEXT, add_special_tokens=True)


def test_tokenize_messages_as_the_chat_template_renders_them(base: str, stack: Stack) -> None:
    messages = [{"role": "user", "content": TEXT}]
    h = _headers(stack)
    r = httpx.post(base + "/tokenize", json={"model": MODEL, "messages": messages}, headers=h, timeout=30)
    assert r.status_code == 200, r.text
    # The same count the chat endpoint reports for the same conversation.
    chat = openai.OpenAI(base_url=base + "/v1", api_key=stack.token, max_retries=0).chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=1,  # type: ignore[arg-type]
    )
    assert chat.usage is not None and r.json()["count"] == chat.usage.prompt_tokens
    without = httpx.post(
        base + "/tokenize", json={"model": MODEL, "messages": messages, "add_generation_prompt": False},
        headers=h, timeout=30,
    ).json()  # fmt: skip
    assert without["count"] < r.json()["count"]


def test_detokenize_gives_the_text_back(base: str, stack: Stack, tokenizer: Any) -> None:
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    r = httpx.post(base + "/detokenize", json={"tokens": ids}, headers=_headers(stack), timeout=30)
    assert r.status_code == 200, r.text
    assert r.json() == {"prompt": tokenizer.decode(ids, skip_special_tokens=True)}


def test_tokenizer_info_has_what_lm_eval_reads(base: str, stack: Stack, tokenizer: Any) -> None:
    h = _headers(stack)
    for url in (base + "/tokenizer_info", f"{base}/tokenizer_info?model={MODEL}"):
        r = httpx.get(url, headers=h, timeout=30)
        assert r.status_code == 200, r.text
        info = r.json()
        assert info["eos_token"] == tokenizer.eos_token
        assert info["bos_token"] == (tokenizer.bos_token or None)
        assert info["model_max_length"] == 2048
        assert isinstance(info["chat_template"], str) and "{%" in info["chat_template"]


@pytest.mark.parametrize(
    ("path", "body", "param", "says"),
    [
        # neither prompt nor messages
        ("/tokenize", {"model": MODEL}, None, "send either 'prompt'"),
        # both
        ("/tokenize", {"prompt": "a", "messages": [{"role": "user", "content": "a"}]}, None, "not both"),
        # not a string
        ("/tokenize", {"prompt": 7}, "prompt", "must be a string"),
        # token strings are not offered
        ("/tokenize", {"prompt": "a", "return_token_strs": True}, None, "return_token_strs"),
        # ids are numbers of the vocabulary, not text
        ("/detokenize", {"tokens": ["a"]}, "tokens.0", "must be an integer"),
        # negative ids
        ("/detokenize", {"tokens": [-1]}, "tokens.0", "at least 0"),
        # no tokens at all
        ("/detokenize", {}, "tokens", "required"),
    ],
)
def test_malformed_tokenizer_requests_say_what_to_send(
    base: str, stack: Stack, path: str, body: dict[str, object], param: str | None, says: str
) -> None:
    r = httpx.post(base + path, json=body, headers=_headers(stack), timeout=30)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param
    assert says in err["message"]


def test_an_unknown_model_is_404(base: str, stack: Stack) -> None:
    r = httpx.post(
        base + "/tokenize", json={"model": "nope", "prompt": "a"}, headers=_headers(stack), timeout=30
    )
    assert r.status_code == 404, r.text
    assert r.json()["error"]["code"] == "model_not_found"


def test_ids_outside_the_vocabulary_are_400_naming_tokens(base: str, stack: Stack) -> None:
    r = httpx.post(base + "/detokenize", json={"tokens": [2**31 - 1]}, headers=_headers(stack), timeout=30)
    # A tokenizer may decode an unknown id to nothing; it never answers 5xx.
    assert r.status_code in (200, 400), r.text
    if r.status_code == 400:
        assert r.json()["error"]["param"] == "tokens"


def test_tokenizer_requests_need_a_token(stack: Stack) -> None:
    r = httpx.post(stack.base_url + "/tokenize", json={"prompt": "a"}, timeout=30)
    assert r.status_code == 401


# ----- malformed messages: errors that say what to send -----

IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}


@pytest.mark.parametrize(
    ("body", "param", "message"),
    [
        # an image part: this service takes text only
        (
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "What is this?"}, IMAGE]}]},
            "messages.0.content",
            "invalid request: 'messages.0.content': part 1 is an 'image_url' part; this service takes text "
            'only: send the content as a string, or as parts {"type": "text", "text": "..."}',
        ),
        # audio, in the second message
        (
            {
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]},
                ]
            },
            "messages.1.content",
            "invalid request: 'messages.1.content': part 0 is an 'input_audio' part; this service takes text "
            'only: send the content as a string, or as parts {"type": "text", "text": "..."}',
        ),
        # a text part without its text
        (
            {"messages": [{"role": "user", "content": [{"type": "text"}]}]},
            "messages.0.content.0.text",
            "invalid request: 'messages.0.content.0.text': this field is required",
        ),
        # content that is neither a string nor a list
        (
            {"messages": [{"role": "user", "content": 42}]},
            "messages.0.content",
            "invalid request: 'messages.0.content': must be a string, or a list of parts of type 'text'",
        ),
        # a role OpenAI does not have
        (
            {"messages": [{"role": "robot", "content": "hi"}]},
            "messages.0.role",
            "invalid request: 'messages.0.role': must be 'system', 'developer', 'user', 'assistant' or 'tool'",
        ),
        # no messages
        ({"messages": []}, "messages", "invalid request: 'messages': must hold at least 1 item"),
        # a stop list with a number in it
        (
            {"messages": [{"role": "user", "content": "hi"}], "stop": ["END", 5]},
            "stop.1",
            "invalid request: 'stop.1': must be a string",
        ),
    ],
)
def test_malformed_messages_are_400s_that_say_what_to_send(
    base: str, stack: Stack, body: dict[str, object], param: str, message: str
) -> None:
    r = httpx.post(
        base + "/v1/chat/completions", json={"model": MODEL, **body}, headers=_headers(stack), timeout=30
    )
    assert r.status_code == 400, r.text
    assert r.json() == {
        "error": {"message": message, "type": "invalid_request_error", "param": param, "code": None}
    }
    assert "Input should" not in r.text and "after validation" not in r.text


def test_the_openai_client_gets_the_text_only_refusal(base: str, stack: Stack) -> None:
    client = openai.OpenAI(base_url=base + "/v1", api_key=stack.token, max_retries=0)
    content = [{"type": "text", "text": "Describe this picture."}, IMAGE]
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": content}],  # type: ignore[list-item,misc]
            max_tokens=4,
        )  # fmt: skip
    assert caught.value.status_code == 400
    assert caught.value.param == "messages.0.content"
    assert "takes text only" in caught.value.message
    assert "Describe this picture" not in caught.value.message  # never the user's text


def test_a_completion_prompt_list_too_long_says_how_many(base: str, stack: Stack) -> None:
    client = openai.OpenAI(base_url=base + "/v1", api_key=stack.token, max_retries=0)
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=MODEL, prompt=[], max_tokens=4)
    assert caught.value.param == "prompt"
    assert "after validation" not in caught.value.message and "Input should" not in caught.value.message


def test_a_tokenizer_request_is_a_usage_row_of_no_tokens(stack: Stack) -> None:
    started = time.time()
    r = httpx.post(stack.base_url + "/tokenize", json={"prompt": TEXT}, headers=_headers(stack), timeout=30)
    assert r.status_code == 200, r.text
    rows: list[tuple[int, int, str]] = []
    deadline = time.monotonic() + 30  # the usage writer commits in batches, off the request path
    while not rows and time.monotonic() < deadline:
        time.sleep(0.05)
        with sqlite3.connect(stack.data_dir / "hearth.db") as db:
            rows = db.execute(
                "select prompt_tokens, completion_tokens, status from usage "
                "where endpoint = 'tokenize' and started >= ?",
                [started - 1],
            ).fetchall()
    assert rows == [(0, 0, "ok")]
