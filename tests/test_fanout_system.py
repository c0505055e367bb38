"""The fanout tier end to end: HTTP send on the real ingest app, WebSocket receive.

Each test runs an isolated deployment (``running_system``) with one or two fanout nodes in
this process (or ``python -m fanout`` subprocesses, where a process is killed).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import signal
import socket
import struct
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest
from prometheus_client import REGISTRY

from eventstore import Settings
from fanout.config import FanoutConfig
from fanout.node import FanoutNode
from ingest.auth.tokens import new_jwt_key, parse_jwt_keys
from tests.system_fixtures import System, User, running_system
from tests.test_projector_support import settings_env

KEY = new_jwt_key("t1")
WITHIN = 10.0


class Client:
    """A WebSocket subscriber recording every frame it receives."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, session: aiohttp.ClientSession):
        self.ws = ws
        self._session = session
        self.frames: list[dict[str, Any]] = []
        self.close_code: int | None = None
        self._changed = asyncio.Event()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for message in self.ws:
            if message.type == aiohttp.WSMsgType.TEXT:
                self.frames.append(msgspec.json.decode(message.data))
                self._changed.set()
        self.close_code = self.ws.close_code
        self._changed.set()

    def events(self, conversation_id: str | None = None) -> list[dict[str, Any]]:
        return [
            f
            for f in self.frames
            if f["type"] == "event"
            and (conversation_id is None or f["conversation_id"] == conversation_id)
        ]

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [f for f in self.frames if f["type"] == kind]

    async def until(self, condition: Callable[[], bool], within: float = WITHIN) -> None:
        async with asyncio.timeout(within):
            while not condition():
                self._changed.clear()
                if self.close_code is not None and not condition():
                    raise AssertionError(f"closed with {self.close_code}: {self.frames[-3:]}")
                await self._changed.wait()

    async def send(self, document: dict[str, Any]) -> None:
        await self.ws.send_bytes(msgspec.json.encode(document))

    async def closed(self, within: float = WITHIN) -> int | None:
        async with asyncio.timeout(within):
            await asyncio.shield(self._reader)
        return self.close_code

    async def close(self) -> None:
        await self.ws.close()
        with contextlib.suppress(Exception):
            await self._reader
        await self._session.close()


def _server_pid(port: int, peer_port: int, pids: list[int]) -> int | None:
    """Which of ``pids`` holds the server end of the loopback TCP connection between ``port``
    and ``peer_port`` (read from the kernel: /proc/net/tcp and each process's descriptors)."""
    inode = None
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote = fields[1], fields[2]
        if (
            int(local.rsplit(":", 1)[1], 16) == port
            and int(remote.rsplit(":", 1)[1], 16) == peer_port
        ):
            inode = fields[9]
    if inode is None:
        return None
    target = f"socket:[{inode}]"
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                if os.readlink(fd) == target:
                    return pid
    return None


async def connect(
    port: int,
    token: str | None,
    cursors: dict[str, str] | None = None,
    *,
    headers: dict[str, str] | None = None,
    wait_ready: bool = True,
    url_query: str = "",
) -> Client:
    session = aiohttp.ClientSession()
    try:
        ws = await session.ws_connect(
            f"http://127.0.0.1:{port}/v1/ws{url_query}", headers=headers, autoping=True
        )
    except BaseException:
        await session.close()
        raise
    client = Client(ws, session)
    if token is not None:
        auth: dict[str, Any] = {"type": "auth", "token": token}
        if cursors:
            auth["cursors"] = cursors
        await client.send(auth)
        if wait_ready:
            await client.until(lambda: bool(client.of_type("ready")))
    return client


@contextlib.asynccontextmanager
async def deployment(
    base: Settings, nodes: int = 1, **config: Any
) -> AsyncIterator[tuple[System, list[FanoutNode]]]:
    keys = parse_jwt_keys(KEY)
    async with running_system(base, keys=keys) as system:
        started: list[FanoutNode] = []
        try:
            for _ in range(nodes):
                node = FanoutNode(system.settings, FanoutConfig(port=0, **config), keys)
                await node.start()
                started.append(node)
            yield system, started
        finally:
            for node in started:
                await node.stop()


