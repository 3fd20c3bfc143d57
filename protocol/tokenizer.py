"""Wire schemas of the tokenizer endpoints, in vLLM's shapes (what lm-evaluation-harness's remote tokenizer
and other tools call):

    POST /tokenize          {"model"?, "prompt" | "messages", "add_special_tokens"?, "add_generation_prompt"?}
                            → {"tokens", "count", "max_model_len", "token_strs": null}
    POST /detokenize        {"model"?, "tokens"} → {"prompt"}
    GET  /tokenizer_info    ?model= → the tokenizer's special tokens, its class and the chat template

They carry the user's text, so they travel as generation requests do: sealed end to end through `hearth
proxy` (each is a job kind of its own in the envelope's visible header), answered by the node from the
model's own tokenizer, without generating. ``model`` may be left out, as lm-evaluation-harness does: the
request then goes to the one model the service serves (``default_model``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from protocol.errors import InvalidRequest, ModelNotFound
from protocol.messages import ChatMessage, Text
from protocol.schemas import (
    MAX_MESSAGES,
    MAX_MODEL_ID_LENGTH,
    ChatCompletionRequest,
    CompletionRequest,
    parse_request,
    validation_error,
)

TokenizerKind = Literal["tokenize", "detokenize", "tokenizer_info"]
TOKENIZER_KINDS: tuple[TokenizerKind, ...] = ("tokenize", "detokenize", "tokenizer_info")
PATHS: dict[str, str] = {
    "tokenize": "/tokenize",
    "detokenize": "/detokenize",
    "tokenizer_info": "/tokenizer_info",
}
MAX_TOKEN_ID = 2**31 - 1
MAX_DETOKENIZE_TOKENS = 1_000_000

ModelId = Annotated[
    str | None,
    Field(
        default=None, min_length=1, max_length=MAX_MODEL_ID_LENGTH,
        description="A model id from /v1/models; left out, the one model the service serves.",
    ),
]  # fmt: skip


class _TokenizerRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)
    model: ModelId = None

    def with_model(self, model: str) -> Any:
        return self.model_copy(update={"model": model})


class TokenizeRequest(_TokenizerRequest):
    prompt: Text | None = Field(default=None, description="Text to tokenize (or messages, not both).")
    messages: list[ChatMessage] | None = Field(
        default=None, min_length=1, max_length=MAX_MESSAGES,
        description="A conversation, tokenized as the model's chat template renders it.",
    )  # fmt: skip
    add_special_tokens: bool | None = Field(
        default=None,
        description="Add the tokenizer's special tokens (a BOS token, for most models). Default: true for "
        "a prompt, false for messages (the chat template writes its own).",
    )
    add_generation_prompt: bool = Field(
        default=True, description="Messages only: end with the opening of the assistant's turn."
    )
    return_token_strs: bool | None = Field(
        default=None,
        description="Not supported: only false or null.",
        json_schema_extra={"enum": [False, None]},
    )

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("send either 'prompt' (a string) or 'messages' (a list of messages), not both")
        if self.return_token_strs:
            raise ValueError("return_token_strs is not supported; leave it out")
        return self

    @property
    def special_tokens(self) -> bool:
        if self.add_special_tokens is not None:
            return self.add_special_tokens
        return self.messages is None


class DetokenizeRequest(_TokenizerRequest):
    tokens: list[Annotated[int, Field(ge=0, le=MAX_TOKEN_ID)]] = Field(
        max_length=MAX_DETOKENIZE_TOKENS, description="Token ids of the model's vocabulary."
    )


class TokenizerInfoRequest(_TokenizerRequest):
    """``GET /tokenizer_info?model=…``; `hearth proxy` seals it as the body ``{"model": …}``."""


TokenizerRequest = TokenizeRequest | DetokenizeRequest | TokenizerInfoRequest
TOKENIZER_REQUESTS = (TokenizeRequest, DetokenizeRequest, TokenizerInfoRequest)
_MODELS: dict[str, type[TokenizeRequest] | type[DetokenizeRequest] | type[TokenizerInfoRequest]] = {
    "tokenize": TokenizeRequest,
    "detokenize": DetokenizeRequest,
    "tokenizer_info": TokenizerInfoRequest,
}


def parse_tokenizer_request(kind: str, body: Any) -> TokenizerRequest:
    """Validate a decoded JSON body of one tokenizer endpoint; InvalidRequest naming the bad field."""
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    try:
        return _MODELS[kind].model_validate(body)
    except ValidationError as exc:
        raise validation_error(exc) from None


def parse_job_request(kind: str, body: Any) -> ChatCompletionRequest | CompletionRequest | TokenizerRequest:
    """A job's request, of any kind a job can be (generation or tokenizer)."""
    if kind in TOKENIZER_KINDS:
        return parse_tokenizer_request(kind, body)
    return parse_request(kind, body)


def default_model(served: Iterable[str]) -> str:
    """The model a tokenizer request that names none goes to: the one model served. With several, the
    client must name it; with none, there is nothing to tokenize with."""
    models = sorted(set(served))
    if len(models) == 1:
        return models[0]
    if not models:
        raise ModelNotFound(
            "no model is served here now; see /v1/models", param="model", code="model_not_found"
        )
    shown = ", ".join(models[:8]) + (", …" if len(models) > 8 else "")
    raise InvalidRequest(f"this service serves several models ({shown}): name one in 'model'", param="model")


# ----- answers (documentation and tests) -----


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int = Field(description="The model's context window in tokens.")
    token_strs: None = None


class DetokenizeResponse(BaseModel):
    prompt: str


class TokenizerInfo(BaseModel):
    """What `GET /tokenizer_info` answers: the tokenizer's special tokens, as vLLM names them."""

    bos_token: str | None
    eos_token: str | None
    pad_token: str | None
    model_max_length: int = Field(description="The model's context window in tokens.")
    chat_template: str | None = Field(
        description="The Jinja chat template the node renders conversations with."
    )
