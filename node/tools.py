"""Tools in the prompt: the conversation a chat template reads when a request offers tools or carries tool
calls and their results.

A template with a tools section (it reads Jinja's ``tools``, as Hugging Face tool-use templates do) gets the
tools in OpenAI's shape (``{"type": "function", "function": {...}}``), assistant messages with their
``tool_calls`` (each call's ``arguments`` as an object, as those templates expect) and ``tool`` messages
with their ``tool_call_id``. A template without one (the built-in fallbacks, most small models) gets the
fallback: a system message that lists the tools as JSON Schemas and says how to call one, the calls in
assistant messages written out in that form, and tool results as user messages wrapped in
``<tool_response>`` tags.

Either way the model calls a tool by writing ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``
(the convention of Hermes- and Qwen-style templates); node.constrain holds it to that form, and
node.tool_calls reads it back.
"""

from __future__ import annotations

import json
from typing import Any

from node.constrain import CALL_CLOSE, CALL_OPEN
from node.templates import ChatTemplate, Message
from protocol.messages import ChatMessage, Tool
from protocol.schemas import ChatCompletionRequest

_CALL_FORM = CALL_OPEN + '{"name": "<function name>", "arguments": {<the arguments>}}' + CALL_CLOSE


def fallback_intro(functions: list[str]) -> str:
    """The system message that describes the tools to a template without a tools section."""
    return (
        "You can call functions to help answer. These are the functions, as JSON Schemas:\n"
        + "\n".join(functions)
        + "\n\nTo call one, answer with nothing but a call in this form, the arguments as a JSON object "
        f"(several calls one after another if you need several):\n{_CALL_FORM}\n"
        "The results come back in <tool_response></tool_response> tags."
    )


def chat_messages(
    req: ChatCompletionRequest, template: ChatTemplate
) -> tuple[list[Message], list[Any] | None]:
    """The conversation as ``template`` reads it, and the tools to hand it (None: none, or described in
    the conversation itself)."""
    offered = req.tools if req.tool_mode != "none" else None
    if template.takes_tools:
        return [_native(m) for m in req.messages], [_tool(t) for t in offered] if offered else None
    messages = [_fallback(m) for m in req.messages]
    if offered:
        intro = fallback_intro([json.dumps(_tool(t)["function"]) for t in offered])
        if messages and messages[0]["role"] in ("system", "developer"):
            first = messages[0]
            messages[0] = {
                **first,
                "content": f"{first['content']}\n\n{intro}" if first["content"] else intro,
            }
        else:
            messages.insert(0, {"role": "system", "content": intro})
    return messages, None


def _base(m: ChatMessage) -> dict[str, Any]:
    return {"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})}


def _native(m: ChatMessage) -> Message:
    message = _base(m)
    if m.tool_calls:
        message["tool_calls"] = [
            {
                "id": call.id,
                "type": "function",
                "function": {"name": call.function.name, "arguments": _arguments(call.function.arguments)},
            }
            for call in m.tool_calls
        ]
    if m.tool_call_id is not None:
        message["tool_call_id"] = m.tool_call_id
    return message


def _fallback(m: ChatMessage) -> Message:
    message = _base(m)
    if m.role == "tool":
        return {"role": "user", "content": f"<tool_response>\n{message['content']}\n</tool_response>"}
    if m.tool_calls:
        calls = "".join(
            CALL_OPEN
            + json.dumps({"name": c.function.name, "arguments": _arguments(c.function.arguments)})
            + CALL_CLOSE
            for c in m.tool_calls
        )
        message["content"] = f"{message['content']}\n{calls}" if message["content"] else calls
    return message


def _tool(tool: Tool) -> dict[str, Any]:
    function: dict[str, Any] = {"name": tool.function.name}
    if tool.function.description:
        function["description"] = tool.function.description
    function["parameters"] = tool.function.parameters or {"type": "object", "properties": {}}
    return {"type": "function", "function": function}


def _arguments(text: str) -> Any:
    # Templates write the arguments with ``tojson``: an object, if the client sent one.
    try:
        return json.loads(text)
    except ValueError:
        return text
