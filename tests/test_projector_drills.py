"""Fault drills on real worker processes: SIGKILL mid-stream, and a rebalance mid-stream.

Both end the same way: the read model equals a clean single pass of the same log into another
database (checksum), and every message was applied exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from eventstore import EventStore, Pool, Settings, create_pool
from eventstore.runtime import NICE_ENV
from projectors.checksum import checksum
from projectors.projector import Projector
from projectors.read.contract import LIVE_SCHEMA
from projectors.schema import ensure_live_schema
from projectors.worker import WORKER_INDEX_VARIABLE, application_name
from schemas import (
    ConversationCreated,
    Event,
    MemberJoined,
    MessageEdited,
    ReactionAdded,
    ReadMarkerMoved,
)
from tests.store_fixtures import fresh_database, isolated
from tests.test_projector_support import (
    catch_up,
    group,
    log_end,
    message,
    register,
    settings_env,
    wait_for,
)

pytestmark = pytest.mark.fault


def workload(rooms: int, users: int, messages: int, seed: int) -> tuple[list[Event], int]:
    """Users, groups, then ``messages`` messages with edits, reactions, joins and markers mixed
    in; returns the events and the number of distinct messages sent."""
    rng = random.Random(seed)
    people = [uuid.UUID(int=rng.getrandbits(128)) for _ in range(users)]
    groups = [uuid.UUID(int=rng.getrandbits(128)) for _ in range(rooms)]
    events: list[Event] = [register(p) for p in people]
    members = {g: rng.sample(people, 3) for g in groups}
    events += [group(g, m[0], *m[1:]) for g, m in members.items()]
    sent: dict[uuid.UUID, list[uuid.UUID]] = {g: [] for g in groups}
    for n in range(messages):
        room = rng.choice(groups)
        sender = rng.choice(members[room])
        mid = uuid.UUID(int=rng.getrandbits(128))
        events.append(message(room, sender, f"message {n}", mid))
        sent[room].append(mid)
        roll = rng.random()
        if roll < 0.05:
            events.append(
                MessageEdited(conversation_id=room, message_id=mid, editor_id=sender, body="edit")
            )
        elif roll < 0.10:
            events.append(
                ReactionAdded(conversation_id=room, message_id=mid, user_id=sender, emoji="👍")
            )
        elif roll < 0.12:
            reader = rng.choice(members[room])
            events.append(ReadMarkerMoved(conversation_id=room, user_id=reader, up_to=mid))
        elif roll < 0.125:
            joiner = rng.choice(people)
            if joiner not in members[room]:
                members[room].append(joiner)
                events.append(MemberJoined(conversation_id=room, user_id=joiner, added_by=sender))
    return events, messages


async def produce(store: EventStore, events: list[Event], chunk: int = 2000) -> None:
    """Append ``events`` in order, a chunk at a time (one append keeps its order per stream)."""
    for start in range(0, len(events), chunk):
        await store.producer.append(events[start : start + chunk])


async def applied_total(pool: Pool | asyncpg.Connection) -> int:
    """The events the read model holds: the sum of its stored offsets."""
    if not await pool.fetchval("SELECT to_regclass('chat.offsets') IS NOT NULL"):
        return 0
    return int(await pool.fetchval("SELECT coalesce(sum(next_offset), 0) FROM chat.offsets"))


class Worker:
    """One ``python -m projectors`` process against ``settings``."""

    def __init__(self, settings: Settings, log: Path, index: int = 0, nice: int = 0) -> None:
        self.port = free_port()
        self._env = {
            **os.environ,
            **settings_env(settings),
            WORKER_INDEX_VARIABLE: str(index),
            "BACKBONE_PROJECTOR_METRICS_PORT": str(self.port),
            NICE_ENV: str(nice),
        }
        self.application_name = application_name(self._env)
        self.log = log
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "projectors", env=self._env, stdout=log, stderr=log
            )

    async def get(self, path: str) -> tuple[int, str]:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{self.port}{path}") as response,
        ):
            return response.status, await response.text()

    async def batches_applied(self) -> float:
        """The worker's own count of applied batches, from its /metrics."""
        status, text = await self.get("/metrics")
        assert status == 200
        for line in text.splitlines():
            if line.startswith("backbone_projector_batch_events_count "):
                return float(line.split()[1])
        raise AssertionError("no batch metric")

    async def assigned(self) -> bool:
        """Whether the worker has been given partitions (its log says so)."""
        return bool(self.assignments())

    def assignments(self) -> list[int]:
        """The partition count of each assignment the worker logged, in order."""
        counts: list[int] = []
        if self.log.exists():
            for line in self.log.read_text(errors="replace").splitlines():
                if "reader.assigned" in line:
                    with contextlib.suppress(ValueError, KeyError, TypeError):
                        counts.append(int(json.loads(line)["partitions"]))
        return counts

    async def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        await self.proc.wait()

    async def serving(self) -> None:
        """Wait until the worker serves its metrics: its signal handlers are installed then.

        (A SIGTERM that lands while the interpreter is still starting kills it outright.)
        """
        async with asyncio.timeout(30):
            while True:
                with contextlib.suppress(aiohttp.ClientError):
                    if (await self.get("/healthz"))[0] == 200:
                        return
                await asyncio.sleep(0.05)

    async def stop(self) -> int:
        assert self.proc is not None
        if self.proc.returncode is None:
            await self.serving()
            self.proc.send_signal(signal.SIGTERM)
            async with asyncio.timeout(30):
                await self.proc.wait()
        assert self.proc.returncode is not None
        return self.proc.returncode


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@pytest.fixture
async def drill(base_settings: Settings) -> AsyncIterator[tuple[Settings, EventStore]]:
    settings = await isolated(base_settings, user_partitions=2, conversation_partitions=4)
    async with await EventStore.open(settings) as store:
        yield settings, store


