"""Docs that run, and everything documented.

Static checks keep docs/ in step with the code: every setting, CLI command and option, and scheduler route
must be documented, and the sample settings file must load. The live checks start the real `hearth up
--demo` as a user would and run the documentation's own curl and Python examples against it, so an example
that stops working fails here first.
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import types
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union, get_args, get_origin

import click
import pytest
from pydantic import BaseModel, SecretStr
from pydantic.fields import FieldInfo

from hearth.cli import main
from hearth.config import HearthSettings, load_settings
from scheduler.app import create_app
from scheduler.settings import SchedulerSettings

DOCS = Path(__file__).resolve().parent.parent / "docs"
QUICKSTART = DOCS / "quickstart.md"
API = DOCS / "api.md"
CONFIGURATION = DOCS / "configuration.md"
# Where the docs write the server's address; the live tests put the real one in its place.
DOC_ROOT_URL = "http://127.0.0.1:8000"


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


@dataclass(frozen=True)
class Block:
    lang: str
    code: str
    start: int  # offsets in the document, to tell which blocks sit next to each other
    end: int


def _blocks(text: str, lang: str | None = None) -> list[Block]:
    # Indented fences (inside list items) count too; their indentation is removed.
    pattern = re.compile(r"^([ \t]*)```(\w*)\n(.*?)^\1```[ \t]*$", re.MULTILINE | re.DOTALL)
    found = []
    for m in pattern.finditer(text):
        indent = m.group(1)
        code = "".join(line.removeprefix(indent) for line in m.group(3).splitlines(keepends=True))
        found.append(Block(m.group(2), code, m.start(), m.end()))
    return [b for b in found if lang is None or b.lang == lang]


# ----- settings -----


def _unwrap(annotation: Any) -> tuple[type[BaseModel] | None, bool]:
    """The nested settings model behind a field's annotation (if any), and whether it is a list of them."""
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        return _unwrap(args[0]) if len(args) == 1 else (None, False)
    if origin is list:
        inner, _ = _unwrap(get_args(annotation)[0])
        return inner, inner is not None
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation, False
    return None, False


def _settings(
    model: type[BaseModel] = HearthSettings, prefix: str = ""
) -> Iterator[tuple[str, FieldInfo, bool]]:
    """(dotted name, field, is a section) for every field, depth first; list items are written `name[]`."""
    for name, field in model.model_fields.items():
        dotted = prefix + name
        nested, is_list = _unwrap(field.annotation)
        yield dotted, field, nested is not None and not is_list
        if nested is not None:
            yield from _settings(nested, dotted + ("[]." if is_list else "."))


SETTINGS = list(_settings())
SETTING_IDS = [name for name, _, _ in SETTINGS]


def test_the_walk_reaches_every_nested_model() -> None:
    # Guards the walker itself: a settings model it fails to enter would leave its fields unchecked.
    names = set(SETTING_IDS)
    for expected in (
        "scheduler.max_body_bytes",
        "scheduler.policy.max_tokens_cap",
        "scheduler.policy.tiers",
        "node.threads",
        "node.models[].truncation",
    ):
        assert expected in names


@pytest.mark.parametrize(("name", "field", "section"), SETTINGS, ids=SETTING_IDS)
def test_every_setting_has_a_description(name: str, field: FieldInfo, section: bool) -> None:
    assert field.description and field.description.strip(), f"{name} has no description"


@pytest.mark.parametrize(("name", "field", "section"), SETTINGS, ids=SETTING_IDS)
def test_every_setting_is_in_the_configuration_reference(name: str, field: FieldInfo, section: bool) -> None:
    assert f"`{name}`" in _read(CONFIGURATION), f"docs/configuration.md does not mention `{name}`"


def _reference_rows() -> dict[str, list[str]]:
    """The rows of the "Every setting" tables: dotted name -> [type, default, description]."""
    text = _read(CONFIGURATION)
    section = text.split("\n## Every setting\n", 1)[1].split("\n## ", 1)[0]
    rows: dict[str, list[str]] = {}
    for line in section.splitlines():
        m = re.match(r"^\| `([^`]+)` \|(.*)\|$", line)
        if m:
            cells = [c.strip() for c in m.group(2).split("|")]
            assert len(cells) == 3, f"malformed row for {m.group(1)} (no '|' in cells, please): {line}"
            assert m.group(1) not in rows, f"{m.group(1)} is listed twice"
            rows[m.group(1)] = cells
    return rows


