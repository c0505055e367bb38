"""Rebuilds: a shadow schema built from offset 0 while the live projector serves, then swapped.

Every test compares against a clean replay of the same log into a schema of its own: equal
checksums mean byte-identical read models.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import multiprocessing
import random
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from eventstore import EventStore, GroupReader, Pool, create_pool, stream_placement
from eventstore.epoch import bump_epoch
from projectors.checksum import checksum, snapshot_readers
from projectors.errors import ProjectorError
from projectors.projector import Projector
from projectors.read.contract import LIVE_SCHEMA, ReadSide, members_key
from projectors.read.queries import Reads
from projectors.rebuild import (
    Progress,
    Rebuild,
    RebuildRunning,
    ReplayWorkerFailed,
    goes_parallel,
    replay_in_workers,
    replay_shares,
    shadow_schema,
    swap_pass_bound,
)
from projectors.schema import (
    READ_MODEL_VERSION,
    TABLES,
    create_schema,
    finish_build,
    schema_exists,
)
from projectors.sources import REPLAY_BATCH
from projectors.worker import group_id
from schemas import ConversationCreated, Event, UserErased
from tests.test_projector_drills import produce, workload
from tests.test_projector_support import (
    World,
    catch_up,
    message,
    register,
    wait_for,
    world_fixture,  # noqa: F401 - provides the `world` fixture
)


async def clean_checksum(world: World, name: str = "clean") -> str:
    """The checksum of a single clean pass of the whole log into schema ``name``."""
    async with world.store.pool.acquire() as conn:
        await conn.execute(f"DROP SCHEMA IF EXISTS {name} CASCADE")
    projector = Projector(world.store.pool, world.store.layout, schema=name)
    async with world.store.pool.acquire() as conn:
        await create_schema(conn, name)
    await catch_up(world.store, projector)
    async with world.store.pool.acquire() as conn:
        return await checksum(conn, name)


async def live_checksum(pool: Pool) -> str:
    async with pool.acquire() as conn:
        return await checksum(conn, LIVE_SCHEMA)


async def log_end(store: EventStore) -> dict[tuple[str, int], int]:
    async with store.reader() as reader:
        return {p: end for p, end in (await reader.end_offsets()).items() if end}


async def caught_up(pool: Pool, store: EventStore) -> bool:
    ends = await log_end(store)
    rows = await pool.fetch("SELECT topic, partition, next_offset FROM chat.offsets")
    return {(r[0], r[1]): r[2] for r in rows if r[2]} == ends


@contextlib.asynccontextmanager
async def live_projector(world: World) -> AsyncIterator[GroupReader]:
    """The live projector as the worker runs it: a group member applying to ``chat``."""
    store = world.store
    reader = GroupReader(
        world.settings,
        group_id=group_id(world.settings),
        streams=("user", "conversation"),
        positions=world.projector.positions,
        handler=world.projector.handle,
        keys=store.keyring.keys_for_read,
        epoch=store.epoch,
        max_records=500,
    )
    task = asyncio.create_task(reader.run())
    try:
        yield reader
    finally:
        reader.stop()
        await task


def rooms_and_senders(events: list[Event]) -> list[tuple[uuid.UUID, uuid.UUID]]:
    """(conversation, a member) pairs of the groups in ``events``, for later messages."""
    return [(e.conversation_id, e.creator_id) for e in events if isinstance(e, ConversationCreated)]


async def test_rebuild_while_writes_continue_ends_equal_to_the_live_model(world: World) -> None:
    """Writes go on during the whole rebuild and after the swap; the live projector applies
    them across the swap (its compare-and-set re-seeks when the new offsets differ); once
    writes stop and both caught up, the swapped-in model equals a clean replay."""
    events, _ = workload(rooms=12, users=24, messages=2500, seed=7)
    await produce(world.store, events)
    rooms = rooms_and_senders(events)
    rng = random.Random(1)
    rebuilt = asyncio.Event()
    written = 0

    async def keep_writing() -> None:
        nonlocal written
        while not rebuilt.is_set():
            chunk = [message(*rng.choice(rooms), f"during {written + i}") for i in range(25)]
            await world.write(chunk)
            written += len(chunk)

    async with live_projector(world) as reader:
        await wait_for(lambda: caught_up(world.store.pool, world.store), 60, "live caught up")
        writer = asyncio.create_task(keep_writing())
        try:
            result = await Rebuild(world.store, redis=world.redis, batch=400).run()
        finally:
            rebuilt.set()
            await writer
        applied_at_swap = dict(world.projector.applied)
        await world.write([message(*rooms[0], f"after swap {n}") for n in range(50)])
        await wait_for(lambda: caught_up(world.store.pool, world.store), 60, "live caught up")
        assert reader.assignment, "the live projector is still a member"
    assert written > 0, "writes overlapped the rebuild"
    assert world.projector.applied != applied_at_swap, "the live projector applied after the swap"
    assert result.replaced is not None
    assert result.replaced.startswith("chat_old_")
    assert not await schema_exists(world.store.pool, result.replaced), "old model dropped"
    assert not await schema_exists(world.store.pool, shadow_schema(LIVE_SCHEMA))
    comment = await world.store.pool.fetchval("SELECT obj_description('chat'::regnamespace)")
    assert comment == f"backbone read model v{READ_MODEL_VERSION}"
    assert await world.redis.exists(members_key(world.namespace, rooms[0][0]))
    assert await live_checksum(world.store.pool) == await clean_checksum(world)
    # The shadow was built with some indexes left out; the model swapped in has every one.
    assert await index_definitions(world.store.pool, LIVE_SCHEMA) == await index_definitions(
        world.store.pool, "clean"
    )


async def index_definitions(pool: Pool, schema: str) -> set[str]:
    """Every index of ``schema``, as its definition with the schema's name taken out."""
    rows = await pool.fetch("SELECT indexdef FROM pg_indexes WHERE schemaname = $1", schema)
    return {r[0].replace(f" {schema}.", " ") for r in rows}


