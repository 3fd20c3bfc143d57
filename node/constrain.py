"""Constrained decoding: answers that must parse (``response_format``) or be tool calls (``tools``).

A request's constraint is a grammar (llguidance's Lark dialect, with JSON Schemas inlined as ``%json``);
each sequence that runs under it gets its own matcher, which says before every token which tokens may
come next (a mask over the vocabulary) and follows the token chosen. Backends apply the mask where they
sample (transformers: on the logits; exllamav2: through its filter interface), so a sequence can only end
where the grammar is complete: the answer parses, unless ``max_tokens`` cuts it (``finish_reason:
"length"``, as in OpenAI's API).

Compiling a grammar against a vocabulary is the expensive part (a lexer over every token): each loaded
model keeps its compiled grammars, keyed by the grammar's text, and every sequence starts from a copy of
the compiled one. Schemas are the client's: they go into error messages (to the client) but never into a
log line.

JSON answers are compact (no whitespace between tokens): a model cannot pad them with blank space until
``max_tokens``, and properties come in the schema's order.
"""

from __future__ import annotations

import collections
import json
import re
import threading
import weakref
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from protocol.errors import InvalidRequest
from protocol.messages import ResponseFormatJsonObject, ResponseFormatJsonSchema
from protocol.schemas import ChatCompletionRequest, CompletionRequest

if TYPE_CHECKING:
    import torch

CALL_OPEN = "<tool_call>"
CALL_CLOSE = "</tool_call>"
CACHED_GRAMMARS = 64  # per model
# Our options for every inlined schema: compact JSON, and a schema keyword we cannot enforce is an error,
# never silently dropped.
_JSON_OPTIONS = {"whitespace_flexible": False, "lenient": False}
# Text answers under tool_choice "auto": anything that does not contain a tool call's opening tag.
_FREE_TEXT = f"TEXT: /(?s:.*)/ & ~/(?s:.*{re.escape(CALL_OPEN)}.*)/"


class SequenceConstraint:
    """One sequence's matcher: the tokens allowed next, and the token taken."""

    def __init__(self, matcher: Any, vocab_size: int, eos_ids: Sequence[int]) -> None:
        self._matcher = matcher
        self._vocab = vocab_size
        self._eos = list(eos_ids)

    def allowed(self, width: int) -> torch.Tensor:
        """A bool mask of ``width`` entries (the logits' width, which may exceed the vocabulary)."""
        import torch

        bits = torch.frombuffer(bytearray(self._matcher.compute_bitmask()), dtype=torch.uint8)
        unpacked = ((bits.unsqueeze(1) >> torch.arange(8, dtype=torch.uint8)) & 1).flatten().bool()
        mask = torch.zeros(width, dtype=torch.bool)
        n = min(width, self._vocab, unpacked.numel())
        mask[:n] = unpacked[:n]
        if not bool(mask.any()):
            # A matcher in error (a bug, never a client's grammar: those are refused up front) ends the
            # answer rather than letting every token through.
            mask[[e for e in self._eos if e < width]] = True
        return mask

    def restrict(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits`` (1-D) with the tokens the grammar forbids at -inf."""
        return logits.masked_fill(~self.allowed(logits.shape[-1]).to(logits.device), float("-inf"))

    def advance(self, token: int) -> None:
        self._matcher.consume_token(token)


ConstraintFactory = Callable[[], SequenceConstraint]


class Grammars:
    """One model's vocabulary for llguidance and the grammars compiled against it."""

    def __init__(self, tokenizer_json: str, eos_ids: Sequence[int]) -> None:
        import llguidance

        self._eos = sorted(eos_ids)
        self._tokenizer = llguidance.LLTokenizer(tokenizer_json, eos_token=self._eos or None)
        self._compiled: collections.OrderedDict[str, Any] = collections.OrderedDict()
        self._lock = threading.Lock()
        self.compiles = 0  # grammars compiled so far (a cache miss each)

    def constraint(self, grammar: str, *, check: Callable[[], None] | None = None) -> ConstraintFactory:
        """A factory of per-sequence constraints for ``grammar``, compiled once per model. A grammar that
        does not compile runs ``check`` (which names what is wrong in the client's terms) and is refused."""
        import llguidance

        with self._lock:
            compiled = self._compiled.get(grammar)
            if compiled is not None:
                self._compiled.move_to_end(grammar)
        if compiled is None:
            compiled = llguidance.LLMatcher(self._tokenizer, grammar, log_level=0)
            if compiled.is_error():
                if check is not None:
                    check()
                raise InvalidRequest(
                    f"the answer's constraint cannot be enforced: {_brief(compiled.get_error())}"
                )
            with self._lock:
                self.compiles += 1
                self._compiled[grammar] = compiled
                while len(self._compiled) > CACHED_GRAMMARS:
                    self._compiled.popitem(last=False)
        vocab, eos = self._tokenizer.vocab_size, self._eos
        return lambda: SequenceConstraint(compiled.deep_copy(), vocab, eos)

    def token_bytes(self, token: int) -> bytes:
        return bytes(self._tokenizer.decode_bytes([token]))

    def check_schema(self, schema: dict[str, Any], param: str) -> None:
        """Refuse a schema llguidance cannot enforce, naming the keywords (400, ``param``)."""
        import llguidance

        grammar = llguidance.LLMatcher.grammar_from_lark(f"start: {_inline(schema)}\n")
        failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, self._tokenizer)
        if failed:
            raise InvalidRequest(_schema_message(messages[0] if messages else ""), param=param)


