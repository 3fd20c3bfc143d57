"""How a node keeps its scheduler (and the LAN) informed: signed heartbeats and a zeroconf advert.

Heartbeats go every few seconds, and at once (rate-limited) when something placement cares about
changes: a model finished loading, a job ended, the node started draining. A scheduler that is down is
retried with backoff; the node keeps serving nothing new meanwhile only because nothing is sent to it.
A heartbeat answered "revoked" makes the node drop its scheduler's key at once: from then on every call
gets 401.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import aiohttp

from node.state import VERSION, NodeState
from protocol.errors import HearthError
from protocol.federation import MAX_RECEIPTS, HeartbeatReply, parse
from protocol.identity import fingerprint, sign_request
from protocol.web import is_loopback, log_unexpected, read_capped

if TYPE_CHECKING:
    from hardware.probe import NodeProbe
    from node.settings import NodeSettings
    from protocol.advert import Advert

log = logging.getLogger("hearth.node.heartbeat")

MIN_GAP_S = 0.1  # between two heartbeats sent for changes, so a burst of job endings sends one
MAX_BACKOFF = 8
MAX_REPLY_BYTES = 64 * 1024


def memory_pool(settings: NodeSettings) -> tuple[int, str]:
    """(bytes models may use, a short GPU summary). Blocking (NVML): call it off the event loop.

    A declared memory budget wins (a CPU node, or a GPU box whose owner lends only part of it). Else the
    GPUs' free VRAM at start, as NVML reports it: what the owner's own processes hold stays theirs. With no
    GPU and no budget, half of this machine's RAM.
    """
    if settings.memory_budget_bytes is not None:
        return settings.memory_budget_bytes, "cpu"
    from hardware.probe import probe

    found = probe()
    if found.gpus:
        return pool_from_probe(found)
    try:
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")) // 2, "cpu"
    except (ValueError, OSError):
        return 4 << 30, "cpu"


def pool_from_probe(found: NodeProbe) -> tuple[int, str]:
    """A GPU node's pool: free VRAM summed over its GPUs, and e.g. "2x NVIDIA GeForce RTX 3090"."""
    names = Counter(g.name for g in found.gpus)
    summary = ", ".join(f"{count}x {name}" for name, count in names.items())
    return found.free_bytes, summary[:200]


def status_doc(state: NodeState) -> dict[str, Any]:
    pool = state.pool
    return {
        "node_id": state.settings.node_id,
        "version": VERSION,
        "url": state.url or "http://unknown",
        "tier": (state.trust.enrollment.tier if state.trust.enrollment else state.settings.tier),
        "gpus": pool.gpus,
        "memory_total_bytes": pool.total_bytes,
        "memory_free_bytes": pool.free_bytes,
        "draining": state.draining,
        "yielding": state.owner.yielding if state.owner else False,
        "yield_reason": state.owner.reason if state.owner else None,
        "models": [slot.status() for slot in pool.slots.values()],
        "key_statement": state.keys.current()[1],
        "alarm": state.key_alarm,
    }


async def heartbeat_loop(state: NodeState) -> None:
    await state.listening.wait()
    interval = state.settings.heartbeat_interval
    failures = 0
    said = ""
    async with aiohttp.ClientSession() as session:
        while True:
            state.changed.clear()
            try:
                outcome = await _beat(session, state)
            except Exception as exc:  # a bug in building the status must not end the heartbeats for good
                log_unexpected("sending a heartbeat", exc)
                outcome = "error"
            if outcome is not None and outcome != said:
                log.log(logging.WARNING if outcome != "ok" else logging.INFO, "scheduler: %s", outcome)
                said = outcome
            if isinstance(outcome, str) and outcome.startswith("unreachable"):
                failures = min(failures + 1, MAX_BACKOFF)
            else:
                failures = 0
            if state.reply_interval is not None:
                interval = state.reply_interval
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval * (1 + failures)):
                    await state.changed.wait()
            await asyncio.sleep(MIN_GAP_S)