async def test_a_build_schema_leaves_indexes_out_until_it_is_finished(world: World) -> None:
    """A schema created for a build has its primary keys only; ``finish_build`` adds every
    other index (idempotently), ending equal to a schema made at once."""
    pool = world.store.pool
    built, whole = (f"ix_{kind}_{uuid.uuid4().hex[:6]}" for kind in ("built", "whole"))
    async with pool.acquire() as conn:
        await create_schema(conn, built, build=True)
        await create_schema(conn, whole)
        left_out = await index_definitions(pool, whole) - await index_definitions(pool, built)
        assert {d.split(" ON ")[0] for d in left_out} == {
            "CREATE INDEX conversations_by_creator_id",
            "CREATE INDEX media_by_uploader_id",
            "CREATE INDEX members_by_user_id_conversation_id",
            "CREATE INDEX messages_by_media_id",
            "CREATE INDEX messages_by_sender_id",
            "CREATE UNIQUE INDEX messages_by_conversation_id_offset",
            "CREATE INDEX reactions_by_user_id",
            "CREATE INDEX sessions_by_user_id",
        }
        await finish_build(pool, built)
        await finish_build(pool, built)  # a resumed build finishes again: nothing to add
        assert await index_definitions(pool, built) == await index_definitions(pool, whole)
        tables = (
            "SELECT array_agg(tablename ORDER BY tablename) FROM pg_tables WHERE schemaname = $1"
        )
        assert await conn.fetchval(tables, built) == await conn.fetchval(tables, whole)
        for schema in (built, whole):
            await conn.execute(f"DROP SCHEMA {schema} CASCADE")


