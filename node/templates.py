"""Chat templates: turning a list of messages into the one prompt string a model was trained on.

A model's own template (Hugging Face ``chat_template``) comes from whoever published the model, so it is
rendered in Jinja's immutable sandbox: it can read the conversation but not reach Python internals or
mutate what it is given. The environment offers what Hugging Face templates expect: ``trim_blocks`` and
``lstrip_blocks``, the ``loopcontrols`` extension, ``raise_exception(msg)``, ``strftime_now(fmt)`` and a
``tojson`` filter that writes plain JSON (Jinja's own escapes ``<`` and ``>`` for HTML, which changes
the prompt).

Models without a template get one of the fallbacks below, chosen by the node's configuration. Every
fallback starts with ``bos_token`` (as Hugging Face templates do), so the prompt must be tokenized without
adding special tokens again. ``developer`` messages count as ``system`` messages.

| name       | layout                                                                                    |
|------------|-------------------------------------------------------------------------------------------|
| alpaca     | preamble, ``### Instruction:`` / ``### Input:`` / ``### Response:`` sections              |
| vicuna     | v1.1: ``{system} USER: {user} ASSISTANT: {assistant}</s>``, prompt ``ASSISTANT:``         |
| llama-2    | ``{bos}[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {assistant} {eos}``      |
| chatml     | ``<|im_start|>{role}\\n{content}<|im_end|>\\n``, prompt ``<|im_start|>assistant\\n``       |
| stackllama | ``{system}\\n\\nQuestion: {user}\\n\\nAnswer: {assistant}\\n\\n``, prompt ``Answer: ``    |

Only chatml can say who spoke a ``tool`` message; the other fallbacks refuse such conversations rather than
mislabel them. chatml keeps system messages where they are; the others gather every system message, in
order and joined by a blank line, into the place their format has for one (alpaca's preamble, vicuna's
opening line, llama-2's ``<<SYS>>`` block inside the first instruction). llama-2 trims its turns as Meta's
reference code does; it has no separate generation prompt, because ``[/INST]`` already closes the user turn.

Alpaca's ``### Input:`` rule: a user message directly after a user message that was written as an
instruction becomes that instruction's input; a further user message starts a new instruction. The
preamble is Alpaca's "paired with an input" variant when any input section appears, unless the
conversation brings its own system prompt, which then replaces the preamble.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, NoReturn

from jinja2 import Template, TemplateSyntaxError, meta
from jinja2.sandbox import ImmutableSandboxedEnvironment

from protocol.errors import ConfigError, InvalidRequest

log = logging.getLogger(__name__)

# A message as templates read it: role and content strings, and for tool use (node.tools) an assistant's
# ``tool_calls`` list and a tool message's ``tool_call_id``.
Message = Mapping[str, Any]

_SYSTEM_PARTS = """\
{%- set ns = namespace(system='') -%}
{%- for m in messages if m['role'] in ('system', 'developer') -%}
  {%- set ns.system = ns.system + ('\\n\\n' if ns.system else '') + m['content'] -%}
{%- endfor -%}
{%- for m in messages if m['role'] not in ('system', 'developer', 'user', 'assistant') -%}
  {{- raise_exception('the ' + format + ' chat format has no place for ' + m['role'] + ' messages') -}}
{%- endfor -%}
"""

_ALPACA = (
    "{%- set format = 'alpaca' -%}"
    + _SYSTEM_PARTS
    + """\
{%- set ns2 = namespace(prev='', has_input=false) -%}
{%- for m in messages -%}
  {%- if m['role'] == 'user' and ns2.prev == 'instruction' -%}
    {%- set ns2.has_input = true -%}{%- set ns2.prev = 'input' -%}
  {%- elif m['role'] == 'user' -%}{%- set ns2.prev = 'instruction' -%}
  {%- elif m['role'] == 'assistant' -%}{%- set ns2.prev = '' -%}
  {%- endif -%}
{%- endfor -%}
{{- bos_token -}}
{%- if ns.system -%}{{- ns.system -}}
{%- elif ns2.has_input -%}
  {{- 'Below is an instruction that describes a task, paired with an input that provides further '
      'context. Write a response that appropriately completes the request.' -}}
{%- else -%}
  {{- 'Below is an instruction that describes a task. '
      'Write a response that appropriately completes the request.' -}}
{%- endif -%}
{{- '\\n\\n' -}}
{%- set ns2.prev = '' -%}
{%- for m in messages -%}
  {%- if m['role'] == 'user' and ns2.prev == 'instruction' -%}
    {{- '### Input:\\n' + m['content'] + '\\n\\n' -}}{%- set ns2.prev = 'input' -%}
  {%- elif m['role'] == 'user' -%}
    {{- '### Instruction:\\n' + m['content'] + '\\n\\n' -}}{%- set ns2.prev = 'instruction' -%}
  {%- elif m['role'] == 'assistant' -%}
    {{- '### Response:\\n' + m['content'] + '\\n\\n' -}}{%- set ns2.prev = '' -%}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '### Response:\\n' -}}{%- endif -%}
