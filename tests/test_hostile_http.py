"""Hostile HTTP against the real `hearth up --demo`: malformed messages, slow and greedy clients.

A canary goes through every malformed form of HTTP a client (or an attacker) can send, to the scheduler and
to the node, and then must appear nowhere: not in stdout or stderr (DEBUG logging on), not in any file under
the data directory, in no encoding (raw, UTF-16, hex, base64). aiohttp's own "Error handling request" line
quoted the bytes its parser choked on; Hearth answers a malformed message in OpenAI's error shape, naming no
byte of it, and logs nothing (protocol.server).

Slow clients are bounded (protocol.server): headers that trickle are cut after the header timeout, a
`Content-Length` over the limit is refused on its header, and one address holds a bounded number of
connections. The limits are lowered here through the environment, as an operator would set them.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import time
import uuid
from collections.abc import Iterator
from urllib.parse import urlsplit

import httpx
import pytest

from tests.test_up import Running, _start

HEADER_TIMEOUT_S = 2
MAX_PER_ADDRESS = 24
CANARY = f"CANARY-{uuid.uuid4().hex}"


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    base = tmp_path_factory.mktemp("hostile")
    (base / "logs").mkdir()
    limits = {
        f"HEARTH_{role}__HTTP__HEADER_TIMEOUT": str(HEADER_TIMEOUT_S) for role in ("SCHEDULER", "NODE")
    } | {
        f"HEARTH_{role}__HTTP__MAX_CONNECTIONS_PER_ADDRESS": str(MAX_PER_ADDRESS)
        for role in ("SCHEDULER", "NODE")
    }
    saved = {k: os.environ.get(k) for k in limits}
    os.environ.update(limits)
    try:
        run = _start(base / "data", base / "logs")
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    yield run
    if run.proc.poll() is None:
        run.proc.kill()
        run.proc.wait()


def _address(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    return parts.hostname, parts.port


def _node_url(running: Running) -> str:
    run = json.loads((running.data_dir / "node" / "run.json").read_text())
    return str(run["url"])


def _exchange(address: tuple[str, int], raw: bytes, *, wait: float = 10.0) -> bytes:
    """Send ``raw`` on a fresh connection and read until the server closes it or ``wait`` passes."""
    with socket.create_connection(address, timeout=wait) as sock:
        sock.sendall(raw)
        sock.shutdown(socket.SHUT_WR)
        got = b""
        try:
            while chunk := sock.recv(65536):
                got += chunk
        except (TimeoutError, ConnectionResetError):
            pass
        return got


def _chat(canary: str) -> bytes:
    return json.dumps(
        {"model": "hearth-demo", "messages": [{"role": "user", "content": f"secret {canary}"}]}
    ).encode()


def _malformed(canary: str, token: str) -> dict[str, bytes]:
    """Malformed HTTP messages, each carrying the canary where a parser will choke on or near it."""
    body = _chat(canary)
    auth = f"Authorization: Bearer {token}\r\n".encode()
    post = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + auth
    c = canary.encode()
    return {
        # a chunk size that is not hexadecimal, and a prompt in the chunk
        "bad chunk size": post + b"Transfer-Encoding: chunked\r\n\r\n" + c + b"\r\n" + body + b"\r\n0\r\n\r\n",
        # a chunk whose size says less than it holds
        "short chunk": post + b"Transfer-Encoding: chunked\r\n\r\n5\r\n" + body + b"\r\n0\r\n\r\n",
        # a NUL byte inside a header value
        "NUL in a header": post + b"X-Note: a\x00" + c + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body,
        # a request line with a broken method and the canary as its target
        "bad request line": b"P\x01ST /" + c + b" HTTP/1.1\r\nHost: x\r\n\r\n" + body,
        # an HTTP version that does not exist
        "bad version": b"POST /v1/chat/completions HTTP/9." + c + b"\r\nHost: x\r\n\r\n",
        # a header name with a space in it
        "bad header name": post + b"Bad Header" + c + b": 1\r\nContent-Length: 2\r\n\r\n{}",
        # a Content-Length that is not a number
        "bad content length": post + b"Content-Length: " + c + b"\r\n\r\n" + body,
        # two Content-Lengths that disagree (request smuggling)
        "two lengths": post + b"Content-Length: 3\r\nContent-Length: %d\r\n\r\n" % len(body) + body,
        # Transfer-Encoding and Content-Length together (smuggling again)
        "TE and CL": post + b"Transfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n" + body,
        # a header line longer than the parser allows, made of the canary
        "long header": post + b"X-Long: " + c * 600 + b"\r\n\r\n",
        # a body that is not UTF-8, with the canary inside
        "latin-1 body": post + b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n"
        % (len(body) + 2) + b"\xff\xfe" + body,
        # invalid JSON quoting the canary
        "bad json": post + b"Content-Length: %d\r\n\r\n" % (len(c) + 1) + b"{" + c,
        # a body shorter than its Content-Length, then the connection ends
        "truncated body": post + b"Content-Length: %d\r\n\r\n" % (len(body) + 100) + body,
        # a bearer token made of the canary and bytes that are not ASCII
        "non-ASCII token": b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff"
        + c + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body,
        # not HTTP at all
        "TLS to a plain port": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + c,
    }  # fmt: skip


def _encodings(canary: str) -> dict[str, bytes]:
    raw = canary.encode()
    forms = {
        "raw": raw,
        "utf-16-le": canary.encode("utf-16-le"),
        "utf-16-be": canary.encode("utf-16-be"),
        "hex": raw.hex().encode(),
        "HEX": raw.hex().upper().encode(),
    }
    # base64 of the canary wherever it sits in a larger text: the middle of all three alignments.
    for shift in range(3):
        encoded = base64.b64encode(b"x" * shift + raw)
        forms[f"base64+{shift}"] = encoded[4 : len(encoded) - 4]
    return forms


def _leaks(running: Running, canary: str) -> list[str]:
    files = [p for p in running.data_dir.rglob("*") if p.is_file()] + [running.stdout, running.stderr]
    assert any(p.name == "hearth.db" for p in files)
    found = []
    for path in files:
        data = path.read_bytes()
        found += [f"{path.name} ({name})" for name, form in _encodings(canary).items() if form in data]
    return found


def test_malformed_http_leaves_no_trace_and_no_server_error(running: Running) -> None:
    targets = {"scheduler": _address(running.api), "node": _address(_node_url(running))}
    for target, address in targets.items():
        for name, raw in _malformed(CANARY, running.token).items():
            answer = _exchange(address, raw)
            status_line = answer.split(b"\r\n", 1)[0]
            # Every malformed message is the client's fault: a 4xx, or the connection closed, never a 5xx.
            assert not status_line.startswith((b"HTTP/1.1 5", b"HTTP/1.0 5")), (target, name, status_line)
            if answer:  # OpenAI's error shape, naming no byte the client sent
                body = json.loads(answer.split(b"\r\n\r\n", 1)[1])
                assert body["error"]["type"] == "invalid_request_error", (target, name, body)
                assert CANARY not in json.dumps(body), (target, name)
    # The services are still up and answer properly.
    r = httpx.get(running.api + "/models", headers={"Authorization": f"Bearer {running.token}"}, timeout=30)
    assert r.status_code == 200
    time.sleep(0.5)  # let the log lines of the last connections be written
    stderr = running.stderr.read_text(errors="replace")
    # A client's malformed request says nothing to the operator: no line at all (no log flooding either).
    assert "Error handling request" not in stderr
    assert "Traceback" not in stderr
    assert _leaks(running, CANARY) == []


def test_a_body_announced_over_the_limit_is_refused_on_its_header(running: Running) -> None:
    address = _address(running.api)
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer " + running.token.encode() + b"\r\nContent-Length: %d\r\n\r\n" % (10 << 30)
    )
    with socket.create_connection(address, timeout=20) as sock:
        sock.sendall(head + b'{"model": "hearth-demo"')  # 20-odd bytes of the announced 10 GiB
        # The answer comes without the rest of the body (the socket timeout is far below the 30 s the
        # body would be waited for), and the connection is then closed.
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 413"), answer[:100]
    body = json.loads(answer.split(b"\r\n\r\n", 1)[1])
    assert body["error"]["code"] == "payload_too_large"


def test_headers_that_trickle_are_cut_and_others_are_served_meanwhile(running: Running) -> None:
    address = _address(running.api)
    slow = []
    for i in range(12):
        sock = socket.create_connection(address, timeout=60)
        # Half begin with the empty lines a parser skips before a request line: no head is complete.
        sock.sendall((b"\r\n\r\n" if i % 2 else b"") + b"POST /v1/chat/completions HTTP/1.1\r\n")
        slow.append(sock)
    try:
        closed: set[int] = set()
        deadline = time.monotonic() + 60  # far beyond the 2 s timeout; the assertion is that they end
        served = 0
        while len(closed) < len(slow) and time.monotonic() < deadline:
            for i, sock in enumerate(slow):
                if i in closed:
                    continue
                try:
                    sock.sendall(b"X")  # one byte a round: never a whole header line
                    sock.settimeout(0.05)
                    if sock.recv(1024) == b"":
                        closed.add(i)
                except TimeoutError:
                    pass
                except (BrokenPipeError, ConnectionResetError):
                    closed.add(i)
            r = httpx.get(running.api + "/models", headers={"Authorization": f"Bearer {running.token}"})
            served += r.status_code == 200
            time.sleep(0.3)
        assert len(closed) == len(slow), "every trickling connection was closed"
        assert served >= 1
    finally:
        for sock in slow:
            sock.close()


def test_one_address_holds_a_bounded_number_of_connections(running: Running) -> None:
    address = _address(running.api)
    held: list[socket.socket] = []
    try:
        # Idle connections (no byte sent) up to the limit; other tests' connections may still be closing,
        # so open until the server refuses one.
        refused = None
        for _ in range(MAX_PER_ADDRESS + 8):
            sock = socket.create_connection(address, timeout=20)
            sock.settimeout(0.3)
            try:
                first = sock.recv(65536)
            except TimeoutError:
                held.append(sock)
                continue
            refused = first
            sock.settimeout(20)
            while chunk := sock.recv(65536):
                refused += chunk
            sock.close()
            break
        assert refused is not None, "a connection over the limit was refused"
        assert len(held) <= MAX_PER_ADDRESS
        assert refused.startswith(b"HTTP/1.1 503"), refused[:80]
        head, body = refused.split(b"\r\n\r\n", 1)
        assert b"Retry-After:" in head
        assert json.loads(body)["error"]["code"] == "too_many_connections"
    finally:
        for sock in held:
            sock.close()
    # Once they are closed, the address is served again.
    deadline = time.monotonic() + 30
    while True:
        try:
            r = httpx.get(running.api + "/models", headers={"Authorization": f"Bearer {running.token}"})
            if r.status_code == 200:
                break
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "served again after the connections closed"
        time.sleep(0.2)
