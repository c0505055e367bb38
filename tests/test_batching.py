"""Group commit on a real broker: concurrent appends share batches, keep order and offsets."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import msgspec
import pytest
from aiokafka import AIOKafkaProducer

from eventstore import EventStore, LogUnavailable, RecordedEvent, RecordRejected, Settings
from eventstore.codec import OutgoingRecord, encode_event
from schemas import MessageSent
from tests.test_log import read_all


class CountingProducer(AIOKafkaProducer):  # type: ignore[misc]
    """A real producer that counts the batches and records handed to it."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.batches = 0
        self.records = 0

    async def send_batch(self, batch: Any, topic: str, *, partition: int) -> Any:
        self.batches += 1
        self.records += batch.record_count()
        return await super().send_batch(batch, topic, partition=partition)


def _message(room: uuid.UUID, sender: uuid.UUID, n: int) -> MessageSent:
    return MessageSent(
        conversation_id=room,
        message_id=uuid.uuid4(),
        sender_id=sender,
        client_msg_id=f"m{n}",
        body=f"body {n}",
    )


async def test_concurrent_appends_share_batches_and_keep_order_and_offsets(
    settings: Settings,
) -> None:
    made: list[CountingProducer] = []

    def factory() -> AIOKafkaProducer:
        made.append(
            CountingProducer(
                bootstrap_servers=settings.kafka_bootstrap,
                enable_idempotence=True,
                acks="all",
                max_batch_size=256 * 1024,  # as the event store's own factory sets it
            )
        )
        return made[-1]

    rooms = [uuid.uuid4() for _ in range(3)]
    sender = uuid.uuid4()
    async with await EventStore.open(settings, producer_factory=factory) as store:
        await store.producer.append([_message(rooms[0], sender, -1)])  # the sender's key, cached
        producer = made[0]
        before = producer.batches
        # Appends started together queue their records before the partition's lane runs:
        # they leave as one batch (two if the first had already gone), however fast Kafka is.
        together = await asyncio.gather(
            *(store.producer.append([_message(rooms[0], sender, 1000 + n)]) for n in range(200))
        )
        assert producer.batches - before <= 2, "appends started together were not batched"
        offsets = [r.position.offset for (r,) in together]
        assert offsets == sorted(offsets), "queue order is log order"
        assert len(set(offsets)) == 200

        async def writer(room: uuid.UUID) -> list[RecordedEvent]:
            # One writer per room appends in sequence: its events must land in that order.
            return [
                (await store.producer.append([_message(room, sender, n)]))[0] for n in range(40)
            ]

        # Many writers at once on the same partitions: their records queue together.
        per_writer = await asyncio.gather(*(writer(rooms[i % 3]) for i in range(30)))
        read = [r for r in await read_all(store) if isinstance(r, RecordedEvent)]

    acked = [r for chunk in per_writer for r in chunk] + [r for (r,) in together]
    assert len(acked) == 1400
    assert producer.records == 1401

    positions = {r.envelope.id: r.position for r in read}
    assert len(positions) == 1401, "each acknowledged event exactly once"
    assert all(positions[r.envelope.id] == r.position for r in acked), "acked offset is real"
    for chunk in per_writer:
        offsets = [r.position.offset for r in chunk]
        assert offsets == sorted(offsets), "a writer's events keep their order"


async def test_an_oversize_record_is_refused_alone_and_its_neighbours_land(
    settings: Settings,
) -> None:
    room, sender = uuid.uuid4(), uuid.uuid4()
    async with await EventStore.open(settings) as store:
        producer = store.producer
        # One room: every record goes to the same partition, so they would share batches.
        small = [await _encoded(store, _message(room, sender, n)) for n in range(20)]
        big = msgspec.structs.replace(small[0], value=b"x" * (2 * 1024 * 1024))

        outcomes = await asyncio.gather(
            *(producer.send_records([r]) for r in small[:10]),
            producer.send_records([big]),
            *(producer.send_records([r]) for r in small[10:]),
            return_exceptions=True,
        )
        refused = outcomes[10]
        landed = outcomes[:10] + outcomes[11:]
        assert isinstance(refused, RecordRejected)
        assert all(isinstance(o, list) and len(o) == 1 for o in landed)

        read = [r for r in await read_all(store) if isinstance(r, RecordedEvent)]
    assert sorted(r.envelope.id for r in read) == sorted(r.envelope.id for r in small)


async def _encoded(store: EventStore, event: MessageSent) -> OutgoingRecord:
    producer = store.producer
    keys = await store.keyring.keys_for_write([event.sender_id])
    envelope = producer.envelope_for(event, actor=None, correlation_id=None, causation_id=None)
    return encode_event(event, envelope, keys, producer.layout)


async def test_appends_after_stop_fail_fast(settings: Settings) -> None:
    room, sender = uuid.uuid4(), uuid.uuid4()
    async with await EventStore.open(settings) as store:
        await store.producer.append([_message(room, sender, 0)])
        await store.producer.stop()
        # The sender's data key is cached (the key ring still listens), so the append gets as
        # far as the stopped producer. (A closed key ring caches nothing: it hears no erasures.)
        with pytest.raises(LogUnavailable, match="not running"):
            await store.producer.append([_message(room, sender, 1)])
