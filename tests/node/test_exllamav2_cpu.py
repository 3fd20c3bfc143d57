"""The exllamav2 backend on exllamav2's own generator, on a CPU (tests/node/exllamav2_cpu.py: the library's
Python as it is, its CUDA extension, model and cache stood in for).

What this shows with the library's code: the backend contract holds, paged (continuous batching) and unpaged;
the plans ``load`` makes pass the generator's own checks; a user's next turn reuses their cached prompt pages
and another user's identical prompt reuses none, directly and through the scheduler; admission reserves
prompt + max_new_tokens in pages and a cancelled job's pages are free at once; tokens held back at a stop
token are not lost; presence and frequency penalties see the answer only; generation, cancellation and each
layer of a load take the GPU lock, and a failed load frees what it took; the job runner drives several jobs
at once to the same answers they give alone; the openai client streams through scheduler and node; a second
model loads and unloads while the first streams; a canary prompt and its answer reach no log or file.
tests/gpu/ runs the same backend on a GPU with a model of a real architecture, for what a stand-in cannot
show (kernels, loading weights, memory, speed).
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, ClassVar

import httpx
import pytest

from node.backends.base import BatchBackend, CacheScope, NeverFits, SamplingParams
from node.demo import CHATML_TEMPLATE, DEMO_MODEL_ID
from node.runner import Delta, JobRunner
from node.settings import ModelSettings, NodeSettings
from scheduler.store import Store
from tests.node.backend_contract import CONTRACT, PROMPT, drive, drive_all
from tests.support import LoopThread, Stack, start_stack, stop_stack, wait_for

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("exllamav2") is None,
    reason="needs exllamav2's Python (pip install --no-deps exllamav2==0.3.2; the dev extra has it)",
)


@pytest.fixture(scope="module", autouse=True)
def _exllamav2_on_a_cpu() -> Iterator[None]:
    from tests.node import exllamav2_cpu

    try:
        with exllamav2_cpu.stand_in():
            yield
    except RuntimeError as exc:
        pytest.skip(str(exc))


GREEDY = SamplingParams(max_new_tokens=24, temperature=0.0, ignore_eos=True)


def backend_for(path: Path, **kwargs: Any) -> tuple[Any, Any]:
    from tests.node import exllamav2_cpu

    return exllamav2_cpu.load(path, **kwargs)


@pytest.mark.parametrize(("paged", "sequences"), [(True, 4), (False, 1)], ids=["paged", "unpaged"])
@pytest.mark.parametrize("check", CONTRACT, ids=lambda c: c.__name__)
def test_the_exllamav2_backend_meets_the_contract(
    demo_model_dir: Path, paged: bool, sequences: int, check: Callable[[BatchBackend], None]
) -> None:
    backend, _ = backend_for(demo_model_dir, cache_tokens=2048, max_sequences=sequences, paged=paged)
    check(backend)


def test_load_plans_what_the_generator_accepts(demo_model_dir: Path) -> None:
    # The demo model's context is 2,048 tokens.
    cases = {
        # cache tokens, sequences asked for, paged → cache, context, chunk, sequences
        (300, 8, True): (512, 512, 512, 2),  # no more sequences than pages
        (4096, 64, True): (4096, 2048, 2048, 16),  # a sequence never outgrows the model
        (8192, None, True): (8192, 2048, 2048, 32),
        (1000, 8, False): (1024, 1024, 1024, 1),  # unpaged: one at a time
        (1000, 8, 200): (1024, 200, 200, 1),  # a context shorter than a page: unpaged
    }
    for (tokens, sequences, paged), expected in cases.items():
        context = paged if not isinstance(paged, bool) else None
        backend, _ = backend_for(
            demo_model_dir, cache_tokens=tokens, max_sequences=sequences, paged=bool(paged), context=context
        )
        generator = backend._generator
        got = (generator.max_total_tokens, backend.context_length, generator.max_chunk_size)
        assert (*got, backend.cache().max_sequences) == expected, (tokens, sequences, paged)
        assert backend.cache().total_tokens == expected[0]
        assert backend.cache().page_tokens == (256 if paged is True else expected[0])


def test_the_models_own_template_and_stop_tokens(demo_model_dir: Path) -> None:
    backend, model = backend_for(demo_model_dir, cache_tokens=1024, max_sequences=2)
    assert backend.chat_template == CHATML_TEMPLATE  # from chat_template.jinja
    assert backend.eos_token == "<|im_end|>"
    assert backend.encode("<|im_start|>user", add_special_tokens=False)[0] == 3, "special tokens as text"
    pool = backend._generator.sampling_pool
    backend.close()
    assert model.unloaded and backend.cache().total_tokens == 0
    assert pool._shutdown, "the generator's sampling threads are let go"


def test_a_users_next_turn_reuses_their_pages_and_no_one_elses(demo_model_dir: Path) -> None:
    backend, model = backend_for(demo_model_dir, cache_tokens=4096, max_sequences=4)
    prompt = list(range(10, 710))  # two whole pages and part of a third
    params = SamplingParams(max_new_tokens=4, temperature=0.0, ignore_eos=True)

    def prefilled(scope: CacheScope) -> int:
        before = model.prompt_tokens
        seq = backend.admit(prompt, params, scope)
        assert seq is not None
        drive(backend, seq)
        return model.prompt_tokens - before

    alice, bob = CacheScope(b"user:alice"), CacheScope(b"user:bob")
    whole = len(prompt) - 1  # the last prompt token is the first one decoded
    assert prefilled(alice) == whole
    assert prefilled(alice) == whole - 512, "the same scope reuses the two whole pages"
    assert prefilled(bob) == whole, "another scope reuses nothing"
    assert prefilled(CacheScope.private()) == whole
    assert prefilled(alice) == whole - 512
    # Unpaged, exllamav2 would reuse the previous job's prefix, whoever sent it: off.
    unpaged, model = backend_for(demo_model_dir, cache_tokens=1024, max_sequences=1, paged=False)
    backend = unpaged
    assert [prefilled(alice), prefilled(alice)] == [whole, whole]


def test_admission_reserves_pages_and_cancel_returns_them(demo_model_dir: Path) -> None:
    backend, _ = backend_for(demo_model_dir, cache_tokens=2048, max_sequences=3)
    params = SamplingParams(max_new_tokens=313, ignore_eos=True)
    free = [backend.cache().free_tokens]
    seqs = []
    for _ in range(4):
        seqs.append(backend.admit(list(range(10, 209)), params, CacheScope.private()))
        free.append(backend.cache().free_tokens)
    # Each job reserves 199 + 313 tokens: 2 pages of 256. The batch holds three.
    assert seqs == [0, 1, 2, None]
    assert free == [2048, 1536, 1024, 512, 512]
    first = {step.seq: len(step.tokens) for step in backend.step()}  # the generator starts them
    assert first == {0: 1, 1: 1, 2: 1} and backend.cache().free_tokens == 512, "the pages stay reserved"
    backend.cancel(seqs[1])
    assert backend.cache().free_tokens == 1024, "a cancelled job's pages are free at once"
    second: dict[int, int] = {}
    for step in backend.step():
        second[step.seq] = second.get(step.seq, 0) + len(step.tokens)
    # A step may hand a sequence no token yet (the generator samples on its own threads): count what came.
    assert set(second) == {0, 2}, "a cancelled job makes no more steps"
    long = SamplingParams(max_new_tokens=500)
    assert backend.admit(list(range(10, 1510)), long, CacheScope.private()) is None, "8 pages, 4 free: wait"
    with pytest.raises(NeverFits, match=r"1999 \+ 500 tokens exceed the context \(2048\)"):
        backend.admit(list(range(1, 2000)), long, CacheScope.private())
    ends = drive_all(backend, [seqs[0], seqs[2]])
    assert [ends[seqs[0]][1], len(ends[seqs[2]][0])] == ["length", 313 - first[2] - second[2]]
    assert backend.cache().free_tokens == 2048


def test_a_stop_token_after_half_a_character_keeps_the_half(demo_model_dir: Path) -> None:
    backend, model = backend_for(demo_model_dir, cache_tokens=1024, max_sequences=2)
    eos = 4
    e_acute = backend.encode("é", add_special_tokens=False)  # two byte tokens
    assert len(e_acute) == 2
    prompt = backend.encode(PROMPT, add_special_tokens=True)
    params = SamplingParams(max_new_tokens=16, temperature=0.0)
    model.force(prompt[-1], e_acute[0])
    model.force(e_acute[0], eos)  # half a character, then the end: exllamav2 held the half back
    assert drive(backend, _admit(backend, prompt, params)) == ([e_acute[0]], "stop")
    model.force(e_acute[0], e_acute[1])
    model.force(e_acute[1], eos)
    tokens, finish = drive(backend, _admit(backend, prompt, params))
    assert (tokens, finish) == (e_acute, "stop") and backend.decode(tokens) == "é"


def test_presence_and_frequency_penalties_count_the_answer_not_the_prompt(demo_model_dir: Path) -> None:
    backend, model = backend_for(demo_model_dir, cache_tokens=1024, max_sequences=2)
    prompt = backend.encode(PROMPT, add_special_tokens=True)
    favourite, last, other = prompt[3], prompt[-1], prompt[3] + 1  # two of the prompt's tokens, one not
    assert other not in prompt and favourite != last
    model.table[last, :] = 0.0
    model.table[last, favourite], model.table[last, other] = 2.0, 1.5
    model.force(favourite, favourite)  # the answer would repeat it, but for the penalty...
    model.table[favourite, last] = 49.8  # ...then the prompt's last token, unpenalised...
    model.table[favourite, other] = 49.5  # ...unless the penalty reached into the prompt
    for penalty in ({"presence_penalty": 1.0}, {"frequency_penalty": 1.0}):
        params = SamplingParams(max_new_tokens=2, temperature=0.0, ignore_eos=True, **penalty)
        tokens, _ = drive(backend, _admit(backend, prompt, params))
        assert tokens == [favourite, last], f"{penalty}: over the answer so far, exactly"
    plain = SamplingParams(max_new_tokens=2, temperature=0.0, ignore_eos=True)
    assert drive(backend, _admit(backend, prompt, plain))[0] == [favourite, favourite]


def test_generation_and_cancellation_hold_the_gpu_lock(demo_model_dir: Path) -> None:
    from node.backends import exllamav2_backend as eb

    backend, model = backend_for(demo_model_dir, cache_tokens=1024, max_sequences=2)
    held: list[bool] = []
    forward, cancel = model.forward_chunk, backend._generator.cancel

    def watched_forward(*args: Any, **kwargs: Any) -> Any:
        held.append(eb._GPU.locked())
        return forward(*args, **kwargs)

    def watched_cancel(job: Any) -> None:
        held.append(eb._GPU.locked())
        cancel(job)

    model.forward_chunk, backend._generator.cancel = watched_forward, watched_cancel
    params = SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True)
    seq = _admit(backend, backend.encode(PROMPT, add_special_tokens=True), params)
    backend.step()
    backend.cancel(seq)
    assert len(held) >= 3 and all(held), "every forward pass and the cancellation ran under the lock"


class LayeredModel:
    """Stands in for ``ExLlamaV2`` loading itself: ``load_autosplit_gen``'s protocol (a callback generator
    before each layer and at the end), tensors held by the loader's frame, and a failure at one layer."""

    def __init__(self, layers: int, fail_at: int | None = None, error: str = "") -> None:
        self.layers, self.fail_at, self.error = layers, fail_at, error
        self.loaded: list[int] = []
        self.lock_held: list[bool] = []
        self.unloaded = False
        self.frame_tensor: Any = None

    def load_autosplit_gen(
        self, cache: Any, callback_gen: Callable[[int, int], Iterator[Any]]
    ) -> Iterator[Any]:
        import torch

        from node.backends import exllamav2_backend as eb

        scratch = torch.zeros(1 << 16)  # what the real loader's frame holds: hidden states, reserved VRAM
        self.frame_tensor = weakref.ref(scratch)
        for layer in range(self.layers):
            yield from callback_gen(layer, self.layers)
            self.lock_held.append(eb._GPU.locked())
            self._forward(layer, scratch)
            self.loaded.append(layer)
        yield from callback_gen(self.layers, self.layers)
        self.lock_held.append(eb._GPU.locked())

    def _forward(self, layer: int, hidden: Any) -> None:
        """A layer's trial forward pass, which fails where the memory runs out (its frame holds ``hidden``)."""
        if layer == self.fail_at:
            raise RuntimeError(self.error)

    def unload(self) -> None:
        self.unloaded = True