def _toml_literal(value: Any) -> str | None:
    """How a default is written in the reference (TOML syntax), or None where it is described in words."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    if isinstance(value, Path):
        value = str(value)
    if isinstance(value, str):
        return json.dumps(value)
    if value == []:
        return "[]"
    return None


def test_the_reference_tables_list_exactly_the_settings() -> None:
    rows = _reference_rows()
    leaves = {name for name, _, section in SETTINGS if not section}
    assert leaves - rows.keys() == set(), "settings missing from the tables"
    assert rows.keys() - {name for name, _, _ in SETTINGS} == set(), "table rows that are no setting"


LEAVES = [(name, field) for name, field, section in SETTINGS if not section]


@pytest.mark.parametrize(("name", "field"), LEAVES, ids=[name for name, _ in LEAVES])
def test_documented_defaults_are_the_real_ones(name: str, field: FieldInfo) -> None:
    rows = _reference_rows()
    if name not in rows:
        pytest.skip("reported by test_the_reference_tables_list_exactly_the_settings")
    default_cell = rows[name][1]
    if field.is_required():
        assert default_cell == "required"
        return
    if field.default_factory is not None:
        value = field.get_default(call_default_factory=True)
        if value != []:  # machine-dependent (data_dir): described in words
            return
    else:
        value = field.default
    if value is None:
        assert default_cell.startswith("unset"), f"{name}: the default is unset, the docs say {default_cell}"
        return
    literal = _toml_literal(value)
    assert literal is not None, f"{name}: no way to write the default {value!r}; extend _toml_literal"
    assert f"`{literal}`" in default_cell, f"{name}: the default is {literal}, the docs say {default_cell}"


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for key in list(os.environ):
        if key.upper().startswith("HEARTH_"):
            monkeypatch.delenv(key)
    return monkeypatch


def test_the_sample_settings_file_loads_and_holds_the_defaults(
    clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    sample = _blocks(_read(CONFIGURATION), "toml")[0]
    path = tmp_path / "hearth.toml"
    path.write_text(sample.code, encoding="utf-8")
    loaded = load_settings(path)
    # The docs promise the sample changes nothing until edited; data_dir is commented out there.
    assert loaded.model_dump(exclude={"data_dir"}) == load_settings(None).model_dump(exclude={"data_dir"})


def test_every_toml_example_loads(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    blocks = [b for doc in (QUICKSTART, API, CONFIGURATION) for b in _blocks(_read(doc), "toml")]
    assert blocks
    for i, block in enumerate(blocks):
        tomllib.loads(block.code)
        path = tmp_path / f"example-{i}.toml"
        path.write_text(block.code, encoding="utf-8")
        load_settings(path)


def test_precedence_is_flags_then_environment_then_file_then_defaults(
    clean_env: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = tmp_path / "hearth.toml"
    path.write_text('[scheduler]\nport = 1111\nhost = "10.0.0.1"\n', encoding="utf-8")
    assert load_settings(None).scheduler.port == 8000
    assert load_settings(path).scheduler.port == 1111
    clean_env.setenv("HEARTH_SCHEDULER__PORT", "2222")
    assert load_settings(path).scheduler.port == 2222
    flagged = load_settings(path, scheduler={"port": 3333})
    assert flagged.scheduler.port == 3333
    assert flagged.scheduler.host == "10.0.0.1", "sections merge key by key"


# ----- command line -----


def _commands(cmd: click.Command, path: tuple[str, ...] = ("hearth",)) -> Iterator[tuple[str, click.Command]]:
    yield " ".join(path), cmd
    if isinstance(cmd, click.Group):
        for name, sub in sorted(cmd.commands.items()):
            yield from _commands(sub, (*path, name))


COMMANDS = list(_commands(main))


def _user_docs() -> str:
    return "\n".join(
        _read(p)
        for p in (
            QUICKSTART,
            API,
            CONFIGURATION,
            DOCS / "operators.md",
            DOCS / "volunteers.md",
            DOCS / "policies.md",
            DOCS / "planning.md",
        )
    )


@pytest.mark.parametrize(("path", "command"), COMMANDS, ids=[p for p, _ in COMMANDS])
def test_every_command_is_documented_and_has_help(path: str, command: click.Command) -> None:
    assert command.help and command.help.strip(), f"`{path}` has no help text"
    docs = _user_docs()
    assert path in docs, f"`{path}` is not in the docs"
    for param in command.params:
        if isinstance(param, click.Option):
            flags = [o for o in param.opts if o.startswith("--")]
            assert param.help, f"{path} {flags[0]} has no help text"
            assert any(f in docs for f in flags), f"{path} {flags[0]} is not in the docs"
        elif isinstance(param, click.Argument):
            metavar = (param.name or "").upper()
            assert metavar in docs, f"{path} argument {metavar} is not in the docs"


# ----- endpoints -----


def _routes(tmp_path: Path) -> set[tuple[str, str]]:
    app = create_app(SchedulerSettings(data_dir=tmp_path))
    return {
        (r.method, r.resource.canonical) for r in app.router.routes() if r.method != "HEAD" and r.resource
    }


def test_every_route_is_documented(tmp_path: Path) -> None:
    routes = _routes(tmp_path)
    assert routes
    headings = set(re.findall(r"^## ([A-Z]+) (/\S*)$", _read(API), re.MULTILINE))
    assert routes - headings == set(), "routes without a section in docs/api.md"
    assert headings - routes == set(), "sections in docs/api.md for routes that do not exist"


# ----- docs that run: a real `hearth up --demo` -----


def _hearth() -> list[str]:
    script = Path(sys.executable).with_name("hearth")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from hearth.cli import main; main()"]


@dataclass
class Server:
    base_url: str  # ends in /v1, as the banner prints it
    token: str
    data_dir: Path
    workdir: Path
    env: dict[str, str]

    @property
    def root(self) -> str:
        return self.base_url.removesuffix("/v1")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("HEARTH_")}
    # Loopback only: a configured HTTP proxy must not see (or break) requests to the test server.
    env.update(NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost", HF_HUB_OFFLINE="1")
    env.update(HEARTH_DEMO_MODEL="random")  # the generated demo, ready in seconds; the examples hold for both
    env.update(PYTHONIOENCODING="utf-8", **extra)
    return env


def _read_until(proc: subprocess.Popen[bytes], marker: bytes, timeout: float) -> bytes:
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    out = b""
    deadline = time.monotonic() + timeout
    while marker not in out:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"no {marker!r} from hearth up within {timeout:.0f} s; stdout so far: {out!r}")
        ready, _, _ = select.select([fd], [], [], remaining)
        if ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                raise RuntimeError(f"hearth up exited before it was ready; stdout: {out!r}")
            out += chunk
    return out


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    base = tmp_path_factory.mktemp("docs-live")
    data_dir = base / "data"
    workdir = base / "work"
    workdir.mkdir()
    stderr_path = base / "hearth-up.stderr"
    with stderr_path.open("wb") as stderr:
        proc = subprocess.Popen(
            [*_hearth(), "up", "--demo", "--host", "127.0.0.1", "--port", "0", "--data-dir", str(data_dir)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=stderr,
            env=_env(),
            cwd=workdir,
        )
    try:
        try:
            banner = _read_until(proc, b"Press Ctrl-C to stop.", timeout=180).decode("utf-8", "replace")
        except (TimeoutError, RuntimeError) as exc:
            log = stderr_path.read_text(encoding="utf-8", errors="replace")[-4000:]
            pytest.fail(f"{exc}\nstderr:\n{log}")
        url = re.search(r"API base URL: (\S+)", banner)
        token = re.search(r"API token:\s+(hth_\S+)", banner)
        assert url and token, banner
        env = _env(HEARTH_BASE_URL=url.group(1), HEARTH_TOKEN=token.group(1))
        yield Server(url.group(1), token.group(1), data_dir, workdir, env)
    finally:
        # Ctrl-C, as the quickstart says: the server must stop by itself, promptly and cleanly.
        proc.send_signal(signal.SIGINT)
        try:
            rest, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            pytest.fail("hearth up did not stop within 60 s of SIGINT")
    log = stderr_path.read_text(encoding="utf-8", errors="replace")[-4000:]
    assert proc.returncode == 0, f"hearth up exited with {proc.returncode} after SIGINT\nstderr:\n{log}"
    assert "Shutting down" in rest.decode("utf-8", "replace")


def _python_examples() -> list[tuple[str, str]]:
    return [
        (f"{doc.name}#{i}", block.code)
        for doc in (QUICKSTART, API)
        for i, block in enumerate(_blocks(_read(doc), "python"))
    ]


PYTHON_EXAMPLES = _python_examples()


def test_the_quickstart_has_sync_and_streaming_openai_examples() -> None:
    quickstart = [code for name, code in PYTHON_EXAMPLES if name.startswith("quickstart")]
    assert any("stream=True" in code for code in quickstart)
    assert any("stream=True" not in code and "chat.completions.create" in code for code in quickstart)


def test_the_quickstart_has_structured_output_and_tool_loop_examples() -> None:
    quickstart = [code for name, code in PYTHON_EXAMPLES if name.startswith("quickstart")]
    assert any("chat.completions.parse" in code and "response_format=" in code for code in quickstart)
    assert any("tool_choice=" in code and '"role": "tool"' in code for code in quickstart)


@pytest.mark.parametrize(("name", "code"), PYTHON_EXAMPLES, ids=[n for n, _ in PYTHON_EXAMPLES])
def test_python_example_runs(server: Server, name: str, code: str) -> None:
    pytest.importorskip("openai")
    result = subprocess.run(
        [sys.executable, "-c", code], env=server.env, cwd=server.workdir, capture_output=True, timeout=120
    )
    assert result.returncode == 0, f"{name} failed:\n{result.stderr.decode(errors='replace')}"


def _curl_examples() -> list[tuple[str, str, str | None]]:
    """(id, shell code, the JSON answer printed right after it in the docs, if any)."""
    examples = []
    for doc in (QUICKSTART, API):
        text = _read(doc)
        blocks = _blocks(text)
        for i, block in enumerate(blocks):
            first = next((ln for ln in block.code.splitlines() if ln.strip() and not ln.startswith("#")), "")
            if block.lang != "sh" or not first.startswith("curl "):
                continue
            nxt = blocks[i + 1] if i + 1 < len(blocks) else None
            answer = None
            if nxt is not None and nxt.lang == "json" and not text[block.end : nxt.start].strip():
                answer = nxt.code
            examples.append((f"{doc.name}#{i}", block.code, answer))
    return examples


CURL_EXAMPLES = _curl_examples()


def _same_shape(real: Any, documented: Any, where: str = "$") -> None:
    """The documented answer has the real one's keys and value types (the text and ids differ per run)."""
    if isinstance(documented, dict):
        assert isinstance(real, dict), where
        assert set(real) == set(documented), f"{where}: keys {sorted(real)}, documented {sorted(documented)}"
        for key in documented:
            _same_shape(real[key], documented[key], f"{where}.{key}")
    elif isinstance(documented, list):
        assert isinstance(real, list), where
        if real and documented:
            _same_shape(real[0], documented[0], f"{where}[0]")
    else:
        assert type(real) is type(documented), f"{where}: {real!r} vs documented {documented!r}"


