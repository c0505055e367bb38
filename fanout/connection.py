"""One client socket: an asyncio protocol, from the HTTP request to the close.

No task, stream or per-message object lives for an idle socket: the protocol object (with
``__slots__``), its transport and its wsproto connection are all there is, which is what keeps
a held connection at a few kilobytes. The request head is read by h11 and the upgrade accepted
by wsproto (:mod:`fanout.handshake`); from then on incoming bytes are fed to the wsproto
connection in ``data_received`` and its events handled at once. Outgoing frames are appended to
``pending`` by the hub during a batch and written with one ``writelines`` per socket and batch
(:meth:`flush`); they are encoded once per event, not per socket (:mod:`fanout.wire`), so only
control frames (pong, close) go through the socket's own wsproto connection.

**The send queue is the transport's buffer**, bounded in bytes: before each write (events,
and the socket's own frames: pongs, errors, ``ready``) the socket's unsent bytes are checked
against ``queue_limit`` and a socket that cannot keep up is closed with 4008 (the client
resumes with its cursors). Writes never wait, so one slow reader cannot hold up delivery to
the others. Frames the hub holds back for a socket during a resume (``held``, in bytes) count
as queued too; only a resume's replay waits for the socket to drain (:meth:`drained`), and a
replay is written in steps, so a socket that does not read never has a whole history queued.
"""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final, cast

import h11
import msgspec
from wsproto.connection import Connection as WebSocket
from wsproto.connection import ConnectionState
from wsproto.events import CloseConnection, Message, Ping, TextMessage

from fanout import frames
from fanout.handshake import (
    HttpRefusal,
    RequestHead,
    accept,
    check_upgrade,
    http_server,
    refusal,
    response,
)
from fanout.metrics import FRAMES_REFUSED
from fanout.wire import CLOSE_POLICY, CLOSE_RATE_LIMITED, CLOSE_TOO_BIG

if TYPE_CHECKING:
    from fanout.hub import Hub

HEAD: Final = 0
"""Reading the HTTP request (or answering a plain HTTP one)."""
AUTH: Final = 1
"""Upgraded; waiting for the ``auth`` frame."""
ADMITTING: Final = 2
"""Authenticating and loading the user's conversations."""
OPEN: Final = 3
CLOSED: Final = 4

Buffered = list[tuple[int, bytes]]

_CAN_CLOSE: Final = frozenset({ConnectionState.OPEN, ConnectionState.REMOTE_CLOSING})
"""wsproto states in which a close frame is still ours to send (first, or as the answer)."""


