"""Benchmark: what the E2E envelope costs (not a test: it prints figures).

    .venv/bin/python -m tests.bench.bench_envelope

Per request: sealing a 2 KiB chat body for 1 and 4 candidates (the proxy's cost) and opening it (the node's).
Per frame: sealing and opening one token-sized frame (~40 bytes of SSE, padded to 64).
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from protocol.envelope import (
    Candidate,
    ResponseOpener,
    ResponseSealer,
    from_wire,
    open_request,
    peek,
    seal_request,
    to_wire,
)

BODY = b'{"model": "m", "messages": [{"role": "user", "content": "' + b"x" * 2000 + b'"}]}'
FRAME = b'data: {"choices":[{"delta":{"content":" word"}}]}\n\n'


def timed(fn: Callable[[], object], n: int) -> tuple[float, float]:
    """(median, p99) microseconds per call, over ``n`` calls after a warm-up."""
    for _ in range(min(100, n)):
        fn()
    times = []
    for _ in range(n):
        start = time.perf_counter_ns()
        fn()
        times.append((time.perf_counter_ns() - start) / 1000)
    times.sort()
    return statistics.median(times), times[int(0.99 * n) - 1]


def main() -> None:
    keys = [X25519PrivateKey.generate() for _ in range(4)]
    kid = "0123456789abcdef0123"
    candidates = [Candidate(f"n{i}", kid, k.public_key()) for i, k in enumerate(keys)]

    def seal(k: int) -> Callable[[], object]:
        return lambda: seal_request(BODY, endpoint="chat", model="m", max_tokens=256, stream=True, request_id="r",
                                    issued_at=int(time.time()), ttl_s=60, candidates=candidates[:k])  # fmt: skip

    sealed, _ = seal(4)()
    now = int(time.time())
    wire = json.dumps(to_wire(sealed))
    rows = [
        ("seal a 2 KiB request, 1 candidate", timed(seal(1), 2000)),
        ("seal a 2 KiB request, 4 candidates", timed(seal(4), 2000)),
        ("open it (one node)", timed(lambda: open_request(sealed, node_id="n0", keys={kid: keys[0]}, now=now), 2000)),
        ("its wire form, checked (the scheduler)", timed(lambda: peek(json.loads(wire)), 2000)),
        ("its wire form, parsed (the node)", timed(lambda: from_wire(json.loads(wire)), 2000)),
    ]  # fmt: skip
    sealer = ResponseSealer(bytes(32), "r")
    frames = [sealer.seal(FRAME) for _ in range(20_000)]
    sealing = ResponseSealer(bytes(32), "r2")
    rows.append(("seal one token frame", timed(lambda: sealing.seal(FRAME), 10_000)))
    rows.append(("start a response (HKDF)", timed(lambda: ResponseSealer(bytes(32), "r"), 5000)))
    opener = ResponseOpener(bytes(32), "r")
    it = iter(frames)
    rows.append(("open one token frame", timed(lambda: opener.open(next(it), final=False), 10_000)))
    print(f"{'operation':<40} {'median µs':>10} {'p99 µs':>10}")
    for name, (median, p99) in rows:
        print(f"{name:<40} {median:>10.1f} {p99:>10.1f}")


if __name__ == "__main__":
    main()
