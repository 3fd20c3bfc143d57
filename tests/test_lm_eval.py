"""lm-evaluation-harness against Hearth, as users run it: `lm_eval.simple_evaluate` in this process, its
`local-completions` and `local-chat-completions` models over HTTP, to a real stack (scheduler, node, demo
model) in plaintext and sealed through `hearth proxy`. The tasks are small YAML files over local JSONL, so
nothing is downloaded (HF_DATASETS_OFFLINE, HF_HUB_OFFLINE). The loglikelihoods lm-eval computes from
Hearth's answers must equal the model's own, computed here from the same weights with transformers; its
generations must equal what Hearth answers the same request with the `openai` client (docs/evaluation.md)."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import torch

from node.backends.transformers_backend import TransformersBackend
from node.settings import ModelSettings
from tests.support import LoopThread, SealedStack, start_sealed_stack, stop_stack

MODEL = "hearth-demo"
EVALUATION = Path(__file__).resolve().parent.parent / "docs" / "evaluation.md"
# Where docs/evaluation.md writes the server's address; the test puts the real one in its place.
DOC_ROOT_URL = "http://127.0.0.1:8000"
# The choices carry their own leading space (the tasks' target_delimiter is ""), so that a choice can be
# the model's own next token, whatever it is: see with_greedy_choice.
QUESTIONS = [
    {
        "question": "Question: What colour is the sky?\nAnswer:",
        "choices": [" blue", " green", " a cat"],
        "answer": 0,
    },
    {
        "question": "Question: How many legs has a spider?\nAnswer:",
        "choices": [" six", " eight"],
        "answer": 1,
    },
]


@pytest.fixture(scope="module")
def env(
    servers: LoopThread, demo_model: ModelSettings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SealedStack]:
    """The demo model's stack, plaintext allowed, and `hearth proxy` in front of it."""
    got = servers.call(start_sealed_stack(tmp_path_factory.mktemp("lm-eval"), [demo_model], scheduler={}))
    yield got
    servers.call(stop_stack(got.stack))


@pytest.fixture(scope="module")
def model(demo_model_dir: Path) -> Iterator[TransformersBackend]:
    """The demo model in this process: the reference Hearth's numbers must equal."""
    backend = TransformersBackend.load(demo_model_dir)
    yield backend
    backend.close()


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No dataset or model download; lm-eval's requests carry this key (OPENAI_API_KEY, as it reads it)."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


