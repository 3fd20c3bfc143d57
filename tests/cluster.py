"""A real federation for tests: `hearth scheduler start` and `hearth node start` processes on 127.0.0.1,
driven with the real CLI (authority, enrollment codes, approval), zeroconf bound to loopback.

Timings are shortened (heartbeats every 0.3 s, a node silent for 2 s is unhealthy) so that failures show
in seconds; nothing else differs from what an operator and volunteers run.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

HEARTH = str(Path(sys.executable).with_name("hearth"))
START_TIMEOUT_S = 120.0


@dataclass
class Proc:
    popen: subprocess.Popen[bytes]
    stdout: Path
    stderr: Path

    def text(self) -> str:
        return self.stdout.read_text(errors="replace") + self.stderr.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(20)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


@dataclass
class NodeSpec:
    node_id: str
    tier: str
    budget_bytes: int | None  # None: the node reads its GPUs' free VRAM
    models: list[tuple[Path, str, bool]]  # (directory, id, preload)
    backend: str = "auto"
    lan: bool = False  # never enrolled with a code: found on the LAN, then approved

    @property
    def preloaded(self) -> list[str]:
        return [model_id for _, model_id, preload in self.models if preload]


@dataclass
class Cluster:
    base: Path
    authority_key: str = ""
    url: str = ""
    token: str = ""
    scheduler: Proc | None = None
    nodes: dict[str, Proc] = field(default_factory=dict)
    node_urls: dict[str, str] = field(default_factory=dict)
    port: int = 0
    specs: dict[str, NodeSpec] = field(default_factory=dict)  # the nodes `ensure` can bring up
    _named: int = 0

    @property
    def data_dir(self) -> Path:
        return self.base / "scheduler"

    @property
    def authority_dir(self) -> Path:
        return self.base / "operator" / "authority"

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "HEARTH_TOKEN": self.token,
            "HEARTH_SCHEDULER_URL": self.url,
            "HF_HUB_OFFLINE": "1",
            "HEARTH_LOG_LEVEL": "DEBUG",
        }

    def hearth(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        r = subprocess.run(
            [HEARTH, *args],
            capture_output=True,
            text=True,
            env=self.env(),
            timeout=120,
            stdin=subprocess.DEVNULL,
        )
        if check and r.returncode != 0:
            raise AssertionError(f"hearth {' '.join(args)} failed ({r.returncode}):\n{r.stderr[-3000:]}")
        return r

    def _spawn(self, name: str, args: list[str]) -> Proc:
        logs = self.base / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        n = len(list(logs.glob(f"{name}*.out")))
        out, err = logs / f"{name}.{n}.out", logs / f"{name}.{n}.err"
        with out.open("wb") as o, err.open("wb") as e:
            popen = subprocess.Popen(
                [HEARTH, *args], stdout=o, stderr=e, env=self.env(), stdin=subprocess.DEVNULL
            )
        return Proc(popen, out, err)

    def _await_line(self, proc: Proc, pattern: str) -> re.Match[str]:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            found = re.search(pattern, proc.stdout.read_text(errors="replace"))
            if found:
                return found
            if proc.popen.poll() is not None:
                raise AssertionError(f"process exited early:\n{proc.text()[-3000:]}")
            time.sleep(0.1)
        raise AssertionError(f"no line matching {pattern!r} in time:\n{proc.text()[-3000:]}")

    # the operator's side

    def init(self) -> None:
        self.authority_key = self.hearth("authority", "init", "--dir", str(self.authority_dir)).stdout.strip()
        self.data_dir.mkdir(parents=True)
        config = self.base / "scheduler.toml"
        config.write_text(
            "[scheduler]\n"
            f'authority_key = "{self.authority_key}"\n'
            # A queue of a test's requests drains slowly on a busy 2-core machine: no test waits on this.
            "heartbeat_interval = 0.3\nnode_timeout = 2.0\nmax_queue_wait = 120.0\n"
            'zeroconf_interfaces = ["127.0.0.1"]\n'
            "[scheduler.policy]\nrequire_e2e = false\n"  # these tests send plaintext on purpose
        )
        self.token = self.hearth(
            "tokens", "create", "--admin", "--data-dir", str(self.data_dir)
        ).stdout.strip()

    def start_scheduler(self) -> None:
        args = ["scheduler", "start", "--config", str(self.base / "scheduler.toml")]
        args += ["--data-dir", str(self.data_dir), "--port", str(self.port)]
        self.scheduler = self._spawn("scheduler", args)
        self.url = self._await_line(self.scheduler, r"listening on (http://\S+)").group(1)
        self.port = int(self.url.rsplit(":", 1)[1])

    def scheduler_running(self) -> bool:
        return self.scheduler is not None and self.scheduler.popen.poll() is None

    def ensure_scheduler(self) -> None:
        """Start the scheduler (same port, same data dir) unless it runs."""
        if not self.scheduler_running():
            self.start_scheduler()

    def new_id(self, prefix: str) -> str:
        """A node id no other node of this cluster has had."""
        self._named += 1
        return f"{prefix}{self._named}"

    def user_token(self, name: str) -> str:
        return self.hearth(
            "tokens", "create", "--name", name, "--data-dir", str(self.data_dir)
        ).stdout.strip()

    def admin(self, path: str) -> Any:
        r = httpx.get(self.url + path, headers={"Authorization": f"Bearer {self.token}"}, timeout=10)
        r.raise_for_status()
        return r.json()

    def approve(self, node_id: str) -> None:
        self.hearth("enroll", "approve", node_id, "--dir", str(self.authority_dir))

    # the volunteer's side

    def node_dir(self, node_id: str) -> Path:
        """The node's --data-dir (its keys and enrollment are in `node/` inside, as for any user)."""
        return self.base / "nodes" / node_id

    def node_keys(self, node_id: str) -> Path:
        return self.node_dir(node_id) / "node"

    def write_node_config(self, spec: NodeSpec, *, authority_key: str | None = None) -> Path:
        lines = [
            'log_level = "DEBUG"',
            "[node]",
            f'node_id = "{spec.node_id}"',
            f'tier = "{spec.tier}"',
            "heartbeat_interval = 0.3",
            "advert_interval = 0.3",
            'zeroconf_interfaces = ["127.0.0.1"]',
        ]
        lines.append(f'backend = "{spec.backend}"')
        if spec.budget_bytes is not None:
            lines.append(f"memory_budget_bytes = {spec.budget_bytes}")
        if authority_key:
            lines.append(f'authority_key = "{authority_key}"')
        for path, model_id, preload in spec.models:
            lines += [
                "[[node.models]]",
                f'path = "{path}"',
                f'id = "{model_id}"',
                "default_max_tokens = 32",
                f"preload = {'true' if preload else 'false'}",
            ]
        config = self.base / f"{spec.node_id}.toml"
        config.write_text("\n".join(lines) + "\n")
        return config

    def enroll(self, spec: NodeSpec) -> None:
        code = self.hearth("enroll", "create", "--tier", spec.tier).stdout.strip()
        self.hearth(
            "node", "enroll", "--scheduler", self.url, "--code", code, "--node-id", spec.node_id,
            "--data-dir", str(self.node_dir(spec.node_id)),
        )  # fmt: skip

    def start_node(self, spec: NodeSpec, *, authority_key: str | None = None) -> None:
        config = self.write_node_config(spec, authority_key=authority_key)
        proc = self._spawn(
            spec.node_id,
            ["node", "start", "--config", str(config), "--data-dir", str(self.node_dir(spec.node_id))],
        )
        self.nodes[spec.node_id] = proc
        self.node_urls[spec.node_id] = self._await_line(proc, r"listening on (http://\S+)").group(1)

    def node_running(self, node_id: str) -> bool:
        proc = self.nodes.get(node_id)
        return proc is not None and proc.popen.poll() is None

    def ensure(self, *node_ids: str) -> None:
        """Bring the nodes of ``specs`` named here to work, from whatever state they are in: enrolled (with a
        code, or found on the LAN), approved, running, healthy, their preloaded models ready. Idempotent:
        nodes that are so already are left alone."""
        self.ensure_scheduler()
        known = self.enrollments()
        for node_id in node_ids:
            spec = self.specs[node_id]
            if node_id not in known and not spec.lan:
                self.enroll(spec)
            if not self.node_running(node_id):
                self.start_node(spec, authority_key=self.authority_key if spec.lan else None)
            if node_id not in known and spec.lan:
                self.wait(lambda n=node_id: n in self.enrollments(), f"{node_id} is discovered", within=30)
        known = self.enrollments()
        for node_id in node_ids:
            state = known[node_id]["state"]
            if state == "pending":
                self.approve(node_id)
            elif state != "approved":
                raise AssertionError(f"{node_id} is {state}: no test may leave a shared node so")
        for node_id in node_ids:
            self.wait(
                lambda n=node_id: (self.node_doc(n) or {}).get("healthy") is True, f"{node_id} heard from"
            )
            for model in self.specs[node_id].preloaded:
                self.wait(
                    lambda n=node_id, m=model: self.model_phase(n, m) == "ready", f"{model} on {node_id}"
                )

    def kill_node(self, node_id: str) -> None:
        proc = self.nodes[node_id]
        proc.popen.kill()
        proc.popen.wait()

    def stop(self) -> None:
        for proc in [*self.nodes.values(), *([self.scheduler] if self.scheduler else [])]:
            proc.stop()

    # observing

    def wait(self, predicate: Callable[[], bool], what: str, within: float = 60.0) -> None:
        deadline = time.monotonic() + within
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting until {what}")
            time.sleep(0.1)

    def enrollments(self, state: str | None = None) -> dict[str, dict[str, Any]]:
        """The scheduler's enrollment records by node id (those in ``state`` only, when given)."""
        query = f"?state={state}" if state else ""
        return {r["node_id"]: r for r in self.admin("/admin/enrollments" + query)["enrollments"]}

    def node_doc(self, node_id: str) -> dict[str, Any] | None:
        return next((n for n in self.admin("/admin/nodes")["nodes"] if n["node_id"] == node_id), None)

    def model_phase(self, node_id: str, model: str) -> str | None:
        doc = self.node_doc(node_id)
        if doc is None or not doc["healthy"]:
            return None
        return next((m["phase"] for m in doc["models"] if m["id"] == model), None)

    @contextlib.contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        """The scheduler's database, read-only (the scheduler writes it meanwhile)."""
        db = sqlite3.connect(f"file:{self.data_dir / 'hearth.db'}?mode=ro", uri=True)
        try:
            yield db
        finally:
            db.close()

    def usage_nodes(self, since: float = 0.0) -> list[tuple[str, str, str]]:
        """(model, node, status) of each request relayed since ``since``, read from the scheduler's DB."""
        with self._db() as db:
            rows = db.execute(
                "select model, node_id, status from usage where started >= ? order by started", [since]
            ).fetchall()
        return [tuple(r) for r in rows]

    def served(self, since: float) -> list[tuple[str, str, float, float]]:
        """(token name, node, started, ended) of each request relayed since ``since``, in the order the
        scheduler finished them; started is when it reached the scheduler, ended when its answer ended."""
        with self._db() as db:
            rows = db.execute(
                "select t.name, u.node_id, u.started, u.ended from usage u join tokens t on t.id = u.token_id"
                " where u.started >= ? order by u.ended",
                [since],
            ).fetchall()
        return [tuple(r) for r in rows]


def chat(url: str, token: str, model: str, **extra: Any) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8, **extra}
    return httpx.post(
        url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {token}"}, timeout=60
    )


def error_code(r: httpx.Response) -> str | None:
    try:
        return json.loads(r.content)["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return None