async def test_an_interrupted_rebuild_resumes_from_the_shadows_offsets(world: World) -> None:
    """Cancelled mid-way, the shadow keeps what it applied; a rerun continues from there (it
    does not start over) and ends with the same checksum as a clean replay."""
    events, _ = workload(rooms=10, users=20, messages=4000, seed=11)
    await produce(world.store, events)
    total = sum((await log_end(world.store)).values())
    seen: list[Progress] = []

    def interrupt_midway(progress: Progress) -> None:
        seen.append(progress)
        if progress.applied >= total // 2 and not first.cancelled():
            first.cancel()

    first = asyncio.create_task(Rebuild(world.store, batch=300, on_progress=interrupt_midway).run())
    with pytest.raises(asyncio.CancelledError):
        await first
    shadow = shadow_schema(LIVE_SCHEMA)
    kept = await world.store.pool.fetchval(f"SELECT sum(next_offset) FROM {shadow}.offsets")
    assert total // 2 <= kept < total
    assert seen[-1].total == total
    assert seen[-1].rate > 0

    result = await Rebuild(world.store, redis=world.redis, batch=300).run()
    assert result.resumed
    assert result.records == total - kept
    assert result.replaced is not None  # the live schema of the world, empty, was replaced
    assert sum(result.positions.values()) == total
    expected = await clean_checksum(world)
    assert result.checksum == expected
    assert await live_checksum(world.store.pool) == expected


async def test_a_shadow_left_before_the_log_was_restored_is_not_resumed(world: World) -> None:
    """A rebuild that died before a ``restore-log`` left a shadow holding the old log's
    offsets; once the epoch has moved, the next rebuild starts over rather than resuming on
    positions of another log (it had skipped partitions and swapped in what no log holds)."""
    events, _ = workload(rooms=5, users=10, messages=600, seed=5)
    await produce(world.store, events)
    total = sum((await log_end(world.store)).values())

    def interrupt(progress: Progress) -> None:
        if progress.applied and not first.cancelled():
            first.cancel()

    first = asyncio.create_task(Rebuild(world.store, batch=100, on_progress=interrupt).run())
    with pytest.raises(asyncio.CancelledError):
        await first
    shadow = shadow_schema(LIVE_SCHEMA)
    assert await world.store.pool.fetchval(f"SELECT sum(next_offset) FROM {shadow}.offsets")
    await bump_epoch(world.store.pool)  # what restore-log does once the log is back

    result = await Rebuild(world.store, redis=world.redis, batch=300).run()
    assert not result.resumed
    assert result.records == total
    assert result.checksum == await clean_checksum(world)


async def test_a_replay_into_a_schema_that_is_not_a_read_model_is_refused(world: World) -> None:
    """``--into`` names where a point-in-time model goes; a schema there that is not a read
    model (``public`` holds the key store, ``ingest`` the accounts) is refused, untouched: it
    had been dropped with CASCADE as if left by a build of another version. One that is a read
    model of another version is still replaced."""
    await world.write([register(uuid.uuid4())])
    pool = world.store.pool
    await pool.execute("CREATE SCHEMA precious")
    await pool.execute("CREATE TABLE precious.keys (k int)")
    await pool.execute("INSERT INTO precious.keys VALUES (1)")
    with pytest.raises(ProjectorError, match="is not a read model"):
        await Rebuild(world.store, batch=300, into="precious").run()
    assert await pool.fetchval("SELECT k FROM precious.keys") == 1
    await pool.execute("COMMENT ON SCHEMA precious IS 'backbone read model v1'")
    result = await Rebuild(world.store, batch=300, into="precious").run()
    assert not result.resumed
    assert await pool.fetchval("SELECT to_regclass('precious.keys')") is None
    assert await pool.fetchval("SELECT count(*) FROM precious.users") == 1


