"""The rules a scheduler hands its node with a job (protocol.rules.JobRules), as the node applies them.

Both kinds of job may carry ``"rules"`` beside the request; the scheduler's signature on the job covers
them, so they are its word and a client can neither alter nor strip them. None, or a document with no rule
set, means a job exactly as without. The node applies them after opening the request:

- ``system_prompt`` (a course's): in a chat it becomes the first message, a system message before every
  message the client sent (the client's own system messages follow it; context fitting keeps leading system
  messages, so it is never dropped); a raw completions prompt gets it in front, a blank line between.
- ``max_total_tokens``: what the scheduler reserved of the holder's quota for this job, prompt (as the node
  counts it: the course prompt and any resumed answer included) plus completion. The answer is cut to fit
  (finish_reason "length"); a prompt that alone fills it is refused before any work (429 quota_exceeded).

Pure functions over the request's parts: errors quote token counts and field names, never text.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError

from node.templates import Message
from protocol.errors import InvalidRequest, RateLimited
from protocol.rules import JobRules


def parse_rules(doc: Any) -> JobRules | None:
    """A job's ``rules`` member: None when absent, null or empty; InvalidRequest (400 invalid_rules) when
    malformed, naming each wrong field (never its value)."""
    if doc is None:
        return None
    try:
        rules = JobRules.model_validate(doc)
    except ValidationError as exc:
        wrong = "; ".join(
            ".".join(["rules", *(str(part) for part in err["loc"])]) + ": " + err["msg"]
            for err in exc.errors()
        )
        raise InvalidRequest(
            f"the job's rules are malformed ({wrong})", param="rules", code="invalid_rules"
        ) from None
    return None if rules.empty else rules


def course_messages(messages: Sequence[Message], rules: JobRules | None) -> list[Message]:
    """The conversation the model reads: the course's system prompt first, then the client's messages."""
    if rules is None or rules.system_prompt is None:
        return list(messages)
    return [{"role": "system", "content": rules.system_prompt}, *messages]


def course_prompt(prompt: str, rules: JobRules | None) -> str:
    """The raw prompt the model continues: the course's system prompt, a blank line, the client's prompt."""
    if rules is None or rules.system_prompt is None:
        return prompt
    return f"{rules.system_prompt}\n\n{prompt}"


def within_budget(
    max_new_tokens: int, prompt_tokens: int, rules: JobRules | None, *, resumed: bool = False
) -> int:
    """The most new tokens the job may generate: ``max_new_tokens``, less what the token budget lacks.

    ``prompt_tokens`` counts everything the model reads (course prompt, and for a resumed job the answer so
    far). Raises RateLimited (429 quota_exceeded) when the prompt alone leaves nothing to answer with."""
    if rules is None or rules.max_total_tokens is None:
        return max_new_tokens
    left = rules.max_total_tokens
    if prompt_tokens >= left:
        what = "prompt and the answer so far are" if resumed else "prompt is"
        raise RateLimited(
            f"this request's {what} {prompt_tokens} tokens; the quota left for it is {left} tokens",
            code="quota_exceeded",
        )
    return min(max_new_tokens, left - prompt_tokens)