"""
)

_VICUNA = (
    "{%- set format = 'vicuna' -%}"
    + _SYSTEM_PARTS
    + """\
{{- bos_token -}}
{%- if ns.system -%}{{- ns.system -}}
{%- else -%}
  {{- 'A chat between a curious user and an artificial intelligence assistant. '
      "The assistant gives helpful, detailed, and polite answers to the user's questions." -}}
{%- endif -%}
{{- ' ' -}}
{%- for m in messages -%}
  {%- if m['role'] == 'user' -%}{{- 'USER: ' + m['content'] + ' ' -}}
  {%- elif m['role'] == 'assistant' -%}{{- 'ASSISTANT: ' + m['content'] + '</s>' -}}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}
"""
)

_LLAMA_2 = (
    "{%- set format = 'llama-2' -%}"
    + _SYSTEM_PARTS
    + """\
{%- set turn = namespace(sys_block='<<SYS>>\\n' + ns.system + '\\n<</SYS>>\\n\\n' if ns.system else '') -%}
{%- for m in messages if m['role'] in ('user', 'assistant') -%}
  {%- if m['role'] == 'user' -%}
    {{- bos_token + '[INST] ' + turn.sys_block + m['content'] | trim + ' [/INST]' -}}
  {%- else -%}
    {%- if turn.sys_block -%}{{- bos_token + '[INST] ' + turn.sys_block | trim + ' [/INST]' -}}{%- endif -%}
    {{- ' ' + m['content'] | trim + ' ' + eos_token -}}
  {%- endif -%}
  {%- set turn.sys_block = '' -%}
{%- else -%}
  {%- if turn.sys_block -%}{{- bos_token + '[INST] ' + turn.sys_block | trim + ' [/INST]' -}}{%- endif -%}
{%- endfor -%}
"""
)

_CHATML = """\
{{- bos_token -}}
{%- for m in messages -%}
  {{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}
"""

_STACKLLAMA = (
    "{%- set format = 'stackllama' -%}"
    + _SYSTEM_PARTS
    + """\
{{- bos_token -}}
{%- if ns.system -%}{{- ns.system + '\\n\\n' -}}{%- endif -%}
{%- for m in messages -%}
  {%- if m['role'] == 'user' -%}{{- 'Question: ' + m['content'] + '\\n\\n' -}}
  {%- elif m['role'] == 'assistant' -%}{{- 'Answer: ' + m['content'] + '\\n\\n' -}}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- 'Answer: ' -}}{%- endif -%}
"""
)

FALLBACK_TEMPLATES: dict[str, str] = {
    "alpaca": _ALPACA,
    "vicuna": _VICUNA,
    "llama-2": _LLAMA_2,
    "chatml": _CHATML,
    "stackllama": _STACKLLAMA,
}


class _Rejected(Exception):
    """Raised by a template's ``raise_exception``; kept apart so it is told from a template that broke."""


def _raise_exception(message: object) -> NoReturn:
    raise _Rejected(str(message))


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(
    value: Any,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
    ensure_ascii: bool = False,
) -> str:
    return json.dumps(
        value, indent=indent, separators=separators, sort_keys=sort_keys, ensure_ascii=ensure_ascii
    )


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.filters["tojson"] = _tojson
    return env