async def assert_equals_clean_replay(settings: Settings, store: EventStore) -> None:
    """The worker-built read model equals a single clean pass into another database."""
    clean = await fresh_database(settings)
    pool = await create_pool(clean.postgres_dsn)
    try:
        await ensure_live_schema(pool)
        await catch_up(store, Projector(pool, store.layout))
        async with store.pool.acquire() as live, pool.acquire() as replay:
            assert await checksum(live, LIVE_SCHEMA) == await checksum(replay, LIVE_SCHEMA)
    finally:
        await pool.close()


async def test_a_worker_runs_as_a_tier_at_the_niceness_it_is_given(
    drill: tuple[Settings, EventStore], tmp_path: Path
) -> None:
    """``backbone up`` asks the projectors to yield the CPU to the tiers clients wait on
    (``BACKBONE_NICE``): the worker's process runs at that niceness, as every tier started
    through :func:`eventstore.runtime.run` does."""
    settings, _ = drill
    worker = Worker(settings, tmp_path / "projector.log", nice=7)
    try:
        await worker.start()
        await worker.serving()
        assert worker.proc is not None
        assert os.getpriority(os.PRIO_PROCESS, worker.proc.pid) == 7
        assert await worker.stop() == 0
    finally:
        if worker.proc is not None and worker.proc.returncode is None:
            await worker.kill()


