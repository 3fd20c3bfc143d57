"""From an opened request to what the model runs: the prompt's token ids and the sampling parameters.

The node renders the chat template (or takes the raw prompt), applies the job's rules (node.rules: the
course's system prompt first, the token budget last), fits the conversation into the model's context
(node.context), and sizes the answer: the client's max_tokens (or the model's default), no more than the
context has room for, no more than the budget leaves. CPU work: the caller runs it in a thread.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from node.backends.base import SamplingParams, vocab_size
from node.constrain import request_constraint, token_bytes
from node.context import fit_messages, fit_prompt
from node.pool import ModelSlot
from node.rules import course_messages, course_prompt, within_budget
from node.runner import JobRunner
from node.templates import Message
from node.tools import chat_messages
from protocol.errors import ContextLengthExceeded, InvalidRequest, RateLimited
from protocol.rules import JobRules
from protocol.schemas import ChatCompletionRequest, CompletionRequest

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's


@dataclass(frozen=True)
class Prepared:
    prompt_ids: list[int]
    params: SamplingParams
    resumed_tokens: int = 0  # of prompt_ids, the tail another node generated


def prepare(
    slot: ModelSlot,
    runner: JobRunner,
    req: ChatCompletionRequest | CompletionRequest,
    sent_text: str = "",
    rules: JobRules | None = None,
    prompt: str | list[int] | None = None,
) -> Prepared:
    """Render, tokenize and fit the prompt. ``sent_text`` is what another node already answered (blind
    failover): it goes on after the prompt, and counts against max_tokens. ``runner`` is the slot's as the
    job arrived (the model may be unloaded meanwhile)."""
    assert slot.template is not None
    backend = runner.backend
    context = backend.context_length
    requested = req.requested_max_tokens
    sent = backend.encode(sent_text, add_special_tokens=False) if sent_text else []
    if requested is not None and sent:
        requested = max(1, requested - len(sent))
    if requested is not None and requested >= context:
        raise ContextLengthExceeded(
            f"max_tokens is {requested} but the model's context is {context} tokens, prompt included",
            param="max_tokens",
        )
    budget = context - (requested if requested is not None else 1)
    if isinstance(req, ChatCompletionRequest):
        template = slot.template
        # Tools, tool calls and their results as the template reads them (node.tools).
        client, tools = chat_messages(req, template)
        # The course's prompt leads as a system message, and fitting keeps leading system messages.
        messages = course_messages(client, rules)
        # Fitting counts candidate conversations; keep each one's ids so the winner is not encoded twice.
        encoded: dict[tuple[int, ...], list[int]] = {}

        def count(candidate: Sequence[Message]) -> int:
            ids = backend.encode(template.render(candidate, tools=tools), add_special_tokens=False)
            encoded[tuple(map(id, candidate))] = ids
            return len(ids)

        truncate = (req.truncation or slot.settings.truncation) == "auto"
        fitted = fit_messages(messages, count_tokens=count, budget=budget, truncate=truncate)
        key = tuple(map(id, fitted.messages))
        prompt_ids = (
            encoded[key]
            if key in encoded
            else backend.encode(template.render(fitted.messages, tools=tools), add_special_tokens=False)
        )
        default = slot.settings.default_max_tokens
    else:
        prompt = req.prompts()[0] if prompt is None else prompt
        if isinstance(prompt, str):
            prompt_ids = backend.encode(course_prompt(prompt, rules), add_special_tokens=True)
        else:  # token ids, read as they are (a course prompt goes before them, special tokens as text)
            course = course_prompt("", rules)
            prompt_ids = (backend.encode(course, add_special_tokens=False) if course else []) + prompt
        fit_prompt(len(prompt_ids), budget=budget)
        default = COMPLETIONS_DEFAULT_MAX_TOKENS
    if not prompt_ids:
        raise InvalidRequest("the prompt is empty", param="prompt")
    if sent:
        prompt_ids = prompt_ids + sent
        if len(prompt_ids) >= context:
            raise ContextLengthExceeded("the answer so far fills the model's context")
    room = context - len(prompt_ids)
    max_new = min(requested if requested is not None else default, room)
    if rules is not None and rules.max_new_tokens is not None:
        # The group's cap, sent for a request that names no max_tokens (a completion's default of 16 too).
        max_new = min(max_new, rules.max_new_tokens)
    # Every token the model reads counts against the job's budget, the answer so far included: the usage
    # reported (prompt + completion) is then never more than the scheduler reserved.
    max_new = within_budget(max_new, len(prompt_ids), rules, resumed=bool(sent))
    params = SamplingParams(
        max_new_tokens=max_new,
        temperature=req.temperature,
        top_p=req.top_p,
        top_k=max(0, req.top_k),
        min_p=req.min_p,
        repetition_penalty=req.repetition_penalty,
        seed=req.seed,
        stop_token_ids=tuple(req.stop_token_ids or ()),
        presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty,
        ignore_eos=req.ignore_eos,
        logit_bias=req.biases(),
        logprobs=req.top_count,
        prompt_logprobs=isinstance(req, CompletionRequest) and bool(req.echo) and req.logprobs is not None,
        # The grammar of a structured answer or tool calls, compiled once per model (node.constrain).
        constraint=request_constraint(backend, req, sent),
    )
    return Prepared(prompt_ids, params, len(sent))


def prepare_choices(
    slot: ModelSlot,
    runner: JobRunner,
    req: ChatCompletionRequest | CompletionRequest,
    sent_text: str = "",
    rules: JobRules | None = None,
) -> list[Prepared]:
    """What each choice runs, in the answer's order (index = prompt × n + sample): ``prepare`` for each
    prompt, then n samples of each (seed, seed + 1, …, when a seed is set). The job's token budget, where
    the rules give one, is shared: every prompt once (as usage counts it), every choice's answer."""
    echo = isinstance(req, CompletionRequest) and bool(req.echo)
    if sent_text and (req.choices > 1 or echo):
        # What the client has is told by choice 0's text, which holds the prompt too with echo.
        raise InvalidRequest(
            "an answer of several choices, or with echo, cannot be resumed on another node", param="n"
        )
    backend = runner.backend
    if req.top_count is not None:
        # The tokens' own bytes (logprobs' "bytes") come from llguidance's reading of the tokenizer, built
        # once per model: here, off the loop and off the generation thread, not at the first token.
        token_bytes(backend)
    size = vocab_size(backend)
    if size is not None and any(token >= size for token, _ in req.biases()):
        raise InvalidRequest(
            f"logit_bias names a token id the model lacks (it has {size})", param="logit_bias"
        )
    prompts: list[str | list[int] | None] = (
        list(req.prompts()) if isinstance(req, CompletionRequest) else [None]
    )
    for prompt in prompts:
        if isinstance(prompt, list) and size is not None and any(t >= size for t in prompt):
            raise InvalidRequest(f"the prompt has a token id the model lacks (it has {size})", param="prompt")
    # Each prompt on its own first, without the shared budget (applied below, over all of them).
    alone = None if rules is None else rules.model_copy(update={"max_total_tokens": None})
    each = [prepare(slot, runner, req, sent_text, alone, prompt) for prompt in prompts]
    limit = getattr(backend, "score_limit", None)
    for prepared in each:
        if prepared.params.prompt_logprobs and limit is not None and len(prepared.prompt_ids) > limit:
            raise InvalidRequest(
                f"echo with logprobs scores prompts of at most {limit} tokens on this node", param="echo"
            )
    if rules is not None and rules.max_total_tokens is not None:
        read = sum(len(p.prompt_ids) for p in each)
        if len(each) == 1 and req.n == 1:
            each = [replace(each[0], params=replace(each[0].params, max_new_tokens=within_budget(
                each[0].params.max_new_tokens, read, rules, resumed=bool(sent_text),
            )))]  # fmt: skip
        else:
            left = rules.max_total_tokens - read
            share = left // req.choices
            if left <= 0 or (share == 0 and req.requested_max_tokens != 0):
                raise RateLimited(
                    f"this request's {len(each)} prompts are {read} tokens and its {req.choices} choices "
                    f"need room to answer; the quota left for it is {rules.max_total_tokens} tokens",
                    code="quota_exceeded",
                )
            each = [
                replace(p, params=replace(p.params, max_new_tokens=min(p.params.max_new_tokens, share)))
                for p in each
            ]
    out: list[Prepared] = []
    for prepared in each:
        for sample in range(req.n):
            params = prepared.params
            if params.seed is not None and sample:
                params = replace(params, seed=(params.seed + sample) % 2**63)
            out.append(replace(prepared, params=params))
    return out