def write_task(folder: Path, name: str, rows: list[dict[str, Any]], spec: str) -> Path:
    """A task YAML over a JSONL file in `folder`, for lm-eval's include_path."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        f"  data_files:\n    test: {json.dumps(str(data))}\n"
        f"  cache_dir: {json.dumps(str(folder / 'cache'))}\n"
        "test_split: test\n" + spec,
        encoding="utf-8",
    )
    return folder


def with_greedy_choice(model: TransformersBackend) -> list[dict[str, Any]]:
    """QUESTIONS, each with one more choice: the model's most likely next token, so that lm-eval's is_greedy
    is true for one answer and false for the others."""
    rows = []
    for row in QUESTIONS:
        ids = model.encode(row["question"], add_special_tokens=False)
        with torch.inference_mode():
            best = int(model._model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
        rows.append({**row, "choices": [*row["choices"], model.decode([best])]})
    return rows


def evaluate(
    folder: Path, task: str, model: str, model_args: dict[str, Any], batch_size: int = 1, **kwargs: Any
) -> dict[str, Any]:
    import lm_eval
    from lm_eval.tasks import TaskManager

    results = lm_eval.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=[task],
        task_manager=TaskManager(include_path=str(folder), include_defaults=False),
        num_fewshot=0,
        batch_size=batch_size,
        limit=len(QUESTIONS),
        log_samples=True,
        **kwargs,
    )
    assert results is not None
    return results


def reference_loglikelihood(
    model: TransformersBackend, context: str, continuation: str
) -> tuple[float, bool]:
    """The loglikelihood of `continuation` after `context` from the weights, split into tokens as lm-eval
    splits a pair (the whole text encoded, the context's tokens cut off the front), and whether each of its
    tokens is the model's most likely one (lm-eval's is_greedy)."""
    whole = model.encode(context + continuation, add_special_tokens=False)
    ctx = model.encode(context, add_special_tokens=False)
    cont = whole[len(ctx) :]
    with torch.inference_mode():
        logits = model._model(input_ids=torch.tensor([whole])).logits[0]
    rows = torch.log_softmax(logits.double(), dim=-1)
    picked = [rows[len(ctx) - 1 + i] for i in range(len(cont))]
    greedy = all(int(row.argmax()) == t for row, t in zip(picked, cont, strict=True))
    return sum(float(row[t]) for row, t in zip(picked, cont, strict=True)), greedy


MULTIPLE_CHOICE = (
    "output_type: multiple_choice\n"
    'doc_to_text: "{{question}}"\n'
    'doc_to_choice: "{{choices}}"\n'
    'doc_to_target: "{{answer}}"\n'
    'target_delimiter: ""\n'
    "metric_list:\n  - metric: acc\n"
)


@pytest.mark.parametrize(
    ("route", "tokenizer", "batch_size"),
    [("plain", "remote", 1), ("plain", "huggingface", 1), ("sealed", "remote", 1), ("sealed", "remote", 4)],
)
@pytest.mark.usefixtures("offline")
def test_multiple_choice_loglikelihoods_equal_the_models_own(
    env: SealedStack,
    model: TransformersBackend,
    demo_model_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    route: str,
    tokenizer: str,
    batch_size: int,
) -> None:
    """batch_size 4: lm-eval sends several answers' token ids in one request, one choice each."""
    rows = with_greedy_choice(model)
    folder = write_task(tmp_path / "tasks", "hearth_mc", rows, MULTIPLE_CHOICE)
    base = env.stack.base_url if route == "plain" else env.url.removesuffix("/v1")
    # The key lm-eval sends with generation requests; through the proxy none: the proxy holds the token.
    if route == "plain":
        monkeypatch.setenv("OPENAI_API_KEY", env.stack.token)
    else:
        monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    args: dict[str, Any] = {
        "model": MODEL,
        "base_url": base + "/v1/completions",
        "tokenizer_backend": tokenizer,
        "tokenized_requests": True,
        "max_retries": 1,
    }
    if tokenizer == "huggingface":
        args["tokenizer"] = str(demo_model_dir)
    elif route == "plain":
        args["auth_token"] = env.stack.token  # the remote tokenizer's own requests
    results = evaluate(folder, "hearth_mc", "local-completions", args, batch_size=batch_size)

    samples = results["samples"]["hearth_mc"]
    assert len(samples) == len(QUESTIONS)
    for sample in samples:
        doc = sample["doc"]
        served = [resp[0] for resp in sample["resps"]]
        reference = [reference_loglikelihood(model, doc["question"], c) for c in doc["choices"]]
        assert len(served) == len(doc["choices"])
        for (got, got_greedy), (want, want_greedy) in zip(served, reference, strict=True):
            assert math.isclose(got, want, abs_tol=1e-3), (got, want)
            assert got_greedy == want_greedy
        assert [greedy for _, greedy in served] == [False] * (len(served) - 1) + [True]
        expected = [ll for ll, _ in reference]
        # lm-eval's accuracy is the argmax of those numbers, as the reference's.
        assert sample["acc"] == float(max(range(len(expected)), key=expected.__getitem__) == doc["answer"])
    assert results["results"]["hearth_mc"]["acc,none"] == sum(s["acc"] for s in samples) / len(samples)


GENERATE = (
    "output_type: generate_until\n"
    'doc_to_text: "{{question}}"\n'
    'doc_to_target: "{{choices[answer]}}"\n'
    "generation_kwargs:\n"
    '  until: ["Question:"]\n'
    "  max_gen_toks: 8\n"
    "  do_sample: false\n"
    "  temperature: 0\n"
    "metric_list:\n  - metric: exact_match\n"
)


@pytest.mark.parametrize("route", ["plain", "sealed"])
@pytest.mark.usefixtures("offline")
def test_generate_until_through_chat_completions_answers_as_hearth_does(
    env: SealedStack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, route: str
) -> None:
    folder = write_task(tmp_path / "tasks", "hearth_gen", QUESTIONS, GENERATE)
    base = env.stack.base_url if route == "plain" else env.url.removesuffix("/v1")
    key = env.stack.token if route == "plain" else "unused-locally"
    if route == "plain":
        monkeypatch.setenv("OPENAI_API_KEY", key)
    else:
        monkeypatch.delenv("OPENAI_API_KEY", raising=False)  # as docs/evaluation.md says: none needed
    results = evaluate(
        folder,
        "hearth_gen",
        "local-chat-completions",
        {"model": MODEL, "base_url": base + "/v1/chat/completions", "max_retries": 1},
        apply_chat_template=True,
    )

    samples = results["samples"]["hearth_gen"]
    assert len(samples) == len(QUESTIONS)
    with openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0, timeout=60) as client:
        for sample in samples:
            answer = client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": sample["doc"]["question"]}],
                max_tokens=8,
                temperature=0,
                stop=["Question:"],
                seed=1234,
            )
            text = answer.choices[0].message.content or ""
            assert text and sample["resps"][0][0] == text
    assert "exact_match,none" in results["results"]["hearth_gen"]