async def test_read_queries_of_other_connections_work_across_the_swap(world: World) -> None:
    """Connections that prepared the read API's statements on the old tables (asyncpg caches
    them) answer the same after the swap and the old schema's drop, from the new tables."""
    events, _ = workload(rooms=4, users=8, messages=300, seed=3)
    await produce(world.store, events)
    await world.catch_up()
    room, member = rooms_and_senders(events)[0]
    other = await _other_process_pool(world)
    try:
        reads = Reads(other, world.store.layout, world.store.epoch)
        side = ReadSide(other, world.redis, world.namespace)

        async def answers() -> list[object]:
            page = await reads.messages(room, _partition(world, room), member, limit=20)
            return [
                page,
                await reads.message(page.items[-1].message_id, member),
                await reads.conversations(member),
                await reads.conversation(room, member),
                await reads.members(room),
                await reads.profile(member, private=True),
                await side.member_role_db(room, member),
                await side.owner_count(room),
                await side.conversation_kind(room),
                await side.applied(),
            ]

        holder = await asyncpg.connect(world.settings.postgres_dsn)
        try:
            held = await holder.prepare("SELECT count(*) FROM chat.messages WHERE sender_id = $1")
            before_count = await held.fetchval(member)
            before = await answers()
            await Rebuild(world.store, redis=world.redis).run()
            assert await held.fetchval(member) == before_count
        finally:
            await holder.close()
        assert await answers() == before
        assert (
            await world.store.pool.fetchval(
                "SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'chat\\_old\\_%'"
            )
            == 0
        )
    finally:
        await other.close()


async def test_one_rebuild_at_a_time(world: World) -> None:
    """A second rebuild of the same database is refused while one runs."""
    async with world.store.pool.acquire() as conn:
        await conn.execute("SELECT pg_advisory_lock($1)", 0x72656275696C6421)
        try:
            with pytest.raises(RebuildRunning):
                await Rebuild(world.store).run()
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", 0x72656275696C6421)


async def _other_process_pool(world: World) -> Pool:
    """A pool of one connection, as another process (ingest) would hold it."""
    return await create_pool(world.settings.postgres_dsn, min_size=1, max_size=1)


def _partition(world: World, room: uuid.UUID) -> int:
    _, partition = stream_placement(room, world.store.layout.partitions("conversation"))
    return partition


async def test_a_rebuild_in_two_worker_processes_equals_one_in_this_process(world: World) -> None:
    """The build passes dealt out to two worker processes (erasures among the events, so that
    their batches serialise against the others) give the same model, byte for byte, as a
    rebuild applying everything in one process."""
    events, _ = workload(rooms=12, users=24, messages=3000, seed=5)
    await produce(world.store, events)
    erased = next(e.creator_id for e in events if isinstance(e, ConversationCreated))
    await world.store.keyring.erase(erased)
    await world.write([UserErased(user_id=erased)])
    room = next(r for r in rooms_and_senders(events) if r[1] != erased)
    await world.write([message(*room, f"after erasure {n}") for n in range(40)])
    seen: list[Progress] = []
    # Batches of 100: the first pass is long enough to go to the workers.
    parallel = await Rebuild(world.store, batch=100, workers=2, on_progress=seen.append).run()
    one = await Rebuild(world.store, batch=100, workers=1).run()
    assert parallel.checksum == one.checksum
    assert parallel.positions == one.positions
    assert parallel.records == one.records == sum((await log_end(world.store)).values())
    assert seen[-1].applied == parallel.records, "progress counts every worker's batches"
    assert one.checksum == await clean_checksum(world)


