"""The parts of a chat request: its messages (text only), the tools it offers and the formats its answer
may be held to (protocol.schemas assembles them into requests; node.tools and node.constrain read them).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_TOOLS = 128  # OpenAI's limit on tools per request
MAX_FUNCTION_NAME = 64


def _valid_unicode(text: str) -> str:
    # JSON escapes can smuggle lone surrogates ("\\ud800") that no tokenizer can encode.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text must be valid Unicode (it contains a lone surrogate)") from None
    return text


Text = Annotated[str, AfterValidator(_valid_unicode)]

Role = Literal["system", "developer", "user", "assistant", "tool"]


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)
    type: Literal["text"]
    text: Text


# Content part types of OpenAI's API (and close relatives) that Hearth names when it refuses them; any other
# type is refused without being quoted (it is the client's text).
NON_TEXT_PARTS = frozenset(
    {"image_url", "input_image", "image", "input_audio", "audio", "file", "input_file", "video", "refusal"}
)


class ToolCallFunction(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)
    name: str = Field(min_length=1, max_length=MAX_FUNCTION_NAME)
    arguments: Text = Field(description="The arguments as the model wrote them: a JSON object, as a string.")


class ToolCall(BaseModel):
    """A call an assistant message made (in the history the client sends back)."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    id: str = Field(min_length=1, max_length=256)
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)
    role: Role
    content: Text | list[TextPart] | None = None
    name: str | None = Field(default=None, max_length=256)
    tool_calls: list[ToolCall] | None = Field(
        default=None, max_length=MAX_TOOLS, description="An assistant message's calls to tools."
    )
    tool_call_id: str | None = Field(
        default=None, max_length=256, description="A tool message's answer to this call."
    )

    @model_validator(mode="after")
    def _tool_fields(self) -> ChatMessage:
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs the tool_call_id of the call it answers")
        return self

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


FunctionName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
JsonSchemaDoc = Annotated[
    dict[str, Any], Field(description="A JSON Schema; Hearth enforces it while generating (docs/api.md).")
]

Strict = Annotated[
    bool | None,
    Field(
        description="The schema is always enforced; true also closes objects that allow nothing else "
        "(additionalProperties false, as OpenAI's strict mode)."
    ),
]


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)
    name: FunctionName
    description: Text | None = None
    parameters: JsonSchemaDoc | None = Field(
        default=None, description="The arguments' JSON Schema (an object); none means no arguments."
    )
    strict: Strict = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)
    name: FunctionName


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)
    type: Literal["function"]
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)
    name: FunctionName
    description: Text | None = None
    # Named schema_, as "schema" shadows a BaseModel attribute; the wire name stays "schema".
    schema_: JsonSchemaDoc = Field(default_factory=dict, alias="schema")
    strict: Strict = None


class ResponseFormatText(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)
    type: Literal["text"]


class ResponseFormatJsonObject(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)
    type: Literal["json_object"]


class ResponseFormatJsonSchema(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)
    type: Literal["json_schema"]
    json_schema: JsonSchemaFormat


ResponseFormat = Annotated[
    ResponseFormatText | ResponseFormatJsonObject | ResponseFormatJsonSchema, Field(discriminator="type")
]