@pytest.mark.usefixtures("offline")
def test_generate_until_through_completions_answers_as_hearth_does(
    env: SealedStack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = write_task(tmp_path / "tasks", "hearth_gen", QUESTIONS, GENERATE)
    monkeypatch.setenv("OPENAI_API_KEY", env.stack.token)
    results = evaluate(
        folder,
        "hearth_gen",
        "local-completions",
        {
            "model": MODEL,
            "base_url": env.stack.base_url + "/v1/completions",
            "tokenizer_backend": "remote",
            "auth_token": env.stack.token,
            "max_retries": 1,
        },
    )
    samples = results["samples"]["hearth_gen"]
    with openai.OpenAI(base_url=env.stack.api, api_key=env.stack.token, max_retries=0, timeout=60) as client:
        for sample in samples:
            answer = client.completions.create(
                model=MODEL, prompt=sample["doc"]["question"], max_tokens=8, temperature=0, stop=["Question:"]
            )
            assert answer.choices[0].text and sample["resps"][0][0] == answer.choices[0].text


def doc_blocks(lang: str) -> list[str]:
    text = EVALUATION.read_text(encoding="utf-8")
    return re.findall(rf"^```{lang}\n(.*?)^```$", text, flags=re.S | re.M)


@pytest.mark.usefixtures("offline")
def test_the_offline_example_in_the_docs_runs_as_written(
    env: SealedStack, model: TransformersBackend, tmp_path: Path
) -> None:
    """docs/evaluation.md's own task, JSONL and `lm-eval run` command, in a shell, against the stack."""
    rows = [json.loads(line) for line in doc_blocks("json")[-1].splitlines()]
    (tmp_path / "my-tasks").mkdir()
    (tmp_path / "my-tasks" / "quiz.jsonl").write_text(doc_blocks("json")[-1], encoding="utf-8")
    (tmp_path / "my-tasks" / "quiz.yaml").write_text(doc_blocks("yaml")[-1], encoding="utf-8")
    command = doc_blocks("sh")[-1]
    assert "--include_path my-tasks" in command and DOC_ROOT_URL in command
    bin_dir = str(Path(sys.executable).parent)
    shell_env = {
        **os.environ,
        "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
        "HEARTH_TOKEN": env.stack.token,
        "HF_HOME": str(tmp_path / "hf"),  # the datasets cache, kept out of the user's
    }
    done = subprocess.run(
        ["bash", "-euc", command.replace(DOC_ROOT_URL, env.stack.base_url)],
        cwd=tmp_path,
        env=shell_env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    [written] = list((tmp_path / "results").rglob("results_*.json"))
    acc = json.loads(written.read_text(encoding="utf-8"))["results"]["quiz"]["acc,none"]
    right = 0
    for row in rows:
        lls = [reference_loglikelihood(model, row["question"], " " + c)[0] for c in row["choices"]]
        right += max(range(len(lls)), key=lls.__getitem__) == row["answer"]
    assert acc == right / len(rows)
    assert "quiz" in done.stdout and "acc" in done.stdout


def test_the_tasks_the_docs_name_are_lm_evals() -> None:
    """Every `--tasks` in docs/evaluation.md's commands (but the docs' own offline quiz) is a task that the
    installed lm-eval knows, and every command runs one of the two models that talk to Hearth."""
    from lm_eval.tasks import TaskManager

    commands = [c for c in doc_blocks("sh") if "lm-eval run" in c]
    named = {t for c in commands for arg in re.findall(r"--tasks (\S+)", c) for t in arg.split(",")}
    assert {"arc_easy", "arc_challenge", "hellaswag", "mmlu", "truthfulqa_mc2"} <= named
    known = set(TaskManager().all_tasks)
    assert named - {"quiz"} <= known, sorted(named - {"quiz"} - known)
    models = {m for c in commands for m in re.findall(r"--model (\S+)", c)}
    assert models == {"local-completions", "local-chat-completions"}
    # The table of benchmarks names tasks too.
    table = re.findall(r"^\| [^|]+ \| `([a-z0-9_,]+)` \|", EVALUATION.read_text(encoding="utf-8"), flags=re.M)
    assert len(table) == 5 and {t for cell in table for t in cell.split(",")} <= known