async def test_sigkill_at_random_points_neither_loses_nor_repeats_an_event(
    drill: tuple[Settings, EventStore], tmp_path: Path
) -> None:
    settings, store = drill
    events, sent = workload(rooms=300, users=150, messages=50_000, seed=4)
    await produce(store, events)
    end = await log_end(store)
    rng = random.Random(7)
    worker = Worker(settings, tmp_path / "projector.log")
    kills = 0
    try:
        for _ in range(8):
            await worker.start()
            target = min(end - 1, await applied_total(store.pool) + rng.randint(1000, 4000))

            async def progressed(target: int = target) -> bool:
                return await applied_total(store.pool) >= target

            await wait_for(progressed, 60, f"the worker applied up to {target}")
            await asyncio.sleep(rng.uniform(0, 0.05))  # land anywhere inside a batch
            await worker.kill()
            kills += 1
        await worker.start()

        async def finished() -> bool:
            return await applied_total(store.pool) >= end

        await wait_for(finished, 120, "the worker applied the whole log")
        assert await worker.stop() == 0
    finally:
        if worker.proc is not None and worker.proc.returncode is None:
            await worker.kill()
    assert kills == 8
    counted = await store.pool.fetchrow(
        "SELECT count(*) AS messages, count(DISTINCT message_id) AS distinct_ids, "
        "max(seq) FILTER (WHERE true) AS top FROM chat.messages"
    )
    assert counted is not None
    assert (counted["messages"], counted["distinct_ids"]) == (sent, sent)
    assert await store.pool.fetchval("SELECT sum(message_count) FROM chat.conversations") == sent, (
        "every message counted once in its conversation"
    )
    assert await store.pool.fetchval("SELECT count(*) FROM chat.dead_letters") == 0
    await assert_equals_clean_replay(settings, store)


async def test_two_workers_with_a_rebalance_mid_stream_build_the_same_model(
    drill: tuple[Settings, EventStore], tmp_path: Path
) -> None:
    """The second worker joins while the first applies and events keep arriving; both apply
    batches (their own /metrics say so) and the result equals a clean single pass."""
    settings, store = drill
    events, sent = workload(rooms=200, users=100, messages=40_000, seed=11)
    split = len(events) // 3
    first = Worker(settings, tmp_path / "first.log", index=0)
    second = Worker(settings, tmp_path / "second.log", index=1)
    try:
        await first.start()
        await produce(store, events[:split])

        async def started() -> bool:
            return await applied_total(store.pool) >= split // 3

        await wait_for(started, 60, "the first worker is applying")
        await second.start()  # the group rebalances while the first one is mid-stream
        # The rest arrives once the second holds partitions: a first worker that is quick
        # enough could otherwise apply the whole log before the rebalance ends.
        await wait_for(second.assigned, 60, "the second worker was given partitions")
        await produce(store, events[split:])
        end = await log_end(store)

        async def finished() -> bool:
            return await applied_total(store.pool) >= end

        await wait_for(finished, 120, "both workers applied the whole log")
        assert await first.get("/healthz") == (200, '{"status": "ok"}')
        assert (await second.get("/readyz"))[0] == 200
        assert await first.batches_applied() > 0
        assert await second.batches_applied() > 0, "the second worker took partitions over"
        assert await second.stop() == 0
        assert await first.stop() == 0
    finally:
        for worker in (first, second):
            if worker.proc is not None and worker.proc.returncode is None:
                await worker.kill()
    count = await store.pool.fetchval("SELECT count(*) FROM chat.messages")
    assert count == sent
    assert await store.pool.fetchval("SELECT count(*) FROM chat.dead_letters") == 0
    await assert_equals_clean_replay(settings, store)


_OPEN_TRANSACTIONS_SQL = (
    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
    "AND application_name = $1 "
    "AND state = 'idle in transaction' AND xact_start < now() - interval '200 milliseconds'"
)


async def freeze_inside_a_batch(worker: Worker, pool: Pool) -> None:
    """SIGSTOP ``worker`` at an instant when it holds a batch's transaction open (its offsets
    rows locked): stopped there, it leaves a transaction idle and aging. Retried at other
    instants until one lands inside a batch. Only ``worker``'s own sessions count: another
    worker's transaction, open that long on a busy machine, once passed for the stopped one's,
    which then rejoined the group after SIGCONT instead of finding its batch ended."""
    assert worker.proc is not None
    rng = random.Random(3)
    for _ in range(200):
        worker.proc.send_signal(signal.SIGSTOP)
        await asyncio.sleep(0.3)
        if await pool.fetchval(_OPEN_TRANSACTIONS_SQL, worker.application_name):
            return
        worker.proc.send_signal(signal.SIGCONT)
        await asyncio.sleep(rng.uniform(0.001, 0.03))
    raise AssertionError("the worker was never stopped inside a batch")