@pytest.mark.parametrize(("name", "code", "answer"), CURL_EXAMPLES, ids=[n for n, _, _ in CURL_EXAMPLES])
def test_curl_example_runs(server: Server, name: str, code: str, answer: str | None) -> None:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    result = subprocess.run(
        ["bash", "-c", code.replace(DOC_ROOT_URL, server.root)],
        env=server.env,
        cwd=server.workdir,
        capture_output=True,
        timeout=60,
    )
    out = result.stdout.decode("utf-8", "replace")
    assert result.returncode == 0, f"{name} failed:\n{result.stderr.decode(errors='replace')}"
    if '"stream": true' in code:
        events = [ln for ln in out.splitlines() if ln]
        assert events[-1] == "data: [DONE]", out
        for event in events[:-1]:
            json.loads(event.removeprefix("data: "))
    if answer is not None:
        real, documented = json.loads(out), json.loads(answer)
        if "error" in documented:
            assert real == documented, "the documented error is not the one the server gives"
        else:
            _same_shape(real, documented)


def _get(url: str, token: str) -> int:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    try:
        with opener.open(request, timeout=30) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        exc.close()
        return int(exc.code)


def test_token_commands_work_as_the_quickstart_says(server: Server) -> None:
    def hearth(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*_hearth(), "tokens", *args, "--data-dir", str(server.data_dir)],
            env=server.env,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )

    created = hearth("create", "--name", "docs-test")
    token = created.stdout.strip()
    assert created.stdout == token + "\n", "the token must be alone on stdout"
    assert token.startswith("hth_")
    assert _get(server.base_url + "/models", token) == 200

    listing = hearth("list").stdout
    row = next(line for line in listing.splitlines() if line.endswith(" docs-test"))
    token_id = row.split()[0]
    assert token not in listing, "the list must never show tokens"

    hearth("revoke", token_id)
    assert _get(server.base_url + "/models", token) == 401, "a revoked token must fail at once, no restart"
