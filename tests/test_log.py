"""The log on a real Kafka broker: round trips, order, unknown types, crypto-shredding."""

from __future__ import annotations

import asyncio
import re
import uuid

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from eventstore import (
    EventStore,
    KeyStoreUnavailable,
    LogUnavailable,
    Position,
    RecordedEvent,
    Settings,
    Skipped,
    SubjectErased,
)
from eventstore.codec import RecordLike, decode_records
from eventstore.metrics import EVENTS_SKIPPED
from schemas import ERASED, MessageSent, UserProfileUpdated, UserRegistered
from tests.samples import sample_events


async def read_all(store: EventStore) -> list[RecordedEvent | Skipped]:
    """Everything in the store's topics, in log order per partition."""
    items: list[RecordedEvent | Skipped] = []
    async with store.reader() as reader:
        async for batch in reader.batches_until_end():
            items.extend(batch.items)
    return items


async def raw_values(settings: Settings, store: EventStore) -> bytes:
    """All record bytes (values and headers) of the store's topics, undecoded."""
    consumer = AIOKafkaConsumer(
        *store.layout.topics,
        bootstrap_servers=settings.kafka_bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    chunks: list[bytes] = []
    try:
        while True:
            batch = await consumer.getmany(timeout_ms=1000)
            if not batch:
                break
            for records in batch.values():
                for record in records:
                    chunks.append(record.value or b"")
                    chunks.extend(v for _, v in record.headers)
    finally:
        await consumer.stop()
    return b"".join(chunks)


async def test_appended_events_read_back_with_their_positions(store: EventStore) -> None:
    """Produce -> consume round trip: every event, envelope and position comes back."""
    user, room = uuid.uuid4(), uuid.uuid4()
    written = await store.producer.append(
        sample_events(user=user, room=room), actor=str(user), correlation_id="corr-1"
    )
    read = await read_all(store)
    assert all(isinstance(r, RecordedEvent) for r in read)
    by_id = {r.envelope.id: r for r in read if isinstance(r, RecordedEvent)}
    assert len(by_id) == len(written)
    for sent in written:
        got = by_id[sent.envelope.id]
        assert got.event == sent.event
        assert got.position == sent.position
        assert got.envelope.correlationid == "corr-1"
        assert got.envelope.actor == str(user)
        assert got.envelope.subject == str(sent.event.stream_id)


async def test_a_reader_without_decoding_hands_over_the_records_a_decoding_one_reads(
    store: EventStore,
) -> None:
    """``decode=False`` (a build's reader, which decodes its own way): each batch holds the
    raw records per partition and their offset ranges, no items; decoded, they are what a
    decoding reader hands over."""
    user, room = uuid.uuid4(), uuid.uuid4()
    await store.producer.append(sample_events(user=user, room=room))
    decoded = await read_all(store)
    raw: list[RecordLike] = []
    async with store.reader(decode=False) as reader:
        async for batch in reader.batches_until_end():
            assert batch.items == []
            assert set(batch.records) == set(batch.ranges)
            for partition, records in batch.records.items():
                span = batch.ranges[partition]
                assert [r.offset for r in records] == list(range(span.first, span.next))
                raw.extend(records)
    keys = store.keyring.keys_for_read
    from_raw = await decode_records(raw, store.layout, store.epoch, keys)
    # The same records, in log order per partition (batches interleave partitions as fetched).
    assert sorted(from_raw, key=_at) == sorted(decoded, key=_at)
    assert len(decoded) == len(sample_events())


def _at(item: RecordedEvent | Skipped) -> Position:
    return item.position


async def test_order_is_kept_per_stream_across_many_streams(store: EventStore) -> None:
    """Events of one conversation come back in append order, whatever runs concurrently."""
    sender = uuid.uuid4()
    rooms = [uuid.uuid4() for _ in range(40)]

    def message(room: uuid.UUID, n: int) -> MessageSent:
        return MessageSent(
            conversation_id=room,
            message_id=uuid.uuid4(),
            sender_id=sender,
            client_msg_id=f"m{n}",
            body=f"message {n}",
        )

    async def one_after_another(room: uuid.UUID) -> None:
        for n in range(15):
            await store.producer.append([message(room, n)])

    async def all_at_once(room: uuid.UUID) -> None:
        await store.producer.append([message(room, n) for n in range(15, 30)])

    await asyncio.gather(*(one_after_another(r) for r in rooms))
    await asyncio.gather(*(all_at_once(r) for r in rooms))

    seen: dict[uuid.UUID, list[int]] = {r: [] for r in rooms}
    partitions: dict[uuid.UUID, set[int]] = {r: set() for r in rooms}
    for item in await read_all(store):
        assert isinstance(item, RecordedEvent)
        assert isinstance(item.event, MessageSent)
        seen[item.event.conversation_id].append(int(item.event.client_msg_id[1:]))
        partitions[item.event.conversation_id].add(item.position.partition)
    for room in rooms:
        assert seen[room] == list(range(30))
        assert len(partitions[room]) == 1, "a stream lives in one partition"


async def test_unknown_event_types_are_skipped_counted_and_reading_goes_on(
    settings: Settings, store: EventStore
) -> None:
    user = uuid.uuid4()
    first = await store.producer.append(
        [UserRegistered(user_id=user, username="user1", email="a@b.c")]
    )
    raw = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap)
    await raw.start()
    try:
        headers = [
            ("ce_specversion", b"1.0"),
            ("ce_id", str(uuid.uuid4()).encode()),
            ("ce_source", b"urn:newer-writer"),
            ("ce_type", b"chat.user.teleported"),
            ("ce_subject", str(user).encode()),
            ("ce_time", b"2026-11-25T12:00:00.000Z"),
            ("content-type", b"application/json"),
        ]
        await raw.send_and_wait(
            store.layout.topic("user"), b'{"where":"mars"}', key=str(user).encode(), headers=headers
        )
    finally:
        await raw.stop()
    last = await store.producer.append(
        [UserRegistered(user_id=user, username="user2", email="a@b.c")]
    )
    before = EVENTS_SKIPPED.labels("unknown_type", "chat.user.teleported")._value.get()

    read = await read_all(store)

    assert [type(r).__name__ for r in read] == ["RecordedEvent", "Skipped", "RecordedEvent"]
    skipped = read[1]
    assert isinstance(skipped, Skipped)
    assert (skipped.reason, skipped.type) == ("unknown_type", "chat.user.teleported")
    assert [r.envelope.id for r in read if isinstance(r, RecordedEvent)] == [
        first[0].envelope.id,
        last[0].envelope.id,
    ]
    after = EVENTS_SKIPPED.labels("unknown_type", "chat.user.teleported")._value.get()
    assert after == before + 1