class ChatTemplate:
    """A compiled chat template with the model's special tokens bound to it."""

    __slots__ = ("_bos_token", "_eos_token", "_source", "_template", "name", "takes_tools")

    def __init__(self, name: str, source: str, template: Template, bos_token: str, eos_token: str) -> None:
        self.name = name
        self._source = source
        self._template = template
        self._bos_token = bos_token
        self._eos_token = eos_token
        # Whether the template has a tools section (it reads the ``tools`` variable, as Hugging Face's
        # tool-use templates do); node.tools describes tools in a system message to the others.
        self.takes_tools = "tools" in meta.find_undeclared_variables(_environment().parse(source))

    def __repr__(self) -> str:
        return f"ChatTemplate(name={self.name!r})"

    @property
    def source(self) -> str:
        """The Jinja source (GET /tokenizer_info shows it, as vLLM does)."""
        return self._source

    @classmethod
    def from_source(
        cls, source: str, *, name: str = "model", bos_token: str = "", eos_token: str = ""
    ) -> ChatTemplate:
        """Compile ``source`` now, so a broken template fails when the model loads, not on a request."""
        try:
            template = _environment().from_string(source)
        except TemplateSyntaxError as exc:
            raise ConfigError(
                f"the {name!r} chat template is not valid Jinja (line {exc.lineno}: {exc.message})"
            ) from None
        return cls(name, source, template, bos_token, eos_token)

    @classmethod
    def named(cls, name: str, *, bos_token: str = "", eos_token: str = "") -> ChatTemplate:
        source = FALLBACK_TEMPLATES.get(name)
        if source is None:
            valid = ", ".join(sorted(FALLBACK_TEMPLATES))
            raise ConfigError(f"unknown chat template {name!r}; choose one of: {valid}")
        return cls.from_source(source, name=name, bos_token=bos_token, eos_token=eos_token)

    def render(
        self,
        messages: Sequence[Message],
        *,
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> str:
        # Plain dicts in a fresh list: the template sees exactly what it would under Hugging Face, and
        # nothing it does can reach the caller's objects.
        conversation = [dict(m) for m in messages]
        try:
            return self._template.render(
                messages=conversation,
                add_generation_prompt=add_generation_prompt,
                bos_token=self._bos_token,
                eos_token=self._eos_token,
                tools=[dict(t) for t in tools] if tools else None,
            )
        except _Rejected as exc:
            reason = self._safe_reason(str(exc), conversation)
            log.info("chat template %r rejected a conversation of %d messages", self.name, len(messages))
            detail = f": {reason}" if reason else ""
            raise InvalidRequest(
                f"the chat template rejected the conversation{detail}", param="messages"
            ) from None
        except Exception as exc:
            # Only the exception's type is logged: its text (and its chained traceback, hence ``from
            # None``) may quote the conversation.
            log.info("chat template %r failed to render: %s", self.name, type(exc).__name__)
            raise InvalidRequest(
                "the chat template could not render this conversation", param="messages"
            ) from None

    def _safe_reason(self, reason: str, conversation: Sequence[Mapping[str, Any]]) -> str | None:
        """The template's own reason, or None where it might quote the conversation.

        Templates pass literal sentences to ``raise_exception``, but nothing stops one from building the
        reason out of message text, and this text goes back to the client and its logs. A literal found in
        the template's source is safe; anything else is shown only if it shares no text with any message.
        """
        reason = " ".join(reason.split())[:300]
        if reason in self._source:
            return reason or None
        for message in conversation:
            content = message.get("content")
            if isinstance(content, str) and content.strip():
                text = content.strip()
                if text in reason or reason in text:
                    return None
        return reason or None


def resolve_template(
    config_name: str | None, model_template: str | None, *, bos_token: str = "", eos_token: str = ""
) -> ChatTemplate:
    """The node's configured fallback if any (operators override a model's broken or missing template),
    else the model's own template, else chatml, the most widely understood layout."""
    if config_name:
        return ChatTemplate.named(config_name, bos_token=bos_token, eos_token=eos_token)
    if model_template:
        return ChatTemplate.from_source(model_template, bos_token=bos_token, eos_token=eos_token)
    return ChatTemplate.named("chatml", bos_token=bos_token, eos_token=eos_token)
