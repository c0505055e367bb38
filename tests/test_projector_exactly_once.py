"""Exactly-once application: compare-and-set offsets, idempotence, dead letters, checksums."""

from __future__ import annotations

import asyncio
import re
import uuid

import asyncpg
import msgspec
import pytest
from aiokafka import AIOKafkaProducer

from eventstore import Batch, Position, RecordedEvent, codec, create_pool
from eventstore.codec import stream_placement
from eventstore.consumer import Partition, PositionsMoved
from ingest.exports import READ_MODEL_SQL
from ingest.media import SHARED_WITH_SQL
from projectors.caches import rebuild_caches, summary_key
from projectors.checksum import checksum
from projectors.dead_letters import list_dead_letters, retry_dead_letter
from projectors.metrics import EVENTS
from projectors.projector import Projector
from projectors.read.contract import LIVE_SCHEMA, members_key, user_conversations_key
from projectors.read.queries import Reads
from projectors.rows import ROW_CLASSES
from projectors.schema import TABLES, create_schema, ensure_live_schema
from tests.store_fixtures import fresh_database
from tests.test_projector_support import (
    World,
    catch_up,
    group,
    message,
    register,
    wait_for,
    world_fixture,  # noqa: F401 - provides the `world` fixture
)


async def all_batches(world: World) -> list[Batch]:
    batches: list[Batch] = []
    async with world.store.reader() as reader:
        async for batch in reader.batches_until_end():
            batches.append(batch)
    return batches


async def send_raw(world: World, stream_id: uuid.UUID, event_type: str, value: bytes) -> None:
    """A record the way a foreign or broken writer would put it in the conversations topic."""
    producer = AIOKafkaProducer(bootstrap_servers=world.settings.kafka_bootstrap)
    await producer.start()
    try:
        headers = [
            ("ce_specversion", b"1.0"),
            ("ce_id", str(uuid.uuid4()).encode()),
            ("ce_source", b"urn:test"),
            ("ce_type", event_type.encode()),
            ("ce_subject", str(stream_id).encode()),
            ("ce_time", b"2026-11-25T12:00:00.000Z"),
            ("content-type", b"application/json"),
        ]
        await producer.send_and_wait(
            world.store.layout.topic("conversation"),
            value,
            key=str(stream_id).encode(),
            headers=headers,
        )
    finally:
        await producer.stop()


def test_row_classes_match_their_tables_column_for_column() -> None:
    for cls in ROW_CLASSES:
        assert [f.name for f in msgspec.structs.fields(cls)] == [c.name for c in cls.table.columns]