async def test_the_checksum_does_not_depend_on_key_ranges_or_readers(world: World) -> None:
    """Hashing UUID-keyed tables in key ranges, on one connection or several sharing a
    snapshot, gives the digest of one pass over each whole table."""
    events, _ = workload(rooms=12, users=24, messages=300, seed=5)
    await produce(world.store, events)
    single = await clean_checksum(world)
    async with world.store.pool.acquire() as conn:
        digest = hashlib.sha256()
        for table in TABLES:
            columns = ", ".join(
                f'"{c.name}"' for c in table.columns if c.name not in table.unchecked
            )
            count, whole = await conn.fetchrow(
                "SELECT count(*), "
                f"bit_xor(hashint8extended(hash_record_extended(ROW({columns}), 0), 0)) "
                f"FROM clean.{table.name}"
            )
            digest.update(f"{table.name}:{count}:{(whole or 0) & (2**64 - 1):016x}\n".encode())
    async with snapshot_readers(world.store.pool, 3) as readers:
        await readers.own()
        shared = await readers.checksum("clean")
    assert single == shared == digest.hexdigest()


async def test_the_checksum_sees_rows_that_trade_values(world: World) -> None:
    """Row hashes are combined without order, but each covers its row's key: two messages that
    swap bodies (every column still holds the same values, in other rows) change the digest,
    and swapping them back restores it."""
    events, _ = workload(rooms=3, users=6, messages=40, seed=9)
    await produce(world.store, events)
    before = await clean_checksum(world)
    swap = (
        "UPDATE clean.messages m SET body = o.body FROM clean.messages o "
        "WHERE (m.message_id, o.message_id) IN (($1, $2), ($2, $1))"
    )
    async with world.store.pool.acquire() as conn:
        first, second = await conn.fetch(
            "SELECT DISTINCT ON (body) message_id, body FROM clean.messages "
            "WHERE body IS NOT NULL ORDER BY body LIMIT 2"
        )
        assert first["body"] != second["body"]
        await conn.execute(swap, first["message_id"], second["message_id"])
        swapped = await checksum(conn, "clean")
        await conn.execute(swap, first["message_id"], second["message_id"])
        restored = await checksum(conn, "clean")
    assert swapped != before
    assert restored == before


# A value of each column type that differs from the one stored (or from NULL): far from any
# other row's number (unique indexes), a key no other row has.
_ANOTHER_VALUE = {
    "uuid": "gen_random_uuid()",
    "integer": "coalesce({c}, 0) + 1000000007",
    "bigint": "coalesce({c}, 0) + 1000000007",
    "text": "coalesce({c}, '') || 'x'",
    "boolean": "NOT coalesce({c}, false)",
    "timestamptz": "coalesce({c}, now()) + interval '1 microsecond'",
    "jsonb": """coalesce({c}, '{{}}'::jsonb) || '{{"changed": true}}'::jsonb""",
    "bytea": "coalesce({c}, ''::bytea) || '\\x00'::bytea",
}


async def test_a_change_to_any_checked_column_changes_the_checksum(world: World) -> None:
    """Rows are hashed by each column type's own hash function: for every table holding rows
    and every column the checksum covers, another value in one row gives another digest, and
    so does NULL where a value was."""
    events, _ = workload(rooms=3, users=6, messages=40, seed=11)
    await produce(world.store, events)
    before = await clean_checksum(world)
    seen: set[str] = set()
    async with world.store.pool.acquire() as conn:
        for table in TABLES:
            if not await conn.fetchval(f"SELECT count(*) FROM clean.{table.name}"):
                continue
            for column in table.columns:
                if column.name in table.unchecked:
                    continue
                name = column.sql_name
                changes = [(_ANOTHER_VALUE[column.type].format(c=name), "true")]
                if column.nullable:
                    changes.append(("NULL", f"{name} IS NOT NULL"))
                for value, where in changes:
                    row = await conn.fetchval(
                        f"SELECT ctid FROM clean.{table.name} WHERE {where} LIMIT 1"
                    )
                    if row is None:
                        continue  # no row holds a value to take away
                    async with contextlib.AsyncExitStack() as undo:
                        changing = conn.transaction()
                        await changing.start()
                        undo.push_async_callback(changing.rollback)
                        await conn.execute(
                            f"UPDATE clean.{table.name} SET {name} = {value} WHERE ctid = $1",
                            row,
                        )
                        assert await checksum(conn, "clean") != before, (table.name, name, value)
                    seen.add(column.type)
        assert await checksum(conn, "clean") == before
    assert seen >= {"uuid", "integer", "bigint", "text", "boolean", "timestamptz", "jsonb"}


