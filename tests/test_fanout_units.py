"""Pure pieces of the fanout tier: the HTTP/WebSocket front, audiences, the membership window.

The socket tests drive a real :class:`Connection` (h11 and wsproto inside) with bytes, against
an in-memory transport and a hub double that records what reaches it.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import uuid
from typing import Any

import h11
import msgspec
import pytest
from wsproto.frame_protocol import FrameProtocol

from eventstore import Batch, Position, RecordedEvent
from eventstore.cloudevents import frame
from eventstore.topics import TopicLayout
from fanout import frames
from fanout.audiences import Audiences
from fanout.config import FanoutConfig
from fanout.connection import AUTH, CLOSED, OPEN, Connection
from fanout.expiry import Expiries
from fanout.handshake import HttpRefusal, RequestHead, accept, check_upgrade
from fanout.history import History, ResumeFailed
from fanout.hub import Hub
from fanout.membership import Change, MembershipWindow
from fanout.signals import Signals
from fanout.wire import text_frame
from schemas import Envelope, Event, MemberLeft, MessageSent

UPGRADE = (
    b"GET /v1/ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
)


class Transport:
    """What a connection wrote, and whether it closed."""

    def __init__(self) -> None:
        self.written = b""
        self.closed = False
        self.unsent = 0
        """What ``get_write_buffer_size`` answers: bytes the peer has not read yet."""

    def write(self, data: bytes) -> None:
        self.written += data

    def writelines(self, data: list[bytes]) -> None:
        self.written += b"".join(data)

    def close(self) -> None:
        self.closed = True

    def get_write_buffer_size(self) -> int:
        return self.unsent

    def get_extra_info(self, name: str) -> None:
        return None

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass


class HubDouble:
    def __init__(self, **config: Any) -> None:
        self.config = FanoutConfig(**config)
        self.frames: list[frames.ClientFrame] = []
        self.requests: list[RequestHead] = []
        self.slow: list[Connection] = []

    def opened(self, conn: Connection) -> None:
        pass

    def closing(self, conn: Connection) -> None:
        pass

    def too_slow(self, conn: Connection) -> None:
        """What the hub does (counted there): close with 4008."""
        self.slow.append(conn)
        conn.close(4008, "too slow")

    def on_frame(self, conn: Connection, message: frames.ClientFrame) -> None:
        self.frames.append(message)

    def http(self, conn: Connection, head: RequestHead) -> None:
        self.requests.append(head)


def client_frames(*parts: tuple[str | bytes, bool]) -> bytes:
    """Masked client frames, by wsproto's client-side encoder."""
    encoder = FrameProtocol(client=True, extensions=[])
    return b"".join(bytes(encoder.send_data(data, fin=fin)) for data, fin in parts)


def socket(**config: Any) -> tuple[Connection, Transport, HubDouble]:
    hub = HubDouble(**config)
    conn = Connection(hub)  # type: ignore[arg-type]
    transport = Transport()
    conn.connection_made(transport)  # type: ignore[arg-type]
    return conn, transport, hub


def test_upgrade_is_answered_with_the_rfc_6455_accept_key_and_no_extension() -> None:
    http = h11.Connection(h11.SERVER)
    http.receive_data(UPGRADE + b"Sec-WebSocket-Extensions: permessage-deflate\r\n\r\n")
    request = http.next_event()
    assert isinstance(request, h11.Request)
    answer, _ = accept(request)
    assert answer.startswith(b"HTTP/1.1 101 ")
    assert b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n" in answer
    assert b"extensions" not in answer.lower()


