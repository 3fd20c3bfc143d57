"""The real `hearth up --demo` command, as a new user runs it: start, chat, tokens, Ctrl-C.

It also carries the privacy canary: a unique string goes through every kind of request (chat and
completions, streaming and not, refused ones, an abandoned stream) and afterwards must appear nowhere in
the logs or in any file under the data directory (database, WAL, models, everything).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

HEARTH = str(Path(sys.executable).with_name("hearth"))


@dataclass
class Running:
    proc: subprocess.Popen[bytes]
    api: str
    token: str
    data_dir: Path
    stdout: Path
    stderr: Path


def _start(data_dir: Path, logs: Path, token: str | None = None) -> Running:
    """`hearth up --demo` on ``data_dir``. ``token``: the admin token of an earlier start on it (only the
    first start prints one)."""
    n = len(list(logs.glob("stdout*.log")))
    stdout, stderr = logs / f"stdout.{n}.log", logs / f"stderr.{n}.log"
    env = {**os.environ, "HEARTH_LOG_LEVEL": "DEBUG", "HF_HUB_OFFLINE": "1"}
    with stdout.open("wb") as out, stderr.open("wb") as err:
        proc = subprocess.Popen(
            [HEARTH, "up", "--demo", "--port", "0", "--data-dir", str(data_dir)],
            stdout=out,
            stderr=err,
            stdin=subprocess.DEVNULL,
            env=env,
        )
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        text = stdout.read_text()
        api, printed = re.search(r"API base URL: (\S+)", text), re.search(r"API token:\s+(hth_\S+)", text)
        known = token or (printed.group(1) if printed else None)
        if api and known:
            return Running(proc, api.group(1), known, data_dir, stdout, stderr)
        if proc.poll() is not None:
            pytest.fail(f"hearth up exited early:\n{stderr.read_text()[-2000:]}")
        time.sleep(0.2)
    proc.kill()
    pytest.fail("hearth up did not print its URL and token in time")


@pytest.fixture(scope="module")
def started(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    """`hearth up` started once on a fresh data directory (a test may have stopped it since)."""
    base = tmp_path_factory.mktemp("up")
    (base / "logs").mkdir()
    run = _start(base / "data", base / "logs")
    yield run
    if run.proc.poll() is None:
        run.proc.kill()
        run.proc.wait()


@pytest.fixture
def running(started: Running) -> Running:
    """`hearth up`, answering: started again on the same data directory (so with the same admin token) if a
    test before stopped it, as its user would after Ctrl-C."""
    if started.proc.poll() is not None:
        again = _start(started.data_dir, started.stdout.parent, token=started.token)
        started.proc, started.api = again.proc, again.api
        started.stdout, started.stderr = again.stdout, again.stderr
    return started


def test_chat_through_hearth_up(running: Running) -> None:
    client = openai.OpenAI(base_url=running.api, api_key=running.token, max_retries=0)
    assert [m.id for m in client.models.list().data] == ["hearth-demo"]
    r = client.chat.completions.create(
        model="hearth-demo", messages=[{"role": "user", "content": "hello"}], max_tokens=8
    )
    assert r.usage is not None and r.usage.completion_tokens > 0


def test_tokens_cli_against_the_running_server(running: Running) -> None:
    created = subprocess.run(
        [HEARTH, "tokens", "create", "--name", "alice", "--data-dir", str(running.data_dir)],
        capture_output=True,
        text=True,
        check=True,
    )
    token = created.stdout.strip()
    assert re.fullmatch(r"hth_[A-Za-z0-9_-]{40,}", token), "create prints the token alone on stdout"
    headers = {"Authorization": f"Bearer {token}"}
    assert httpx.get(running.api + "/models", headers=headers).status_code == 200
    listed = subprocess.run(
        [HEARTH, "tokens", "list", "--data-dir", str(running.data_dir)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "alice" in listed and token not in listed
    token_id = next(line.split()[0] for line in listed.splitlines() if line.endswith("alice"))
    subprocess.run(
        [HEARTH, "tokens", "revoke", token_id, "--data-dir", str(running.data_dir)],
        check=True,
        capture_output=True,
    )
    assert httpx.get(running.api + "/models", headers=headers).status_code == 401
    bad = subprocess.run(
        [HEARTH, "tokens", "revoke", "tok_nope", "--data-dir", str(running.data_dir)],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 1
    assert bad.stderr.startswith("hearth: error:") and "Traceback" not in bad.stderr


def test_canary_never_reaches_logs_or_disk(running: Running) -> None:
    canary = f"CANARY-{uuid.uuid4().hex}"
    client = openai.OpenAI(base_url=running.api, api_key=running.token, max_retries=0)
    chat = [{"role": "system", "content": f"system {canary}"}, {"role": "user", "content": f"say {canary}"}]
    client.chat.completions.create(model="hearth-demo", messages=chat, max_tokens=4)  # type: ignore[arg-type]
    list(client.chat.completions.create(model="hearth-demo", messages=chat, max_tokens=4, stream=True))  # type: ignore[arg-type]
    client.completions.create(model="hearth-demo", prompt=canary, max_tokens=4)
    list(client.completions.create(model="hearth-demo", prompt=canary, max_tokens=4, stream=True))
    client.chat.completions.create(model="hearth-demo", messages=chat, max_tokens=4, stop=[canary])  # type: ignore[arg-type]
    # Refused requests: too long for the context, a malformed field, an unknown role, a bad model.
    for bad in (
        {"model": "hearth-demo", "messages": [{"role": "user", "content": (canary + " ") * 600}]},
        {"model": "hearth-demo", "messages": chat, "temperature": canary},
        {"model": "hearth-demo", "messages": [{"role": canary, "content": canary}]},
        {"model": "no-such-model", "messages": chat},
    ):
        r = httpx.post(
            running.api + "/chat/completions",
            json=bad,
            headers={"Authorization": f"Bearer {running.token}"},
            timeout=30,
        )
        assert r.status_code in (400, 404)
        assert canary not in r.text
    # An abandoned stream.
    with httpx.stream(
        "POST",
        running.api + "/chat/completions",
        timeout=30,
        json={"model": "hearth-demo", "messages": chat, "max_tokens": 500, "stream": True},
        headers={"Authorization": f"Bearer {running.token}"},
    ) as r:
        next(r.iter_lines())
    time.sleep(0.5)

    leaks = [str(p) for p in _all_files(running) if canary.encode() in p.read_bytes()]
    assert leaks == [], f"the canary was written to {leaks}"


def _all_files(running: Running) -> list[Path]:
    files = [p for p in running.data_dir.rglob("*") if p.is_file()]
    assert any(p.name == "hearth.db" for p in files)
    return [*files, running.stdout, running.stderr]


def test_ctrl_c_shuts_down_cleanly(running: Running) -> None:
    running.proc.send_signal(signal.SIGINT)
    assert running.proc.wait(timeout=30) == 0
    err = running.stderr.read_text()
    assert "Traceback" not in err
    assert "Shutting down" in running.stdout.read_text()
    # Nothing left listening.
    with pytest.raises(httpx.ConnectError):
        httpx.get(running.api.removesuffix("/v1") + "/healthz", timeout=2)
    # Second start: no new admin token is printed (it was shown once).


def test_second_start_does_not_print_a_new_admin_token(started: Running, tmp_path: Path) -> None:
    again = _start_no_token(started.data_dir, tmp_path)
    assert "hth_" not in again


def _start_no_token(data_dir: Path, logs: Path) -> str:
    out = logs / "out.log"
    with out.open("wb") as fh:
        proc = subprocess.Popen(
            [HEARTH, "up", "--demo", "--port", "0", "--data-dir", str(data_dir)],
            stdout=fh,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
        )
    try:
        deadline = time.monotonic() + 120
        while "Press Ctrl-C" not in out.read_text():
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
    return out.read_text()


def test_offline_hugging_face_id_fails_in_one_line(tmp_path: Path) -> None:
    r = subprocess.run(
        [HEARTH, "up", "--model", "someorg/somemodel", "--port", "0", "--data-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert r.returncode == 1
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "offline" in lines[0] and lines[0].startswith("hearth: error:")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "choose one"),  # neither --demo nor --model
        (["--demo", "--model", "x/y"], "choose one"),  # both
        (["--model", "/no/such/dir"], "neither a model directory"),  # a path that does not exist
    ],
)
def test_bad_up_arguments_fail_in_one_line(args: list[str], message: str, tmp_path: Path) -> None:
    r = subprocess.run(
        [HEARTH, "up", *args, "--data-dir", str(tmp_path)], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 1
    assert message in r.stderr and "Traceback" not in r.stderr