async def test_erasing_a_subject_shreds_their_data_everywhere(
    settings: Settings, store: EventStore
) -> None:
    """After erase: raw Kafka bytes and decoded events hold nothing readable of the subject,
    in this process (cached key dropped) and in a fresh one; other subjects are untouched."""
    alice, bob, room = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    secret_a, secret_b = f"alice-secret-{uuid.uuid4()}", f"bob-secret-{uuid.uuid4()}"
    await store.producer.append(
        [
            UserRegistered(user_id=alice, username="alice", email=f"{secret_a}@example.org"),
            UserRegistered(user_id=bob, username="bob", email=f"{secret_b}@example.org"),
        ]
    )
    await store.producer.append(
        [
            MessageSent(
                conversation_id=room,
                message_id=uuid.uuid4(),
                sender_id=alice,
                client_msg_id="a",
                body=secret_a,
            ),
            MessageSent(
                conversation_id=room,
                message_id=uuid.uuid4(),
                sender_id=bob,
                client_msg_id="b",
                body=secret_b,
            ),
        ]
    )
    # Another process (its own key ring and cache) has read and cached alice's key.
    async with await EventStore.open(settings, with_producer=False) as other:
        before = await read_all(other)
        assert any(
            isinstance(r, RecordedEvent) and getattr(r.event, "body", None) == secret_a
            for r in before
        )

        assert await store.keyring.erase(alice) is True

        raw = await raw_values(settings, store)
        assert secret_a.encode() not in raw
        assert secret_b.encode() not in raw  # sealed too, just not erased

        async def alice_erased_for(reader_store: EventStore) -> bool:
            for item in await read_all(reader_store):
                assert isinstance(item, RecordedEvent)
                event = item.event
                if isinstance(event, MessageSent) and event.sender_id == alice:
                    return event.body == ERASED
            raise AssertionError("alice's message is missing")

        assert await alice_erased_for(store)
        # The other process learns of the erasure by NOTIFY; wait for it, bounded.
        async with asyncio.timeout(5):
            while not await alice_erased_for(other):
                await asyncio.sleep(0.05)

    async with await EventStore.open(settings, with_producer=False) as fresh:
        decoded = [r for r in await read_all(fresh) if isinstance(r, RecordedEvent)]
    by_sender = {
        getattr(r.event, "sender_id", None) or getattr(r.event, "user_id", None): r.event
        for r in decoded
        if isinstance(r.event, MessageSent)
    }
    assert by_sender[alice].body == ERASED  # type: ignore[union-attr]
    assert by_sender[bob].body == secret_b  # type: ignore[union-attr]
    registered = {r.event.user_id: r.event for r in decoded if isinstance(r.event, UserRegistered)}
    assert registered[alice].email == ERASED
    assert registered[alice].username == ERASED
    assert registered[bob].email == f"{secret_b}@example.org"

    async with store.pool.acquire() as conn:
        row = await conn.fetchrow(
            "SELECT wrapped, erased_at FROM data_keys WHERE subject=$1", alice
        )
    assert row is not None
    assert row["wrapped"] is None
    assert row["erased_at"] is not None

    with pytest.raises(SubjectErased):
        await store.producer.append(
            [
                MessageSent(
                    conversation_id=room,
                    message_id=uuid.uuid4(),
                    sender_id=alice,
                    client_msg_id="c",
                    body="back again",
                )
            ]
        )


