"""Draw the console's screenshots for docs/console.md: each screen of the snapshot tests, at 160×48, as
PNG (the SVG Textual exports, rendered by CairoSVG). Run after a change to a screen:

    .venv/bin/python -m tests.tui.screenshots            # writes docs/console/*.png

The pictures come from the fixed data of the snapshot tests (tests.tui.fixed), never from a live cluster.
"""

from __future__ import annotations

import sys
from pathlib import Path

from textual._doc import take_svg_screenshot

from tests.tui.scenes import SCENES, console, settle, utc

OUT = Path(__file__).resolve().parents[2] / "docs" / "console"
SIZE = (160, 48)
FONT = "DejaVu Sans Mono"


def main() -> int:
    try:
        import cairosvg  # type: ignore[import-untyped]
    except (ImportError, OSError) as exc:  # OSError: the cairo library itself is missing
        print(f"screenshots need CairoSVG and the cairo library: {exc}", file=sys.stderr)
        return 1
    utc()
    OUT.mkdir(parents=True, exist_ok=True)
    for name, keys in SCENES:
        app = console()
        svg = take_svg_screenshot(app=app, terminal_size=SIZE, run_before=settle(app, keys))
        # Textual names Fira Code, which CairoSVG does not find or fall back from: a monospace font the
        # machine has keeps the columns where the terminal puts them.
        svg = svg.replace("font-family: Fira Code, monospace", f"font-family: {FONT}")
        target = OUT / f"{name}.png"
        cairosvg.svg2png(bytestring=svg.encode(), write_to=str(target), output_width=1600)
        print(f"{target.relative_to(OUT.parents[1])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
