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
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from protocol.errors import InvalidRequest
from protocol.messages import (
    MAX_TOOLS,
    ChatMessage,
    NamedToolChoice,
    ResponseFormat,
    Text,
    Tool,
    ToolChoice,
)
from protocol.validation import validation_error as validation_error

MAX_MESSAGES = 2048
MAX_STOP_SEQUENCES = 4
MAX_STOP_LENGTH = 256
MAX_STOP_TOKEN_IDS = 16
MAX_TOP_K = 1000
MAX_MODEL_ID_LENGTH = 256
MAX_CHOICES = 8  # n (and best_of): samples per prompt
MAX_PROMPTS = 64  # prompts in one batched completions request
MAX_BATCH_CHOICES = 64  # prompts × n
MAX_TOP_LOGPROBS = 20  # chat's top_logprobs
MAX_COMPLETION_LOGPROBS = 5  # completions' logprobs (OpenAI's legacy limit)
MAX_LOGIT_BIAS = 1024  # entries
MAX_TOKEN_ID = 2**31 - 1


# Options Hearth accepts only in their "off" form: the document says so (each in JSON Schema's words, which
# apply alongside the field's type), and the validators below refuse the rest with a clear message.

Prompt = Annotated[Text, Field(min_length=1)]

Truncation = Literal["auto", "disabled"]


class _Request(BaseModel):
    # Unknown fields are ignored as OpenAI does, so clients that send extra options keep working; the
    # options we cannot honour are declared below and refused explicitly instead of silently dropped.
    model_config = ConfigDict(extra="ignore", frozen=True)


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


# vLLM's own ways to constrain an answer: Hearth constrains through response_format (and tools), so these are
# refused by name rather than ignored with the other unknown fields, which would answer unconstrained.
VLLM_CONSTRAINTS = ("guided_json", "guided_regex", "guided_choice", "guided_grammar", "structured_outputs")