async def test_an_unreachable_broker_stops_start_up_naming_it(settings: Settings) -> None:
    import msgspec

    bad = msgspec.structs.replace(settings, kafka_bootstrap="127.0.0.1:1")
    async with asyncio.timeout(30):
        with pytest.raises(LogUnavailable, match=re.escape("127.0.0.1:1")):
            await EventStore.open(bad)


async def test_an_unreachable_database_stops_start_up_naming_it(settings: Settings) -> None:
    import msgspec

    bad = msgspec.structs.replace(
        settings, postgres_dsn="postgresql://backbone:secret@127.0.0.1:1/backbone"
    )
    async with asyncio.timeout(30):
        with pytest.raises(KeyStoreUnavailable, match=re.escape("127.0.0.1:1")) as caught:
            await EventStore.open(bad)
    assert "secret" not in str(caught.value), "the password is not printed"


@pytest.mark.parametrize("keep_sessions", [False, True])
async def test_a_pool_keeping_sessions_skips_the_reset_but_not_the_rollback(
    settings: Settings, keep_sessions: bool
) -> None:
    """``keep_sessions``: a released connection keeps its session settings (no reset statement
    per use), yet a transaction left open is still rolled back; the default resets both."""
    from eventstore import create_pool

    pool = await create_pool(
        settings.postgres_dsn, min_size=1, max_size=1, keep_sessions=keep_sessions
    )
    try:
        async with pool.acquire() as conn:
            await conn.execute("SET application_name = 'kept'")
            await conn.execute("CREATE TEMP TABLE left_open (n int)")
            await conn.execute("BEGIN")
            await conn.execute("INSERT INTO left_open VALUES (1)")
        async with pool.acquire() as conn:
            kept = await conn.fetchval("SHOW application_name") == "kept"
            assert kept is keep_sessions
            if keep_sessions:
                assert await conn.fetchval("SELECT count(*) FROM left_open") == 0
    finally:
        await pool.close()