async def test_a_failed_checksum_raises_the_database_error_and_frees_its_readers(
    world: World,
) -> None:
    async with snapshot_readers(world.store.pool, 2) as readers:
        await readers.own()
        with pytest.raises(asyncpg.UndefinedTableError):
            await readers.checksum("no_such_model")
    async with world.store.pool.acquire() as conn:
        assert await conn.fetchval("SELECT 1") == 1  # back in the pool, idle


async def test_a_failing_replay_worker_fails_the_pass_and_leaves_no_worker(world: World) -> None:
    """A worker that fails (here: its schema does not exist) fails the pass with its exit code;
    no worker process is left behind."""
    await produce(world.store, workload(rooms=4, users=8, messages=200, seed=3)[0])
    shares = [[p] for p in sorted(await log_end(world.store))[:2]]
    with pytest.raises(ReplayWorkerFailed, match="exited with 1"):
        await replay_in_workers(world.store.settings, "no_such_schema", shares, 100, lambda n: None)
    assert multiprocessing.active_children() == []


async def test_a_cancelled_replay_in_workers_stops_every_worker(world: World) -> None:
    """Cancelling a pass (Ctrl-C on ``backbone replay``) kills its workers: none outlives it,
    and what they committed stays for a rerun to resume from."""
    events, _ = workload(rooms=12, users=24, messages=3000, seed=5)
    await produce(world.store, events)
    async with world.store.pool.acquire() as conn:
        await create_schema(conn, "cancelled", build=True)
    shares = replay_shares(await log_end(world.store), 2)
    first = asyncio.Event()
    applied: list[int] = []

    def on_batch(count: int) -> None:
        applied.append(count)
        first.set()

    # Batches of 10 records: the pass is far from done when the first one is in.
    task = asyncio.create_task(
        replay_in_workers(world.store.settings, "cancelled", shares, 10, on_batch)
    )
    await asyncio.wait_for(first.wait(), 60)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert multiprocessing.active_children() == []
    stored = await world.store.pool.fetchval("SELECT sum(next_offset) FROM cancelled.offsets")
    assert 0 < stored < sum((await log_end(world.store)).values())


def test_build_passes_go_to_workers_from_ten_batches_or_200k_records() -> None:
    """Workers cost a start (connections, a reader): small passes stay in the rebuilding process.
    With the default batch (100,000 records), a pass of 200,000 records is already worth workers."""
    assert goes_parallel({("c", 0): 999, ("c", 1): 1}, batch=100)
    assert not goes_parallel({("c", 0): 998, ("c", 1): 1}, batch=100)
    assert goes_parallel({("c", 0): 150_000, ("c", 1): 50_000}, batch=REPLAY_BATCH)
    assert not goes_parallel({("c", 0): 199_999}, batch=REPLAY_BATCH)


def test_the_swap_pass_stays_short_whatever_the_batch() -> None:
    """The build passes end once one applies fewer than 20,000 records (or than a batch, if
    smaller): the swap's own pass, which the live projector waits for, is at most that."""
    assert swap_pass_bound(300) == 300
    assert swap_pass_bound(REPLAY_BATCH) == 20_000


def test_replay_shares_deal_out_partitions_by_their_work() -> None:
    remaining = {("c", 0): 500, ("c", 1): 400, ("c", 2): 300, ("u", 0): 200}
    assert replay_shares(remaining, 2) == [[("c", 0), ("u", 0)], [("c", 1), ("c", 2)]]
    assert replay_shares(remaining, 8) == [[("c", 0)], [("c", 1)], [("c", 2)], [("u", 0)]]
