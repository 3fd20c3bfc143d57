"""Chat templates: the fallback layouts byte for byte, model templates in the sandbox, and errors that
never quote the conversation."""

from __future__ import annotations

import logging

import pytest

from node.templates import FALLBACK_TEMPLATES, ChatTemplate, Message, resolve_template
from protocol.errors import ConfigError, InvalidRequest

CANARY = "CANARY-b81f secret prompt text"

CONVERSATION: list[Message] = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Name a colour."},
]

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)
ALPACA_INPUT_PREAMBLE = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
)

# A small template in the style Hugging Face models ship: strict alternation enforced with
# raise_exception, the system prompt folded into the first turn.
MODEL_TEMPLATE = """\
{% if messages[0]['role'] == 'system' %}
{% set system = messages[0]['content'] %}{% set loop_messages = messages[1:] %}
{% else %}
{% set system = '' %}{% set loop_messages = messages %}
{% endif %}
{{- bos_token -}}
{% for message in loop_messages %}
{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') -}}
{% endif %}
{% if loop.first and system %}
{{- '<|' + message['role'] + '|>' + system + '\\n' + message['content'] + eos_token -}}
{% else %}
{{- '<|' + message['role'] + '|>' + message['content'] + eos_token -}}
{% endif %}
{% endfor %}
{% if add_generation_prompt %}
{{- '<|assistant|>' -}}
{% endif %}
"""


@pytest.mark.parametrize(
    ("name", "add_generation_prompt", "expected"),
    [
        # alpaca: the system prompt replaces the preamble; the prompt ends on an open response
        (
            "alpaca",
            True,
            "<s>Be brief.\n\n### Instruction:\nHi there\n\n### Response:\nHello!\n\n"
            "### Instruction:\nName a colour.\n\n### Response:\n",
        ),
        # alpaca without generation prompt: stops after the last instruction
        (
            "alpaca",
            False,
            "<s>Be brief.\n\n### Instruction:\nHi there\n\n### Response:\nHello!\n\n"
            "### Instruction:\nName a colour.\n\n",
        ),
        # vicuna v1.1: system line, USER/ASSISTANT turns, assistant turns closed by </s>
        (
            "vicuna",
            True,
            "<s>Be brief. USER: Hi there ASSISTANT: Hello!</s>USER: Name a colour. ASSISTANT:",
        ),
        # vicuna without generation prompt: no trailing ASSISTANT:
        ("vicuna", False, "<s>Be brief. USER: Hi there ASSISTANT: Hello!</s>USER: Name a colour. "),
        # llama-2: <<SYS>> inside the first [INST], bos/eos around each exchange
        (
            "llama-2",
            True,
            "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi there [/INST] Hello! </s>"
            "<s>[INST] Name a colour. [/INST]",
        ),
        # llama-2 has no separate generation prompt: [/INST] already closes the user turn
        (
            "llama-2",
            False,
            "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi there [/INST] Hello! </s>"
            "<s>[INST] Name a colour. [/INST]",
        ),
        # chatml: every message in place with its role, then an open assistant turn
        (
            "chatml",
            True,
            "<s><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
            "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nName a colour.<|im_end|>\n"
            "<|im_start|>assistant\n",
        ),
        # chatml without generation prompt: ends after the last message
        (
            "chatml",
            False,
            "<s><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
            "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nName a colour.<|im_end|>\n",
        ),
        # stackllama: Question/Answer blocks, prompt ends on "Answer: "
        (
            "stackllama",
            True,
            "<s>Be brief.\n\nQuestion: Hi there\n\nAnswer: Hello!\n\nQuestion: Name a colour.\n\nAnswer: ",
        ),
        # stackllama without generation prompt: ends after the last question
        (
            "stackllama",
            False,
            "<s>Be brief.\n\nQuestion: Hi there\n\nAnswer: Hello!\n\nQuestion: Name a colour.\n\n",
        ),
    ],
)
def test_fallback_renders_golden(name: str, add_generation_prompt: bool, expected: str) -> None:
    template = ChatTemplate.named(name, bos_token="<s>", eos_token="</s>")
    assert template.name == name
    assert template.render(CONVERSATION, add_generation_prompt=add_generation_prompt) == expected