async def _beat(session: aiohttp.ClientSession, state: NodeState) -> str | None:
    trust = state.trust
    enrollment = trust.enrollment
    scheduler_url = state.settings.scheduler_url or (enrollment.scheduler_url if enrollment else None)
    key = trust.scheduler_key
    if scheduler_url is None or key is None:
        return "not enrolled (run `hearth node enroll`)" if not trust.revoked else "revoked by the operator"
    path = "/v1/nodes/heartbeat"
    status = status_doc(state)
    mark, status["usage"] = state.receipts.batch()
    identity, audience = trust.identity, fingerprint(key)

    def encode_and_sign() -> tuple[bytes, dict[str, str]]:
        # Serializing and signing take the CPU for a moment: off the loop, which may be relaying tokens.
        body = json.dumps(status).encode()
        return body, sign_request(identity, "POST", path, body, audience=audience)

    body, headers = await asyncio.to_thread(encode_and_sign)
    headers["Content-Type"] = "application/json"
    try:
        async with session.post(
            scheduler_url.rstrip("/") + path,
            data=body,
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=10),
        ) as resp:
            doc: Any = json.loads(await read_capped(resp, MAX_REPLY_BYTES))
            code = resp.status
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        return f"unreachable ({type(exc).__name__}); retrying"
    if code == 200:
        try:
            reply: HeartbeatReply = parse(HeartbeatReply, doc)
        except HearthError:
            return "sent a malformed reply"
        state.receipts.sent(mark)  # only once the answer shows the scheduler took the heartbeat
        if len(state.receipts) >= MAX_RECEIPTS:
            state.changed.set()  # more receipts than one heartbeat carries: the next one goes soon
        state.reply_interval = reply.interval
        if reply.drain != state.draining:
            state.draining = reply.drain
        if (
            reply.certificate is not None
            and trust.certificate is None
            and enrollment
            and enrollment.authority_key
        ):
            try:
                await asyncio.to_thread(trust.accept_certificate, reply.certificate, enrollment.authority_key)
            except (HearthError, OSError):
                return "sent a certificate this node cannot verify"
        return "ok"
    error = doc.get("error", {}) if isinstance(doc, dict) else {}
    reason = error.get("code") if isinstance(error, dict) else None
    if reason == "node_revoked":
        trust.revoked = True
        return "revoked by the operator: this node takes no more work"
    if reason == "pending_approval":
        return "enrolled; waiting for the operator's approval"
    return f"refused the heartbeat (status {code}, {reason})"


async def rotate_keys(state: NodeState) -> None:
    """Make a new encryption key when the current one is due; the next heartbeat publishes it."""
    interval = min(60.0, state.settings.key_rotation / 10)
    while True:
        if await asyncio.to_thread(state.keys.rotate_if_due):
            state.touch()
        await asyncio.sleep(interval)


async def check_directory(state: NodeState) -> None:
    """Now and then, check that the scheduler's directory shows this node's current key, as a proxy would
    see it. If not (a scheduler swapping keys, or a log that lost a statement), raise the alarm: a log
    line and a flag in the status the operator sees."""
    async with aiohttp.ClientSession() as session:
        while True:
            await asyncio.sleep(state.settings.directory_check_interval)
            problem = await _directory_problem(session, state)
            if problem != state.key_alarm:
                if problem is not None:
                    log.error("ALARM: %s", problem)
                else:
                    log.info("the directory shows this node's current key again")
                state.key_alarm = problem
                state.touch()


