"""``backbone bench fanout``: idle sockets, deliveries per second, end-to-end latency.

Subjects (``--subjects``, default all three):

* ``idle``: ``--connections`` authenticated sockets held by one real ``python -m fanout``
  process, each a user in one conversation; the server's RSS before and after, per socket;
* ``deliveries``: the same sockets in ``--conversations`` conversations; events are appended
  with the event store's producer as fast as it acknowledges them for ``--seconds`` (in this
  process, or with ``--producer-process`` in a process of its own); the server's
  ``fanout_deliveries_total`` over the interval is the figure (frames received by the
  generator are counted too, as a cross-check). ``--profile`` samples the server with py-spy
  meanwhile and prints where its time goes;
* ``latency``: every tier as its own process (``python -m projectors``, ``python -m ingest``,
  ``python -m fanout``) in a deployment of its own (:func:`ops.bench.ingest.deployment`);
  users registered over HTTP, ``--latency-conversations`` conversations of 10 members each,
  every member's socket connected; messages are POSTed at a paced ``--rate`` for
  ``--seconds``, each carrying its send time, and every delivery's send-start ->
  frame-received time is measured (p50/p99).

For the first two, the server runs against the local stack (fresh topics of its own) and
memberships are written straight into the read model and sessions straight into Redis (what
ingest and the projector would have done), so they need neither tier. The load generator is
this process, on plain uvloop sockets (a handshake and one ``auth`` frame made by wsproto's
client side, then counting frames), so it never shares the server's core for anything but
the kernel.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import functools
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import msgspec
from redis.asyncio import Redis
from wsproto import ConnectionType, WSConnection
from wsproto.events import Request
from wsproto.frame_protocol import FrameProtocol

from eventstore import EventStore, Settings, TopicLayout, load_settings, provision_topics
from ingest.auth.tokens import AccessTokens, new_jwt_key, parse_jwt_keys
from ops.bench.ingest import _prepare_user, _Profiler, _wait_ready, deployment
from ops.bench.project import delete_topics_and_caches
from ops.bench.rawhttp import RawHttpPool
from ops.bench.report import Figures, figures, table, write_json
from ops.environment import stack_settings
from ops.provision import provision
from ops.stack import default_stack_dir, stack_up
from ops.stack.ports import ephemeral_port
from schemas import MessageSent, new_event_id, parse_time, utc_now

_EVENT = b'"type":"event"'
SUBJECTS = ("idle", "deliveries", "latency")


class Subscriber(asyncio.Protocol):
    """A load-generator socket: handshake, auth, then count event frames."""

    def __init__(self, auth: bytes, ready: asyncio.Future[None], counts: list[int]) -> None:
        self._auth = auth
        self._ready = ready
        self._counts = counts
        self._open = False
        self._last = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # The upgrade request from a throwaway wsproto client: the generator only counts
        # frames afterwards, so it keeps no protocol state per socket.
        request = WSConnection(ConnectionType.CLIENT).send(Request(host="bench", target="/v1/ws"))
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
    """A client (masked) text frame, by wsproto's client-side encoder."""
    return bytes(FrameProtocol(client=True, extensions=[]).send_data(payload.decode()))


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


def _message_batch(
    conversations: Sequence[uuid.UUID], sender: uuid.UUID, start: int, size: int
) -> list[MessageSent]:
    return [
        MessageSent(
            conversation_id=conversations[(start + i) % len(conversations)],
            message_id=new_event_id(),
            sender_id=sender,
            client_msg_id=f"b{start + i}",
            body="hello from the benchmark",
        )
        for i in range(size)
    ]


async def _produce(
    settings: Settings, conversations: Sequence[uuid.UUID], seconds: float, workers: int
) -> int:
    """Append events with the event store's producer as fast as it acknowledges them."""
    store = await EventStore.open(settings, migrate=False)
    sent = 0
    deadline = time.perf_counter() + seconds
    sender = uuid.uuid4()

    async def producer(worker: int) -> None:
        nonlocal sent
        while time.perf_counter() < deadline:
            batch = _message_batch(conversations, sender, worker * 50 + sent, 50)
            await store.producer.append(batch)
            sent += len(batch)

    try:
        await asyncio.gather(*(producer(w) for w in range(workers)))
    finally:
        await store.close()
    return sent


