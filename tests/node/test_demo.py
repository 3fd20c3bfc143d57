"""The demo model must load through the same transformers calls the node uses for real models."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from node.backends.transformers_backend import cache_kwargs
from node.demo import DEMO_MODEL_ID, FORMAT_VERSION, MARKER, build_demo_model, is_complete

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

EXPECTED_FILES = {
    MARKER,
    "chat_template.jinja",
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer_config.json",
}


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_demo_model(tmp_path_factory.mktemp("demo") / DEMO_MODEL_ID)


@pytest.fixture(scope="module")
def tokenizer(demo_dir: Path) -> Any:
    return transformers.AutoTokenizer.from_pretrained(demo_dir)


@pytest.fixture(scope="module")
def model(demo_dir: Path) -> Any:
    loaded, info = transformers.AutoModelForCausalLM.from_pretrained(demo_dir, output_loading_info=True)
    # A silently re-initialised weight would make the "same seed, same model" promise meaningless.
    assert not info["missing_keys"]
    assert not info["unexpected_keys"]
    assert not info["mismatched_keys"]
    return loaded.eval()


def test_build_writes_hugging_face_layout(demo_dir: Path) -> None:
    assert {p.name for p in demo_dir.iterdir()} == EXPECTED_FILES
    assert (demo_dir / MARKER).read_text(encoding="utf-8").strip() == FORMAT_VERSION
    assert is_complete(demo_dir)
    assert not list(demo_dir.parent.glob(".*")), "staging or trash directories were left behind"


def test_config_is_the_small_llama_the_node_reports(model: Any, tokenizer: Any) -> None:
    cfg = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert cfg.max_position_embeddings == 2048
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads) == (64, 2, 4)
    assert cfg.num_key_value_heads == 2
    assert cfg.tie_word_embeddings
    assert model.dtype == torch.float32
    assert cfg.vocab_size == len(tokenizer)
    assert 2000 <= len(tokenizer) <= 4000


@pytest.mark.parametrize(
    "text",
    [
        "Hello, world! The next train leaves at 9:30.",
        "Crème brûlée, naïve façade, Ångström, ñandú",
        "Party 🎉👋🏽 family 👨‍👩‍👧 flags 🇫🇷",
        "你好，世界 — こんにちは — Привет",
        "  leading spaces,\ttabs\nand\r\nnewlines  ",
    ],
)
def test_tokenizer_round_trips_any_text(tokenizer: Any, text: str) -> None:
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text
    assert tokenizer.unk_token_id not in ids  # byte-level: nothing is ever unknown


def test_special_tokens_stop_chat_replies(demo_dir: Path, tokenizer: Any, model: Any) -> None:
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.bos_token == "<s>"
    assert tokenizer.pad_token == "</s>"
    assert tokenizer.convert_tokens_to_ids("<|im_start|>") != tokenizer.unk_token_id
    eos_ids = model.generation_config.eos_token_id
    assert set(eos_ids) == {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("</s>")}
    # Special tokens in text must map to single ids, or stop detection on ids would never fire.
    assert tokenizer.encode("<|im_end|>", add_special_tokens=False) == [tokenizer.eos_token_id]


def test_chat_template_renders_chatml(tokenizer: Any) -> None:
    assert tokenizer.chat_template
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi ☕"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye"},
    ]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\nHi ☕<|im_end|>\n"
        "<|im_start|>assistant\nHello.<|im_end|>\n"
        "<|im_start|>user\nBye<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert rendered.endswith("<|im_start|>assistant\n")


def test_forward_pass_gives_logits_over_the_vocab(model: Any, tokenizer: Any) -> None:
    ids = torch.tensor([tokenizer.encode("The library opens at nine.", add_special_tokens=False)])
    with torch.inference_mode():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], len(tokenizer))
    assert torch.isfinite(logits).all()


def test_token_by_token_decode_with_kv_cache_matches_full_forward(model: Any, tokenizer: Any) -> None:
    # The node's CPU backend decodes this way; the cache must carry positions on its own.
    ids = torch.tensor([tokenizer.encode("A garden teaches patience, they say.", add_special_tokens=False)])
    n_prompt = ids.shape[1] - 4
    with torch.inference_mode():
        full = model(input_ids=ids).logits
        out = model(input_ids=ids[:, :n_prompt], use_cache=True)
        for pos in range(n_prompt, ids.shape[1]):
            out = model(input_ids=ids[:, pos : pos + 1], use_cache=True, **cache_kwargs(model, out))
            torch.testing.assert_close(out.logits[0, -1], full[0, pos], atol=1e-5, rtol=1e-4)
    (cache,) = cache_kwargs(model, out).values()
    assert cache.get_seq_length() == ids.shape[1]


def test_same_seed_gives_identical_model(demo_dir: Path, tmp_path: Path) -> None:
    again = build_demo_model(tmp_path / "again", seed=0)
    other = build_demo_model(tmp_path / "other", seed=1)
    first = safetensors_torch.load_file(demo_dir / "model.safetensors")
    second = safetensors_torch.load_file(again / "model.safetensors")
    third = safetensors_torch.load_file(other / "model.safetensors")
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name
    assert not torch.equal(first["model.embed_tokens.weight"], third["model.embed_tokens.weight"])
    assert (demo_dir / "tokenizer.json").read_bytes() == (again / "tokenizer.json").read_bytes()


def test_second_build_reuses_the_finished_model(demo_dir: Path) -> None:
    weights = demo_dir / "model.safetensors"
    before = weights.stat().st_mtime_ns
    started = time.monotonic()
    assert build_demo_model(demo_dir) == demo_dir
    assert time.monotonic() - started < 0.5
    assert weights.stat().st_mtime_ns == before


@pytest.mark.parametrize("marker", [None, "0\n"], ids=["no-marker", "old-format"])
def test_incomplete_or_outdated_directory_is_rebuilt(tmp_path: Path, marker: str | None) -> None:
    target = tmp_path / "demo"
    target.mkdir()
    (target / "config.json").write_text("{", encoding="utf-8")  # as if killed mid-write
    if marker is not None:
        (target / MARKER).write_text(marker, encoding="utf-8")
    assert not is_complete(target)
    build_demo_model(target)
    assert is_complete(target)
    assert {p.name for p in target.iterdir()} == EXPECTED_FILES
    transformers.AutoConfig.from_pretrained(target)  # the truncated config was replaced


def test_leftover_staging_from_a_killed_builder_is_swept(tmp_path: Path) -> None:
    stale = tmp_path / ".demo.building-dead"
    stale.mkdir()
    (stale / "tokenizer.json").write_text("{}", encoding="utf-8")
    os.utime(stale, (0, 0))
    build_demo_model(tmp_path / "demo")
    assert not stale.exists()


def test_refuses_to_delete_a_directory_that_is_not_ours(tmp_path: Path) -> None:
    target = tmp_path / "precious"
    target.mkdir()
    (target / "thesis.tex").write_text("years of work", encoding="utf-8")
    with pytest.raises(FileExistsError, match=r"thesis\.tex"):
        build_demo_model(target)
    assert (target / "thesis.tex").read_text(encoding="utf-8") == "years of work"
    assert not list(tmp_path.glob(".*")), "staging was not cleaned up after the refusal"


def test_concurrent_builders_leave_one_complete_model(tmp_path: Path) -> None:
    target = tmp_path / "demo"
    results: list[Path] = []
    errors: list[BaseException] = []

    def build() -> None:
        try:
            results.append(build_demo_model(target))
        except BaseException as exc:  # surfaced below; a thread would otherwise swallow it
            errors.append(exc)

    threads = [threading.Thread(target=build) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert results == [target] * 3
    assert is_complete(target)
    assert {p.name for p in target.iterdir()} == EXPECTED_FILES
    assert not list(tmp_path.glob(".*"))


def test_importing_the_module_does_not_import_ml_runtimes() -> None:
    code = "import sys, node.demo; sys.exit(bool({'torch', 'transformers', 'tokenizers'} & set(sys.modules)))"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])
