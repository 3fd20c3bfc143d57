"""`hearth plan --report DIR` as a planner runs it: a page that stands alone, real plots, the same JSON."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
from matplotlib.image import imread

from tests.test_plan_cli import SMALL, _run

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# A copy split over two cards, a mixed fleet, a card left out and no user count within the service level:
# the plots' awkward cases at once, in a few seconds.
FLEET = ["--model", "Llama-3.1-70B", "--gpus", "3090x2,4090x1,A6000x1", "--requests", "120", "--users", "40"]


class _Page(HTMLParser):
    """What the test reads back from the page: its text, images and any reference outside it."""

    def __init__(self) -> None:
        super().__init__()
        self.text: list[str] = []
        self.images: list[str] = []
        self.outside: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if tag == "img":
            self.images.append(found.get("src") or "")
        if tag in ("script", "link", "iframe") or any(
            k in ("href", "src") and v and not v.startswith("data:") for k, v in attrs
        ):
            self.outside.append(f"<{tag} {found}>")

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def _read(report: Path) -> _Page:
    page = _Page()
    page.feed((report / "report.html").read_text(encoding="utf-8"))
    page.close()
    return page


@pytest.mark.parametrize(
    "args",
    [
        SMALL,  # one card type, one copy per card
        FLEET,  # a split copy, mixed cards, one card left out
    ],
)
def test_the_report_is_a_page_with_four_real_plots_and_the_json(tmp_path: Path, args: list[str]) -> None:
    report, json_file = tmp_path / "out" / "report", tmp_path / "plan.json"
    code, out, err = _run(*args, "--report", str(report), "--json", str(json_file))
    assert code == 0, err
    doc = json.loads(json_file.read_text(encoding="utf-8"))
    assert json.loads((report / "plan.json").read_text(encoding="utf-8")) == doc
    assert (report / "plan.json").read_bytes() == json_file.read_bytes()
    page = _read(report)
    text = "".join(page.text)
    assert page.outside == []  # nothing fetched from anywhere: it can be mailed as one file
    assert text.lstrip().startswith("hearth plan:")  # the title, then the verdict first in the body
    assert doc["verdict"] in text and text.index(doc["verdict"]) < text.index("Fit")
    headings = [text.index(h) for h in ("Fit", "Speed", "Simulation", "Cost")]
    assert headings == sorted(headings)
    assert f"most users within the service level: {doc['max_users']}" in text
    # The simulation table shows every figure of the sweep, the whole request's median latency included.
    for column in ("TPOT p50", "TPOT p99", "latency p50", "latency p99", "queue mean", "queue max"):
        assert f"<th>{column}</th>" in (report / "report.html").read_text(encoding="utf-8")
    assert all(f["copy"] in text for f in doc["fit"])
    assert len(page.images) == 4
    for name, src in zip(("vram", "throughput", "ttft", "cost"), page.images, strict=True):
        prefix = "data:image/png;base64,"
        assert src.startswith(prefix)
        png = base64.b64decode(src.removeprefix(prefix), validate=True)
        assert png.startswith(PNG_SIGNATURE)
        assert (report / f"{name}.png").read_bytes() == png
        pixels = imread(io.BytesIO(png), format="png")
        assert pixels.shape[0] > 100 and pixels.shape[1] > 100
        assert pixels[..., :3].var() > 0.001  # something is drawn, not a blank canvas
    assert out.splitlines()[0] == doc["verdict"]  # the terminal answer is unchanged


def test_strings_in_the_page_are_escaped(tmp_path: Path) -> None:
    # A model directory's name reaches the page; markup in it stays text.
    model_dir = tmp_path / "<b>llama&co"
    model_dir.mkdir()
    config = {
        "model_type": "llama", "hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 32,
        "num_key_value_heads": 8, "intermediate_size": 8192, "vocab_size": 128256,
        "max_position_embeddings": 131072, "tie_word_embeddings": True,
    }  # fmt: skip
    (model_dir / "config.json").write_text(json.dumps(config), encoding="utf-8")
    report = tmp_path / "report"
    code, _, err = _run(
        "--model", str(model_dir), "--gpus", "4090x1", "--requests", "60", "--report", str(report)
    )
    assert code == 0, err
    source = (report / "report.html").read_text(encoding="utf-8")
    assert "<b>llama" not in source and "&lt;b&gt;llama&amp;co" in source
    assert "<b>llama&co" in "".join(_read(report).text)


def test_a_report_dir_that_is_a_file_is_one_line_and_exit_2(tmp_path: Path) -> None:
    taken = tmp_path / "taken"
    taken.write_text("not a directory\n", encoding="utf-8")
    for where in (taken, taken / "below"):  # the path itself, and a directory that cannot be made under it
        code, out, err = _run(*SMALL, "--report", str(where))
        assert code == 2, out + err
        assert err.startswith("hearth: error: ") and err.count("\n") == 1, err
        assert "Traceback" not in out + err
    assert taken.read_text(encoding="utf-8") == "not a directory\n"


def test_plan_without_a_report_never_imports_matplotlib() -> None:
    # The scheduler's side and the terminal answer stay as light as before: matplotlib is the report's alone.
    probe = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from hearth.cli import main\n"
        "done = CliRunner().invoke(main, ['plan', '--model', 'Llama-3.1-8B', '--gpus', '4090x1', "
        "'--requests', '50'])\n"
        "assert done.exit_code == 0, done.output\n"
        "print('matplotlib' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False", done.stderr