def produce_main(argv: Sequence[str]) -> int:
    """``python -m ops.bench.fanout produce FILE SECONDS WORKERS``: the producer alone.

    Settings come from the environment (the server's); conversation ids, one per line, from
    FILE; prints the number of events appended.
    """
    path, seconds, workers = argv[0], float(argv[1]), int(argv[2])
    conversations = [uuid.UUID(line) for line in Path(path).read_text().split()]
    settings = load_settings()
    sent = _run(_produce(settings, conversations, seconds, workers))
    print(json.dumps({"sent": sent}))
    return 0


async def _deliveries_subject(
    args: argparse.Namespace,
    settings: Settings,
    env: dict[str, str],
    server_pid: int,
    counts: list[int],
    conversations: Sequence[uuid.UUID],
) -> tuple[Figures, dict[str, Any]]:
    port = args.port
    extra: dict[str, Any] = {}
    first = await _deliveries(port)
    received0 = counts[0]
    profiler = None
    workdir = Path(tempfile.mkdtemp(prefix="bench-fanout-"))
    if args.profile:
        profiler = _Profiler(server_pid, args.seconds, workdir / "profile.txt")
    t0 = time.perf_counter()
    if args.producer_process:
        ids = workdir / "conversations.txt"
        ids.write_text("\n".join(map(str, conversations)))
        child = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "ops.bench.fanout",
            "produce",
            str(ids),
            str(args.seconds),
            str(args.producers),
            env=env,
            stdout=subprocess.PIPE,
        )
        out, _ = await child.communicate()
        sent = int(json.loads(out.decode().strip().splitlines()[-1])["sent"])
    else:
        sent = await _produce(settings, conversations, args.seconds, args.producers)
    await asyncio.sleep(1.0)
    seconds = time.perf_counter() - t0
    delivered = await _deliveries(port) - first
    received = counts[0] - received0
    where = "another process" if args.producer_process else "the generator's process"
    row = Figures(
        "deliveries by one process",
        int(delivered),
        round(seconds, 3),
        round(delivered / seconds, 1),
        note=f"{sent} events appended from {where}, {received} frames received",
    )
    extra.update(events=sent, frames_received=received, producer_process=args.producer_process)
    if profiler is not None:
        extra["profile_self_time_pct"] = await asyncio.to_thread(profiler.result)
        extra["profile_fanout_inclusive_pct"] = _inclusive(workdir / "profile.txt")
        extra["profile_raw"] = str(workdir / "profile.txt")
    return row, extra


_PACKAGES = ("fanout/", "eventstore/", "wsproto/", "aiokafka/consumer/")
_FRAME_FILE = re.compile(r"\(([^()]*?)([^/()]+\.py):\d+\)")


def _inclusive(raw: Path) -> list[tuple[str, float]]:
    """Share of samples (%) in which each function of the tier, the log reader or wsproto is
    on the stack (py-spy names files relative to their ``sys.path`` entry)."""
    within: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        names = set()
        for frame in stack.split(";"):
            match = _FRAME_FILE.search(frame)
            if match and match.group(1).endswith(_PACKAGES):
                function = frame.split(" (", 1)[0]
                names.add(f"{match.group(2)}:{function}")
        for name in names:
            within[name] += int(count)
        total += int(count)
    return (
        [(name, round(100 * n / total, 1)) for name, n in within.most_common(15)] if total else []
    )


async def _bench(args: argparse.Namespace, base: Settings) -> tuple[list[Figures], dict[str, Any]]:
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
    extra: dict[str, Any] = {}
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
        extra.update(
            deployment=settings.topic_prefix,
            rss_before=before,
            rss_after=after,
            bytes_per_connection=round(per),
        )
        rows.append(
            Figures(
                "idle sockets (connect+auth)",
                len(users),
                round(connect_seconds, 3),
                round(len(users) / connect_seconds, 1),
                note=f"{per / 1024:.2f} KiB RSS per socket",
            )
        )
        if "deliveries" in args.subjects:
            row, more = await _deliveries_subject(
                args, settings, env, server.pid, counts, conversations
            )
            rows.append(row)
            extra.update(more)
        for transport in transports:
            transport.abort()
    finally:
        server.terminate()
        await server.wait()
        await redis.aclose()
        await _forget(settings, conversations)
    return rows, extra