def test_upgrade_policy_refuses_url_credentials_foreign_origins_and_plain_requests() -> None:
    def head(query: str = "", **headers: str) -> RequestHead:
        return RequestHead("GET", "/v1/ws", query, {"upgrade": "websocket", **headers})

    check_upgrade(head(origin="https://app.example"), ("https://app.example",))
    check_upgrade(head(), ("https://app.example",))  # no Origin: not a browser
    for bad, status in (
        (head("token=abc"), 400),
        (head(origin="https://evil.example"), 403),
        (RequestHead("GET", "/v1/ws", "", {}), 426),
        (RequestHead("POST", "/v1/ws", "", {"upgrade": "websocket"}), 405),
    ):
        with pytest.raises(HttpRefusal) as refused:
            check_upgrade(bad, ("https://app.example",))
        assert status == refused.value.status


def test_connection_upgrades_reassembles_fragments_and_answers_pings() -> None:
    """Bytes may arrive split anywhere; a fragmented message is handed on once, whole."""
    conn, transport, hub = socket()
    data = (
        UPGRADE
        + b"\r\n"
        + client_frames(('{"type":"ping"}', True), ('{"type"', False), (':"ping"}', True))
    )
    for i in range(0, len(data), 7):
        conn.data_received(data[i : i + 7])
    assert conn.state == AUTH
    assert transport.written.startswith(b"HTTP/1.1 101 ")
    assert [frames.Ping(), frames.Ping()] == hub.frames
    before = len(transport.written)
    ping = FrameProtocol(client=True, extensions=[]).ping(b"hi")
    conn.data_received(bytes(ping))
    assert transport.written[before:] == b"\x8a\x02hi"  # pong, echoing the payload


def server_frames(written: bytes) -> list[tuple[int, Any]]:
    """The frames a connection wrote after its 101 answer, parsed by wsproto's client side."""
    decoder = FrameProtocol(client=True, extensions=[])
    decoder.receive_bytes(written.split(b"\r\n\r\n", 1)[1])
    return [(int(f.opcode), f.payload) for f in decoder.received_frames()]


def test_connection_closes_with_1002_on_an_unmasked_frame() -> None:
    conn, transport, hub = socket()
    conn.data_received(UPGRADE + b"\r\n" + text_frame(b'{"type":"ping"}'))
    assert conn.state == CLOSED
    assert transport.closed
    assert [payload[0] for _, payload in server_frames(transport.written)] == [1002]
    assert hub.frames == []


@pytest.mark.parametrize(
    "frame",
    [
        client_frames(("x" * 300, True)),
        client_frames(("x" * 200, False), ("x" * 200, True)),  # too big only once whole
        client_frames((b"\x00" * 300, True)),  # binary counts the same
        client_frames(("\u00e9" * 150, True)),  # 150 characters, 300 bytes of UTF-8
    ],
)
def test_connection_closes_with_1009_on_a_message_above_max_frame(frame: bytes) -> None:
    conn, transport, hub = socket(max_frame=256)
    conn.data_received(UPGRADE + b"\r\n" + frame)
    assert conn.state == CLOSED
    assert transport.closed
    assert server_frames(transport.written) == [(0x8, (1009, "message too large"))]
    assert hub.frames == []


def test_a_message_in_more_than_max_fragments_frames_closes_with_1008() -> None:
    """A message may come in up to ``max_fragments`` frames, empty ones included; a client
    that keeps one open with empty continuation frames is closed with 1008 at the first
    frame past the bound (each frame costs the same: no re-summing of the parts)."""
    conn, transport, hub = socket(max_fragments=128)
    conn.data_received(
        UPGRADE
        + b"\r\n"
        + client_frames(('{"type"', False), *[("", False)] * 100, (':"ping"}', True))
    )
    assert [frames.Ping()] == hub.frames  # 102 frames, empty ones among them: one message
    conn.data_received(client_frames(("", False), *[("", False)] * 20_000))
    assert conn.state == CLOSED
    assert transport.closed
    assert server_frames(transport.written) == [(0x8, (1008, "too many fragments"))]
    assert [frames.Ping()] == hub.frames


