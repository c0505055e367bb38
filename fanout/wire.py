"""RFC 6455 framing, sans I/O: the handshake answer, server frames, and a client-frame parser.

The server writes unmasked, unfragmented, uncompressed frames, so a frame is a header plus
the payload: :func:`text_frame` is computed once per event and the very same bytes are
written to every subscriber. Per-message compression is never negotiated, since it would
make every socket's bytes different (and cost CPU per socket).

Clients must mask their frames; fragmented messages are accepted up to the size limit.
"""

from __future__ import annotations

import base64
import hashlib
import struct
from typing import Final

OP_CONTINUATION: Final = 0x0
OP_TEXT: Final = 0x1
OP_BINARY: Final = 0x2
OP_CLOSE: Final = 0x8
OP_PING: Final = 0x9
OP_PONG: Final = 0xA

CLOSE_NORMAL: Final = 1000
CLOSE_GOING_AWAY: Final = 1001
CLOSE_PROTOCOL_ERROR: Final = 1002
CLOSE_POLICY: Final = 1008
CLOSE_TOO_BIG: Final = 1009
CLOSE_INTERNAL: Final = 1011
CLOSE_TRY_AGAIN: Final = 1013
CLOSE_UNAUTHORIZED: Final = 4001
CLOSE_TOO_SLOW: Final = 4008
CLOSE_EPOCH_CHANGED: Final = 4009
CLOSE_RATE_LIMITED: Final = 4029

_GUID: Final = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class ProtocolError(Exception):
    """The peer broke RFC 6455 (or our size limit); ``code`` is the close code to answer."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def accept_key(key: str) -> str:
    """The ``Sec-WebSocket-Accept`` value answering a client's ``Sec-WebSocket-Key``."""
    return base64.b64encode(hashlib.sha1(key.encode() + _GUID).digest()).decode()  # noqa: S324 - RFC 6455 mandates SHA-1 here


def frame(opcode: int, payload: bytes) -> bytes:
    """One final, unmasked frame (what a server sends)."""
    length = len(payload)
    first = 0x80 | opcode
    if length < 126:
        return bytes((first, length)) + payload
    if length < 65536:
        return struct.pack("!BBH", first, 126, length) + payload
    return struct.pack("!BBQ", first, 127, length) + payload


def text_frame(payload: bytes) -> bytes:
    """A text frame carrying ``payload`` (UTF-8 JSON)."""
    return frame(OP_TEXT, payload)


def close_frame(code: int, reason: str = "") -> bytes:
    return frame(OP_CLOSE, struct.pack("!H", code) + reason.encode()[:120])


def _unmask(mask: bytes, data: bytes) -> bytes:
    if not data:
        return data
    length = len(data)
    key = int.from_bytes((mask * (length // 4 + 1))[:length], "little")
    return (int.from_bytes(data, "little") ^ key).to_bytes(length, "little")


class FrameParser:
    """Turns received bytes into complete messages: ``(opcode, payload)`` pairs.

    Data frames are reassembled across continuation frames; control frames (close, ping,
    pong) are returned as they come. A message or frame above ``max_size`` bytes raises
    :class:`ProtocolError` with 1009 before its payload is buffered.
    """

    __slots__ = ("_buffer", "_fragments", "_fragments_opcode", "_max_size")

    def __init__(self, max_size: int) -> None:
        self._max_size = max_size
        self._buffer = b""
        self._fragments: list[bytes] | None = None
        self._fragments_opcode = 0

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        buffer = self._buffer + data if self._buffer else data
        messages: list[tuple[int, bytes]] = []
        while True:
            parsed = self._one(buffer)
            if parsed is None:
                break
            consumed, fin, opcode, payload = parsed
            buffer = buffer[consumed:]
            message = self._assemble(fin, opcode, payload)
            if message is not None:
                messages.append(message)
        self._buffer = buffer
        return messages

    def _one(self, buffer: bytes) -> tuple[int, bool, int, bytes] | None:
        if len(buffer) < 2:
            return None
        first, second = buffer[0], buffer[1]
        if first & 0x70:
            raise ProtocolError(CLOSE_PROTOCOL_ERROR, "reserved bits set")
        if not second & 0x80:
            raise ProtocolError(CLOSE_PROTOCOL_ERROR, "client frames must be masked")
        length = second & 0x7F
        offset = 2
        if length == 126:
            if len(buffer) < 4:
                return None
            (length,) = struct.unpack_from("!H", buffer, 2)
            offset = 4
        elif length == 127:
            if len(buffer) < 10:
                return None
            (length,) = struct.unpack_from("!Q", buffer, 2)
            offset = 10
        if length > self._max_size:
            raise ProtocolError(CLOSE_TOO_BIG, "frame too large")
        end = offset + 4 + length
        if len(buffer) < end:
            return None
        mask = buffer[offset : offset + 4]
        payload = _unmask(mask, buffer[offset + 4 : end])
        return end, bool(first & 0x80), first & 0x0F, payload

    def _assemble(self, fin: bool, opcode: int, payload: bytes) -> tuple[int, bytes] | None:
        if opcode >= OP_CLOSE:
            if not fin or len(payload) > 125:
                raise ProtocolError(CLOSE_PROTOCOL_ERROR, "bad control frame")
            return opcode, payload
        if opcode == OP_CONTINUATION:
            if self._fragments is None:
                raise ProtocolError(CLOSE_PROTOCOL_ERROR, "continuation without a start")
            self._fragments.append(payload)
            if sum(map(len, self._fragments)) > self._max_size:
                raise ProtocolError(CLOSE_TOO_BIG, "message too large")
            if not fin:
                return None
            whole = b"".join(self._fragments)
            self._fragments = None
            return self._fragments_opcode, whole
        if opcode not in (OP_TEXT, OP_BINARY):
            raise ProtocolError(CLOSE_PROTOCOL_ERROR, f"unknown opcode {opcode}")
        if self._fragments is not None:
            raise ProtocolError(CLOSE_PROTOCOL_ERROR, "new message inside a fragmented one")
        if fin:
            return opcode, payload
        self._fragments = [payload]
        self._fragments_opcode = opcode
        return None


def parse_close(payload: bytes) -> int:
    """The close code in a close frame's payload (1005 when it carries none)."""
    if len(payload) >= 2:
        code: int = struct.unpack_from("!H", payload)[0]
        return code
    return 1005
