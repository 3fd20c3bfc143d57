"""The endpoints tools look for beside generation: ``GET /v1/models/{id}`` and the tokenizer endpoints
(``POST /tokenize``, ``POST /detokenize``, ``GET /tokenizer_info``, as vLLM serves them), against a real
scheduler and node, in plaintext and through a real `hearth proxy` (end-to-end encrypted)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import aiohttp
import httpx
import openai
import pytest

from hearth.proxy import SealedClient, state_path
from hearth.proxy_server import serve
from tests.support import LoopThread, Stack, wait_for

MODEL = "hearth-demo"


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