def test_pongs_respect_the_queue_limit() -> None:
    """A client that pings and never reads is closed as too slow (4008) once its unsent
    bytes pass ``queue_limit``, instead of the server buffering a pong per ping."""
    conn, transport, hub = socket(queue_limit=4096)
    conn.data_received(UPGRADE + b"\r\n")
    ping = bytes(FrameProtocol(client=True, extensions=[]).ping(b"x" * 125))
    conn.data_received(ping)
    assert server_frames(transport.written) == [(0xA, b"x" * 125)]
    transport.unsent = 4097  # the client stopped reading
    conn.data_received(ping * 10)
    assert [conn] == hub.slow
    assert conn.state == CLOSED
    assert transport.closed
    assert server_frames(transport.written) == [(0xA, b"x" * 125), (0x8, (4008, "too slow"))]


def test_server_frames_are_plain_unmasked_rfc_frames() -> None:
    """One text frame per event, identical for every socket: what the hub broadcasts."""
    assert text_frame(b"hi") == b"\x81\x02hi"
    assert text_frame(b"x" * 256)[:4] == b"\x81\x7e\x01\x00"
    assert b"\x81\x7f" + (70_000).to_bytes(8, "big") == text_frame(b"x" * 70_000)[:10]


def test_close_and_http_answers() -> None:
    """The server's close frame carries the code; a plain request reaches the hub's routes
    and is answered through h11 with ``Connection: close``."""
    conn, transport, _ = socket()
    conn.data_received(UPGRADE + b"\r\n")
    conn.close(4008)
    assert server_frames(transport.written) == [(0x8, (4008, ""))]
    conn, transport, hub = socket()
    conn.data_received(b"GET /healthz?x=1 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert [RequestHead("GET", "/healthz", "x=1", {"host": "x"})] == hub.requests
    conn.respond(200, b"{}")
    assert transport.written.startswith(b"HTTP/1.1 200 ")
    assert b"connection: close" in transport.written.lower()
    assert transport.written.endswith(b"\r\n\r\n{}")
    assert transport.closed


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET /v1/ws HTTP/1.1\r\nHost: x\r\n\r\n", 426),
        (UPGRADE.replace(b"Version: 13", b"Version: 8") + b"\r\n", 426),
        (b"GET /v1/ws?token=abc HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"NOT HTTP\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: x\r\nX: " + b"y" * 9000, 431),
    ],
)
def test_bad_requests_are_refused_with_a_status(request_bytes: bytes, status: int) -> None:
    conn, transport, _ = socket()
    conn.data_received(request_bytes)
    assert transport.written.startswith(f"HTTP/1.1 {status} ".encode())
    assert transport.closed


def test_audiences_follow_joins_and_leaves_of_local_users_only() -> None:
    audiences: Audiences[str] = Audiences()
    alice, bob, c1, c2 = (uuid.uuid4() for _ in range(4))
    assert audiences.add("a1", alice, [c1])
    assert not audiences.add("a2", alice, [c2])  # second socket: tracked set wins
    assert {"a1", "a2"} == audiences.rooms[c1]
    audiences.join(c2, alice)
    audiences.join(c2, bob)  # not on this node: nothing
    assert {"a1", "a2"} == audiences.rooms[c2]
    assert {"a1", "a2"} == audiences.leave(c1, alice)
    assert c1 not in audiences.rooms
    assert not audiences.remove("a1", alice)
    assert audiences.remove("a2", alice)
    assert audiences.rooms == {}
    assert not audiences.tracks(alice)


def test_window_brings_a_snapshot_up_to_the_tail() -> None:
    user, c1, c2 = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    window = MembershipWindow(60.0, {0: 10, 1: 5})
    window.record(Change(0, 12, c1, user, True, 100.0))
    window.record(Change(1, 7, c2, user, True, 100.0))
    window.record(Change(0, 14, c1, user, False, 101.0))
    assert not window.covers({0: 9, 1: 5})
    conversations = {c1}
    window.apply(user, conversations, {0: 13, 1: 5})  # join at 12 already in the snapshot
    assert {c2} == conversations
    window.evict(161.0)
    assert window.horizon == {0: 13, 1: 8}
    assert not window.covers({0: 12, 1: 8})