# Each loaded model's Grammars, kept as long as its backend is (and built on first use, off the loop).
_by_model: weakref.WeakKeyDictionary[object, Grammars] = weakref.WeakKeyDictionary()
_by_model_lock = threading.Lock()


def grammars_for(backend: object) -> Grammars:
    """The backend's Grammars; InvalidRequest when its tokenizer cannot be given to llguidance."""
    with _by_model_lock:
        found = _by_model.get(backend)
    if found is not None:
        return found
    inner = getattr(backend, "inner", backend)  # node.backends.base.Sequential wraps one-at-a-time backends
    vocabulary = getattr(inner, "constraint_vocabulary", None)
    described = vocabulary() if vocabulary is not None else None
    if described is None:
        raise InvalidRequest(
            "this model's tokenizer cannot be used for structured output or tools (it needs a Hugging Face "
            "tokenizer.json)"
        )
    try:
        made = Grammars(*described)
    except ImportError:
        raise InvalidRequest(
            "this node cannot constrain answers (structured output, tools): llguidance is not installed "
            "(pip install 'hearth-llm[node-cpu]' or '[node-gpu]')",
            code="unsupported_on_node",
        ) from None
    with _by_model_lock:
        return _by_model.setdefault(backend, made)


def token_bytes(backend: object) -> Callable[[int], bytes] | None:
    """Each token's own bytes (llguidance's reading of the model's tokenizer), or None where the tokenizer
    cannot be read that way (or llguidance is missing)."""
    try:
        grammars = grammars_for(backend)
    except InvalidRequest:
        return None
    return grammars.token_bytes


def request_constraint(
    backend: object, req: ChatCompletionRequest | CompletionRequest, resumed: Sequence[int] = ()
) -> ConstraintFactory | None:
    """The constraint a request's answer runs under, or None (free text). ``resumed``: the tokens of
    the answer another node began (failover), which each sequence's matcher follows before it starts."""
    answer = _answer_rule(req)
    if answer is None and _tool_mode(req) == "none":
        return None
    grammars = grammars_for(backend)
    grammar = build_grammar(req)

    def check() -> None:
        schema = _answer_schema(req)
        if schema is not None:
            grammars.check_schema(schema, "response_format.json_schema.schema")
        for i, tool in enumerate(req.tools or () if isinstance(req, ChatCompletionRequest) else ()):
            grammars.check_schema(_arguments(tool.function), f"tools.{i}.function.parameters")

    factory = grammars.constraint(grammar, check=check)
    if not resumed:
        return factory

    def after_resumed() -> SequenceConstraint:
        constraint = factory()
        for token in resumed:
            constraint.advance(token)
        return constraint

    return after_resumed


