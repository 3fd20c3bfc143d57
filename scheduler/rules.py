"""The policy in force: loading, validating and hot-reloading the policy file.

``load_policy`` reads and validates a file without applying it (`hearth policy check` uses it too). A bad
file is refused with its name, line and field in one message (``PolicyFileError``), and whatever policy was
in force stays. ``Rules`` holds the policy the scheduler applies, when it was put in force and why the file
on disk was last refused; ``watch`` reloads it when the file changes, ``reload_now`` when an operator asks.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import stat
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import ValidationError

from policies.schema import DEFAULT_GROUP, MAX_TERMS_CHARS, GroupRules, PolicyFile, resolve
from protocol.errors import ConfigError

log = logging.getLogger("hearth.scheduler.rules")

MAX_POLICY_BYTES = 1024 * 1024
MAX_TERMS_BYTES = 4 * MAX_TERMS_CHARS  # UTF-8: at most 4 bytes a character
POLL_S = 1.0

# What a reload did: put a new policy in force, refused the file (the old one stays), or found nothing new.
Outcome = Literal["applied", "refused", "unchanged"]


class PolicyFileError(ConfigError):
    """A policy file that cannot be applied: the message names the file, the line and the field."""

    default_code = "invalid_policy"


@dataclass(frozen=True)
class LoadedPolicy:
    """A validated policy file, with its terms' text read and a digest of what was loaded."""

    policy: PolicyFile
    groups: dict[str, GroupRules]
    terms_text: str | None
    source: str  # the file's path, or "(built in)"
    text: str | None  # the file as loaded (None: built in)
    digest: str  # sha-256 of the file's bytes (and the terms file's), to tell versions apart

    @property
    def terms_version(self) -> str | None:
        return self.policy.terms.version if self.policy.terms is not None else None


def builtin() -> LoadedPolicy:
    """No policy file: one unlimited default group, no terms."""
    policy = PolicyFile()
    return LoadedPolicy(policy, resolve(policy), None, "(built in)", None, hashlib.sha256(b"").hexdigest())


def parse_policy(text: str, name: str, base: Path | None = None) -> LoadedPolicy:
    """Validate a policy document; ``base`` is where a terms file's relative path starts."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PolicyFileError(f"{name}: {exc}") from None
    try:
        policy = PolicyFile.model_validate(doc)
    except ValidationError as exc:
        raise PolicyFileError(_first_error(exc, text, name)) from None
    digest = hashlib.sha256(text.encode())
    terms_text = None
    if policy.terms is not None:
        if policy.terms.file is not None:
            where = f"{name}, line {_line_of(text, ('terms', 'file'))}, terms.file"
            raw = _read_terms(policy.terms.file, base, where)
            try:
                terms_text = raw.decode()
            except UnicodeDecodeError:
                raise PolicyFileError(f"{where}: not UTF-8 text") from None
            digest.update(raw)
        else:
            terms_text = policy.terms.text
    return LoadedPolicy(policy, resolve(policy), terms_text, name, text, digest.hexdigest())


def _read_terms(name: str, base: Path | None, where: str) -> bytes:
    """The terms file: a regular file in the policy file's folder (or below it), of bounded size. Anything
    else is refused: the terms are shown to every user, so the policy must not be able to publish another
    file the scheduler can read, or hang it on a device or a pipe."""
    folder = (base or Path.cwd()).resolve()
    path = (folder / name).resolve()
    if Path(name).is_absolute() or not path.is_relative_to(folder):
        raise PolicyFileError(f"{where}: {name} must be a file in the policy file's folder")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:
        raise PolicyFileError(f"{where}: cannot read {name}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise PolicyFileError(f"{where}: {name} is not a regular file")
        raw = f.read(MAX_TERMS_BYTES + 1)
    if len(raw) > MAX_TERMS_BYTES:
        raise PolicyFileError(f"{where}: {name} is larger than {MAX_TERMS_BYTES} bytes")
    return raw


def load_policy(path: Path) -> LoadedPolicy:
    """Read and validate ``path``; PolicyFileError names what is wrong."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise PolicyFileError(f"{path}: cannot read it: {exc.strerror}") from None
    if len(raw) > MAX_POLICY_BYTES:
        raise PolicyFileError(f"{path}: larger than {MAX_POLICY_BYTES} bytes")
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        raise PolicyFileError(f"{path}: not UTF-8 text") from None
    return parse_policy(text, str(path), path.parent)


def _first_error(exc: ValidationError, text: str, name: str) -> str:
    err = exc.errors()[0]
    loc = tuple(str(part) for part in err["loc"])
    where = ".".join(loc) or "(the file)"
    message = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        message = "not a setting (see docs/policies.md)"
    more = f" (and {len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
    return f"{name}, line {_line_of(text, loc)}, {where}: {message}{more}"