def test_expiries_hand_out_due_sockets_once_and_follow_moves_and_closes() -> None:
    expiries: Expiries[str] = Expiries()
    expiries.set("a", 100)
    expiries.set("b", 100)
    expiries.set("c", 105)
    expiries.set("moved", 100)
    expiries.set("moved", 110)  # a re-authentication: the old second forgets it
    expiries.set("gone", 101)
    expiries.discard("gone")  # closed: its emptied second is skipped lazily
    expiries.set("gone", 101)  # the same second again is not queued twice ...
    expiries.discard("gone")
    assert len(expiries._seconds) == 4  # ... 100, 101, 105, 110
    assert expiries.due(99.9) == []
    assert sorted(expiries.due(100.0)) == ["a", "b"]
    assert expiries.due(104.0) == []
    assert expiries.deadline("a") is None
    assert expiries.deadline("moved") == 110
    assert expiries.due(1000.0) == ["c", "moved"]
    assert len(expiries) == 0
    assert expiries._seconds == []


# --- the hub: resumes ---------------------------------------------------------------------

EPOCH = 3
LAYOUT = TopicLayout(
    prefix="t", user_partitions=1, conversation_partitions=1, replication_factor=1, min_insync=1
)
TIME = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)


class StoreDouble:
    epoch = EPOCH
    layout = LAYOUT


class TailDouble:
    def __init__(self, offset: int) -> None:
        self.offsets = {0: offset}
        self.start_offsets = {0: 0}


class StuckTransport(Transport):
    """A peer that never reads: every byte written stays unsent, and past the high-water mark
    the protocol is told to pause, as asyncio's transports do."""

    def __init__(self) -> None:
        super().__init__()
        self.protocol: Connection | None = None
        self.high = 64 * 1024
        self.paused = False

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.high = 64 * 1024 if high is None else high

    def write(self, data: bytes) -> None:
        super().write(data)
        self._grew(len(data))

    def writelines(self, data: list[bytes]) -> None:
        super().writelines(data)
        self._grew(sum(len(d) for d in data))

    def _grew(self, size: int) -> None:
        self.unsent += size
        if self.unsent > self.high and not self.paused and self.protocol is not None:
            self.paused = True
            self.protocol.pause_writing()


class HistoryDouble:
    """``missed`` answers ``found`` once ``release`` is set; records whether it was cancelled."""

    def __init__(self, found: list[tuple[int, bytes]]) -> None:
        self.found = found
        self.called = asyncio.Event()
        self.release = asyncio.Event()
        self.cancelled = asyncio.Event()

    async def missed(
        self, conversation_id: uuid.UUID, partition: int, after: int, upto: int
    ) -> tuple[str, list[tuple[int, bytes]]]:
        self.called.set()
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        return "log", [(o, d) for o, d in self.found if after < o < upto]


def recorded(event: Event, offset: int) -> RecordedEvent:
    envelope = Envelope(
        id=uuid.uuid4(), source="urn:t", type=event.type_name(), subject="s", time=TIME
    )
    return RecordedEvent(envelope, event, Position(EPOCH, "conversation", 0, offset))


def message(room: uuid.UUID, user: uuid.UUID, offset: int, body: str = "") -> RecordedEvent:
    return recorded(
        MessageSent(
            conversation_id=room,
            message_id=uuid.uuid4(),
            sender_id=user,
            client_msg_id=f"c{offset}",
            body=body or f"m{offset}",
        ),
        offset,
    )


def live_hub(history: HistoryDouble, tail_offset: int, **config: Any) -> tuple[Hub, TailDouble]:
    tail = TailDouble(tail_offset)
    hub = Hub(
        FanoutConfig(**config),
        StoreDouble(),  # type: ignore[arg-type]
        tail,  # type: ignore[arg-type]
        tokens=None,  # type: ignore[arg-type]
        sessions=None,  # type: ignore[arg-type]
        read_side=None,  # type: ignore[arg-type]
        history=history,  # type: ignore[arg-type]
        snapshots=None,  # type: ignore[arg-type]
    )
    return hub, tail