class _Sampling(_Request):
    @model_validator(mode="before")
    @classmethod
    def _no_vllm_constraints(cls, data: Any) -> Any:
        for name in VLLM_CONSTRAINTS:
            if isinstance(data, dict) and data.get(name) is not None:
                raise InvalidRequest(
                    f"invalid request: '{name}' (vLLM's) is not supported: constrain the answer with "
                    "response_format (json_object or json_schema)",
                    param=name,
                )
        return data

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
        description="Token id (as a string) → a bias from -100 to 100 added to its logit before sampling, as "
        "OpenAI: -100 bans the token, 100 all but forces it. Ids the model does not have are refused.",
        json_schema_extra={
            "type": ["object", "null"],
            "maxProperties": MAX_LOGIT_BIAS,
            "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100},
        },
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
    n: int = Field(
        default=1, ge=1, le=MAX_CHOICES,
        description="Samples per prompt, one choice each (index = prompt × n + sample).",
    )  # fmt: skip
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

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, value: Any) -> Any:
        return None if value is None else check_logit_bias(value)

    def biases(self) -> tuple[tuple[int, float], ...]:
        """logit_bias as (token id, bias) pairs, by id (empty when none)."""
        if not self.logit_bias:
            return ()
        return tuple(sorted((int(k), float(v)) for k, v in self.logit_bias.items()))

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
    tools: list[Tool] | None = Field(
        default=None, max_length=MAX_TOOLS,
        description="Functions the model may call; its calls come back in message.tool_calls.",
    )  # fmt: skip
    tool_choice: ToolChoice | None = Field(
        default=None,
        description='"auto" (the default with tools), "none", "required", or a named function.',
    )
    parallel_tool_calls: bool | None = Field(
        default=None, description="false: at most one call per answer (default true)."
    )
    # Refused, not mapped: their answers have another shape (message.function_call), which Hearth does not
    # write, and every client that sends them also speaks tools.
    functions: Any = Field(
        default=None,
        description="Deprecated by OpenAI; refused: use tools.",
        json_schema_extra={"type": "null"},
    )
    function_call: Any = Field(
        default=None,
        description="Deprecated by OpenAI; refused: use tool_choice.",
        json_schema_extra={"type": "null"},
    )
    logprobs: bool | None = Field(
        default=None,
        description="Return each generated token's log probability (of the model's own distribution, "
        "before temperature, penalties, logit_bias and truncation, as vLLM).",
    )
    top_logprobs: int | None = Field(
        default=None, ge=0, le=MAX_TOP_LOGPROBS,
        description="With logprobs: this many most likely tokens at each position, with theirs.",
    )  # fmt: skip
    response_format: ResponseFormat | None = Field(
        default=None,
        description='{"type": "text"}, {"type": "json_object"} or {"type": "json_schema", "json_schema": '
        '{"name", "schema", "strict"}}: the answer is generated to parse (and to match the schema).',
    )

    @model_validator(mode="after")
    def _supported(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequest(
                "invalid request: 'top_logprobs' needs 'logprobs': true", param="top_logprobs"
            )
        return self

    @field_validator("functions", "function_call")
    @classmethod
    def _no_legacy_functions(cls, value: Any, info: ValidationInfo) -> Any:
        if value is not None:
            newer = "tools" if info.field_name == "functions" else "tool_choice"
            raise ValueError(f"{info.field_name} is deprecated and not supported: use {newer}")
        return value

    @model_validator(mode="after")
    def _tool_choice_names_a_tool(self) -> ChatCompletionRequest:
        names = [tool.function.name for tool in self.tools or ()]
        if len(set(names)) != len(names):
            raise InvalidRequest("invalid request: 'tools': two tools have the same name", param="tools")
        choice = self.tool_choice
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise InvalidRequest(
                "invalid request: 'tool_choice': it names a function that is not in tools",
                param="tool_choice",
            )
        if choice == "required" and not names:
            raise InvalidRequest(
                "invalid request: 'tool_choice': \"required\" needs tools", param="tool_choice"
            )
        return self

    @property
    def tool_mode(self) -> Literal["none", "auto", "required"] | str:
        """What the answer may be: text only ("none"), text or calls ("auto"), calls ("required"), or a call
        of the one function named."""
        if not self.tools or self.tool_choice == "none":
            return "none"
        choice = self.tool_choice or "auto"
        return choice if isinstance(choice, str) else choice.function.name

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def top_count(self) -> int | None:
        """How many alternatives each token's logprob comes with; None: no logprobs."""
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def prompt_count(self) -> int:
        return 1

    @property
    def choices(self) -> int:
        """Choices in the answer (one per sample)."""
        return self.n


TokenId = Annotated[int, Field(strict=True, ge=0, le=MAX_TOKEN_ID)]
TokenIds = Annotated[list[TokenId], Field(min_length=1)]


class CompletionRequest(_Sampling):
    # Not empty: an empty prompt has nothing to continue from (most tokenizers give it no token at all).
    prompt: (
        Prompt
        | Annotated[list[Prompt], Field(min_length=1, max_length=MAX_PROMPTS)]
        | TokenIds
        | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS)]
    ) = Field(
        description=f"A prompt (a string, or token ids), or up to {MAX_PROMPTS} of them (a list of strings, "
        "or a list of token-id lists): one choice per prompt and sample, index = prompt × n + sample. Not "
        "empty."
    )
    max_tokens: int | None = Field(
        default=16, ge=0,
        description="Upper bound on generated tokens (default 16); 0 (with echo) scores the prompt only.",
    )  # fmt: skip
    echo: bool | None = Field(
        default=False,
        description="Put the prompt before the completion in the text, and with logprobs its tokens' log "
        "probabilities (the first one null) before the completion's.",
    )
    suffix: str | None = Field(default=None, description="Not supported.", json_schema_extra={"maxLength": 0})
    logprobs: int | None = Field(
        default=None, ge=0, le=MAX_COMPLETION_LOGPROBS,
        description="Return each token's log probability (of the model's own distribution, before "
        "temperature, penalties, logit_bias and truncation, as vLLM) with this many most likely "
        "alternatives.",
    )  # fmt: skip
    best_of: int | None = Field(
        default=None, ge=1, le=MAX_CHOICES,
        description="Only equal to n (or absent): ranking more samples than are returned is not supported.",
    )  # fmt: skip
    response_format: ResponseFormat | None = Field(
        default=None,
        description="As in chat completions (vLLM's extension; OpenAI's completions have none): the text "
        "generated after the prompt is held to the format.",
    )

    @model_validator(mode="before")
    @classmethod
    def _no_tools(cls, data: Any) -> Any:
        # A completion has no messages to carry calls and their results: tools would be silently ignored.
        for name in ("tools", "tool_choice", "functions", "function_call"):
            if isinstance(data, dict) and data.get(name) is not None:
                raise InvalidRequest(
                    f"invalid request: '{name}' is for /v1/chat/completions; a completion takes no tools",
                    param=name,
                )
        return data

    @model_validator(mode="after")
    def _supported(self) -> CompletionRequest:
        if self.suffix:
            raise ValueError("suffix is not supported")
        if self.best_of is not None and self.best_of != self.n:
            raise InvalidRequest(
                "invalid request: 'best_of' greater than n is not supported (Hearth does not rank hidden "
                "samples): leave it out, or set it equal to n",
                param="best_of",
            )
        if self.max_tokens == 0 and not self.echo:
            raise InvalidRequest(
                "invalid request: 'max_tokens' 0 generates nothing; it is for scoring a prompt, with "
                "'echo': true",
                param="max_tokens",
            )
        if self.prompt_count * self.n > MAX_BATCH_CHOICES:
            raise InvalidRequest(
                f"invalid request: {self.prompt_count} prompts × n={self.n} make more than "
                f"{MAX_BATCH_CHOICES} choices",
                param="n",
            )
        return self

    def prompts(self) -> list[str | list[int]]:
        """The prompts, each a string or a list of token ids."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if all(isinstance(p, int) for p in prompt):
            return [list(prompt)]  # type: ignore[arg-type]
        return list(prompt)  # type: ignore[arg-type]

    def prompt_text(self) -> str:
        first = self.prompts()[0]
        return first if isinstance(first, str) else ""

    @property
    def prompt_count(self) -> int:
        prompt = self.prompt
        if isinstance(prompt, str) or all(isinstance(p, int) for p in prompt):
            return 1
        return len(prompt)

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    @property
    def top_count(self) -> int | None:
        return self.logprobs

    @property
    def choices(self) -> int:
        return self.prompt_count * self.n


def check_logit_bias(value: Any) -> dict[str, float]:
    """OpenAI's logit_bias: token ids (strings of digits) → numbers from -100 to 100. The messages name
    no key or value (a key could be anything the client wrote)."""
    if not isinstance(value, dict):
        raise ValueError("logit_bias must be an object mapping token ids to numbers")
    if len(value) > MAX_LOGIT_BIAS:
        raise ValueError(f"logit_bias may hold at most {MAX_LOGIT_BIAS} entries")
    out: dict[str, float] = {}
    for key, bias in value.items():
        if not (isinstance(key, str) and key.isascii() and key.isdigit() and int(key) <= MAX_TOKEN_ID):
            raise ValueError("logit_bias keys must be token ids (whole numbers, as strings)")
        if isinstance(bias, bool) or not isinstance(bias, int | float) or not -100 <= bias <= 100:
            raise ValueError("logit_bias values must be numbers from -100 to 100")
        out[str(int(key))] = float(bias)
    return out


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