async def _forget(settings: Settings, conversations: list[uuid.UUID]) -> None:
    """Delete what the run left on the shared stack: its topics, its Redis keys (sessions,
    caches) and the member rows it wrote into the live read model. Left behind, runs add up
    (a million stale keys made every later latency figure worse)."""
    conn = await asyncpg.connect(settings.postgres_dsn)
    try:
        await conn.execute(
            "DELETE FROM chat.members WHERE conversation_id = ANY($1::uuid[])", conversations
        )
    finally:
        await conn.close()
    await delete_topics_and_caches(settings)


# --- (c) end-to-end latency through every tier --------------------------------------------

_SENT_AT = re.compile(rb'"time":"([^"]{20,40})"[^\n]*?lat (\d{6,20}) ')
"""An event frame's CloudEvents ``time`` (stamped by ingest's producer, ms, wall clock) and
the send time the generator put in the body (``time.time_ns()``, same machine clock)."""
_PAD = "x" * 64


class LatencySubscriber(Subscriber):
    """A subscriber that also notes, per event, its send time (in the body) and now."""

    def __init__(
        self,
        auth: bytes,
        ready: asyncio.Future[None],
        counts: list[int],
        seen: list[tuple[int, int, int]],
    ) -> None:
        super().__init__(auth, ready, counts)
        self._seen = seen
        self._tail = b""

    def data_received(self, data: bytes) -> None:
        now = time.time_ns()
        super().data_received(data)
        # Server frames are unmasked and uncompressed: the body is in clear on the wire. The
        # tail of the previous read is kept for a marker split across reads.
        window = self._tail + data
        skip = len(self._tail)
        for match in _SENT_AT.finditer(window):
            if match.end() > skip:
                stamped = _stamp_ns(match.group(1))
                self._seen.append((int(match.group(2)), stamped, now))
        self._tail = window[-600:]


@functools.lru_cache(maxsize=4096)
def _stamp_ns(raw: bytes) -> int:
    return int(parse_time(raw.decode()).timestamp() * 1000) * 1_000_000


async def _members(
    base: str, groups: int, per_group: int
) -> list[tuple[str, list[str], list[str]]]:
    """``groups`` of 10 registered users: the owner's token and conversations, all tokens.

    The owner is made by :func:`ops.bench.ingest._prepare_user` (its conversations created and
    warmed); the 9 others are registered alike and added to each of the owner's conversations.
    """
    slots = asyncio.Semaphore(4)  # bcrypt runs on ingest's thread pool
    adds = asyncio.Semaphore(32)

    async def user(conversations: int) -> tuple[str, list[str]]:
        async with slots:
            return await _prepare_user(base, conversations)

    out = []
    async with aiohttp.ClientSession(base) as http:
        for _ in range(groups):
            made = await asyncio.gather(user(per_group), *(user(0) for _ in range(9)))
            owner_token, convs = made[0]
            tokens = [t for t, _ in made]
            ids = []
            for token in tokens[1:]:
                headers = {"Authorization": f"Bearer {token}"}
                async with http.get("/v1/users/me", headers=headers) as r:
                    ids.append((await r.json())["user_id"])
            owner = {"Authorization": f"Bearer {owner_token}"}

            async def add(cid: str, member: str, headers: dict[str, str] = owner) -> None:
                async with (
                    adds,
                    http.post(
                        f"/v1/conversations/{cid}/members",
                        json={"user_id": member},
                        headers=headers,
                    ) as r,
                ):
                    assert r.status == 202, await r.text()

            await asyncio.gather(*(add(cid, m) for cid in convs for m in ids))
            out.append((owner_token, convs, tokens))
    return out


