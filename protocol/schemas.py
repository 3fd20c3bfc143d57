"""Wire schemas of the public, OpenAI-compatible API.

Requests are validated with pydantic; the same models generate the OpenAPI document, so the document cannot
drift from what the server accepts. Responses are built as plain dicts on the hot path (one per streamed
token) and described here by models that a test checks real responses against.

Validation errors are turned into one :class:`InvalidRequest` naming the field and the rule, never the
value: a value may be prompt text.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from protocol.errors import InvalidRequest
from protocol.validation import validation_error as validation_error

MAX_MESSAGES = 2048
MAX_STOP_SEQUENCES = 4
MAX_STOP_LENGTH = 256
MAX_STOP_TOKEN_IDS = 16
MAX_TOP_K = 1000
MAX_MODEL_ID_LENGTH = 256


def _valid_unicode(text: str) -> str:
    # JSON escapes can smuggle lone surrogates ("\\ud800") that no tokenizer can encode.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text must be valid Unicode (it contains a lone surrogate)") from None
    return text


Text = Annotated[str, AfterValidator(_valid_unicode)]

# Options Hearth accepts only in their "off" form: the document says so (each in JSON Schema's words, which
# apply alongside the field's type), and the validators below refuse the rest with a clear message.
_OFF: dict[str, Any] = {"enum": [False, None]}
_EMPTY_OBJECT: dict[str, Any] = {"type": ["object", "null"], "maxProperties": 0}

Prompt = Annotated[Text, Field(min_length=1)]

Role = Literal["system", "developer", "user", "assistant", "tool"]
Truncation = Literal["auto", "disabled"]


class _Request(BaseModel):
    # Unknown fields are ignored as OpenAI does, so clients that send extra options keep working; the
    # options we cannot honour are declared below and refused explicitly instead of silently dropped.
    model_config = ConfigDict(extra="ignore", frozen=True)


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)
    type: Literal["text"]
    text: Text


# Content part types of OpenAI's API (and close relatives) that Hearth names when it refuses them; any other
# type is refused without being quoted (it is the client's text).
NON_TEXT_PARTS = frozenset(
    {"image_url", "input_image", "image", "input_audio", "audio", "file", "input_file", "video", "refusal"}
)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)
    role: Role
    content: Text | list[TextPart] | None = None
    name: str | None = Field(default=None, max_length=256)

    @field_validator("content", mode="before")
    @classmethod
    def _text_only(cls, value: Any) -> Any:
        # Before the union is tried: its branches would each say something beside the point.
        if not isinstance(value, list):
            return value
        for i, part in enumerate(value):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                continue
            if not isinstance(kind, str):
                raise ValueError(f'part {i} must be an object {{"type": "text", "text": "..."}}')
            named = f"an '{kind}' part" if kind in NON_TEXT_PARTS else "a part that is not of type 'text'"
            raise ValueError(
                f"part {i} is {named}; this service takes text only: send the content as a string, or as "
                'parts {"type": "text", "text": "..."}'
            )
        return value

    def text(self) -> str:
        """The message's content flattened to one string (text parts joined)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)
    include_usage: bool | None = False


StopSequence = Annotated[Text, Field(min_length=1, max_length=MAX_STOP_LENGTH)]
StopField = Annotated[
    StopSequence
    | Annotated[
        list[StopSequence],
        Field(max_length=MAX_STOP_SEQUENCES),
    ]
    | None,
    Field(
        description=f"Up to {MAX_STOP_SEQUENCES} sequences where generation stops (not included in output)."
    ),
]