async def test_a_reader_used_again_after_reading_to_the_end_leaves_no_gap(
    store: EventStore,
) -> None:
    """Records written while ``batches_until_end`` runs may be fetched past its end and are not
    handed over; a second ``batches_until_end`` on the same reader hands them over, so the two
    passes together read every record once, in order, with no gap and no repeat."""
    user, room, sender = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()

    def profile(n: int) -> UserProfileUpdated:
        return UserProfileUpdated(user_id=user, status=f"status {n}")

    def message(n: int) -> MessageSent:
        return MessageSent(
            conversation_id=room,
            message_id=uuid.uuid4(),
            sender_id=sender,
            client_msg_id=f"m{n}",
            body=f"message {n} ".ljust(4000, "x"),
        )

    seen: list[tuple[str, int]] = []
    offsets: dict[tuple[str, int], list[int]] = {}

    def note(items: list[RecordedEvent | Skipped]) -> None:
        for item in items:
            assert isinstance(item, RecordedEvent)
            position = item.position
            offsets.setdefault((position.stream, position.partition), []).append(position.offset)
            event = item.event
            if isinstance(event, UserProfileUpdated):
                assert isinstance(event.status, str)
                seen.append(("user", int(event.status.split()[1])))
            else:
                assert isinstance(event, MessageSent)
                seen.append(("room", int(event.client_msg_id[1:])))

    # About 7 MB in the room's partition: more than one fetch (4 MB per partition), so the
    # user's partition is fetched on past its end while the room's still has records to go.
    await store.producer.append([profile(0)])
    for start in range(0, 1300, 100):
        await store.producer.append([message(n) for n in range(start, start + 100)])
    reader = store.reader(max_records=50)
    await reader.start("beginning")
    try:
        first = True
        async for batch in reader.batches_until_end():
            note(batch.items)
            if first:
                await store.producer.append([profile(n) for n in range(1, 6)])
                first = False
            await asyncio.sleep(0.005)
        async for batch in reader.batches_until_end():
            note(batch.items)
    finally:
        await reader.stop()
    assert [n for kind, n in seen if kind == "user"] == list(range(6))
    assert [n for kind, n in seen if kind == "room"] == list(range(1300))
    for partition, found in offsets.items():
        assert found == list(range(found[0], found[0] + len(found))), partition


async def test_a_batch_takes_several_fetches_up_to_max_records(store: EventStore) -> None:
    """A fetch holds at most 4 MB of a partition; a batch goes on fetching until it holds
    ``max_records`` (a replay's batches are larger than one fetch), never more, in log order,
    or until it holds ``max_bytes`` of record values."""
    room, sender = uuid.uuid4(), uuid.uuid4()
    messages = [
        MessageSent(
            conversation_id=room,
            message_id=uuid.uuid4(),
            sender_id=sender,
            client_msg_id=f"m{n}",
            body=f"message {n} ".ljust(4000, "x"),
        )
        for n in range(1300)
    ]
    for start in range(0, len(messages), 100):  # about 7 MB in the room's partition
        await store.producer.append(messages[start : start + 100])

    async def batch_sizes(max_records: int, max_bytes: int | None = None) -> list[int]:
        sizes: list[int] = []
        sent: list[str] = []
        async with store.reader(max_records=max_records, max_bytes=max_bytes) as reader:
            async for batch in reader.batches_until_end(timeout_ms=10_000):
                sizes.append(len(batch.items))
                for item in batch.items:
                    assert isinstance(item, RecordedEvent)
                    assert isinstance(item.event, MessageSent)
                    sent.append(item.event.client_msg_id)
        assert sent == [m.client_msg_id for m in messages]
        return sizes

    assert await batch_sizes(10_000) == [1300]
    assert await batch_sizes(500) == [500, 500, 300]
    # A byte bound ends a batch at the fetch that reaches it: one fetch (4 MB, about 1,000 of
    # these records) per batch here, however many records were asked for.
    by_bytes = await batch_sizes(10_000, max_bytes=1_000_000)
    assert len(by_bytes) >= 2
    assert max(by_bytes) * 4000 <= 1_000_000 + 4 * 1024 * 1024
    assert await batch_sizes(10_000, max_bytes=100_000_000) == [1300]