class Connection(asyncio.Protocol):
    __slots__ = (
        "_drain",
        "_fragments",
        "_http",
        "_partial",
        "_partial_size",
        "_paused",
        "_stamp",
        "_tokens",
        "_violations",
        "_ws",
        "held",
        "hub",
        "last_seen",
        "pending",
        "resuming",
        "session_id",
        "since",
        "started",
        "state",
        "transport",
        "typing_at",
        "user_id",
    )

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.transport: asyncio.Transport | None = None
        self.state = HEAD
        self._http: h11.Connection | None = http_server()
        """Reads the request head; dropped once the socket is upgraded or answered."""
        self._ws: WebSocket | None = None
        self._partial: list[Any] | None = None
        """The parts of a client message wsproto delivered in pieces, until its last one."""
        self._partial_size = 0
        """Bytes in ``_partial``, kept as they come (not re-summed per part)."""
        self._fragments = 0
        """Frames of the message in ``_partial`` so far (empty ones included)."""
        self.user_id: uuid.UUID | None = None
        self.session_id: uuid.UUID | None = None
        self.since: dict[int, int] = {}
        """Tail position when the socket subscribed: what it was sent live starts here."""
        self.resuming: dict[uuid.UUID, Buffered] | None = None
        """Live frames held back per conversation while its missed events are replayed."""
        self.held = 0
        """Bytes in ``resuming``: queued for the socket as much as its transport's buffer."""
        self._paused = False
        """Whether the transport asked us to stop writing (its buffer is past high water)."""
        self._drain: asyncio.Future[None] | None = None
        """Resolved when the transport resumes writing (or the socket goes): see :meth:`drained`."""
        self.pending: list[bytes] | None = None
        self.typing_at: dict[uuid.UUID, float] | None = None
        self._tokens = float(hub.config.frame_burst)
        self.started = self._stamp = self.last_seen = time.monotonic()
        """``started`` bounds the upgrade and the ``auth`` frame (``auth_timeout``), which no
        later byte extends; ``last_seen`` (any byte, pings included) only bounds idleness."""
        self._violations = 0

    # --- asyncio.Protocol ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's TCP transport implements asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        # The replay of a resume waits for the buffer to fall back under the low-water mark
        # once it passes the high one; the high one must come before ``queue_limit``.
        high = min(64 * 1024, self.hub.config.queue_limit // 2)
        self.transport.set_write_buffer_limits(high=high)
        if self.hub.config.send_buffer:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.hub.config.send_buffer)
        self.hub.opened(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.state = CLOSED
        self.transport = None
        self._http = None
        self._ws = None
        self._partial = None
        self.pending = None
        self.resuming = None
        self.held = 0
        self._wake()
        self.hub.lost(self)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._wake()

    def _wake(self) -> None:
        drain, self._drain = self._drain, None
        if drain is not None and not drain.done():
            drain.set_result(None)

    def data_received(self, data: bytes) -> None:
        self.last_seen = time.monotonic()
        if self.state == HEAD:
            self._read_head(data)
            return
        ws = self._ws
        if ws is None or self.state == CLOSED:
            return
        ws.receive_data(data)
        for event in ws.events():
            if self.state == CLOSED:
                return
            self._event(ws, event)

    # --- the HTTP request --------------------------------------------------------------

    def _read_head(self, data: bytes) -> None:
        http = self._http
        if http is None or http.their_state is not h11.IDLE:
            return  # the request is being answered; nothing else is read
        try:
            http.receive_data(data)
            event = http.next_event()
        except h11.RemoteProtocolError as exc:
            self.refuse(HttpRefusal(exc.error_status_hint, str(exc)))
            return
        if event is h11.NEED_DATA:
            return
        if not isinstance(event, h11.Request):
            self.abandon()  # the peer closed before sending a request
            return
        head = RequestHead.from_h11(event)
        if head.path != "/v1/ws":
            self.hub.http(self, head)
            return
        try:
            check_upgrade(head, self.hub.config.origins)
            answer, ws = accept(event)
            # Past the head (and a body, which a GET has not) h11 pauses for the protocol
            # switch and keeps what followed: the client's first frames.
            after = http.next_event()
            while isinstance(after, h11.Data | h11.EndOfMessage):
                after = http.next_event()
        except HttpRefusal as exc:
            self.refuse(exc)
            return
        except h11.RemoteProtocolError as exc:
            self.refuse(HttpRefusal(exc.error_status_hint, str(exc)))
            return
        rest, _ = http.trailing_data
        self._http = None
        self._ws = ws
        self.state = AUTH
        self.write_raw(answer)
        if rest:
            self.data_received(bytes(rest))

    def refuse(self, error: HttpRefusal) -> None:
        """Answer the HTTP request with an error status (problem in JSON), and close."""
        FRAMES_REFUSED.labels(f"http_{error.status}").inc()
        http = self._http
        self.answer(b"" if http is None else refusal(http, error))

    def respond(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        """Answer the plain HTTP request this connection read, and close."""
        http = self._http
        try:
            raw = b"" if http is None else response(http, status, body, content_type)
        except h11.LocalProtocolError:  # e.g. a body for a HEAD request: just close
            raw = b""
        self.answer(raw)

    def answer(self, raw: bytes) -> None:
        """Write a complete HTTP response and close (no keep-alive)."""
        self.state = CLOSED
        self._http = None
        if self.transport is not None:
            if raw:
                self.transport.write(raw)
            self.transport.close()

    def abandon(self) -> None:
        """Close a connection that is still in its HTTP request, without an answer."""
        self.answer(b"")

    # --- WebSocket messages ------------------------------------------------------------

    def _event(self, ws: WebSocket, event: object) -> None:
        if isinstance(event, Message):
            self._data(event)
        elif isinstance(event, Ping):
            self.write_raw(ws.send(event.response()))
        elif isinstance(event, CloseConnection):
            # The client's own close is echoed with its code (RFC 6455 5.5.1); otherwise
            # wsproto found a protocol error (framing, masking, UTF-8) and names the code.
            if ws.state is not ConnectionState.REMOTE_CLOSING:
                FRAMES_REFUSED.labels("protocol").inc()
            self.close(event.code, event.reason or "")
        # Pong: nothing to do (the client's activity already counts in ``last_seen``).

    def _data(self, event: Message[Any]) -> None:
        """Collect a client message (wsproto may deliver it in parts) up to ``max_frame``
        bytes and ``max_fragments`` frames.

        wsproto hands on every frame of a fragmented message as an event, an empty one too,
        and a frame read in several pieces as several events (only its last with
        ``frame_finished``). The size is kept as a running total and empty parts are not
        stored, so each event costs the same whatever came before; the frames are counted
        because empty ones cost no bytes: without that bound a client could keep one message
        open forever at the price of six bytes a frame, and every one of them a call here.
        """
        config = self.hub.config
        parts = self._partial
        if parts is None:
            if event.message_finished and _size(event.data) <= config.max_frame:
                self._message(event.data)
                return
            parts = self._partial = []
            self._partial_size = self._fragments = 0
        self._partial_size += _size(event.data)
        if self._partial_size > config.max_frame:
            FRAMES_REFUSED.labels("protocol").inc()
            self.close(CLOSE_TOO_BIG, "message too large")
            return
        if event.frame_finished:
            self._fragments += 1
            if self._fragments > config.max_fragments:
                FRAMES_REFUSED.labels("protocol").inc()
                self.close(CLOSE_POLICY, "too many fragments")
                return
        if event.data:
            parts.append(event.data)
        if event.message_finished:
            self._partial = None
            # A message's parts are all text or all binary, as its first frame said.
            self._message("".join(parts) if isinstance(event, TextMessage) else _join(parts))

    def _message(self, payload: str | bytes | bytearray) -> None:
        if not self._allowed():
            return
        try:  # JSON whether it came as text or binary
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
        """Write one of the socket's own frames (pong, error, ``ready``, the 101 answer),
        under the same bound as events.

        Pongs are what made this matter: every ping is answered, so a client that pings and
        never reads would grow the buffer at its upload rate. Over the limit the socket
        is closed with 4008, as :meth:`send` does, rather than the pong dropped (which RFC
        6455 5.5.3 would allow): such a socket is already one the next event closes, and
        dropping would let a client that never reads hold ``queue_limit`` bytes for as long
        as it keeps pinging (its pings count as activity against ``idle_timeout``).
        """
        transport = self._writable()
        if transport is not None:
            transport.write(data)

    def flush(self) -> None:
        """Write what the hub queued during a batch, or close the socket if it is too slow."""
        pending, self.pending = self.pending, None
        if pending:
            self.send(pending)

    def send(self, data: Sequence[bytes]) -> None:
        transport = self._writable()
        if transport is not None:
            transport.writelines(data)

    def _writable(self) -> asyncio.Transport | None:
        """The transport, if the socket is open and within ``queue_limit`` (unsent and held
        bytes); past it the socket is closed as too slow (4008) and None returned."""
        transport = self.transport
        if transport is None or self.state == CLOSED:
            return None
        if transport.get_write_buffer_size() + self.held > self.hub.config.queue_limit:
            self.hub.too_slow(self)
            return None
        return transport

    def over_limit(self) -> bool:
        """Whether the socket's queue (unsent bytes and held frames) is past ``queue_limit``."""
        return self.buffered() + self.held > self.hub.config.queue_limit

    async def drained(self, within: float) -> bool:
        """Wait until the transport takes writes again (its buffer fell under low water).

        False if it did not within ``within`` seconds, or the socket closed meanwhile.
        """
        if self._paused and self.state != CLOSED:
            drain = self._drain
            if drain is None:
                drain = self._drain = asyncio.get_running_loop().create_future()
            try:
                async with asyncio.timeout(within):
                    await asyncio.shield(drain)
            except TimeoutError:
                return False
        return self.state != CLOSED

    def close(self, code: int, reason: str = "") -> None:
        """Send a close frame and close; the hub aborts the socket if it never drains."""
        if self.state == CLOSED or self.transport is None:
            return
        ws = self._ws
        self.state = CLOSED
        self._http = None
        self._partial = None
        self.pending = None
        self.resuming = None
        self.held = 0
        self._wake()
        if ws is not None and ws.state in _CAN_CLOSE:
            self.transport.write(ws.send(CloseConnection(code=code, reason=reason)))
        self.transport.close()
        self.hub.closing(self)

    def buffered(self) -> int:
        return 0 if self.transport is None else self.transport.get_write_buffer_size()


def _size(data: str | bytes | bytearray) -> int:
    """Bytes of a message part (text counts in UTF-8, as it came on the wire)."""
    return len(data.encode()) if isinstance(data, str) else len(data)


def _join(parts: list[Any]) -> bytes:
    return b"".join(parts)