async def group(system: System, owner: User, *members: User) -> str:
    reply = await system.api.call(
        "POST",
        "/v1/conversations",
        token=owner.access,
        json={"name": "g", "members": [str(m.user_id) for m in members]},
    )
    assert reply.status == 201, reply.body
    return str(reply.body["conversation_id"])


async def send(system: System, user: User, conversation_id: str, text: str) -> str:
    reply = await system.api.call(
        "POST",
        f"/v1/conversations/{conversation_id}/messages",
        token=user.access,
        json={"client_msg_id": uuid.uuid4().hex, "content": text},
    )
    assert reply.status == 202, reply.body
    return str(reply.body["position"])


def bodies(client: Client, conversation_id: str) -> list[str]:
    return [
        e["event"]["data"]["body"]
        for e in client.events(conversation_id)
        if e["event"]["type"] == "chat.message.sent"
    ]


def offsets(client: Client, conversation_id: str) -> list[int]:
    return [int(e["position"].rsplit(".", 1)[1]) for e in client.events(conversation_id)]


async def test_members_receive_every_event_in_order_and_others_nothing(
    base_settings: Settings,
) -> None:
    """Members get each event once, in log order; a removed member stops at its removal;
    a non-member gets nothing."""
    async with deployment(base_settings) as (system, (node,)):
        owner, member, leaver, stranger = [await system.api.user() for _ in range(4)]
        clients = {
            u.username: await connect(node.port, u.access)
            for u in (owner, member, leaver, stranger)
        }
        cid = await group(system, owner, member, leaver)
        first = [f"m{i}" for i in range(5)]
        for text in first:
            await send(system, owner, cid, text)
        reply = await system.api.call(
            "DELETE", f"/v1/conversations/{cid}/members/{leaver.user_id}", token=owner.access
        )
        assert reply.status == 202, reply.body
        then = [f"n{i}" for i in range(5)]
        for text in then:
            await send(system, owner, cid, text)
        for user in (owner, member):
            client = clients[user.username]
            await client.until(lambda c=client: len(bodies(c, cid)) == 10)
            assert first + then == bodies(client, cid)
            assert offsets(client, cid) == sorted(set(offsets(client, cid)))
            types = [e["event"]["type"] for e in client.events(cid)]
            assert types[0] == "chat.conversation.created"
            assert "chat.member.left" in types
        gone = clients[leaver.username]
        await gone.until(
            lambda: any(e["event"]["type"] == "chat.member.left" for e in gone.events(cid))
        )
        assert first == bodies(gone, cid)
        assert gone.events(cid)[-1]["event"]["type"] == "chat.member.left"
        assert clients[stranger.username].events() == []
        owner_frame = clients[owner.username].events(cid)[1]
        member_frame = clients[member.username].events(cid)[1]
        assert owner_frame == member_frame
        for client in clients.values():
            await client.close()


async def _send_many(
    system: System, user: User, cid: str, texts: list[str], sent: list[str]
) -> None:
    for text in texts:
        await send(system, user, cid, text)
        sent.append(text)


async def _until(condition: Callable[[], bool], within: float = WITHIN) -> None:
    """Poll a condition on this process's own state (the sender task), bounded."""
    async with asyncio.timeout(within):
        while not condition():
            await asyncio.sleep(0.01)


@pytest.mark.parametrize("other_node", [False, True], ids=["same-node", "other-node"])
async def test_resume_after_a_disconnect_misses_nothing_and_repeats_nothing(
    base_settings: Settings, other_node: bool
) -> None:
    """Disconnected mid-stream while messages keep coming, a client resuming with its cursor
    (on the same node or another) receives every message exactly once, in order."""
    async with deployment(base_settings, nodes=2) as (system, nodes):
        sender, reader = await system.api.user(), await system.api.user()
        cid = await group(system, sender, reader)
        client = await connect(nodes[0].port, reader.access)
        texts = [f"t{i}" for i in range(60)]
        sent: list[str] = []
        sending = asyncio.create_task(_send_many(system, sender, cid, texts, sent))
        await client.until(lambda: len(bodies(client, cid)) >= 10)
        await client.close()
        cursor = client.events(cid)[-1]["position"]
        missed_from = len(sent)
        await _until(lambda: len(sent) >= missed_from + 10)  # messages arrive meanwhile
        back = await connect(nodes[1 if other_node else 0].port, reader.access, {cid: cursor})
        await back.until(lambda: bool(back.of_type("resynced")))
        await sending
        await back.until(lambda: len(bodies(back, cid)) + len(bodies(client, cid)) >= 60)
        seen = bodies(client, cid) + bodies(back, cid)
        assert texts == seen
        all_offsets = offsets(client, cid) + offsets(back, cid)
        assert all_offsets == sorted(set(all_offsets))
        await back.close()