@pytest.mark.parametrize(
    ("name", "messages", "expected"),
    [
        # alpaca with no system prompt: Alpaca's own preamble
        (
            "alpaca",
            [{"role": "user", "content": "Sum 2 and 3."}],
            f"{ALPACA_PREAMBLE}\n\n### Instruction:\nSum 2 and 3.\n\n### Response:\n",
        ),
        # alpaca: a user message right after an instruction is its input, with the input preamble
        (
            "alpaca",
            [{"role": "user", "content": "Translate."}, {"role": "user", "content": "bonjour"}],
            f"{ALPACA_INPUT_PREAMBLE}\n\n### Instruction:\nTranslate.\n\n"
            "### Input:\nbonjour\n\n### Response:\n",
        ),
        # alpaca: a third user message in a row starts a new instruction
        (
            "alpaca",
            [
                {"role": "user", "content": "I1"},
                {"role": "user", "content": "X1"},
                {"role": "user", "content": "I2"},
            ],
            f"{ALPACA_INPUT_PREAMBLE}\n\n### Instruction:\nI1\n\n### Input:\nX1\n\n### Instruction:\nI2\n\n"
            "### Response:\n",
        ),
        # vicuna with no system prompt: the v1.1 default system line
        ("vicuna", [{"role": "user", "content": "Hi"}], f"{VICUNA_SYSTEM} USER: Hi ASSISTANT:"),
        # several system messages (developer included) are joined, in order, into one system prompt
        (
            "stackllama",
            [
                {"role": "system", "content": "One."},
                {"role": "developer", "content": "Two."},
                {"role": "user", "content": "Q"},
            ],
            "One.\n\nTwo.\n\nQuestion: Q\n\nAnswer: ",
        ),
        # llama-2 without a system prompt: no <<SYS>> block, content trimmed as Meta's code does
        ("llama-2", [{"role": "user", "content": "  Hi  "}], "[INST] Hi [/INST]"),
        # chatml keeps tool messages, which it can label
        (
            "chatml",
            [{"role": "tool", "content": "42"}],
            "<|im_start|>tool\n42<|im_end|>\n<|im_start|>assistant\n",
        ),
    ],
)
def test_fallback_layout_rules(name: str, messages: list[Message], expected: str) -> None:
    assert ChatTemplate.named(name).render(messages) == expected


@pytest.mark.parametrize("name", sorted(set(FALLBACK_TEMPLATES) - {"chatml"}))
def test_fallbacks_without_tool_role_refuse_tool_messages(name: str) -> None:
    messages: list[Message] = [{"role": "user", "content": CANARY}, {"role": "tool", "content": CANARY}]
    with pytest.raises(InvalidRequest) as caught:
        ChatTemplate.named(name).render(messages)
    assert caught.value.param == "messages"
    assert "tool" in caught.value.message
    assert CANARY not in str(caught.value)


def test_model_template_renders() -> None:
    template = ChatTemplate.from_source(MODEL_TEMPLATE, bos_token="<s>", eos_token="</s>")
    assert template.name == "model"
    assert template.render(CONVERSATION) == (
        "<s><|user|>Be brief.\nHi there</s><|assistant|>Hello!</s><|user|>Name a colour.</s><|assistant|>"
    )


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        # tojson writes plain JSON: no HTML escaping of <, >, & or non-ASCII
        ("{{ messages[0] | tojson }}", '{"role": "user", "content": "<a> & é"}'),
        # tojson passes indent through as Hugging Face's filter does
        ("{{ {'k': 1} | tojson(indent=2) }}", '{\n  "k": 1\n}'),
        # strftime_now is callable and formats the current time
        ("{{ strftime_now('%Y') | length }}", "4"),
        # the sandbox hides internals: an unsafe attribute is undefined, which prints as nothing
        ("{{ raise_exception.__globals__ }}", ""),
        # loop controls work, as some published templates use them
        ("{% for m in messages %}{% break %}{% endfor %}done", "done"),
    ],
)
def test_model_template_helpers(source: str, expected: str) -> None:
    template = ChatTemplate.from_source(source)
    assert template.render([{"role": "user", "content": "<a> & é"}]) == expected


def test_raise_exception_gives_invalid_request() -> None:
    template = ChatTemplate.from_source(MODEL_TEMPLATE)
    messages: list[Message] = [{"role": "assistant", "content": CANARY}]
    with pytest.raises(InvalidRequest) as caught:
        template.render(messages)
    assert caught.value.message == (
        "the chat template rejected the conversation: "
        "Conversation roles must alternate user/assistant/user/assistant/..."
    )
    assert caught.value.param == "messages"
    assert caught.value.__cause__ is None