async def test_live_schema_has_the_contract_columns_and_indexes_serve_the_reads(
    world: World,
) -> None:
    """Every column contract.py names exists; each read-API query is an index scan."""
    async with world.store.pool.acquire() as conn:
        assert not await create_schema(conn, LIVE_SCHEMA), "already there: created once"
        columns = {
            (r["table_name"], r["column_name"])
            for r in await conn.fetch(
                "SELECT table_name, column_name FROM information_schema.columns "
                "WHERE table_schema = $1",
                LIVE_SCHEMA,
            )
        }
        for needed in [
            ("offsets", "topic"),
            ("offsets", "partition"),
            ("offsets", "next_offset"),
            ("conversations", "conversation_id"),
            ("conversations", "kind"),
            ("members", "conversation_id"),
            ("members", "user_id"),
            ("members", "role"),
            ("messages", "message_id"),
            ("messages", "conversation_id"),
            ("messages", "sender_id"),
            ("messages", "deleted"),
        ]:
            assert needed in columns
        assert {t.name for t in TABLES} <= {t for t, _ in columns}
        queries = {
            "my conversations": "SELECT c.*, m.role, c.message_count - coalesce(r.up_to_seq, 0) "
            "FROM chat.members m JOIN chat.conversations c USING (conversation_id) "
            "LEFT JOIN chat.read_markers r USING (conversation_id, user_id) "
            "LEFT JOIN chat.messages l ON l.message_id = c.last_message_id WHERE m.user_id = $1",
            "members": "SELECT user_id, role FROM chat.members WHERE conversation_id = $1",
            "page before": 'SELECT * FROM chat.messages WHERE conversation_id = $1 AND "offset" '
            '< 1000 ORDER BY "offset" DESC LIMIT 50',
            "page after": 'SELECT * FROM chat.messages WHERE conversation_id = $1 AND "offset" '
            '> 10 ORDER BY "offset" LIMIT 50',
        }
        async with conn.transaction():
            await conn.execute("SET LOCAL enable_seqscan = off")
            for name, sql in queries.items():
                plan = "\n".join(r[0] for r in await conn.fetch(f"EXPLAIN {sql}", uuid.uuid4()))
                assert "Seq Scan" not in plan, f"{name}:\n{plan}"
            # What a person's export reads, each by an index on the person's column.
            by_person = {
                "memberships": "members_by_user_id_conversation_id",
                "messages": "messages_by_sender_id",
                "reactions": "reactions_by_user_id",
                "read_markers": "members_by_user_id_conversation_id",
                "media": "media_by_uploader_id",
            }
            assert set(by_person) == set(READ_MODEL_SQL)
            for name, sql in READ_MODEL_SQL.items():
                plan = "\n".join(r[0] for r in await conn.fetch(f"EXPLAIN {sql}", uuid.uuid4()))
                assert "Seq Scan" not in plan, f"export {name}:\n{plan}"
                used = re.search(rf"\b(?:using|on) {by_person[name]}\b", plan)
                assert used, f"export {name}:\n{plan}"
            # Who may download a media object: by the index that leaves out text messages.
            sql = f"EXPLAIN {SHARED_WITH_SQL}"
            plan = "\n".join(r[0] for r in await conn.fetch(sql, uuid.uuid4(), uuid.uuid4()))
            assert "messages_by_media_id" in plan, plan
        definition = await conn.fetchval(
            "SELECT indexdef FROM pg_indexes WHERE schemaname = $1 AND indexname = $2",
            LIVE_SCHEMA,
            "messages_by_media_id",
        )
        assert definition.endswith("WHERE (media_id IS NOT NULL)"), definition


async def test_a_batch_applied_twice_changes_nothing(world: World) -> None:
    owner, bob, room = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    await world.write([register(owner), group(room, owner, bob)])
    await world.write([message(room, bob if n % 2 else owner, f"m{n}") for n in range(30)])
    batches = await all_batches(world)
    for batch in batches:
        await world.projector.handle(batch)
    async with world.store.pool.acquire() as conn:
        once = await checksum(conn, LIVE_SCHEMA)
        cached_once = await world.redis.hgetall(members_key(world.namespace, room))
        # As if the commit had been lost after the caches were written: the offsets go back.
        for batch in batches:
            for (topic, partition), span in batch.ranges.items():
                await conn.execute(
                    "UPDATE chat.offsets SET next_offset = least(next_offset, $3) "
                    "WHERE topic = $1 AND partition = $2",
                    topic,
                    partition,
                    span.first,
                )
        for batch in batches:
            await world.projector.handle(batch)
        assert await checksum(conn, LIVE_SCHEMA) == once
    assert await world.redis.hgetall(members_key(world.namespace, room)) == cached_once
    count = await world.row("SELECT count(*) AS n FROM chat.messages")
    assert count == {"n": 30}


async def test_a_batch_behind_the_stored_offsets_is_refused_and_writes_nothing(
    world: World,
) -> None:
    owner, room = uuid.uuid4(), uuid.uuid4()
    await world.write([group(room, owner), message(room, owner, "hello")])
    batches = await all_batches(world)
    for batch in batches:
        await world.projector.handle(batch)
    async with world.store.pool.acquire() as conn:
        before = await checksum(conn, LIVE_SCHEMA)
        with pytest.raises(PositionsMoved, match="stored offsets moved"):
            await world.projector.handle(batches[0])
        assert await checksum(conn, LIVE_SCHEMA) == before