def _masked(payload: bytes, opcode: int = 0x1) -> bytes:
    mask = os.urandom(4)
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    length = len(payload)
    if length < 126:
        head = bytes((0x80 | opcode, 0x80 | length))
    else:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, length)
    return head + mask + body


async def _slow_reader(port: int, token: str) -> tuple[socket.socket, bytes]:
    """A raw WebSocket with a 4 KiB receive buffer, upgraded and authenticated with ``token``;
    with the bytes received up to its ``ready`` frame (the caller reads no further)."""
    raw = socket.socket()
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(raw, ("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    await loop.sock_sendall(
        raw,
        (
            f"GET /v1/ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
        + _masked(msgspec.json.encode({"type": "auth", "token": token})),
    )
    received = b""
    async with asyncio.timeout(WITHIN):
        while b'"ready"' not in received:
            received += await loop.sock_recv(raw, 4096)
    return raw, received


def _server_frames(data: bytes) -> list[tuple[int, bytes]]:
    found, i = [], 0
    while i + 2 <= len(data):
        opcode, length, i = data[i] & 0x0F, data[i + 1] & 0x7F, i + 2
        if length == 126:
            (length,), i = struct.unpack_from("!H", data, i), i + 2
        elif length == 127:
            (length,), i = struct.unpack_from("!Q", data, i), i + 8
        if i + length > len(data):
            break
        found.append((opcode, data[i : i + length]))
        i += length
    return found


async def test_a_slow_client_is_closed_with_4008_while_a_fast_one_gets_everything(
    base_settings: Settings,
) -> None:
    """A socket that never reads is closed with 4008 once its queue passes the limit; a
    fast member of the same conversation receives every message."""
    async with deployment(base_settings, queue_limit=768 * 1024, send_buffer=8192) as (
        system,
        (node,),
    ):
        sender, fast_user, slow_user = [await system.api.user() for _ in range(3)]
        cid = await group(system, sender, fast_user, slow_user)
        fast = await connect(node.port, fast_user.access)
        raw, _ = await _slow_reader(node.port, slow_user.access)
        loop = asyncio.get_running_loop()
        body = "x" * 3000
        for batch in range(20):
            reply = await system.api.call(
                "POST",
                f"/v1/conversations/{cid}/messages:batch",
                token=sender.access,
                json={
                    "messages": [
                        {"client_msg_id": f"b{batch}-{i}", "content": body} for i in range(30)
                    ]
                },
            )
            assert reply.status == 202, reply.body
            # The fast reader keeps up with each batch; the slow one never reads.
            await fast.until(lambda n=(batch + 1) * 30: len(bodies(fast, cid)) == n)
        received = b""
        async with asyncio.timeout(WITHIN):
            while chunk := await loop.sock_recv(raw, 65536):
                received += chunk
        raw.close()
        closes = [p for op, p in _server_frames(received) if op == 0x8]
        assert [struct.unpack_from("!H", p)[0] for p in closes] == [4008]
        await fast.close()


async def test_logout_closes_the_socket_within_a_second(base_settings: Settings) -> None:
    async with deployment(base_settings) as (system, (node,)):
        user = await system.api.user()
        client = await connect(node.port, user.access)
        started = time.monotonic()
        reply = await system.api.call("POST", "/v1/auth/logout", token=user.access)
        assert reply.status == 204
        assert await client.closed(within=1.0) == 4001
        assert time.monotonic() - started < 1.0
        await client.close()


async def test_refusals(base_settings: Settings) -> None:
    """Bad Origin, a token in the URL, a bad token, no auth frame, an oversized frame and
    repeated malformed frames are all refused."""
    async with deployment(
        base_settings, origins=("https://app.example",), auth_timeout=0.5, max_frame=1024
    ) as (system, (node,)):
        user = await system.api.user()
        with pytest.raises(aiohttp.WSServerHandshakeError) as bad_origin:
            await connect(node.port, None, headers={"Origin": "https://evil.example"})
        assert bad_origin.value.status == 403
        with pytest.raises(aiohttp.WSServerHandshakeError) as in_url:
            await connect(node.port, None, url_query=f"?token={user.access}")
        assert in_url.value.status == 400
        ok = await connect(node.port, user.access, headers={"Origin": "https://app.example"})
        await ok.close()
        forged = await connect(node.port, user.access + "x", wait_ready=False)
        assert await forged.closed() == 4001
        await forged.close()
        silent = await connect(node.port, None)
        assert await silent.closed() == 4001
        await silent.close()
        big = await connect(node.port, user.access)
        await big.send({"type": "ping", "pad": "x" * 2000})
        assert await big.closed() == 1009
        await big.close()
        noisy = await connect(node.port, user.access)
        for _ in range(5):
            await noisy.ws.send_str("{not json")
        assert await noisy.closed() == 1008
        assert [f["code"] for f in noisy.of_type("error")] == ["malformed"] * 3
        await noisy.close()


async def test_pings_and_trickled_bytes_do_not_extend_the_auth_deadline(
    base_settings: Settings,
) -> None:
    """The upgrade and the ``auth`` frame are due ``auth_timeout`` after the accept: a socket
    that keeps pinging without authenticating is closed with 4001, and a request head
    trickled a byte at a time is dropped unanswered."""
    async with deployment(base_settings, auth_timeout=0.5) as (_, (node,)):
        pinger = await connect(node.port, None)

        async def ping() -> None:
            while True:
                await pinger.ws.ping()
                await asyncio.sleep(0.1)

        pinging = asyncio.create_task(ping())
        try:
            assert await pinger.closed() == 4001
        finally:
            pinging.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                await pinging
            await pinger.close()

        raw = socket.socket()
        raw.setblocking(False)
        loop = asyncio.get_running_loop()
        await loop.sock_connect(raw, ("127.0.0.1", node.port))

        async def trickle() -> None:
            head = b"GET /v1/ws HTTP/1.1\r\nHost: x\r\n" + b"X-Pad: y\r\n" * 100
            for byte in head:
                await loop.sock_sendall(raw, bytes((byte,)))
                await asyncio.sleep(0.05)

        trickling = asyncio.create_task(trickle())
        try:
            async with asyncio.timeout(WITHIN):
                answer = await loop.sock_recv(raw, 4096)
        finally:
            trickling.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                await trickling
            raw.close()
        assert answer == b""  # closed, and no response


async def test_a_client_that_pings_and_never_reads_is_closed_with_4008(
    base_settings: Settings,
) -> None:
    """Pongs count against ``queue_limit`` like events: a socket that sends pings and reads
    nothing is closed as too slow instead of the server buffering a pong per ping."""
    async with deployment(base_settings, queue_limit=16 * 1024, send_buffer=8192) as (
        system,
        (node,),
    ):
        user = await system.api.user()
        raw, received = await _slow_reader(node.port, user.access)
        loop = asyncio.get_running_loop()
        slow_before = REGISTRY.get_sample_value("fanout_slow_disconnects_total") or 0.0
        # About 250 kB of pongs, far more than the limit and the two kernel buffers hold.
        await loop.sock_sendall(raw, _masked(b"p" * 125, opcode=0x9) * 2000)
        # The server stops reading at its close, so the pings after it are unread and the
        # kernel ends the connection with a reset, which may overtake the close frame.
        with contextlib.suppress(ConnectionResetError):
            async with asyncio.timeout(WITHIN):
                while chunk := await loop.sock_recv(raw, 65536):
                    received += chunk
        raw.close()
        found = _server_frames(received.split(b"\r\n\r\n", 1)[1])
        closes = [struct.unpack_from("!H", p)[0] for op, p in found if op == 0x8]
        assert closes in ([], [4008])
        assert sum(op == 0xA for op, _ in found) < 2000
        slow_after = REGISTRY.get_sample_value("fanout_slow_disconnects_total") or 0.0
        assert slow_after == slow_before + 1


async def test_typing_presence_ping_and_epoch(base_settings: Settings) -> None:
    """Typing reaches the other members only; presence follows connections; a cursor of
    another epoch is answered with 4009."""
    async with deployment(base_settings, typing_interval=0.01) as (system, (node,)):
        alice, bob, eve = [await system.api.user() for _ in range(3)]
        cid = await group(system, alice, bob)
        b = await connect(node.port, bob.access)
        e = await connect(node.port, eve.access)
        a = await connect(node.port, alice.access)
        await b.until(lambda: any(f["status"] == "online" for f in b.of_type("presence")))
        await a.send({"type": "typing", "conversation_id": cid})
        await b.until(lambda: bool(b.of_type("typing")))
        assert {"type": "typing", "conversation_id": cid, "user_id": str(alice.user_id)} == (
            b.of_type("typing")[0]
        )
        await e.send({"type": "typing", "conversation_id": cid})
        await e.until(lambda: bool(e.of_type("error")))
        assert a.of_type("typing") == []
        await a.send({"type": "ping"})
        await a.until(lambda: bool(a.of_type("pong")))
        await a.close()
        await b.until(lambda: any(f["status"] == "offline" for f in b.of_type("presence")))
        position = await send(system, alice, cid, "hi")
        epoch, rest = position.split(".", 1)
        await b.send({"type": "resume", "cursors": {cid: f"{int(epoch) + 1}.{rest}"}})
        assert await b.closed() == 4009
        await b.close()
        # A restore of the log under a new epoch closes every socket with 4009 at once, and
        # the node stops so that its supervisor restarts it against the new log.
        await system.redis.publish(
            f"{system.settings.topic_prefix}:epoch", msgspec.json.encode({"epoch": int(epoch) + 1})
        )
        assert await e.closed() == 4009
        async with asyncio.timeout(WITHIN):
            await node.wait()
        await e.close()


async def test_resume_falls_back_to_the_log_beyond_the_recent_cache(
    base_settings: Settings,
) -> None:
    """A cursor older than the recent-history cache still gets every missed event, from
    the log, followed by ``resynced``, using the separate ``resume`` frame."""
    async with deployment(base_settings) as (system, (node,)):
        sender = await system.api.user()
        cid = await group(system, sender)
        first = await send(system, sender, cid, "first")
        texts = []
        for batch in range(3):
            chunk = [f"c{batch}-{i}" for i in range(100)]
            reply = await system.api.call(
                "POST",
                f"/v1/conversations/{cid}/messages:batch",
                token=sender.access,
                json={"messages": [{"client_msg_id": t, "content": t} for t in chunk]},
            )
            assert reply.status == 202, reply.body
            texts += chunk
        client = await connect(node.port, sender.access)
        await client.send({"type": "resume", "cursors": {cid: first}})
        await client.until(lambda: bool(client.of_type("resynced")), within=30)
        assert texts == bodies(client, cid)
        await client.close()


def _fanout_env(settings: Settings, port: int) -> dict[str, str]:
    return {
        **os.environ,
        **settings_env(settings),
        "BACKBONE_JWT_KEYS": KEY,
        "BACKBONE_FANOUT_PORT": str(port),
        "BACKBONE_LOG_LEVEL": "warning",
    }


async def _ready(port: int) -> None:
    async with aiohttp.ClientSession() as session, asyncio.timeout(30):
        while True:
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(f"http://127.0.0.1:{port}/readyz") as reply:
                    if reply.status == 200:
                        return
            await asyncio.sleep(0.1)


async def test_killed_process_clients_resume_on_another_with_no_gap(
    base_settings: Settings,
) -> None:
    """Two ``python -m fanout`` processes share a port; one is SIGKILLed while clients are
    connected and messages flow; the clients reconnect (to the survivor) and resume."""
    async with deployment(base_settings, nodes=0) as (system, _):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        env = _fanout_env(system.settings, port)
        procs = [
            await asyncio.create_subprocess_exec(sys.executable, "-m", "fanout", env=env)
            for _ in range(2)
        ]
        opened: list[Client] = []
        try:
            await _ready(port)
            await _ready(port)
            sender = await system.api.user()
            readers = [await system.api.user() for _ in range(6)]
            cid = await group(system, sender, *readers)
            clients = {r.username: await connect(port, r.access) for r in readers}
            opened.extend(clients.values())
            # The kernel deals connections to the two processes at random: kill one that
            # holds some (all six on one process is not rare enough to leave to chance).
            hosts = [
                _server_pid(port, c.ws.get_extra_info("sockname")[1], [p.pid for p in procs])
                for c in clients.values()
            ]
            victim = next(p for p in procs if p.pid in hosts)
            texts = [f"k{i}" for i in range(40)]
            sent: list[str] = []
            sending = asyncio.create_task(_send_many(system, sender, cid, texts, sent))
            await _until(lambda: len(sent) >= 10)
            victim.send_signal(signal.SIGKILL)
            await victim.wait()
            resumed: dict[str, list[Client]] = {}
            for reader in readers:
                client = clients[reader.username]
                with contextlib.suppress(TimeoutError):
                    await client.closed(within=0.5)
                chain = [client]
                if client.close_code is not None or client.ws.closed:
                    events = client.events(cid)
                    cursors = {cid: events[-1]["position"]} if events else {}
                    chain.append(await connect(port, reader.access, cursors))
                    opened.append(chain[-1])
                resumed[reader.username] = chain
            await sending
            for chain in resumed.values():
                await chain[-1].until(lambda c=chain: sum(len(bodies(x, cid)) for x in c) >= 40)
                seen = [b for x in chain for b in bodies(x, cid)]
                assert texts == seen
            assert sum(len(chain) == 2 for chain in resumed.values()) == hosts.count(victim.pid)
        finally:
            for client in opened:
                await client.close()
            for proc in procs:
                if proc.returncode is None:
                    proc.send_signal(signal.SIGTERM)
                    await proc.wait()


async def _kill_subscriber(system: System, node: FanoutNode) -> None:
    """Kill the node's pub/sub connection on the real Redis (by the client's local port, so
    that no other process's subscription is touched)."""
    redis = node._redis
    assert redis is not None
    ports = set()
    for conn in redis.connection_pool._get_in_use_connections():
        writer = getattr(conn, "_writer", None)
        if writer is not None:
            ports.add(writer.get_extra_info("sockname")[1])
    victims = [
        client["id"]
        for client in await system.redis.client_list(_type="pubsub")
        if int(str(client["addr"]).rsplit(":", 1)[1]) in ports
    ]
    assert len(victims) == 1, victims
    await system.redis.client_kill_filter(_id=victims[0])


async def test_a_revocation_published_while_the_signal_feed_is_down_still_closes_the_socket(
    base_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A password change revokes by Redis PUBLISH only; published while the node's
    subscription is down it is never heard. Once the node subscribes again it re-checks its
    sockets' sessions, so the socket is still closed with 4001."""
    async with deployment(base_settings) as (system, (node,)):
        user = await system.api.user()
        client = await connect(node.port, user.access)
        hub, redis = node.hub, node._redis
        assert hub is not None
        assert hub.signals is not None
        assert redis is not None
        signals = hub.signals
        # Hold the resubscription until the revocation is done: it surely falls in the gap.
        gate = asyncio.Event()
        subscriptions = redis.pubsub

        def gated(**kwargs: Any) -> Any:
            pubsub = subscriptions(**kwargs)
            subscribe = pubsub.subscribe

            async def held(*channels: Any, **more: Any) -> Any:
                await gate.wait()
                return await subscribe(*channels, **more)

            pubsub.subscribe = held  # type: ignore[method-assign]
            return pubsub

        monkeypatch.setattr(redis, "pubsub", gated)
        await _kill_subscriber(system, node)
        await _until(lambda: not signals.subscribed.is_set())
        reply = await system.api.call(
            "POST",
            "/v1/users/me/password",
            token=user.access,
            json={"current_password": user.password, "new_password": "another-Secret-42!"},
        )
        assert reply.status == 202, reply.body
        assert client.close_code is None  # not heard: the subscription is down
        gate.set()
        assert await client.closed() == 4001
        await client.close()