def build_grammar(req: ChatCompletionRequest | CompletionRequest) -> str:
    """The request's grammar (llguidance Lark): the answer's format, tool calls, or either."""
    answer = _answer_rule(req)
    mode = _tool_mode(req)
    lines: list[str] = []
    if mode == "none" or not isinstance(req, ChatCompletionRequest):
        lines.append(f"start: {answer}")
    else:
        tools = [t for t in req.tools or () if mode in ("auto", "required") or t.function.name == mode]
        calls = "call+" if req.parallel_tool_calls is not False else "call"
        if mode == "auto":
            text = answer if answer is not None else "TEXT"
            lines.append(f"start: {text} | {calls}")
            if answer is None:
                lines.append(_FREE_TEXT)
        else:
            lines.append(f"start: {calls}")
        lines.append(f"call: {json.dumps(CALL_OPEN)} call_body {json.dumps(CALL_CLOSE)}")
        lines.append(f"call_body: {_inline(_call_schema([t.function for t in tools]))}")
    return "\n".join(lines) + "\n"


def _tool_mode(req: ChatCompletionRequest | CompletionRequest) -> str:
    return req.tool_mode if isinstance(req, ChatCompletionRequest) else "none"  # completions take no tools


def _answer_rule(req: ChatCompletionRequest | CompletionRequest) -> str | None:
    schema = _answer_schema(req)
    return None if schema is None else _inline(schema)


def _answer_schema(req: ChatCompletionRequest | CompletionRequest) -> dict[str, Any] | None:
    """The schema the answer is held to (response_format), as enforced; None: free text."""
    fmt = req.response_format
    if isinstance(fmt, ResponseFormatJsonObject):
        return {"type": "object"}
    if isinstance(fmt, ResponseFormatJsonSchema):
        schema = fmt.json_schema.schema_
        return closed(schema) if fmt.json_schema.strict else schema
    return None


def _call_schema(functions: Sequence[Any]) -> dict[str, Any]:
    """A call as one JSON object, the name first: ``{"name": ..., "arguments": {...}}``."""
    variants = [
        {
            "type": "object",
            "properties": {"name": {"const": f.name}, "arguments": _arguments(f)},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for f in functions
    ]
    return variants[0] if len(variants) == 1 else {"anyOf": variants}


def _arguments(function: Any) -> dict[str, Any]:
    parameters = _parameters(function.parameters)
    return closed(parameters) if function.strict else parameters


def _parameters(parameters: dict[str, Any] | None) -> dict[str, Any]:
    # No parameters: a function that takes none (OpenAI's reading), so "{}".
    if not parameters:
        return {"type": "object", "properties": {}, "additionalProperties": False}
    return parameters


# Keywords whose value is one subschema, or a list or a map of them.
_ONE = ("items", "additionalProperties", "contains", "propertyNames", "unevaluatedProperties", "not", "if",
        "then", "else")  # fmt: skip
_LIST = ("prefixItems", "anyOf", "oneOf")
_MAP = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")


def closed(schema: Any, *, member_of_all_of: bool = False) -> Any:
    """``schema`` as ``strict: true`` reads it (OpenAI's strict mode): an object that does not say what
    else it allows (no ``additionalProperties``, ``patternProperties`` or ``unevaluatedProperties``) allows
    nothing else, so the answer has exactly the properties named. Members of an ``allOf`` stay as they are
    (closing each would refuse what the others add); everything inside them is closed."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in _ONE:
        if key in out:
            out[key] = closed(out[key])
    for key in _LIST:
        if isinstance(out.get(key), list):
            out[key] = [closed(s) for s in out[key]]
    if isinstance(out.get("allOf"), list):
        out["allOf"] = [closed(s, member_of_all_of=True) for s in out["allOf"]]
    for key in _MAP:
        if isinstance(out.get(key), dict):
            out[key] = {name: closed(s) for name, s in out[key].items()}
    kind = out.get("type")
    is_object = kind == "object" or (isinstance(kind, list) and "object" in kind) or "properties" in out
    says = {"additionalProperties", "patternProperties", "unevaluatedProperties", "allOf", "$ref"}
    if is_object and not member_of_all_of and not says & set(out):
        out["additionalProperties"] = False
    return out


def _inline(schema: dict[str, Any]) -> str:
    return "%json " + json.dumps({**schema, "x-guidance": _JSON_OPTIONS}, ensure_ascii=False)


def _schema_message(error: str) -> str:
    keys = re.search(r"Unimplemented keys: \[([^\]]*)\]", error)
    if keys:
        names = ", ".join(k.strip().strip('"') for k in keys.group(1).split(","))
        return f"the schema uses JSON Schema keywords Hearth cannot enforce while generating: {names}"
    return f"the schema cannot be enforced while generating: {_brief(error)}"


def _brief(error: str) -> str:
    return " ".join(error.split())[:300]