def test_a_load_goes_layer_by_layer_under_the_lock_and_a_failed_one_frees_what_it_took() -> None:
    from node.backends import exllamav2_backend as eb
    from protocol.errors import ConfigError

    made: list[LayeredModel] = []

    def load(**kwargs: Any) -> tuple[Any, Any]:
        def make() -> LayeredModel:
            made.append(LayeredModel(**kwargs))
            return made[-1]

        return eb._load_layers(make, lambda model: object(), what="big with a cache of 65536 tokens (fp16)")

    model, _ = load(layers=4)
    assert model.loaded == [0, 1, 2, 3] and all(model.lock_held) and not eb._GPU.locked()
    with pytest.raises(
        ConfigError, match=r"^big with a cache .* does not fit in the GPUs' free memory"
    ) as caught:
        load(layers=4, fail_at=2, error="Insufficient VRAM for model and cache")
    failed = made[-1]
    assert failed.loaded == [0, 1] and failed.unloaded
    # Freed before the allocator's cache was emptied, not when the error is dropped (the pool logs it first).
    assert caught.value.__context__ is not None and failed.frame_tensor() is None
    with pytest.raises(RuntimeError, match="something else"):
        load(layers=4, fail_at=0, error="something else")
    assert made[-1].unloaded and not eb._GPU.locked()


