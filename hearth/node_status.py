"""`hearth node status`: the running node on this machine, asked over loopback, in a few lines."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from hearth.cli_common import gib
from protocol.errors import ConfigError

TIMEOUT_S = 5.0
MAX_BYTES = 1 << 20


def fetch_local_status(node_dir: Path) -> dict[str, Any]:
    """The status document of the node whose data dir is ``node_dir``; ConfigError if none runs."""
    run_file = node_dir / "run.json"
    try:
        url = str(json.loads(run_file.read_text())["url"])
    except FileNotFoundError:
        raise ConfigError(
            f"no node is running with the data dir {node_dir} (start one with `hearth node start`)"
        ) from None
    except (OSError, ValueError, KeyError, TypeError):
        raise ConfigError(f"{run_file} is unreadable; restart the node") from None
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/local/status", timeout=TIMEOUT_S) as resp:
            doc = json.loads(resp.read(MAX_BYTES))
    except (urllib.error.URLError, OSError, ValueError):
        raise ConfigError(f"the node at {url} does not answer (it stopped, or is still starting)") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"the node at {url} sent no status")
    return doc


def _cache(model: dict[str, Any]) -> str:
    free = model.get("cache_free_tokens")
    return "-" if free is None else f"{free}/{model.get('cache_tokens')}"


def render_status(doc: dict[str, Any]) -> str:
    where = f"{doc.get('url')}: {doc.get('backend')} on {doc.get('gpus')}"
    lines = [
        f"node {doc.get('node_id')} ({doc.get('tier')}) at {where}",
        f"scheduler: {doc.get('enrolled_with') or 'not enrolled (run `hearth node enroll`)'}",
    ]
    owner = doc.get("owner_first") or {}
    phase = owner.get("phase", "serving")
    if phase == "yielding":
        lines.append(
            f"state: yielding to its owner since {owner.get('since')}: no new work, running answers finish"
        )
    elif phase == "released":
        lines.append(
            f"state: yielding to its owner since {owner.get('since')}: models unloaded, memory given back"
        )
    elif doc.get("draining"):
        lines.append("state: draining (the operator's word): running answers finish, no new work")
    else:
        lines.append("state: serving")
    reasons = owner.get("reasons") or []
    lines += [f"  because {r}" for r in reasons]
    if phase != "serving" and not reasons:
        lines.append("  the reasons are gone: it serves again once they stay away (owner_first.resume_after)")
    if owner.get("released"):
        lines.append(f"  reloaded when it serves again: {', '.join(owner['released'])}")
    if owner:
        hours = ", ".join(owner.get("hours") or []) or "any time"
        lines.append(f"owner first: {'on' if owner.get('enabled') else 'off'}; serves {hours}")
    if doc.get("alarm"):
        lines.append(f"ALARM: {doc['alarm']}")
    free, total = gib(doc.get("memory_free_bytes")), gib(doc.get("memory_total_bytes"))
    lines.append(f"memory: {free} free of {total} for models")
    models = doc.get("models") or []
    if models:
        header = ["model", "phase", "active", "queued", "cache free", "sequences"]
        rows = [
            [
                str(m.get("id")), str(m.get("phase")), str(m.get("active")), str(m.get("queued")),
                _cache(m),
                str(m.get("max_sequences")),
            ]
            for m in models
        ]  # fmt: skip
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        for row in [header, *rows]:
            lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return "\n".join(lines)