def member_socket(
    hub: Hub, user: uuid.UUID, room: uuid.UUID, transport: Transport | None = None
) -> tuple[Connection, Transport]:
    """An open socket of ``user`` (a member of ``room``) subscribed at the tail's position."""
    conn = Connection(hub)
    transport = transport or Transport()
    if isinstance(transport, StuckTransport):
        transport.protocol = conn
    conn.connection_made(transport)  # type: ignore[arg-type]
    conn.data_received(UPGRADE + b"\r\n")
    hub.audiences.add(conn, user, [room])
    conn.user_id, conn.session_id = user, uuid.uuid4()
    conn.since = hub.tail.offsets
    conn.state = OPEN
    return conn, transport


def cursor(offset: int) -> str:
    return Position(EPOCH, "conversation", 0, offset).token()


def received(transport: Transport) -> list[Any]:
    """What the socket got after its 101: decoded frames, and close codes as ``("close", n)``."""
    found: list[Any] = []
    for opcode, payload in server_frames(transport.written):
        if opcode == 0x8:
            found.append(("close", payload[0]))
        else:
            found.append(msgspec.json.decode(payload))
    return found


def summary(document: Any) -> Any:
    if isinstance(document, tuple):
        return document
    if document["type"] == "event":
        return (document["event"]["type"], int(document["position"].rsplit(".", 1)[1]))
    return (document["type"],)


async def replays_done(hub: Hub) -> None:
    async with asyncio.timeout(5):
        while hub._tasks:
            await asyncio.gather(*hub._tasks, return_exceptions=True)


async def test_a_member_removed_during_a_resume_gets_the_replay_up_to_its_removal() -> None:
    """Removed while its resume reads history, the socket still gets the missed events, the
    frames held meanwhile up to and including its removal, and ``resynced``; nothing after."""
    alice, owner, room = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    missed = [message(room, owner, 6), message(room, owner, 8)]
    history = HistoryDouble([(r.position.offset, text_frame(frame(r))) for r in missed])
    hub, _ = live_hub(history, tail_offset=10)
    conn, transport = member_socket(hub, alice, room)
    hub.resume(conn, {str(room): cursor(5)})
    async with asyncio.timeout(5):
        await history.called.wait()
    removal = recorded(MemberLeft(conversation_id=room, user_id=alice, removed_by=owner), 11)
    hub.apply(Batch([message(room, owner, 10), removal, message(room, owner, 12)], {}))
    assert received(transport) == []  # held back while the replay is read
    history.release.set()
    await replays_done(hub)
    assert [summary(f) for f in received(transport)] == [
        ("chat.message.sent", 6),
        ("chat.message.sent", 8),
        ("chat.message.sent", 10),
        ("chat.member.left", 11),
        ("resynced",),
    ]
    assert conn.state == OPEN
    assert conn.resuming is None
    assert conn.held == 0


async def test_a_replay_larger_than_the_queue_limit_to_a_socket_that_never_reads() -> None:
    """Resuming from 0 with far more history than ``queue_limit`` on a socket that never
    reads: closed with 4008 after little more than the limit was written, not the whole
    history."""
    user, room = uuid.uuid4(), uuid.uuid4()
    history_frames = [
        (r.position.offset, text_frame(frame(r)))
        for r in (message(room, user, o, "x" * 1000) for o in range(1, 401))
    ]
    total = sum(len(d) for _, d in history_frames)
    limit = 16 * 1024
    history = HistoryDouble(history_frames)
    history.release.set()
    hub, _ = live_hub(history, tail_offset=401, queue_limit=limit, replay_stall=0.2)
    conn, transport = member_socket(hub, user, room, StuckTransport())
    assert total > 20 * limit
    hub.resume(conn, {str(room): cursor(0)})
    await replays_done(hub)
    assert conn.state == CLOSED
    got = received(transport)
    assert got[-1] == ("close", 4008)
    assert ("resynced",) not in [summary(f) for f in got]
    assert len(transport.written) < 2 * limit