async def _latency_load(
    args: argparse.Namespace, base: str, fanout_port: int
) -> tuple[list[Figures], dict[str, Any]]:
    groups = max(1, args.latency_groups)
    per_group = max(1, args.latency_conversations // groups)
    made = await _members(base, groups, per_group)
    senders = [(token, cid) for token, convs, _ in made for cid in convs]
    loop = asyncio.get_running_loop()
    counts = [0]
    seen: list[tuple[int, int, int]] = []
    transports = []
    for _, _, tokens in made:
        for token in tokens:
            auth = _masked(msgspec.json.encode({"type": "auth", "token": token}))
            ready: asyncio.Future[None] = loop.create_future()
            transport, _ = await loop.create_connection(
                lambda a=auth, r=ready: LatencySubscriber(a, r, counts, seen),  # type: ignore[misc]
                "127.0.0.1",
                fanout_port,
            )
            transports.append(transport)
            await ready
    pool = RawHttpPool(base, args.latency_connections)
    await pool.start()
    accepted: list[float] = []
    refused = collections.Counter[int]()
    tasks: set[asyncio.Task[None]] = set()

    async def post(n: int, record: bool) -> None:
        token, cid = senders[n % len(senders)]
        sent_at = time.time_ns()
        body = msgspec.json.encode({"client_msg_id": f"l{n}", "content": f"lat {sent_at} {_PAD}"})
        status, _ = await pool.send(
            pool.post_json(f"/v1/conversations/{cid}/messages", body, token)
        )
        if status != 202:
            refused[status] += 1
        elif record:
            accepted.append((time.time_ns() - sent_at) / 1e9)

    def spawn(coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async def paced(seconds: float, first: int, record: bool) -> int:
        """POST at ``args.rate`` for ``seconds`` (open loop: late requests do not slow it)."""
        started = time.perf_counter()
        n = 0
        while (elapsed := time.perf_counter() - started) < seconds:
            while n < int(elapsed * args.rate):
                spawn(post(first + n, record))
                n += 1
            # Sleep until the next send is due. uvloop's timers have millisecond resolution:
            # a shorter sleep returns at once, and the loop spun a core's worth of CPU away.
            due = (n + 1) / args.rate - (time.perf_counter() - started)
            await asyncio.sleep(max(due, 0.001))
        return n

    try:
        warm = await paced(args.latency_warmup, 0, False)
        await asyncio.sleep(1.0)
        window_start = time.time_ns()
        seen.clear()
        t0 = time.perf_counter()
        sent = await paced(args.seconds, warm, True)
        seconds = time.perf_counter() - t0
        window_end = time.time_ns()
        while tasks:
            await asyncio.gather(*list(tasks))
        await asyncio.sleep(2.0)  # stragglers
    finally:
        pool.close()
        for transport in transports:
            transport.abort()
    measured = [entry for entry in seen if entry[0] >= window_start]
    latencies = [(received - sent_at) / 1e9 for sent_at, _, received in measured]
    # The split at the event's stamp (ms precision): before it, HTTP, admission and checks in
    # ingest; after it, the Kafka acknowledgement, the fan-out tail and the socket write.
    to_stamp = [max(stamped - sent_at, 0) / 1e9 for sent_at, stamped, _ in measured]
    from_stamp = [max(received - stamped, 0) / 1e9 for _, stamped, received in measured]
    late = sum(1 for sent_at, _, _ in seen if sent_at >= window_end)
    expected = 10 * (sent - sum(refused.values()))
    rows = [
        figures(
            "e2e HTTP send -> WS frame",
            latencies,
            seconds,
            f"{len(senders)} conversations x 10 sockets, target {args.rate:.0f} msg/s",
        ),
        figures("  send -> event stamped (ingest)", to_stamp, seconds, "ms precision"),
        figures("  stamped -> WS frame (log, fan-out)", from_stamp, seconds, "ms precision"),
        figures("  HTTP POST -> 202", accepted, seconds, f"{sent} messages sent"),
    ]
    extra: dict[str, Any] = {
        "messages_sent": sent,
        "offered_rate": round(sent / seconds, 1),
        "deliveries_expected": expected,
        "deliveries_measured": len(latencies),
        "sent_after_window": late,
        "refused": dict(refused),
        "sockets": len(transports),
    }
    return rows, extra


def _latency(args: argparse.Namespace) -> tuple[list[Figures], dict[str, Any]]:
    """Every tier as a process of its own in an isolated deployment; then the paced load."""
    with deployment(argparse.Namespace(port=0)) as dep:
        base = f"http://127.0.0.1:{dep.env['BACKBONE_INGEST_PORT']}"
        fanout_port = ephemeral_port()
        # The deployment lifts the message/write/read limits; registering dozens of users
        # from one address needs the auth class lifted too.
        limits = json.loads(dep.env["BACKBONE_RATE_LIMITS"])
        limits["auth"] = {"per_ip": {"rate": 1e6, "burst": 1_000_000}}
        dep.env["BACKBONE_RATE_LIMITS"] = json.dumps(limits)
        dep.spawn_projector()
        dep.spawn("ingest", ["-m", "ingest"])
        dep.spawn("fanout", ["-m", "fanout"], {"BACKBONE_FANOUT_PORT": str(fanout_port)})
        asyncio.run(_wait_ready(base + "/readyz"))
        asyncio.run(_wait_ready(f"http://127.0.0.1:{fanout_port}/readyz"))
        result: tuple[list[Figures], dict[str, Any]] = _run(_latency_load(args, base, fanout_port))
        return result


def _run(coro: Coroutine[Any, Any, Any]) -> Any:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a Linux dependency
        return asyncio.run(coro)
    return uvloop.run(coro)


def run(args: argparse.Namespace) -> int:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    args.subjects = [s.strip() for s in args.subjects.split(",") if s.strip()]
    unknown = set(args.subjects) - set(SUBJECTS)
    if unknown:
        raise SystemExit(f"bench fanout: unknown subjects {sorted(unknown)}; known: {SUBJECTS}")
    rows: list[Figures] = []
    extra: dict[str, Any] = {}
    if {"idle", "deliveries"} & set(args.subjects):
        info = stack_up(default_stack_dir())
        base = stack_settings(info)

        async def main() -> tuple[list[Figures], dict[str, Any]]:
            await provision(base)
            return await _bench(args, base)

        more_rows, more = _run(main())
        rows += more_rows
        extra.update(more)
    if "latency" in args.subjects:
        more_rows, more = _latency(args)
        rows += more_rows
        extra["latency"] = more
    print(table(rows))
    for name, pct in extra.pop("profile_self_time_pct", None) or []:
        print(f"  self {pct:5.1f}%  {name}")
    for name, pct in extra.get("profile_fanout_inclusive_pct", []):
        print(f"  incl {pct:5.1f}%  {name}")
    print(extra)
    write_json(
        Path(args.out),
        "fanout",
        {
            "subjects": args.subjects,
            "connections": args.connections,
            "conversations": args.conversations,
            "seconds": args.seconds,
            "producer_process": args.producer_process,
            "rate": args.rate,
            "latency_conversations": args.latency_conversations,
            "open_files": hard,
        },
        rows,
        extra,
    )
    print(f"wrote {args.out}")
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "fanout",
        help="fanout: idle sockets, deliveries/s, end-to-end latency",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--subjects", default=",".join(SUBJECTS), help="comma-separated")
    parser.add_argument("--connections", type=int, default=10_000)
    parser.add_argument("--conversations", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--producers", type=int, default=8)
    parser.add_argument(
        "--producer-process",
        action="store_true",
        help="append the deliveries subject's events from a process of their own",
    )
    parser.add_argument("--profile", action="store_true", help="py-spy the server (deliveries)")
    parser.add_argument("--rate", type=float, default=1000.0, help="latency: messages/s")
    parser.add_argument("--latency-conversations", type=int, default=100)
    parser.add_argument(
        "--latency-groups", type=int, default=5, help="latency: groups of 10 registered users"
    )
    parser.add_argument(
        "--latency-connections",
        type=int,
        default=32,
        help="latency: keep-alive HTTP connections of the load client",
    )
    parser.add_argument("--latency-warmup", type=float, default=3.0, help="seconds")
    parser.add_argument("--port", type=int, default=18090)
    parser.add_argument("--out", default="bench-results/fanout.json")
    parser.set_defaults(func=run)


if __name__ == "__main__":
    if sys.argv[1:2] == ["produce"]:
        sys.exit(produce_main(sys.argv[2:]))
    sys.exit("usage: python -m ops.bench.fanout produce FILE SECONDS WORKERS")