async def _directory_problem(session: aiohttp.ClientSession, state: NodeState) -> str | None:
    from protocol.directory import MAX_DIRECTORY_BYTES, Directory

    trust = state.trust
    enrollment = trust.enrollment
    authority = enrollment.authority_key if enrollment else state.settings.authority_key
    scheduler_url = state.settings.scheduler_url or (enrollment.scheduler_url if enrollment else None)
    if trust.certificate is None or authority is None or scheduler_url is None or trust.revoked:
        return None  # not approved yet: there is nothing of ours to look for
    # The node keeps the log it verified and fetches only what is new, as a proxy does.
    seen = state.directory
    directory = seen.copy() if seen is not None and seen.authority_key == authority else Directory(authority)
    try:
        while True:
            url = f"{scheduler_url.rstrip('/')}/v1/directory?since={directory.head.seq}"
            async with session.get(url, timeout=aiohttp.ClientTimeout(total=30)) as resp:
                raw = await read_capped(resp, MAX_DIRECTORY_BYTES)
                if resp.status != 200:
                    return f"the scheduler's directory answered {resp.status}"
            doc = await asyncio.to_thread(json.loads, raw)
            if doc.get("authority_key") != authority:
                return "the scheduler's directory names another federation authority"
            if not await asyncio.to_thread(directory.apply_page, doc):
                break
    except (aiohttp.ClientError, TimeoutError):
        return state.key_alarm  # unreachable says nothing new about the directory
    except (ValueError, AttributeError, HearthError) as exc:
        return f"the scheduler's directory does not verify ({exc})"
    state.directory = directory
    node = directory.nodes.get(state.settings.node_id)
    mine, _ = state.keys.current()
    shown = node.current_key(time.time()) if node is not None else None
    if shown is None or shown.key_id != mine.key_id:
        return "the scheduler's directory does not show this node's current encryption key"
    return None


def advert(state: NodeState) -> Advert:
    from protocol.advert import Advert

    pool = state.pool
    enrollment = state.trust.enrollment
    port = int((state.url or ":0").rsplit(":", 1)[1].split("/")[0] or 0)
    return Advert(
        node_id=state.settings.node_id,
        version=VERSION,
        port=port,
        tier=enrollment.tier if enrollment else state.settings.tier,
        fingerprint=state.trust.identity.fingerprint,
        gpus=pool.gpus,
        free_bytes=pool.free_bytes,
        models=tuple(s.id for s in pool.slots.values() if s.phase == "ready"),
        load=pool.load,
    )


@contextlib.asynccontextmanager
async def advertise_ctx(state: NodeState) -> AsyncIterator[None]:
    """Advertise the node on the LAN once it listens, and keep the record current."""
    settings = state.settings
    if not settings.advertise:
        yield
        return
    from zeroconf import NonUniqueNameException

    from node.advertise import Advertiser
    from protocol.advert import unknown_addresses

    holder: list[Advertiser] = []
    missing = unknown_addresses(settings.zeroconf_interfaces)
    if missing:
        log.warning("not advertised on the LAN: no interface here has the address %s", ", ".join(missing))
        yield
        return

    async def run() -> None:
        await state.listening.wait()
        host = (state.url or "").split("//", 1)[-1].rsplit(":", 1)[0] or "127.0.0.1"
        advertiser = Advertiser(
            advert(state),
            interfaces=settings.zeroconf_interfaces,
            address=host,
            min_interval=settings.advert_interval,
        )
        holder.append(advertiser)
        if is_loopback(host) and settings.zeroconf_interfaces is None:
            # Bound to loopback: no other machine could reach the address the advert would carry.
            log.info("not advertised on the LAN: the node listens on %s only", host)
            return
        try:
            await advertiser.start()
        except OSError as exc:  # no multicast-capable interface: the node serves, unadvertised
            log.warning(
                "not advertised on the LAN: zeroconf could not start (%s)", exc.strerror or type(exc).__name__
            )
            return
        except NonUniqueNameException:
            log.warning(
                "not advertised on the LAN: another record there already uses the name %s",
                settings.node_id,
            )
            return
        while True:
            await state.advert_changed.wait()
            state.advert_changed.clear()
            advertiser.update(advert(state))

    task = asyncio.create_task(run(), name="hearth-advertise")
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        for advertiser in holder:
            await advertiser.close()