def _line_of(text: str, loc: tuple[str, ...]) -> int:
    """The line a field sits on: the last key of ``loc`` after the table that holds it (best effort: the
    table's line when the key is not written, 1 when neither is)."""
    lines = text.splitlines()
    best = 1
    start = 0
    for depth in range(len(loc), 0, -1):
        table = ".".join(loc[:depth])
        header = re.compile(r"^\s*\[{1,2}\s*" + re.escape(table).replace(r"\.", r"\s*\.\s*") + r"\s*\]{1,2}")
        for i, line in enumerate(lines):
            if header.match(line):
                best, start = i + 1, i + 1
                break
        else:
            continue
        break
    key = re.compile(r"^\s*" + re.escape(loc[-1]) + r"\s*=") if loc else None
    if key is not None:
        for i in range(start, len(lines)):
            if i > start and lines[i].lstrip().startswith("[") and start:
                break
            if key.match(lines[i]):
                return i + 1
    return best


@dataclass
class Rules:
    """The policy in force, swapped whole on reload (readers never see half a policy)."""

    current: LoadedPolicy = field(default_factory=builtin)
    path: Path | None = None
    on_reload: Callable[[str, str], None] | None = None  # (outcome, detail) for the audit log and events
    # Held from the digest check to the swap of `PUT /admin/policy`, and around every reload, so two
    # changes made from the same version cannot both pass and a reload never sees half of a change.
    writing: asyncio.Lock = field(default_factory=asyncio.Lock)
    loaded_at: float | None = None  # Unix time the policy in force was put in force
    # Why the file on disk was refused, while it still is so; None once a good file is read again.
    last_error: str | None = None
    _mtime: tuple[int, ...] | None = None

    def group(self, name: str | None) -> GroupRules | None:
        return self.current.groups.get(name or DEFAULT_GROUP)

    def load(self) -> None:
        """Load the file at start: a missing file means the built-in policy; a bad one stops the start."""
        if self.path is None or not self.path.exists():
            self.current = builtin()
        else:
            self._mtime = _stamp(self.path)
            self.current = load_policy(self.path)
        self.loaded_at = time.time()

    def reload(self) -> bool:
        """Apply the file if it changed; False when it did not or was refused (the old policy stays)."""
        return self._apply(self._read(force=False)) == "applied"

    async def reload_now(self) -> tuple[Outcome, str]:
        """Read the file now, changed or not (`POST /admin/policy/reload`: the terms file it names, which the
        watcher does not watch, is read again too), and apply it as the watcher would: (outcome, the new
        digest or why the file was refused). The caller reports it, with who asked."""
        async with self.writing:
            found = await asyncio.to_thread(self._read, True)
            outcome = self._apply(found, report=False)
        if isinstance(found, PolicyFileError):
            return outcome, found.message
        return outcome, self.current.digest[:16]

    def _read(self, force: bool) -> LoadedPolicy | PolicyFileError | None:
        """The file's policy, or why it was refused, or None when it has not changed since it was last read
        (unless ``force``). I/O only: runs in a thread."""
        if self.path is None:
            return None
        stamp = _stamp(self.path)
        if stamp == self._mtime and not force:
            return None
        self._mtime = stamp
        if stamp is None:
            if self.current.text is None:
                return builtin()  # no file, as at a start without one: the built-in policy, still in force
            return PolicyFileError(f"{self.path} is gone")
        try:
            return load_policy(self.path)
        except PolicyFileError as exc:
            return exc

    def _apply(self, found: LoadedPolicy | PolicyFileError | None, *, report: bool = True) -> Outcome:
        if found is None:
            return "unchanged"
        if isinstance(found, PolicyFileError):
            log.warning("policy file refused, the policy in force stays: %s", found.message)
            self.last_error = found.message
            if report:
                self._report("refused", found.message)
            return "refused"
        self.last_error = None  # the file is good again, even if it is the policy already in force
        if found.digest == self.current.digest:
            return "unchanged"
        self.current = found
        self.loaded_at = time.time()
        log.info("policy reloaded from %s", found.source)
        if report:
            self._report("applied", found.digest[:16])
        return "applied"

    def adopt(self, loaded: LoadedPolicy) -> None:
        """Apply a policy just written to the file (`PUT /admin/policy`): the watcher will see no change."""
        self.current = loaded
        self.loaded_at = time.time()
        self.last_error = None
        if self.path is not None:
            self._mtime = _stamp(self.path)

    def _report(self, outcome: str, detail: str) -> None:
        if self.on_reload is not None:
            self.on_reload(outcome, detail)

    async def watch(self, interval: float = POLL_S) -> None:
        """Poll the file's modification time (cheap, and works on every filesystem and editor)."""
        while True:
            await asyncio.sleep(interval)
            async with self.writing:
                self._apply(await asyncio.to_thread(self._read, False))


def _stamp(path: Path) -> tuple[int, ...] | None:
    """What tells a changed file: an editor that replaces the file changes its inode, one that writes in
    place its modification time or size."""
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size)
