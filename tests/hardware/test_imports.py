"""The hardware package stays pure: the scheduler and the planner import it on boxes without ML or GPU stacks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_import_pulls_in_no_heavy_or_io_dependency() -> None:
    # A fresh interpreter, because this test process has long since imported torch and aiohttp elsewhere.
    code = (
        "import sys; import hardware.estimator, hardware.catalog, hardware.probe;"
        "bad = [m for m in ('torch', 'aiohttp', 'pynvml', 'transformers', 'exllamav2', 'numpy') if m in sys.modules];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
