"""``backbone bench fanout``: idle sockets held per process, and deliveries per second.

The server is a real ``python -m fanout`` process against the local stack (fresh topics of
its own); the load generator is this process, on plain uvloop sockets (a WebSocket
handshake, one masked ``auth`` frame, then counting frames), so it never shares the
server's core for anything but the kernel.

* ``idle``: ``--connections`` authenticated sockets, each a user in one conversation; the
  server's RSS before and after, per socket;
* ``deliveries``: the same sockets, ``--conversations`` conversations; events are appended
  with the event store's producer as fast as it acknowledges them for ``--seconds``; the
  server's ``fanout_deliveries_total`` over the interval is the figure (frames received by
  the generator are counted too, as a cross-check).

Memberships are written straight into the read model and sessions straight into Redis
(what ingest and the projector would have done), so the bench needs neither tier.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import re
import resource
import sys
import time
import uuid
from pathlib import Path

import asyncpg
import msgspec
from redis.asyncio import Redis

from eventstore import EventStore, Settings, TopicLayout, provision_topics
from ingest.auth.tokens import AccessTokens, new_jwt_key, parse_jwt_keys
from ops.bench.report import Figures, table, write_json
from ops.environment import stack_settings
from ops.provision import provision
from ops.stack import default_stack_dir, stack_up
from schemas import MessageSent, new_event_id, utc_now

_EVENT = b'"type":"event"'


class Subscriber(asyncio.Protocol):
    """A load-generator socket: handshake, auth, then count event frames."""

    def __init__(self, auth: bytes, ready: asyncio.Future[None], counts: list[int]) -> None:
        self._auth = auth
        self._ready = ready
        self._counts = counts
        self._open = False
        self._last = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        key = base64.b64encode(os.urandom(16)).decode()
        request = (
            "GET /v1/ws HTTP/1.1\r\nHost: bench\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
        transport.write(request + self._auth)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        if not self._open:
            self._last = data[-200:]
        if not self._open and b'"ready"' in data:
            self._open = True
            if not self._ready.done():
                self._ready.set_result(None)
        self._counts[0] += data.count(_EVENT)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._ready.done():
            self._ready.set_exception(ConnectionError(f"closed before ready: {self._last!r}"))


def _masked(payload: bytes) -> bytes:
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    length = len(payload)
    head = (
        bytes((0x81, 0x80 | 126)) + length.to_bytes(2, "big")
        if length >= 126
        else (bytes((0x81, 0x80 | length)))
    )
    return head + mask + masked


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def _deliveries(port: int) -> float:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: bench\r\n\r\n")
    body = await reader.read()
    writer.close()
    match = re.search(rb"^fanout_deliveries_total ([0-9.e+]+)$", body, re.M)
    return float(match.group(1)) if match else 0.0


async def _ready(port: int, process: asyncio.subprocess.Process) -> None:
    async with asyncio.timeout(60):
        while True:
            if process.returncode is not None:
                raise RuntimeError("fanout exited during start-up")
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(b"GET /readyz HTTP/1.1\r\nHost: bench\r\n\r\n")
                head = await reader.read()
                writer.close()
                if head.startswith(b"HTTP/1.1 200"):
                    return
            except OSError:
                pass
            await asyncio.sleep(0.2)


async def _bench(
    args: argparse.Namespace, base: Settings
) -> tuple[list[Figures], dict[str, float]]:
    settings = msgspec.structs.replace(base, topic_prefix=f"bf{uuid.uuid4().hex[:8]}")
    await provision_topics(settings.kafka_bootstrap, TopicLayout.from_settings(settings))
    jwt = new_jwt_key("bench")
    tokens = AccessTokens(
        parse_jwt_keys(jwt), issuer="urn:backbone:ingest", audience="urn:backbone:api", ttl=3600
    )
    users = [uuid.uuid4() for _ in range(args.connections)]
    conversations = [uuid.uuid4() for _ in range(args.conversations)]
    redis = Redis.from_url(settings.redis_url)
    sessions = {u: uuid.uuid4() for u in users}
    pipe = redis.pipeline(transaction=False)
    for session in sessions.values():
        pipe.set(f"{settings.topic_prefix}:session:{session}", "1", ex=3600)
    await pipe.execute()
    conn = await asyncpg.connect(settings.postgres_dsn)
    try:
        await conn.copy_records_to_table(
            "members",
            schema_name="chat",
            records=[
                (conversations[i % len(conversations)], u, "member", utc_now())
                for i, u in enumerate(users)
            ],
            columns=["conversation_id", "user_id", "role", "joined_at"],
        )
    finally:
        await conn.close()
    port = args.port
    master = ",".join(
        f"{k.key_id}:{base64.b64encode(k.key).decode()}" for k in settings.master_keys
    )
    env = {
        **os.environ,
        "BACKBONE_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "BACKBONE_POSTGRES_DSN": settings.postgres_dsn,
        "BACKBONE_REDIS_URL": settings.redis_url,
        "BACKBONE_MASTER_KEY": master,
        "BACKBONE_TOPIC_PREFIX": settings.topic_prefix,
        "BACKBONE_JWT_KEYS": jwt,
        "BACKBONE_FANOUT_PORT": str(port),
        "BACKBONE_LOG_LEVEL": "warning",
        "BACKBONE_FANOUT_QUEUE_LIMIT": str(4 * 1024 * 1024),
    }
    server = await asyncio.create_subprocess_exec(sys.executable, "-m", "fanout", env=env)
    rows: list[Figures] = []
    extra: dict[str, float] = {}
    try:
        await _ready(port, server)
        before = _rss(server.pid)
        loop = asyncio.get_running_loop()
        counts = [0]
        transports = []
        started = time.perf_counter()
        slots = asyncio.Semaphore(256)

        async def one(user: uuid.UUID) -> None:
            token = tokens.issue(user, sessions[user])
            auth = _masked(msgspec.json.encode({"type": "auth", "token": token}))
            ready: asyncio.Future[None] = loop.create_future()
            async with slots:
                transport, _ = await loop.create_connection(
                    lambda: Subscriber(auth, ready, counts), "127.0.0.1", port
                )
                transports.append(transport)
                await ready

        await asyncio.gather(*(one(u) for u in users))
        connect_seconds = time.perf_counter() - started
        await asyncio.sleep(2)
        after = _rss(server.pid)
        per = (after - before) / len(users)
        extra.update(rss_before=before, rss_after=after, bytes_per_connection=round(per))
        rows.append(
            Figures(
                "idle sockets (connect+auth)",
                len(users),
                round(connect_seconds, 3),
                round(len(users) / connect_seconds, 1),
                note=f"{per / 1024:.2f} KiB RSS per socket",
            )
        )
        store = await EventStore.open(settings, migrate=False)
        try:
            sender = uuid.uuid4()
            first = await _deliveries(port)
            received0 = counts[0]
            t0 = time.perf_counter()
            sent = 0
            deadline = t0 + args.seconds

            async def producer(worker: int) -> None:
                nonlocal sent
                while time.perf_counter() < deadline:
                    batch = [
                        MessageSent(
                            conversation_id=conversations[
                                (worker * 50 + i + sent) % len(conversations)
                            ],
                            message_id=new_event_id(),
                            sender_id=sender,
                            client_msg_id=f"b{sent}-{i}",
                            body="hello from the benchmark",
                        )
                        for i in range(50)
                    ]
                    await store.producer.append(batch)
                    sent += len(batch)

            await asyncio.gather(*(producer(w) for w in range(args.producers)))
            await asyncio.sleep(1.0)
            seconds = time.perf_counter() - t0
            delivered = await _deliveries(port) - first
            received = counts[0] - received0
        finally:
            await store.close()
        rows.append(
            Figures(
                "deliveries by one process",
                int(delivered),
                round(seconds, 3),
                round(delivered / seconds, 1),
                note=f"{sent} events appended, {received} frames received by the generator",
            )
        )
        extra.update(events=sent, frames_received=received)
        for transport in transports:
            transport.abort()
    finally:
        server.terminate()
        await server.wait()
        await redis.aclose()
    return rows, extra


def run(args: argparse.Namespace) -> int:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    info = stack_up(default_stack_dir())
    base = stack_settings(info)

    async def main() -> tuple[list[Figures], dict[str, float]]:
        await provision(base)
        return await _bench(args, base)

    try:
        import uvloop

        rows, extra = uvloop.run(main())
    except ImportError:  # pragma: no cover - uvloop is a Linux dependency
        rows, extra = asyncio.run(main())
    print(table(rows))
    print(extra)
    write_json(
        Path(args.out),
        "fanout",
        {
            "connections": args.connections,
            "conversations": args.conversations,
            "seconds": args.seconds,
            "open_files": hard,
        },
        rows,
        extra,
    )
    print(f"wrote {args.out}")
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "fanout", help="fanout: idle sockets and deliveries/s", description=__doc__
    )
    parser.add_argument("--connections", type=int, default=10_000)
    parser.add_argument("--conversations", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--producers", type=int, default=8)
    parser.add_argument("--port", type=int, default=18090)
    parser.add_argument("--out", default="bench-results/fanout.json")
    parser.set_defaults(func=run)