@pytest.mark.parametrize(
    "source",
    [
        # the reason is the message itself
        "{{ raise_exception(messages[0]['content']) }}",
        # the reason quotes the message inside a sentence
        "{{ raise_exception('bad message: ' + messages[0]['content']) }}",
        # the reason quotes part of the message
        "{{ raise_exception(messages[0]['content'][:6]) }}",
    ],
)
def test_raise_exception_never_quotes_the_conversation(source: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with pytest.raises(InvalidRequest) as caught:
        ChatTemplate.from_source(source).render([{"role": "user", "content": CANARY}])
    assert caught.value.message == "the chat template rejected the conversation"
    assert CANARY[:6] not in str(caught.value)
    assert CANARY[:6] not in caplog.text


@pytest.mark.parametrize(
    "source",
    [
        # climbing to Python internals through a string
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        # reaching a function's globals
        "{{ raise_exception.__globals__['os'] }}",
        # mutating the conversation in place
        "{{ messages.append({'role': 'user', 'content': 'x'}) }}",
        # mutating a message in place
        "{{ messages[0].update({'content': 'x'}) }}",
        # a plain runtime error, whose text would quote the content
        "{{ messages[0]['content'] + 1 }}",
        # an undefined variable used as a mapping
        "{{ nothing['content'] }}",
    ],
)
def test_template_faults_give_generic_invalid_request(source: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    messages: list[Message] = [{"role": "user", "content": CANARY}]
    with pytest.raises(InvalidRequest) as caught:
        ChatTemplate.from_source(source).render(messages)
    assert caught.value.message == "the chat template could not render this conversation"
    assert caught.value.param == "messages"
    assert caught.value.__cause__ is None
    assert caught.value.__suppress_context__
    assert CANARY not in caplog.text
    assert messages == [{"role": "user", "content": CANARY}]


def test_invalid_jinja_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"'model' chat template is not valid Jinja \(line 1"):
        ChatTemplate.from_source("{% for m in messages %}")


def test_unknown_fallback_name_lists_valid_names() -> None:
    with pytest.raises(ConfigError) as caught:
        ChatTemplate.named("llama-9")
    assert "'llama-9'" in caught.value.message
    for name in FALLBACK_TEMPLATES:
        assert name in caught.value.message


@pytest.mark.parametrize(
    ("config_name", "model_template", "expected_name", "expected_prompt"),
    [
        # the node's configured fallback overrides the model's own template
        ("stackllama", MODEL_TEMPLATE, "stackllama", "Question: Hi\n\nAnswer: "),
        # no configured fallback: the model's own template
        (None, MODEL_TEMPLATE, "model", "<|user|>Hi<|assistant|>"),
        # an empty setting counts as unset
        ("", MODEL_TEMPLATE, "model", "<|user|>Hi<|assistant|>"),
        # neither: chatml
        (None, None, "chatml", "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"),
        # a model that ships an empty template is treated as having none
        (None, "", "chatml", "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"),
    ],
)
def test_resolve_template_precedence(
    config_name: str | None, model_template: str | None, expected_name: str, expected_prompt: str
) -> None:
    template = resolve_template(config_name, model_template)
    assert template.name == expected_name
    assert template.render([{"role": "user", "content": "Hi"}]) == expected_prompt


def test_resolve_template_unknown_config_name() -> None:
    with pytest.raises(ConfigError):
        resolve_template("nope", MODEL_TEMPLATE)


@pytest.mark.parametrize(
    "source",
    [
        # a model template in the usual style
        MODEL_TEMPLATE,
        # tojson with its options
        "{{ messages | tojson }}|{{ messages[0] | tojson(indent=2, sort_keys=true) }}",
        # every fallback, so an operator could also hand one to Hugging Face tooling
        *FALLBACK_TEMPLATES.values(),
    ],
)
def test_renders_as_hugging_face_does(source: str) -> None:
    """Our environment must agree with the one model authors test their templates in."""
    hf = pytest.importorskip("transformers.utils.chat_template_utils")
    if not hasattr(hf, "render_jinja_template"):
        pytest.skip("this transformers has no render_jinja_template")
    messages = [dict(m) for m in CONVERSATION]
    messages[1]["content"] = "<b>Hi</b> & é"
    (theirs,), _ = hf.render_jinja_template(
        conversations=[messages],
        chat_template=source,
        add_generation_prompt=True,
        bos_token="<s>",
        eos_token="</s>",
    )
    ours = ChatTemplate.from_source(source, bos_token="<s>", eos_token="</s>").render(messages)
    assert ours == theirs
