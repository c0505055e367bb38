"""One client socket: an asyncio protocol, from the HTTP upgrade to the close.

No task, stream or per-message object lives for an idle socket: the protocol object (with
``__slots__``), its transport and its parser are all there is, which is what keeps a held
connection at a few kilobytes. Incoming bytes are parsed in ``data_received``; outgoing
frames are appended to ``pending`` by the hub during a batch and written with one
``writelines`` per socket and batch (:meth:`flush`).

**The send queue is the transport's buffer**, bounded in bytes: before each write the
socket's unsent bytes are checked against ``queue_limit`` and a socket that cannot keep up
is closed with 4008 (the client resumes with its cursors). Writes never wait, so one slow
reader cannot hold up delivery to the others.
"""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Final, cast

import msgspec

from fanout import frames
from fanout.handshake import MAX_HEAD, HttpRefusal, check_upgrade, parse_head, refusal
from fanout.handshake import upgrade_response as _upgrade_response
from fanout.metrics import FRAMES_REFUSED
from fanout.wire import (
    CLOSE_POLICY,
    CLOSE_RATE_LIMITED,
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    FrameParser,
    ProtocolError,
    close_frame,
    frame,
    parse_close,
)

if TYPE_CHECKING:
    from fanout.hub import Hub

HEAD: Final = 0
"""Reading the HTTP request."""
AUTH: Final = 1
"""Upgraded; waiting for the ``auth`` frame."""
ADMITTING: Final = 2
"""Authenticating and loading the user's conversations."""
OPEN: Final = 3
CLOSED: Final = 4

Buffered = list[tuple[int, bytes]]


class Connection(asyncio.Protocol):
    __slots__ = (
        "_head",
        "_parser",
        "_stamp",
        "_tokens",
        "_violations",
        "hub",
        "last_seen",
        "pending",
        "resuming",
        "session_id",
        "since",
        "state",
        "transport",
        "typing_at",
        "user_id",
    )

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.transport: asyncio.Transport | None = None
        self.state = HEAD
        self._head = b""
        self._parser: FrameParser | None = None
        self.user_id: uuid.UUID | None = None
        self.session_id: uuid.UUID | None = None
        self.since: dict[int, int] = {}
        """Tail position when the socket subscribed: what it was sent live starts here."""
        self.resuming: dict[uuid.UUID, Buffered] | None = None
        """Live frames held back per conversation while its missed events are replayed."""
        self.pending: list[bytes] | None = None
        self.typing_at: dict[uuid.UUID, float] | None = None
        self._tokens = float(hub.config.frame_burst)
        self._stamp = self.last_seen = time.monotonic()
        self._violations = 0

    # --- asyncio.Protocol ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCP transport implements asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        if self.hub.config.send_buffer:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.hub.config.send_buffer)
        self.hub.opened(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.state = CLOSED
        self.transport = None
        self.pending = None
        self.resuming = None
        self.hub.lost(self)

    def data_received(self, data: bytes) -> None:
        self.last_seen = time.monotonic()
        if self.state == HEAD:
            self._read_head(data)
            return
        if self._parser is None or self.state == CLOSED:
            return
        try:
            messages = self._parser.feed(data)
        except ProtocolError as exc:
            FRAMES_REFUSED.labels("protocol").inc()
            self.close(exc.code, exc.reason)
            return
        for opcode, payload in messages:
            if self.state == CLOSED:
                return
            self._message(opcode, payload)

    # --- the HTTP request --------------------------------------------------------------

    def _read_head(self, data: bytes) -> None:
        head = self._head + data
        end = head.find(b"\r\n\r\n")
        if end < 0:
            if len(head) > MAX_HEAD:
                self._refuse(HttpRefusal(431, "request head too large"))
            else:
                self._head = head
            return
        self._head = b""
        try:
            request = parse_head(head[:end])
            if request.path != "/v1/ws":
                self.hub.http(self, request)
                return
            key = check_upgrade(request, self.hub.config.origins)
        except HttpRefusal as exc:
            self._refuse(exc)
            return
        self._parser = FrameParser(self.hub.config.max_frame)
        self.state = AUTH
        self.write_raw(_upgrade_response(key))
        if rest := head[end + 4 :]:
            self.data_received(rest)

    def _refuse(self, error: HttpRefusal) -> None:
        FRAMES_REFUSED.labels(f"http_{error.status}").inc()
        self.answer(refusal(error))

    def answer(self, raw: bytes) -> None:
        """Write a complete HTTP response and close (no keep-alive)."""
        self.state = CLOSED
        if self.transport is not None:
            self.transport.write(raw)
            self.transport.close()

    # --- WebSocket messages ------------------------------------------------------------

    def _message(self, opcode: int, payload: bytes) -> None:
        if opcode == OP_PING:
            self.write_raw(frame(OP_PONG, payload))
            return
        if opcode == OP_PONG:
            return
        if opcode == OP_CLOSE:
            self.close(parse_close(payload) if payload else 1000, echo=True)
            return
        if not self._allowed():
            return
        assert opcode in (OP_TEXT, OP_BINARY)  # JSON either way
        try:
            message = frames.decode_client_frame(payload)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            self.violation("malformed", str(exc)[:200])
            return
        self.hub.on_frame(self, message)

    def _allowed(self) -> bool:
        """Token bucket over client frames; over the limit is a violation."""
        config = self.hub.config
        now = time.monotonic()
        self._tokens = min(
            float(config.frame_burst), self._tokens + (now - self._stamp) * config.frame_rate
        )
        self._stamp = now
        if self._tokens < 1.0:
            self.violation("rate_limited", "too many frames", close_code=CLOSE_RATE_LIMITED)
            return False
        self._tokens -= 1.0
        return True

    def violation(self, code: str, detail: str, *, close_code: int = CLOSE_POLICY) -> None:
        """Answer a bad frame with an error frame; close once they keep coming."""
        FRAMES_REFUSED.labels(code).inc()
        self._violations += 1
        if self._violations > self.hub.config.max_violations:
            self.close(close_code, code)
        else:
            self.write_raw(frames.error(code, detail))

    # --- writing -----------------------------------------------------------------------

    def write_raw(self, data: bytes) -> None:
        if self.transport is not None and self.state != CLOSED:
            self.transport.write(data)

    def flush(self) -> None:
        """Write what the hub queued during a batch, or close the socket if it is too slow."""
        pending, self.pending = self.pending, None
        if pending:
            self.send(pending)

    def send(self, data: Sequence[bytes]) -> None:
        transport = self.transport
        if transport is None or self.state == CLOSED:
            return
        if transport.get_write_buffer_size() > self.hub.config.queue_limit:
            self.hub.too_slow(self)
            return
        transport.writelines(data)

    def close(self, code: int, reason: str = "", *, echo: bool = False) -> None:
        """Send a close frame and close; the hub aborts the socket if it never drains."""
        if self.state == CLOSED or self.transport is None:
            return
        was_open = self.state != HEAD
        self.state = CLOSED
        self.pending = None
        self.resuming = None
        if was_open:
            self.transport.write(close_frame(code, "" if echo else reason))
        self.transport.close()
        self.hub.closing(self)

    def buffered(self) -> int:
        return 0 if self.transport is None else self.transport.get_write_buffer_size()