async def test_a_text_postgresql_cannot_hold_is_dead_lettered_not_retried_forever(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A message whose body holds a NUL character (written before the schema refused one, or
    by a foreign writer) is poison on read: dead-lettered, and the messages after it applied.
    PostgreSQL's ``text`` cannot hold a NUL, so the batch writing it had failed on every
    restart, stopping the partition's read model."""
    owner, room = uuid.uuid4(), uuid.uuid4()
    await world.write([group(room, owner)])
    monkeypatch.setattr(codec, "_check", lambda event: None)  # as the older writer did
    nul = await world.write([message(room, owner, "a\x00b")])
    monkeypatch.undo()
    await world.write([message(room, owner, "after")])
    await world.catch_up()

    bodies = await world.rows("SELECT body FROM chat.messages WHERE conversation_id = $1", room)
    assert bodies == [{"body": "after"}]
    async with world.store.pool.acquire() as conn:
        (letter,) = await list_dead_letters(conn)
    assert (letter.position, letter.reason) == (nul[0].position.token(), "poison")
    assert "regex" in letter.error
    assert "$.body" in letter.error


async def test_poison_and_unprojectable_events_are_dead_lettered_and_later_ones_applied(
    world: World,
) -> None:
    owner, room, ghost_room = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    orphan = uuid.uuid4()
    await world.write([group(room, owner)])
    await send_raw(world, room, "chat.message.sent", b"{not json")
    await send_raw(world, room, "chat.room.painted", b'{"color":"red"}')
    orphan_written = await world.write([message(ghost_room, owner, "nowhere", orphan)])
    await world.write([message(room, owner, "after the poison")])
    before = EVENTS.labels("skipped", "chat.room.painted")._value.get()
    await world.catch_up()

    assert EVENTS.labels("skipped", "chat.room.painted")._value.get() == before + 1
    bodies = await world.rows("SELECT body FROM chat.messages WHERE conversation_id = $1", room)
    assert bodies == [{"body": "after the poison"}]
    async with world.store.pool.acquire() as conn:
        letters = await list_dead_letters(conn)
        payloads = await conn.fetch(
            'SELECT reason, payload FROM chat.dead_letters ORDER BY topic, partition, "offset"'
        )
    assert {(d.type, d.reason) for d in letters} == {
        ("chat.message.sent", "poison"),
        ("chat.message.sent", "projection"),
    }
    by_reason = {p["reason"]: p["payload"] for p in payloads}
    assert by_reason["poison"] == b"{not json"
    assert b"nowhere" not in by_reason["projection"], "personal values are withheld"
    failed = next(d for d in letters if d.reason == "projection")
    assert failed.position == orphan_written[0].position.token()
    assert "does not exist" in failed.error

    # The conversation appears later; a retry of the dead letter now applies the message.
    await world.write([group(ghost_room, owner)])
    await world.catch_up()
    applied = await retry_dead_letter(
        world.store, world.projector, failed.topic, failed.partition, failed.offset
    )
    assert applied is True
    assert await world.row("SELECT body FROM chat.messages WHERE message_id = $1", orphan) == {
        "body": "nowhere"
    }
    poison = next(d for d in letters if d.reason == "poison")
    assert not await retry_dead_letter(
        world.store, world.projector, poison.topic, poison.partition, poison.offset
    )
    async with world.store.pool.acquire() as conn:
        remaining = await list_dead_letters(conn)
    assert [(d.reason, d.retried_at is not None) for d in remaining] == [("poison", True)]


async def test_two_databases_projecting_one_log_have_equal_checksums(world: World) -> None:
    owner, bob, room = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    await world.write([register(owner), register(bob), group(room, owner, bob)])
    await world.write([message(room, bob, f"m{n}") for n in range(50)])
    await world.catch_up()
    other = await fresh_database(world.settings)
    # Keys stay in the deployment's key store; only the read model lives elsewhere.
    pool = await create_pool(other.postgres_dsn)
    try:
        await ensure_live_schema(pool)
        replica = Projector(pool, world.store.layout)  # no caches: the live ones stay as they are
        await catch_up(world.store, replica, max_records=7)  # other batch boundaries, same result
        async with world.store.pool.acquire() as a, pool.acquire() as b:
            assert await checksum(a, LIVE_SCHEMA) == await checksum(b, LIVE_SCHEMA)
            await b.execute("UPDATE chat.messages SET body = 'x' WHERE seq = 7")
            assert await checksum(a, LIVE_SCHEMA) != await checksum(b, LIVE_SCHEMA)
    finally:
        await pool.close()


async def test_membership_caches_can_be_dropped_and_rebuilt_from_postgres(world: World) -> None:
    owner, bob, rooms = uuid.uuid4(), uuid.uuid4(), [uuid.uuid4() for _ in range(5)]
    await world.write([group(room, owner, bob) for room in rooms])
    await world.catch_up()
    before = {r: await world.redis.hgetall(members_key(world.namespace, r)) for r in rooms}
    convs = await world.redis.smembers(user_conversations_key(world.namespace, bob))
    await world.redis.delete(*(members_key(world.namespace, r) for r in rooms))
    await world.redis.delete(user_conversations_key(world.namespace, bob))

    await rebuild_caches(world.store.pool, world.redis, world.namespace)

    assert {r: await world.redis.hgetall(members_key(world.namespace, r)) for r in rooms} == before
    assert await world.redis.smembers(user_conversations_key(world.namespace, bob)) == convs
    assert len(convs) == len(rooms)


async def test_a_summary_a_batch_writes_equals_the_one_rebuilt_from_postgres(world: World) -> None:
    """A batch writes summaries from the rows it projected, a rebuild from the stored rows:
    the two must agree field for field (times, counts, last message)."""
    owner, bob, room = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    await world.write(
        [group(room, owner, bob), message(room, owner, "hi"), message(room, bob, "yo")]
    )
    await world.catch_up()
    key = summary_key(world.namespace, room)
    written = await world.redis.hgetall(key)
    assert written[b"message_count"] == b"2"
    assert written[b"member_count"] == b"2"
    await world.redis.delete(key)

    await rebuild_caches(world.store.pool, world.redis, world.namespace)

    assert await world.redis.hgetall(key) == written


async def test_group_reader_reseeks_when_the_stored_positions_moved(world: World) -> None:
    """A handler refusing a batch with PositionsMoved makes the reader resume at the stored
    offset: records another member applied are not handed over again."""
    owner, room = uuid.uuid4(), uuid.uuid4()
    written = await world.write(
        [group(room, owner), *(message(room, owner, f"m{n}") for n in range(9))]
    )
    partition: Partition = (world.store.layout.topic("conversation"), written[0].position.partition)
    stored: dict[Partition, int] = {}
    firsts: list[int] = []
    seen: list[RecordedEvent] = []

    class Positions:
        async def load(self, partitions: list[Partition]) -> dict[Partition, int]:
            return {p: stored[p] for p in partitions if p in stored}

    async def handler(batch: Batch) -> None:
        span = batch.ranges[partition]
        firsts.append(span.first)
        if len(firsts) == 1:
            stored[partition] = span.first + 4  # another member applied four records
            raise PositionsMoved("moved")
        seen.extend(i for i in batch.items if isinstance(i, RecordedEvent))
        stored[partition] = span.next

    reader = world.store.group_reader(
        group_id=f"g-{uuid.uuid4().hex[:8]}",
        streams=["conversation"],
        positions=Positions(),
        handler=handler,
    )
    running = asyncio.create_task(reader.run())
    try:

        async def done() -> bool:
            return stored.get(partition) == written[-1].position.offset + 1

        await wait_for(done, 60, "the reader applied everything")
    finally:
        reader.stop()
        await running
    assert firsts[:2] == [written[0].position.offset, written[0].position.offset + 4]
    assert [r.envelope.id for r in seen] == [w.envelope.id for w in written[4:]]


def rooms_on_two_partitions(world: World) -> tuple[uuid.UUID, uuid.UUID]:
    """Two conversation ids whose streams land on different partitions."""
    partitions = world.store.layout.partitions("conversation")
    first = uuid.uuid4()
    while True:
        second = uuid.uuid4()
        if stream_placement(second, partitions)[1] != stream_placement(first, partitions)[1]:
            return first, second


async def test_a_partition_never_applied_is_read_again_from_its_start_after_a_refused_batch(
    world: World,
) -> None:
    """A batch holding the first records of a partition with no stored offset is refused
    (PositionsMoved: another of its partitions moved). Its reader had fetched past those
    records; it reads the partition again from offset 0, and every one is applied (the reader
    had left the partition where it was, and the next batch's start became its stored
    offset: the refused records were skipped for good)."""
    owner = uuid.uuid4()
    applied_room, new_room = rooms_on_two_partitions(world)
    await world.write([group(applied_room, owner), message(applied_room, owner, "before")])
    await world.catch_up()
    written = await world.write(
        [
            message(applied_room, owner, "after"),
            group(new_room, owner),
            *(message(new_room, owner, f"m{n}") for n in range(5)),
        ]
    )
    new_partition: Partition = (
        world.store.layout.topic("conversation"),
        written[-1].position.partition,
    )
    refused: list[Batch] = []

    async def handler(batch: Batch) -> None:
        if not refused and new_partition in batch.ranges:
            refused.append(batch)  # as claim refuses it when another partition moved
            raise PositionsMoved("moved")
        await world.projector.handle(batch)

    reader = world.store.group_reader(
        group_id=f"g-{uuid.uuid4().hex[:8]}",
        streams=["user", "conversation"],
        positions=world.projector.positions,
        handler=handler,
    )
    running = asyncio.create_task(reader.run())
    try:

        async def applied() -> bool:
            stored = await world.projector.positions.load([new_partition])
            return stored.get(new_partition) == written[-1].position.offset + 1

        await wait_for(applied, 30, "the new partition's records were applied")
    finally:
        reader.stop()
        await running
    assert len(refused) == 1
    assert refused[0].ranges[new_partition].first == 0
    bodies = await world.rows(
        "SELECT body FROM chat.messages WHERE conversation_id = $1 ORDER BY seq", new_room
    )
    assert [r["body"] for r in bodies] == [f"m{n}" for n in range(5)]


async def test_a_first_batch_that_does_not_start_at_offset_0_is_refused(world: World) -> None:
    """No stored offset means nothing of the partition is applied: a batch starting past 0
    (its reader moved on past records nothing stored, or a crash of PostgreSQL took back the
    commit that created the row) is refused and creates no row; the one from 0 applies."""
    owner, room = uuid.uuid4(), uuid.uuid4()
    written = await world.write(
        [group(room, owner), message(room, owner, "a"), message(room, owner, "b")]
    )
    partition: Partition = (world.store.layout.topic("conversation"), written[0].position.partition)

    async def batch_from(offset: int) -> Batch:
        reader = world.store.reader()
        await reader.start("beginning", {partition: offset}, partitions=[partition])
        try:
            (batch,) = [b async for b in reader.batches_until_end()]
            return batch
        finally:
            await reader.stop()

    with pytest.raises(PositionsMoved, match="stored 0, batch at 1"):
        await world.projector.handle(await batch_from(1))
    assert await world.projector.positions.load([partition]) == {}
    await world.projector.handle(await batch_from(0))
    stored = await world.projector.positions.load([partition])
    assert stored == {partition: written[-1].position.offset + 1}


async def test_a_message_page_never_claims_a_position_it_does_not_hold(world: World) -> None:
    """A page's ``position`` says which writes it includes: a batch committed while the page is
    read must not make it claim a message that is not on it (the rows had been read before
    the stored offset, and a commit in between did exactly that)."""
    owner, room = uuid.uuid4(), uuid.uuid4()
    await world.write([group(room, owner), message(room, owner, "first")])
    await world.catch_up()
    (sent,) = await world.write([message(room, owner, "second")])
    partition = sent.position.partition
    topic = world.store.layout.topic("conversation")
    reader = world.store.reader()
    stored = await world.projector.positions.load([(topic, partition)])
    await reader.start("beginning", dict(stored), partitions=[(topic, partition)])
    try:
        (pending,) = [b async for b in reader.batches_until_end()]
    finally:
        await reader.stop()
    pool = world.store.pool

    class CommitsDuringTheRead:
        """The read model's pool, where a batch commits right after the rows are read."""

        async def fetch(self, sql: str, *args: object) -> list[asyncpg.Record]:
            rows = await pool.fetch(sql, *args)
            if "FROM chat.messages" in sql:
                await world.projector.handle(pending)
            return rows

        async def fetchval(self, sql: str, *args: object) -> object:
            return await pool.fetchval(sql, *args)

    reads = Reads(CommitsDuringTheRead(), world.store.layout, world.store.epoch)  # type: ignore[arg-type]
    page = await reads.messages(room, partition, owner)
    assert [m.content for m in page.items] == ["first"]
    assert page.position is not None
    assert Position.parse(page.position).offset < sent.position.offset


async def test_cache_keys_stay_in_the_deployment_namespace(world: World) -> None:
    """Namespaces keep deployments (and tests) apart: every key written is under ours."""
    owner, room = uuid.uuid4(), uuid.uuid4()
    await world.write([group(room, owner), message(room, owner, "hi")])
    await world.catch_up()
    keys = [k async for k in world.redis.scan_iter(match=f"{world.namespace}:*")]
    assert {k.split(b":")[1] for k in keys} == {
        b"members",
        b"user",
        b"recent",
        b"summary",
        b"fences",
    }