async def test_a_worker_frozen_past_its_session_is_replaced_and_rejoins(
    drill: tuple[Settings, EventStore], tmp_path: Path
) -> None:
    """SIGSTOP (a VM pause, a debugger) outlasts the group session while the worker may be in
    the middle of a batch: the other worker takes every partition over and applies what arrives
    meanwhile; after SIGCONT the frozen one's batch in flight changes nothing, it works again,
    and the read model equals a clean single pass."""
    settings, store = drill
    events, sent = workload(rooms=200, users=100, messages=30_000, seed=17)
    split = len(events) // 2
    first = Worker(settings, tmp_path / "first.log", index=0)
    second = Worker(settings, tmp_path / "second.log", index=1)
    every = settings.user_partitions + settings.conversation_partitions
    try:
        await first.start()
        await second.start()
        await produce(store, events[:split])

        async def both_hold_partitions() -> bool:
            a, b = first.assignments(), second.assignments()
            return bool(a and b and a[-1] and b[-1] and a[-1] + b[-1] == every)

        await wait_for(both_hold_partitions, 60, "the two workers share the partitions")

        async def applying() -> bool:
            return await applied_total(store.pool) >= split // 4

        await wait_for(applying, 60, "the workers are applying")
        # The rest arrives while the first is stopped inside one of the batches it applies.
        rest = asyncio.create_task(produce(store, events[split:], chunk=200))
        try:
            await freeze_inside_a_batch(first, store.pool)
        finally:
            await rest
        end = await log_end(store)

        async def second_holds_all() -> bool:
            found = second.assignments()
            return bool(found) and found[-1] == every

        await wait_for(second_holds_all, 60, "the second worker took every partition over")

        async def finished() -> bool:
            return await applied_total(store.pool) >= end

        await wait_for(finished, 120, "the second worker applied the whole log")
        # Resumed, the first finds its batch's connection closed by PostgreSQL: the batch
        # committed nothing, and the worker exits for its supervisor to start it again.
        assert first.proc is not None
        first.proc.send_signal(signal.SIGCONT)
        async with asyncio.timeout(60):
            assert await first.proc.wait() != 0
        # asyncpg words it by where the worker stood ("the underlying connection is closed",
        # or another operation "in progress" on it): either way a database error ended it,
        # logged as the worker's last event.
        last = json.loads(first.log.read_bytes().splitlines()[-1])
        assert last["event"] == "uncaught"
        assert "asyncpg.exceptions." in last["exception"].splitlines()[-1]
        assert await applied_total(store.pool) == end, "nothing applied twice meanwhile"
        before = len(first.assignments())
        await first.start()  # as the supervisor does

        async def first_rejoined() -> bool:
            found = first.assignments()
            return len(found) > before and found[-1] > 0

        await wait_for(first_rejoined, 60, "the restarted worker rejoined and holds partitions")
        # The group goes on with the two: messages sent now are applied once too.
        rooms = [
            (e.conversation_id, e.creator_id) for e in events if isinstance(e, ConversationCreated)
        ]
        tail = [message(*rooms[n % len(rooms)], f"after {n}", uuid.uuid4()) for n in range(2000)]
        await produce(store, tail)
        sent += len(tail)
        end = await log_end(store)
        await wait_for(finished, 60, "the two workers applied the messages sent after")
        assert await second.stop() == 0
        assert await first.stop() == 0
    finally:
        for worker in (first, second):
            if worker.proc is not None and worker.proc.returncode is None:
                worker.proc.send_signal(signal.SIGCONT)
                await worker.kill()
    assert await store.pool.fetchval("SELECT count(*) FROM chat.messages") == sent
    assert await store.pool.fetchval("SELECT sum(message_count) FROM chat.conversations") == sent
    assert await store.pool.fetchval("SELECT count(*) FROM chat.dead_letters") == 0
    await assert_equals_clean_replay(settings, store)
