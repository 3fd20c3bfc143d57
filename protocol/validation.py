"""Request validation errors in words that say what to send.

pydantic's own messages name its internals ("List should have at most 1 item after validation", "Input
should be a valid string", one per branch of a union); a client's user wants the field and what it takes.
Every API (the scheduler's, the node's, the proxy's, the admin API) turns a ``ValidationError`` into one
:class:`InvalidRequest` here: the first bad field's path as ``param``, a sentence of what it must be, never
the value that was sent (a value may be prompt text).
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from protocol.errors import InvalidRequest

# What a field must be, by pydantic's error type.
_WANTED = {
    "string_type": "a string",
    "string_unicode": "a string",
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "a whole number",
    "float_type": "a number",
    "float_parsing": "a number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "list_type": "a list (a JSON array)",
    "tuple_type": "a list (a JSON array)",
    "dict_type": "an object",
    "model_type": "an object",
    "model_attributes_type": "an object",
    "none_required": "null",
}
# Fields whose union a type error alone cannot explain well: what they take, in full.
_FIELD_HINTS = {
    "content": "a string, or a list of parts of type 'text'",
    "stop": "a string, or a list of strings",
}


def validation_error(exc: ValidationError) -> InvalidRequest:
    errors = exc.errors(include_input=False, include_url=False)
    path = field = _path(errors[0]["loc"])
    # A union field reports one error per branch. A branch that got further into the value (an error
    # deeper than the field) is the shape the client meant; otherwise one that failed on a rule rather than
    # on the type says what to fix; failing that, the field takes any of the branches' types.
    under = [e for e in errors if _within(_path(e["loc"]), path)]
    deeper = [e for e in under if _path(e["loc"]) != path] if path else []
    if deeper:
        first = deeper[0]
        path = _path(first["loc"])
        message = _explain(first)
    else:
        same = [e for e in under if _path(e["loc"]) == path]
        ruled = [e for e in same if e["type"] not in _WANTED]
        message = _explain(ruled[0]) if ruled else "must be " + _either(path, same)
    # Problems with other fields (the branches of this one's union are not others).
    others = len({p for e in errors if not _within(p := _path(e["loc"]), field)})
    more = f" (and {others} more problem{'s' if others > 1 else ''})" if others else ""
    where = f"'{path}': " if path else ""
    return InvalidRequest(f"invalid request: {where}{message}{more}", param=path or None)


def _within(inner: str, outer: str) -> bool:
    return not outer or inner == outer or inner.startswith(outer + ".")


def _either(path: str, errors: list[Any]) -> str:
    hint = _FIELD_HINTS.get(path.rsplit(".", 1)[-1])
    if hint is not None and len(errors) > 1:
        return hint
    wanted = list(dict.fromkeys(_WANTED[e["type"]] for e in errors))
    return " or ".join(wanted)


def _explain(error: Any) -> str:
    kind: str = error["type"]
    ctx: dict[str, Any] = error.get("ctx") or {}
    if kind == "missing":
        return "this field is required"
    if kind in _WANTED:
        return "must be " + _WANTED[kind]
    if kind in ("too_short", "too_long") and ctx.get("field_type") not in (None, "List", "Tuple", "Set"):
        kind = "string_" + kind  # a string checked after a validator of its own: pydantic calls it "Value"
    if kind == "too_short":
        n = ctx.get("min_length", 1)
        return f"must hold at least {n} item{'s' if n != 1 else ''}"
    if kind == "too_long":
        n = ctx.get("max_length", 0)
        return f"may hold at most {n} item{'s' if n != 1 else ''}; send no more"
    if kind == "string_too_short":
        n = ctx.get("min_length", 1)
        return "must not be empty" if n == 1 else f"must be at least {n} characters long"
    if kind == "string_too_long":
        return f"may be at most {ctx.get('max_length')} characters long"
    bounds = {
        "greater_than_equal": ("must be at least", "ge"),
        "greater_than": ("must be greater than", "gt"),
        "less_than_equal": ("must be at most", "le"),
        "less_than": ("must be less than", "lt"),
    }
    if kind in bounds:
        words, key = bounds[kind]
        return f"{words} {ctx.get(key)}"
    if kind in ("literal_error", "enum"):
        return f"must be {ctx.get('expected')}"
    if kind == "finite_number":
        return "must be a finite number"
    if kind == "extra_forbidden":
        return "is not a field this request takes; leave it out"
    return str(error["msg"]).removeprefix("Value error, ").removeprefix("Assertion failed, ")


def _path(loc: tuple[int | str, ...]) -> str:
    # pydantic names the union branch it tried ("str", "list[...]"); users want the field path.
    parts = [str(p) for p in loc]
    return ".".join(p for p in parts if not _is_type_tag(p))


def _is_type_tag(part: str) -> bool:
    return part in {"str", "int", "float", "bool", "none", "TextPart"} or part.startswith(
        ("list[", "function-", "constrained-", "json-or-python[", "lax-or-strict[", "nullable[", "union[")
    )
