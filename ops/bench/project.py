"""``backbone bench project``: replay rate into the read model, beside raw COPY, and live latency.

One run, the local stack, fresh topics and fresh databases (dropped afterwards):

1. generate ``--events`` events (users, groups with members, then mostly ``MessageSent``
   across many conversations with edits, deletes, reactions, read markers and joins mixed in,
   in proportions a chat sees) and write them fast: encoded once with the event store's codec
   (so bodies are sealed as in production) and sent in large batches;
2. **replay**: from offset 0 into a fresh read model, the partitions dealt out to ``--workers``
   processes, each a :class:`~projectors.projector.Projector` over a group-less
   :class:`~eventstore.LogReader`, exactly as ``backbone replay`` builds its shadow (no caches,
   the secondary indexes built at the end, within the time), in events per second, with the
   CPU each event cost the replaying processes (Python) and PostgreSQL's processes;
3. **raw COPY**: the rows that replay produced, read back and written into the same tables of
   another fresh schema with ``COPY`` (asyncpg ``copy_records_to_table``), the deferred indexes
   built after them as the replay builds its own; the reference is those events divided by
   that time: the database's ceiling for these rows (steps 2 and 3 run ``--rounds`` times over
   the one written log, each round into schemas of its own, dropped after it: the figures
   reported are the medians, each round's beside them);
4. **live latency**: the projector worker (``python -m projectors``, its own process) running
   on other fresh topics; messages appended at ``--live-rate`` per second; latency from the
   start of each append to the commit that made its row visible (PostgreSQL's commit
   timestamp, read after the run: nothing polls meanwhile); beside it, the worker's CPU per
   event and the events per batch (distinct committing transactions), what following a live
   rate costs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import resource
import statistics
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Final

import asyncpg
import msgspec
from aiokafka.admin import AIOKafkaAdminClient
from redis.asyncio import Redis

from eventstore import (
    EventStore,
    OutgoingRecord,
    Settings,
    TopicLayout,
    encode_event,
    provision_topics,
)
from eventstore.runtime import tune_gc
from ops.bench.report import CpuMeter, Figures, GroupCpuMeter, figures, table, write_json
from ops.environment import stack_env, stack_settings
from ops.stack import StackInfo, default_stack_dir, stack_up
from projectors import rebuild
from projectors.projector import Projector
from projectors.read.contract import LIVE_SCHEMA
from projectors.schema import TABLES, create_schema, ensure_live_schema, finish_build, in_schema
from projectors.sources import REPLAY_BATCH
from schemas import (
    ConversationCreated,
    Event,
    InitialMember,
    MemberJoined,
    MessageDeleted,
    MessageEdited,
    MessageSent,
    ReactionAdded,
    ReadMarkerMoved,
    UserRegistered,
)

GOAL_REPLAY: Final = 50_000.0
GOAL_VS_COPY: Final = 0.25
GOAL_LIVE_P99_MS: Final = 50.0
_SEND_CHUNK: Final = 20_000
_APPLIED_SQL: Final = "SELECT topic, partition, next_offset FROM {schema}.offsets"
_BODY_WORDS: Final = ("hey", "so", "about", "tomorrow", "sounds", "good", "see", "you", "lunch")
_EMOJI: Final = ("👍", "❤️", "😂", "🎉", "👀")


class Workload(msgspec.Struct):
    events: list[Event]
    users: list[uuid.UUID]
    rooms: dict[uuid.UUID, list[uuid.UUID]]


def workload(total: int, seed: int = 42) -> Workload:
    """About ``total`` events: 0.5% registrations, 1% groups (3-8 members), then messages with
    edits (3%), deletes (1%), reactions (6%), read markers (5%) and joins (0.5%) mixed in."""
    rng = random.Random(seed)  # noqa: S311 - reproducible bench data, not secrets
    users = [uuid.UUID(int=rng.getrandbits(128), version=4) for _ in range(max(total // 200, 8))]
    events: list[Event] = [
        UserRegistered(user_id=u, username=f"u{u.hex[:12]}", email=f"{u.hex[:12]}@bench.test")
        for u in users
    ]
    rooms: dict[uuid.UUID, list[uuid.UUID]] = {}
    for _ in range(max(total // 100, 2)):
        room = uuid.UUID(int=rng.getrandbits(128), version=4)
        members = rng.sample(users, rng.randint(3, 8))
        rooms[room] = members
        events.append(
            ConversationCreated(
                conversation_id=room,
                creator_id=members[0],
                name=f"room {room.hex[:6]}",
                members=tuple(InitialMember(m) for m in members),
            )
        )
    room_ids = list(rooms)
    sent: dict[uuid.UUID, list[uuid.UUID]] = {r: [] for r in room_ids}
    n = 0
    while len(events) < total:
        room = rng.choice(room_ids)
        members = rooms[room]
        roll = rng.random()
        earlier = sent[room]
        if roll < 0.03 and earlier:
            mid = rng.choice(earlier[-20:])
            events.append(
                MessageEdited(conversation_id=room, message_id=mid, editor_id=members[0], body="ed")
            )
        elif roll < 0.04 and earlier:
            mid = earlier.pop()
            events.append(
                MessageDeleted(conversation_id=room, message_id=mid, deleted_by=members[0])
            )
        elif roll < 0.10 and earlier:
            events.append(
                ReactionAdded(
                    conversation_id=room,
                    message_id=rng.choice(earlier[-20:]),
                    user_id=rng.choice(members),
                    emoji=rng.choice(_EMOJI),
                )
            )
        elif roll < 0.15 and earlier:
            events.append(
                ReadMarkerMoved(
                    conversation_id=room, user_id=rng.choice(members), up_to=earlier[-1]
                )
            )
        elif roll < 0.155:
            joiner = rng.choice(users)
            if joiner not in members:
                members.append(joiner)
                events.append(
                    MemberJoined(conversation_id=room, user_id=joiner, added_by=members[0])
                )
        else:
            mid = uuid.UUID(int=rng.getrandbits(128), version=4)
            body = " ".join(rng.choices(_BODY_WORDS, k=rng.randint(3, 25)))
            events.append(
                MessageSent(
                    conversation_id=room,
                    message_id=mid,
                    sender_id=rng.choice(members),
                    client_msg_id=f"c{n}",
                    body=body,
                )
            )
            earlier.append(mid)
            n += 1
    return Workload(events, users, rooms)


async def write_events(store: EventStore, events: Sequence[Event]) -> float:
    """Encode ``events`` with the codec and send them in large batches; the seconds it took."""
    started = time.perf_counter()
    subjects = {s for e in events if e.personal_fields and (s := e.subject_id) is not None}
    keys = await store.keyring.keys_for_write(subjects)
    producer = store.producer
    for start in range(0, len(events), _SEND_CHUNK):
        records: list[OutgoingRecord] = [
            encode_event(
                event,
                producer.envelope_for(event, actor=None, correlation_id=None, causation_id=None),
                keys,
                store.layout,
            )
            for event in events[start : start + _SEND_CHUNK]
        ]
        await producer.send_records(records)
    return time.perf_counter() - started


@contextlib.asynccontextmanager
async def fresh_deployment(base: Settings, name: str) -> AsyncIterator[Settings]:
    """``base`` with topics and a database of their own, both deleted on the way out."""
    tag = f"{name}{uuid.uuid4().hex[:8]}"
    head, _, _ = base.postgres_dsn.rpartition("/")
    settings = msgspec.structs.replace(
        base, topic_prefix=f"bench-{tag}", postgres_dsn=f"{head}/bench_{tag}"
    )
    layout = TopicLayout.from_settings(settings)
    admin_conn = await asyncpg.connect(base.postgres_dsn)
    try:
        await admin_conn.execute(f'CREATE DATABASE "bench_{tag}"')
        await provision_topics(settings.kafka_bootstrap, layout)
        yield settings
    finally:
        with contextlib.suppress(asyncpg.PostgresError):
            await admin_conn.execute(f'DROP DATABASE IF EXISTS "bench_{tag}" WITH (FORCE)')
        await admin_conn.close()
        await delete_topics_and_caches(settings)


async def delete_topics_and_caches(settings: Settings) -> None:
    """Delete a bench deployment's topics and its Redis keys (idempotency records, caches):
    left behind, runs add up on the shared stack (a million keys made Redis's forks and
    every later latency figure worse)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        await admin.delete_topics(list(TopicLayout.from_settings(settings).topics))
    finally:
        await admin.close()
    redis = Redis.from_url(settings.redis_url)
    try:
        batch: list[bytes] = []
        async for key in redis.scan_iter(match=f"{settings.topic_prefix}:*", count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                await redis.unlink(*batch)
                batch.clear()
        if batch:
            await redis.unlink(*batch)
    finally:
        await redis.aclose()


class ReplayCost(msgspec.Struct, frozen=True):
    """CPU per replayed event: the replaying processes' Python, PostgreSQL's processes."""

    python_us: float
    postgres_us: float


async def replay(
    store: EventStore, schema: str, batch: int, workers: int
) -> tuple[int, float, ReplayCost]:
    """Project the whole log into a fresh ``schema``; (records, seconds, CPU per event).

    With ``workers`` > 1 the partitions are dealt out to that many worker processes, as
    ``backbone replay`` builds its shadow (:func:`projectors.rebuild.replay_in_workers`); the
    time includes starting them. They fork from a server that the first round starts (and
    whose imports it waits for); later rounds fork from the same server, as the passes of one
    ``backbone replay`` do. The Python CPU figure is this process's and what each worker
    reports of its own; the server's one import (about 0.3 s, first round only) is in neither.
    """
    async with store.pool.acquire() as conn:
        await create_schema(conn, schema, build=True)
    records = 0

    def count(applied: int) -> None:
        nonlocal records
        records += applied

    # The generated workload stays alive in this process: keep the collector off it, and
    # collect as a replay worker does (bulk: with the server's thresholds, a one-process replay
    # spent a fifth of its time in young collections).
    tune_gc(bulk=True)

    def children_cpu() -> float:
        used = resource.getrusage(resource.RUSAGE_CHILDREN)
        return used.ru_utime + used.ru_stime

    with GroupCpuMeter(lambda name: name.startswith("postgres")) as postgres:
        python = -(children_cpu() + time.process_time())
        started = time.perf_counter()
        if workers > 1:
            ends = await rebuild.log_ends(store)
            shares = rebuild.replay_shares({p: end for p, end in ends.items() if end}, workers)
            python += await rebuild.replay_in_workers(store.settings, schema, shares, batch, count)
        else:
            projector = Projector(
                store.pool, store.layout, schema=schema, caches=None, durable_commits=False
            )
            await rebuild.replay(store, projector, batch, count)
        await finish_build(store.pool, schema)  # the model is usable once its indexes are there
        seconds = time.perf_counter() - started
        python += children_cpu() + time.process_time()
    python -= postgres.own_seconds  # the meter's thread is this process's, not the replay's
    cost = ReplayCost(round(python / max(records, 1) * 1e6, 1), postgres.per(records))
    return records, seconds, cost


async def raw_copy(store: EventStore, source: str, target: str) -> tuple[int, float]:
    """COPY every row of ``source`` into a fresh ``target`` made as a replay makes its own
    (the indexes that can wait built after the rows are in); (rows, seconds spent in COPY and
    in building those indexes)."""
    async with store.pool.acquire() as conn:
        await create_schema(conn, target, build=True)
        rows_total, seconds = 0, 0.0
        for tbl in TABLES:
            columns = [c.name for c in tbl.columns]
            names = ", ".join(f'"{c}"' for c in columns)
            rows = await conn.fetch(f"SELECT {names} FROM {source}.{tbl.name}")  # noqa: S608
            if not rows:
                continue
            started = time.perf_counter()
            await conn.copy_records_to_table(
                tbl.name, records=rows, columns=columns, schema_name=target
            )
            seconds += time.perf_counter() - started
            rows_total += len(rows)
        started = time.perf_counter()
        await finish_build(store.pool, target)
        seconds += time.perf_counter() - started
    return rows_total, seconds


class Round(msgspec.Struct, frozen=True):
    """One replay of the written log and, right after it, the raw COPY of the rows it made."""

    replayed: Figures
    copied: Figures
    cost: ReplayCost
    rows: int

    @property
    def vs_copy(self) -> float:
        return self.replayed.per_second / self.copied.per_second if self.copied.per_second else 0.0


async def replay_round(store: EventStore, number: int, batch: int, workers: int) -> Round:
    """Replay the log into a fresh schema, COPY its rows into another, drop both."""
    replayed_into, copied_into = f"replay_{number}", f"copyref_{number}"
    records, replay_seconds, cost = await replay(store, replayed_into, batch, workers)
    print(
        f"bench project: round {number}: replayed in {replay_seconds:.1f} s; COPY", file=sys.stderr
    )
    rows, copy_seconds = await raw_copy(store, replayed_into, copied_into)
    async with store.pool.acquire() as conn:
        for schema in (replayed_into, copied_into):
            await conn.execute(f"DROP SCHEMA {schema} CASCADE")
    replayed = Figures(
        name="replay: Projector over LogReader",
        count=records,
        seconds=round(replay_seconds, 3),
        per_second=round(records / replay_seconds, 1),
        note=f"round {number}, batch {batch}, {workers} worker{'s' if workers > 1 else ''}",
    )
    copied = Figures(
        name="raw COPY of the same rows",
        count=records,
        seconds=round(copy_seconds, 3),
        per_second=round(records / copy_seconds, 1),
        note=f"round {number}, {rows} rows, events per COPY second",
    )
    return Round(replayed, copied, cost, rows)


async def replay_and_copy(
    base: Settings, events: int, batch: int, workers: int, rounds: int
) -> tuple[Figures, list[Round]]:
    """Write the workload once, then replay it and COPY its rows ``rounds`` times: each round's
    ratio compares two figures taken a few seconds apart, so a host that speeds up or slows
    down between rounds (these shared machines do) moves both."""
    async with fresh_deployment(base, "proj") as settings, await EventStore.open(settings) as store:
        generated = workload(events)
        print(f"bench project: writing {len(generated.events):,} events", file=sys.stderr)
        write_seconds = await write_events(store, generated.events)
        print(f"bench project: written in {write_seconds:.1f} s; replaying", file=sys.stderr)
        done = [await replay_round(store, n, batch, workers) for n in range(1, rounds + 1)]
    records = done[0].replayed.count
    write = Figures(
        name="write: encode_event + send_records",
        count=records,
        seconds=round(write_seconds, 3),
        per_second=round(records / write_seconds, 1),
    )
    return write, done


async def applied_offsets(pool: asyncpg.Pool[asyncpg.Record]) -> dict[tuple[str, int], int]:
    """The live projector's next offset per partition, as stored with its read model."""
    rows = await pool.fetch(in_schema(LIVE_SCHEMA, _APPLIED_SQL))
    return {(r[0], r[1]): r[2] for r in rows}


async def live_latency(
    info: StackInfo, base: Settings, count: int, rate: float
) -> tuple[Figures, dict[str, float]]:
    """Append ``count`` messages at ``rate``/s with the worker running; append -> applied,
    and what following them cost the worker: CPU per event, events per batch."""
    async with fresh_deployment(base, "live") as settings, await EventStore.open(settings) as store:
        await ensure_live_schema(store.pool)
        seed = workload(400, seed=7)
        await write_events(store, seed.events)
        env = {
            **stack_env(info),
            "BACKBONE_TOPIC_PREFIX": settings.topic_prefix,
            "BACKBONE_POSTGRES_DSN": settings.postgres_dsn,
        }
        worker = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "projectors",
            env=env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        try:
            return await _measure_live(store, seed, count, rate, worker.pid)
        finally:
            worker.terminate()
            await worker.wait()


_COMMITTED_SQL: Final = (
    "SELECT message_id, extract(epoch FROM pg_xact_commit_timestamp(xmin))::float8, "
    "xmin::text FROM {schema}.messages WHERE message_id = ANY($1::uuid[])"
)


async def _measure_live(
    store: EventStore, seed: Workload, count: int, rate: float, worker_pid: int
) -> tuple[Figures, dict[str, float]]:
    """Append ``count`` messages at ``rate`` a second; each one's latency runs from the start
    of its append to the commit of the transaction that made its row visible.

    The commit times are PostgreSQL's own (``track_commit_timestamp``, which the local stack
    turns on), read once at the end: nothing polls the database while the load runs (polling
    it every millisecond had taken a large share of this two-core machine from the projector
    being measured). Server and bench share the host's clock."""
    pool = store.pool
    if await pool.fetchval("SHOW track_commit_timestamp") != "on":
        raise RuntimeError(
            "PostgreSQL does not track commit times: restart the local stack "
            "(backbone stack down; backbone stack up) to apply its current settings"
        )
    async with store.reader() as reader:
        ends = {p: e for p, e in (await reader.end_offsets()).items() if e}
    await _until(lambda applied: applied == ends, pool, 60, "the seed")
    rng = random.Random(3)  # noqa: S311 - reproducible bench data, not secrets
    rooms = list(seed.rooms.items())
    started_at: dict[uuid.UUID, float] = {}
    written: dict[tuple[str, int], int] = {}

    async def one(i: int) -> None:
        room, members = rooms[i % len(rooms)]
        event = MessageSent(
            conversation_id=room,
            message_id=uuid.uuid4(),
            sender_id=rng.choice(members),
            client_msg_id=f"live{i}",
            body="live message",
        )
        started_at[event.message_id] = time.time()
        (recorded,) = await store.producer.append([event])
        key = (store.layout.topic("conversation"), recorded.position.partition)
        written[key] = max(written.get(key, 0), recorded.position.offset + 1)

    worker_cpu = CpuMeter(worker_pid)
    started = time.perf_counter()
    sends = []
    for i in range(count):
        target = started + i / rate
        delay = target - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        sends.append(asyncio.create_task(one(i)))
    await asyncio.gather(*sends)
    await _until(
        lambda applied: all(applied.get(p, 0) >= end for p, end in written.items()),
        pool,
        30,
        "the live messages",
    )
    seconds = time.perf_counter() - started
    cpu_per_event = worker_cpu.per(count)
    committed = await pool.fetch(in_schema(LIVE_SCHEMA, _COMMITTED_SQL), list(started_at))
    latencies = [at - started_at[message_id] for message_id, at, _ in committed]
    if len(latencies) != count:
        raise RuntimeError(f"{count - len(latencies)} live messages have no row")
    per_batch = count / len({transaction for _, _, transaction in committed})
    cost = {"live_worker_cpu_us_per_event": cpu_per_event, "live_events_per_batch": per_batch}
    note = f"{rate:g}/s"
    return figures("live: append -> applied (worker)", latencies, seconds, note=note), cost


async def _until(
    done: Callable[[dict[tuple[str, int], int]], bool],
    pool: asyncpg.Pool[asyncpg.Record],
    within: float,
    what: str,
) -> None:
    """Wait until the worker's stored offsets satisfy ``done`` (checked every 20 ms)."""
    deadline = time.monotonic() + within
    while not done(await applied_offsets(pool)):
        if time.monotonic() > deadline:
            raise RuntimeError(f"the projector worker did not apply {what} within {within:g} s")
        await asyncio.sleep(0.02)


def _spread(values: Sequence[float], fmt: str) -> str:
    """The median of ``values`` and, for several, all of them in order."""
    median = format(statistics.median(values), fmt)
    if len(values) == 1:
        return median
    return f"{median} (median of {len(values)}: {', '.join(format(v, fmt) for v in values)})"


def _rounds(raw: str) -> int:
    value = int(raw)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{raw}: at least 1 round")
    return value


def run(args: argparse.Namespace) -> int:
    info = stack_up(default_stack_dir())
    base = stack_settings(info)

    async def measure() -> tuple[Figures, list[Round], Figures, dict[str, float]]:
        write, rounds = await replay_and_copy(
            base, args.events, args.batch, args.workers, args.rounds
        )
        live, cost = await live_latency(info, base, args.live_events, args.live_rate)
        return write, rounds, live, cost

    write, rounds, live, cost = asyncio.run(measure())
    rates = [r.replayed.per_second for r in rounds]
    # As each round reports it, so that the median is the one of the figures beside it.
    ratios = [round(r.vs_copy, 4) for r in rounds]
    python_us = [r.cost.python_us for r in rounds]
    postgres_us = [r.cost.postgres_us for r in rounds]
    rows = [write, *(f for r in rounds for f in (r.replayed, r.copied)), live]
    print(table(rows))
    print(f"replay: {_spread(rates, ',.0f')} events/s (goal >= {GOAL_REPLAY:,.0f})")
    print(f"replay / raw COPY: {_spread(ratios, '.1%')} (goal >= {GOAL_VS_COPY:.0%})")
    print(
        f"replay: {_spread(python_us, ',.1f')} µs of Python CPU an event (the replaying "
        f"processes), PostgreSQL {_spread(postgres_us, ',.1f')}"
    )
    print(f"live p99: {live.p99_ms} ms (goal <= {GOAL_LIVE_P99_MS:g} ms)")
    print(
        f"live: the worker spent {cost['live_worker_cpu_us_per_event']:,.0f} µs of CPU an event, "
        f"{cost['live_events_per_batch']:.1f} events a batch"
    )
    write_json(
        Path(args.json),
        "project",
        {
            "events": args.events,
            "batch": args.batch,
            "workers": args.workers,
            "rounds": args.rounds,
            "live_events": args.live_events,
            "live_rate": args.live_rate,
            "cpus": os.cpu_count(),
        },
        rows,
        {
            **cost,
            "rows": rounds[0].rows,
            "replay_per_second": statistics.median(rates),
            "replay_vs_copy": round(statistics.median(ratios), 4),
            "replay_python_cpu_us_per_event": statistics.median(python_us),
            "replay_postgres_cpu_us_per_event": statistics.median(postgres_us),
            "rounds": [
                {
                    "replay_per_second": r.replayed.per_second,
                    "copy_per_second": r.copied.per_second,
                    "replay_vs_copy": ratio,
                    "python_cpu_us_per_event": r.cost.python_us,
                    "postgres_cpu_us_per_event": r.cost.postgres_us,
                }
                for r, ratio in zip(rounds, ratios, strict=True)
            ],
            "live_p50_ms": live.p50_ms,
            "live_p99_ms": live.p99_ms,
            "goals": {
                "replay_per_second": GOAL_REPLAY,
                "replay_vs_copy": GOAL_VS_COPY,
                "live_p99_ms": GOAL_LIVE_P99_MS,
            },
        },
    )
    print(f"wrote {args.json}")
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "project",
        help="replay rate vs raw COPY, and live apply latency, of the projector",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, default=REPLAY_BATCH, help="records per replay batch")
    parser.add_argument(
        "--workers",
        type=int,
        default=rebuild.default_workers(),
        help="replay processes, partitions dealt out among them (default: one per CPU and "
        "one more, as backbone replay)",
    )
    parser.add_argument(
        "--rounds",
        type=_rounds,
        default=1,
        help="replay the written log (and COPY its rows) this many times: figures are medians",
    )
    parser.add_argument("--live-events", type=int, default=2000)
    parser.add_argument("--live-rate", type=float, default=200.0, help="appends per second")
    parser.add_argument("--json", default="bench-results/project.json", metavar="PATH")
    parser.set_defaults(func=run)