async def test_frames_held_during_a_resume_count_against_the_queue_limit() -> None:
    """Live frames held back while history is read are queued bytes like any other: past
    ``queue_limit`` the socket is closed with 4008 instead of holding them without bound."""
    user, room = uuid.uuid4(), uuid.uuid4()
    history = HistoryDouble([])
    hub, _ = live_hub(history, tail_offset=10, queue_limit=8192)
    conn, transport = member_socket(hub, user, room)
    hub.resume(conn, {str(room): cursor(5)})
    async with asyncio.timeout(5):
        await history.called.wait()
    for offset in range(10, 30):
        hub.apply(Batch([message(room, user, offset, "y" * 1000)], {}))
    assert conn.state == CLOSED
    assert received(transport) == [("close", 4008)]
    assert conn.held == 0
    history.release.set()
    await replays_done(hub)


async def test_a_lost_socket_has_its_replay_cancelled() -> None:
    user, room = uuid.uuid4(), uuid.uuid4()
    history = HistoryDouble([])
    hub, _ = live_hub(history, tail_offset=10)
    conn, _ = member_socket(hub, user, room)
    hub.resume(conn, {str(room): cursor(5)})
    async with asyncio.timeout(5):
        await history.called.wait()
    conn.connection_lost(None)
    async with asyncio.timeout(5):
        await history.cancelled.wait()
    await replays_done(hub)


async def test_the_wait_for_a_log_reader_is_inside_the_resume_bound() -> None:
    """With every log reader busy, a resume that must read the log fails within
    ``log_timeout`` instead of queueing without bound."""
    history = History(
        StoreDouble(),  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
        cache_wait=0.0,
        log_timeout=0.1,
        log_readers=1,
    )
    await history._log_slots.acquire()  # another resume holds the only reader
    with pytest.raises(ResumeFailed):
        async with asyncio.timeout(5):
            await history._from_log(uuid.uuid4(), 0, 0, 10)


async def test_a_half_open_signal_subscription_is_detected_and_replaced() -> None:
    """A subscription that goes silent (not even a PONG) is declared lost after three ping
    intervals and replaced; each confirmed subscription bumps the generation and tells the
    hub, which re-checks its sockets."""

    class Silent:
        """A pub/sub whose connection is half-open: commands go out, nothing comes back."""

        def __init__(self, answer: bool) -> None:
            self.answer = answer
            self.pings = 0
            self.channels: list[str] = []

        async def subscribe(self, *channels: str) -> None:
            self.channels = list(channels)

        async def get_message(self, timeout: float) -> dict[str, Any] | None:
            if self.answer and self.channels:
                return {"type": "subscribe", "channel": self.channels.pop(), "data": 1}
            await asyncio.sleep(timeout / 10)
            return None

        async def ping(self) -> None:
            self.pings += 1

        async def aclose(self) -> None:
            pass

    made: list[Silent] = []

    class FakeRedis:
        def pubsub(self, **kwargs: Any) -> Silent:
            made.append(Silent(answer=True))
            return made[-1]

    ups: list[int] = []
    signals = Signals(
        FakeRedis(),  # type: ignore[arg-type]
        "ns",
        "node",
        presence_ttl=60.0,
        on_typing=lambda s: None,
        on_presence=lambda s: None,
        on_revocation=lambda s: None,
        on_epoch=lambda s: None,
        on_subscribed=lambda: ups.append(signals.generation),
        ping_interval=0.05,
    )
    listening = asyncio.create_task(signals.listen())
    try:
        async with asyncio.timeout(5):
            while len(ups) < 2:
                await asyncio.sleep(0.01)
    finally:
        listening.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await listening
    assert ups[:2] == [1, 2]
    assert made[0].pings >= 1