def _admit(backend: Any, prompt: list[int], params: SamplingParams) -> int:
    seq = backend.admit(prompt, params, CacheScope.private())
    assert seq is not None
    return int(seq)


async def _collect(runner: JobRunner, prompt: list[int], params: SamplingParams, stops: list[str]) -> str:
    job = runner.submit(prompt, params, stops)
    deltas: list[Delta] = []
    while not deltas or deltas[-1].finish_reason is None:
        deltas += await job.next_deltas()
    return "".join(d.text for d in deltas) + f"|{deltas[-1].finish_reason}"


async def test_the_runner_batches_jobs_to_the_answers_they_give_alone(demo_model_dir: Path) -> None:
    backend, model = backend_for(demo_model_dir, cache_tokens=8192, max_sequences=4)
    runner = JobRunner(backend, name="exllamav2-cpu")
    runner.start()
    try:
        prompts = [backend.encode(f"{PROMPT} {n}", add_special_tokens=True) for n in range(6)]
        alone = [await _collect(runner, p, GREEDY, []) for p in prompts]
        passes = model.forward_passes
        together = await asyncio.gather(*(_collect(runner, p, GREEDY, []) for p in prompts))
        assert together == alone
        assert model.forward_passes - passes < sum(24 + 1 for _ in prompts), "decoding was batched"
        text = alone[0].removesuffix("|length")
        stop = text[len(text) // 2 :][:3]
        cut = await _collect(runner, prompts[0], GREEDY, [stop])
        assert cut == text[: text.index(stop)] + "|stop"
        # A job that leaves mid-answer gives its pages back before the next step.
        job = runner.submit(prompts[1], SamplingParams(max_new_tokens=1500, ignore_eos=True), [])
        await job.next_deltas()
        assert backend.cache().free_tokens < 8192
        job.cancel()
        for _ in range(100):
            if backend.cache().free_tokens == 8192:
                break
            await asyncio.sleep(0.01)
        assert backend.cache().free_tokens == 8192 and runner.active == 0
    finally:
        await asyncio.to_thread(runner.stop)
    assert model.unloaded, "a stopped runner closes the backend"


class StandInNode:
    """The node's model loader, with exllamav2 on the stand-ins: a scheduler and node in this process run
    the exllamav2 backend as `hearth node start` would, but for the GPU."""

    models: ClassVar[list[Any]] = []

    @classmethod
    def load(cls, model: ModelSettings, settings: NodeSettings) -> Any:
        assert model.path is not None
        backend, bigram = backend_for(model.path, cache_tokens=4096, max_sequences=4)
        cls.models.append(bigram)
        return backend


@pytest.fixture(scope="module")
def exl_stack(
    servers: LoopThread, demo_model: ModelSettings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    s = servers.call(start_stack(tmp_path_factory.mktemp("exl-cpu"), [demo_model], loader=StandInNode.load))
    yield s
    servers.call(stop_stack(s))


def test_the_openai_client_through_the_scheduler_to_an_exllamav2_node(exl_stack: Stack) -> None:
    from openai import OpenAI

    stack = exl_stack
    (node,) = httpx.get(
        stack.base_url + "/admin/nodes", headers={"Authorization": f"Bearer {stack.token}"}, timeout=30
    ).json()["nodes"]
    (model,) = node["models"]
    assert (model["page_tokens"], model["max_sequences"], model["cache_tokens"]) == (256, 4, 4096)
    client = OpenAI(base_url=stack.api, api_key=stack.token, max_retries=0)

    def one(i: int) -> str:
        stream = client.chat.completions.create(
            model=DEMO_MODEL_ID, messages=[{"role": "user", "content": f"hello {i % 4}"}], max_tokens=40,
            stream=True, temperature=0,
            extra_body={"ignore_eos": True, "top_k": 40, "min_p": 0.05, "repetition_penalty": 1.1},
        )  # fmt: skip
        return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    (bigram,) = StandInNode.models
    passes = bigram.forward_passes
    with ThreadPoolExecutor(8) as pool:  # eight streams at once, four at a time on the node
        answers = list(pool.map(one, range(8)))
    assert all(answers) and answers[:4] == answers[4:], "greedy answers do not depend on their neighbours"
    assert bigram.forward_passes - passes < 8 * 40, "the node batched the streams"
    done = client.chat.completions.create(
        model=DEMO_MODEL_ID, messages=[{"role": "user", "content": "hello 0"}], max_tokens=40, temperature=0,
        extra_body={"ignore_eos": True, "top_k": 40, "min_p": 0.05, "repetition_penalty": 1.1},
    )  # fmt: skip
    assert done.choices[0].message.content == answers[0]
    assert done.usage is not None and done.usage.completion_tokens == 40


def test_the_prompt_and_answer_never_reach_logs_output_or_disk(
    exl_stack: Stack, caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    canary = "quokka-canary-51e2"
    caplog.set_level(logging.DEBUG)
    body = {"model": DEMO_MODEL_ID, "prompt": f"Tell me about {canary}.", "max_tokens": 24, "temperature": 0}
    answers = []
    for stream in (False, True):
        r = httpx.post(
            exl_stack.api + "/completions", json={**body, "stream": stream},
            headers={"Authorization": f"Bearer {exl_stack.token}"}, timeout=60,
        )  # fmt: skip
        assert r.status_code == 200, r.text
        if not stream:
            answers.append(r.json()["choices"][0]["text"])
    (answer,) = answers
    assert len(answer.strip()) >= 16, "a distinctive answer to look for"
    out, err = capfd.readouterr()
    client_side = ("httpx", "httpcore")
    logged = "\n".join(r.getMessage() for r in caplog.records if not r.name.startswith(client_side))
    for seen in (out, err, logged):
        assert canary not in seen and answer.strip() not in seen
    for path in exl_stack.data_dir.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert canary.encode() not in data and answer.strip().encode() not in data, path


def test_through_the_scheduler_only_the_same_user_reuses_cached_prompt_pages(exl_stack: Stack) -> None:
    stack = exl_stack
    store = Store(stack.data_dir / "hearth.db")
    other, _ = store.create_token("cache-other", "user")
    store.close()
    (bigram,) = StandInNode.models
    long = " ".join(f"word{n}" for n in range(300))  # several pages of prompt

    def prefilled(token: str) -> int:
        before = bigram.prompt_tokens
        body = {"model": DEMO_MODEL_ID, "messages": [{"role": "user", "content": long}], "max_tokens": 2}
        r = httpx.post(
            stack.api + "/chat/completions",
            json=body,
            headers={"Authorization": f"Bearer {token}"},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        return bigram.prompt_tokens - before

    first = prefilled(stack.token)
    assert first > 512
    again, theirs = prefilled(stack.token), prefilled(other)
    assert again <= first - 256 * (first // 256), "the same user's repeat reuses their whole pages"
    assert theirs == first, "another user's identical prompt reuses nothing"


def test_another_model_loads_and_unloads_while_one_streams(
    servers: LoopThread, demo_model: ModelSettings, tmp_path_factory: pytest.TempPathFactory
) -> None:
    from openai import OpenAI

    loaded: dict[str, Any] = {}

    def loader(model: ModelSettings, settings: NodeSettings) -> Any:
        assert model.path is not None
        backend, bigram = backend_for(model.path, cache_tokens=2048, max_sequences=2, delay=0.01)
        loaded[model.model_id] = bigram
        return backend

    first = demo_model.model_copy(update={"id": "exl-first"})
    second = demo_model.model_copy(update={"id": "exl-second", "preload": False})
    stack = servers.call(
        start_stack(tmp_path_factory.mktemp("exl-two"), [first, second], loader=loader, wait_ready=False)
    )
    try:
        servers.call(wait_for(lambda: _phase(stack, "exl-first", "ready"), within=60))
        client = OpenAI(base_url=stack.api, api_key=stack.token, max_retries=0)
        stream = client.completions.create(
            model="exl-first", prompt="Once upon a time", max_tokens=400, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
        )  # fmt: skip
        chunks = iter(stream)
        text = next(chunks).choices[0].text  # streaming: 400 tokens at 10 ms a pass take 4 s

        def node(action: str) -> dict[str, Any]:
            path = f"/models/exl-second/{action}"
            r = httpx.post(
                stack.node_url + path,
                content=b"{}",
                headers=stack.node_headers("POST", path, b"{}"),
                timeout=30,
            )
            assert r.status_code in (200, 202), r.text
            return dict(r.json())

        node("load")
        servers.call(wait_for(lambda: _phase(stack, "exl-second", "ready"), within=30))
        done = client.completions.create(model="exl-second", prompt="Hello", max_tokens=5, temperature=0)
        assert done.usage is not None and done.usage.completion_tokens > 0
        node("unload")
        servers.call(wait_for(lambda: _unloaded(loaded["exl-second"]), within=30))
        assert not loaded["exl-first"].unloaded
        rest = list(chunks)
        assert len(rest) > 10, "the first model was still streaming while the second came and went"
        text += "".join(c.choices[0].text for c in rest if c.choices)
        (usage,) = [c.usage for c in rest if c.usage is not None]
        assert usage.completion_tokens == 400 and text
        assert rest[-2].choices[0].finish_reason == "length"
    finally:
        servers.call(stop_stack(stack))


async def _phase(stack: Stack, model_id: str, phase: str) -> bool:
    return any(m.id == model_id and m.phase == phase for n in stack.snapshot().nodes for m in n.models)


async def _unloaded(bigram: Any) -> bool:
    return bool(bigram.unloaded)


def test_the_tokenizer_endpoints_answer_from_an_exllamav2_node(exl_stack: Stack) -> None:
    """POST /tokenize and /detokenize round-trip through the exllamav2 backend's own tokenizer."""
    h = {"Authorization": f"Bearer {exl_stack.token}"}
    text = "The quick brown fox"
    tokens = httpx.post(
        exl_stack.base_url + "/tokenize", json={"prompt": text, "add_special_tokens": False}, headers=h,
        timeout=60,
    )  # fmt: skip
    assert tokens.status_code == 200, tokens.text
    ids = tokens.json()["tokens"]
    assert ids and tokens.json()["count"] == len(ids)
    back = httpx.post(exl_stack.base_url + "/detokenize", json={"tokens": ids}, headers=h, timeout=60)
    assert back.status_code == 200, back.text
    assert back.json()["prompt"].strip() == text
    info = httpx.get(exl_stack.base_url + "/tokenizer_info", headers=h, timeout=60)
    assert info.status_code == 200, info.text
    assert info.json()["chat_template"] and info.json()["model_max_length"] > 0
