"""Response schemas of the public, OpenAI-compatible API: documentation (the OpenAPI document) and tests.

The hot path builds responses as plain dicts (one per streamed token, node.openai_format); a test checks
real responses, tool calls and logprobs included, against these models, so the document cannot drift from
what the server sends.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


FinishReason = Literal["stop", "length", "tool_calls"]


class CalledFunction(BaseModel):
    name: str
    arguments: str = Field(description="The arguments as JSON text, matching the function's parameters.")


class MessageToolCall(BaseModel):
    id: str
    type: Literal["function"]
    function: CalledFunction


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None = Field(description="The answer's text; null when the answer is tool calls.")
    tool_calls: list[MessageToolCall] | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = Field(description="null unless the request set logprobs.")
    finish_reason: FinishReason


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChunkFunction(BaseModel):
    name: str | None = Field(default=None, description="In a call's first delta only.")
    arguments: str = Field(description="The next fragment of the arguments' JSON text (empty at first).")


class ChunkToolCall(BaseModel):
    """A tool call streamed as OpenAI streams it: its first delta has ``id``, ``type`` and
    ``function.name``; those after it add to ``function.arguments``."""

    index: int = Field(description="The call's place among the choice's calls.")
    id: str | None = None
    type: Literal["function"] | None = None
    function: ChunkFunction


class ChunkDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ChunkToolCall] | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: ChunkDelta
    logprobs: ChoiceLogprobs | None = Field(description="null unless the request set logprobs.")
    finish_reason: FinishReason | None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy shape: one entry per token in each list (echo: the prompt's first, the first
    token's logprob and top_logprobs null)."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: FinishReason | None
    logprobs: CompletionLogprobs | None = None


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