class _Sampling(_Request):
    model: str = Field(
        min_length=1, max_length=MAX_MODEL_ID_LENGTH, description="A model id from /v1/models."
    )
    temperature: float = Field(
        default=1.0, ge=0.0, le=2.0, description="0 means greedy decoding (so does any value under 0.0001)."
    )
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(
        default=0, ge=-1, le=MAX_TOP_K,
        description="Hearth extension (as in vLLM): sample only among the k most likely tokens; 0 or -1 is "
        "off.",
    )  # fmt: skip
    min_p: float = Field(
        default=0.0, ge=0.0, le=1.0,
        description="Hearth extension (as in vLLM): drop tokens less likely than min_p times the most likely "
        "one; 0 is off.",
    )  # fmt: skip
    # Not just above 0: near 0 it multiplies the logits of every token already seen by ~1/penalty, past
    # what a float holds; 0.01 is far below any useful setting.
    repetition_penalty: float = Field(
        default=1.0, ge=0.01, le=2.0,
        description="Hearth extension (as in vLLM): above 1, tokens already in the prompt or the answer "
        "become less likely, below 1 more likely; 1 is off.",
    )  # fmt: skip
    stop_token_ids: list[Annotated[int, Field(ge=0, le=2**31 - 1)]] | None = Field(
        default=None, max_length=MAX_STOP_TOKEN_IDS,
        description="Hearth extension (as in vLLM): token ids that end the answer like an end-of-text token "
        "(also with ignore_eos).",
    )  # fmt: skip
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1, description="Makes sampling repeatable.")
    stop: StopField = None
    # Any, not a dict type: a malformed dict would make pydantic name the client's keys in the error.
    logit_bias: Any = Field(
        default=None,
        description="Not supported yet; refused when not empty.",
        json_schema_extra=_EMPTY_OBJECT,
    )
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = Field(
        default=False,
        description="Hearth extension (as in vLLM): keep generating past end-of-text tokens, up to "
        "max_tokens. For benchmarks and tests that need answers of an exact length.",
    )
    n: int = Field(default=1, description="Only 1 is supported.", json_schema_extra={"enum": [1]})
    user: str | None = Field(default=None, max_length=256)

    @field_validator(
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "repetition_penalty",
        "presence_penalty",
        "frequency_penalty",
        "stream",
        "n",
        mode="before",
    )
    @classmethod
    def _null_means_default(cls, value: Any, info: ValidationInfo) -> Any:
        # OpenAI's API accepts null for these and applies the default; clients pass None through.
        return cls.model_fields[str(info.field_name)].default if value is None else value

    @field_validator("n")
    @classmethod
    def _one_choice(cls, value: int) -> int:
        if value != 1:
            raise ValueError("only n=1 is supported")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _no_logit_bias(cls, value: Any) -> Any:
        if value:
            raise ValueError("logit_bias is not supported yet")
        return value

    def stop_sequences(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        if isinstance(self.stop, str):
            return (self.stop,)
        return tuple(self.stop)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and bool(self.stream_options.include_usage)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = Field(default=None, ge=1, description="Upper bound on generated tokens.")
    max_completion_tokens: int | None = Field(default=None, ge=1, description="Newer name of max_tokens.")
    truncation: Truncation | None = Field(
        default=None,
        description='Hearth extension: "auto" drops the oldest turns (keeping system prompts) when the '
        'conversation does not fit the context; "disabled" refuses with context_length_exceeded. '
        "Default: the node's setting.",
    )
    tools: list[Any] | None = Field(
        default=None,
        description="Not supported yet; refused when not empty.",
        json_schema_extra={"maxItems": 0},
    )
    tool_choice: Any = None
    logprobs: bool | None = Field(default=None, description="Not supported yet.", json_schema_extra=_OFF)
    response_format: dict[str, Any] | None = Field(
        default=None,
        description='Only {"type": "text"}.',
        json_schema_extra={"properties": {"type": {"const": "text"}}},
    )

    @model_validator(mode="after")
    def _supported(self) -> ChatCompletionRequest:
        if self.tools:
            raise ValueError("tools are not supported yet")
        if self.logprobs:
            raise ValueError("logprobs are not supported yet")
        if self.response_format is not None and self.response_format.get("type", "text") != "text":
            raise ValueError("only response_format type 'text' is supported")
        return self

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_Sampling):
    # Not empty: an empty prompt has nothing to continue from (most tokenizers give it no token at all).
    prompt: Prompt | Annotated[list[Prompt], Field(min_length=1, max_length=1)] = Field(
        description="One prompt, not empty (a string, or a list holding one string)."
    )
    max_tokens: int | None = Field(
        default=16, ge=1, description="Upper bound on generated tokens (default 16)."
    )
    echo: bool | None = Field(default=False, description="Not supported.", json_schema_extra=_OFF)
    suffix: str | None = Field(default=None, description="Not supported.", json_schema_extra={"maxLength": 0})
    logprobs: int | None = Field(
        default=None, description="Not supported yet.", json_schema_extra={"enum": [None]}
    )
    best_of: int | None = Field(default=None, description="Only 1.", json_schema_extra={"enum": [1, None]})

    @model_validator(mode="after")
    def _supported(self) -> CompletionRequest:
        if self.echo:
            raise ValueError("echo is not supported")
        if self.suffix:
            raise ValueError("suffix is not supported")
        if self.logprobs is not None:
            raise ValueError("logprobs are not supported yet")
        if self.best_of not in (None, 1):
            raise ValueError("only best_of=1 is supported")
        return self

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens


Endpoint = Literal["chat", "completion"]
REQUEST_MODELS: dict[str, type[ChatCompletionRequest] | type[CompletionRequest]] = {
    "chat": ChatCompletionRequest,
    "completion": CompletionRequest,
}


def parse_request(endpoint: str, body: Any) -> ChatCompletionRequest | CompletionRequest:
    """Validate a decoded JSON body; raise InvalidRequest naming the first bad field (never its value)."""
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    try:
        return REQUEST_MODELS[endpoint].model_validate(body)
    except ValidationError as exc:
        raise validation_error(exc) from None


# ----- response schemas (documentation and tests; the hot path builds dicts) -----


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


FinishReason = Literal["stop", "length"]


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: FinishReason


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChunkDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: ChunkDelta
    finish_reason: FinishReason | None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: FinishReason | None
    logprobs: None = None


class FinishedCompletionChoice(CompletionChoice):
    finish_reason: FinishReason


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[FinishedCompletionChoice]
    usage: Usage


class CompletionChunk(BaseModel):
    """One event of a streamed completion: OpenAI streams text_completion objects, with
    ``finish_reason`` null until the last and ``usage`` only in the last, when asked for."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    context_length: int | None = Field(
        description="Hearth extension: the model's context window in tokens (null if no node knows it yet)."
    )


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class DirectoryHead(BaseModel):
    seq: int = Field(description="Entries so far; the next entry gets this number.")
    hash: str = Field(description="The last entry's hash, 64 hex digits (64 zeros for an empty log).")


class DirectoryEntry(BaseModel):
    seq: int
    prev: str = Field(description="The previous entry's hash.")
    kind: Literal["certificate", "key", "revoke"]
    doc: dict[str, Any]
    at: int = Field(description="Unix time of the entry.")


class DirectoryPage(BaseModel):
    """``GET /v1/directory``: a page of the node directory's log (docs/protocol.md)."""

    authority_key: str | None
    head: DirectoryHead
    entries: list[DirectoryEntry]
    more: bool = Field(description="More entries follow: ask again with since=seq of the next one.")
    placement: dict[str, list[str]] = Field(
        description="Unsigned hint: the healthy nodes serving each model."
    )


class Health(BaseModel):
    status: Literal["ok"]
