"""The node → scheduler response stream: a sequence of frames.

    frame = length (4 bytes, big-endian, payload only) ‖ flags (1 byte) ‖ payload

Flags: ``DATA`` payloads are bytes for the client, exactly as the client will receive them (SSE events, or
the whole JSON body of a non-streaming answer), so the scheduler relays them without parsing. ``META``
payloads are JSON for the scheduler (usage, finish reason). ``ERROR`` payloads are an error body in OpenAI's
shape plus the HTTP status. ``FINAL`` marks the last frame; a stream that ends without it was cut.

The end-to-end encryption issue seals DATA payloads; the framing stays the same, which is why it exists
already in the plaintext path. Lengths are checked before anything is allocated.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any

from protocol.errors import ProtocolError

HEADER = struct.Struct(">IB")
MAX_FRAME_PAYLOAD = 4 * 1024 * 1024

DATA = 0x00
FINAL = 0x01
META = 0x02
ERROR = 0x04
ROUTE = 0x08  # scheduler → proxy, sealed streams: {"node_id", "seq"}: the node whose frames follow
_KNOWN_FLAGS = FINAL | META | ERROR | ROUTE

MEDIA_TYPE = "application/x-hearth-frames"


@dataclass(frozen=True, slots=True)
class Frame:
    flags: int
    payload: bytes

    @property
    def final(self) -> bool:
        return bool(self.flags & FINAL)

    @property
    def kind(self) -> int:
        return self.flags & (META | ERROR | ROUTE)

    def json(self) -> Any:
        try:
            return json.loads(self.payload)
        except (ValueError, UnicodeDecodeError):
            raise ProtocolError("a node frame carried malformed JSON") from None


def encode(payload: bytes, flags: int = DATA) -> bytes:
    if len(payload) > MAX_FRAME_PAYLOAD:
        raise ProtocolError("frame payload too large")
    return HEADER.pack(len(payload), flags) + payload


def encode_data(payload: bytes) -> bytes:
    """DATA frames for a payload of any size (a long non-streaming answer spans several frames)."""
    if len(payload) <= MAX_FRAME_PAYLOAD:
        return encode(payload)
    step = MAX_FRAME_PAYLOAD
    return b"".join(encode(payload[i : i + step]) for i in range(0, len(payload), step))


def encode_json(obj: Any, flags: int) -> bytes:
    return encode(json.dumps(obj, separators=(",", ":")).encode(), flags)


class FrameDecoder:
    """Incremental decoder: feed it bytes as they arrive, get whole frames back."""

    def __init__(self, max_payload: int = MAX_FRAME_PAYLOAD) -> None:
        self._buf = bytearray()
        self._max = max_payload
        self.finished = False

    def feed(self, data: bytes) -> list[Frame]:
        if self.finished and data:
            raise ProtocolError("bytes after the final frame")
        self._buf += data
        frames: list[Frame] = []
        while len(self._buf) >= HEADER.size:
            length, flags = HEADER.unpack_from(self._buf)
            if length > self._max:
                raise ProtocolError("frame length over the limit")
            if flags & ~_KNOWN_FLAGS:
                raise ProtocolError("unknown frame flags")
            end = HEADER.size + length
            if len(self._buf) < end:
                break
            frames.append(Frame(flags, bytes(self._buf[HEADER.size : end])))
            del self._buf[:end]
            if flags & FINAL:
                self.finished = True
                if self._buf:
                    raise ProtocolError("bytes after the final frame")
                break
        return frames

    def close(self) -> None:
        """Call at end of input: a stream that ends without its final frame was cut."""
        if not self.finished:
            raise ProtocolError("the stream ended before its final frame")
