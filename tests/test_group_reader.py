"""The group reader seeks to positions the caller stored and never relies on Kafka offsets."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import msgspec
import pytest

from eventstore import Batch, ConfigError, EventStore, RecordedEvent
from eventstore.consumer import GroupReader, Partition
from projectors.worker import linger_ms
from schemas import MessageSent


class Stored:
    """Positions kept by the caller (here in memory; projectors keep them in PostgreSQL)."""

    def __init__(self, positions: dict[Partition, int]) -> None:
        self.positions = positions

    async def load(self, partitions: Sequence[Partition]) -> Mapping[Partition, int]:
        # A real store answers after a database round trip; meanwhile the consumer may already
        # be resetting and fetching, which is the race the seek must win.
        await asyncio.sleep(0.3)
        return {p: self.positions[p] for p in partitions if p in self.positions}


def conversation_reader(store: EventStore, group: str, **options: Any) -> GroupReader:
    """A member of ``group`` reading the conversation topic from stored positions (none)."""
    return GroupReader(
        store.settings,
        group_id=group,
        streams=["conversation"],
        positions=Stored({}),
        keys=store.keyring.keys_for_read,
        epoch=store.epoch,
        **options,
    )


async def test_reading_resumes_exactly_after_the_stored_position(store: EventStore) -> None:
    room, sender = uuid.uuid4(), uuid.uuid4()
    written = await store.producer.append(
        [
            MessageSent(
                conversation_id=room,
                message_id=uuid.uuid4(),
                sender_id=sender,
                client_msg_id=f"m{n}",
                body=f"body {n}",
            )
            for n in range(10)
        ]
    )
    partition = (store.layout.topic("conversation"), written[0].position.partition)
    positions = Stored({partition: written[6].position.offset})  # 0..5 already applied
    seen: list[RecordedEvent] = []
    done = asyncio.Event()

    async def handler(batch: Batch) -> None:
        seen.extend(i for i in batch.items if isinstance(i, RecordedEvent))
        for key, span in batch.ranges.items():
            positions.positions[key] = span.next  # what a projector stores with its effects
        if len(seen) >= 4:
            done.set()

    reader = store.group_reader(
        group_id=f"g-{uuid.uuid4().hex[:8]}",
        streams=["conversation"],
        positions=positions,
        handler=handler,
    )
    running = asyncio.create_task(reader.run())
    async with asyncio.timeout(60):
        await done.wait()
    reader.stop()
    await running
    assert [r.envelope.id for r in seen] == [r.envelope.id for r in written[6:]]
    assert positions.positions[partition] == written[-1].position.offset + 1


async def test_a_lingering_reader_gets_records_appended_one_by_one_in_few_batches(
    store: EventStore,
) -> None:
    """With ``linger_ms`` the broker gathers the records of that window into one fetch: ten
    appends made one after another (each acknowledged before the next) arrive together."""
    room, sender = uuid.uuid4(), uuid.uuid4()
    batches: list[int] = []
    ready = asyncio.Event()
    done = asyncio.Event()

    async def handler(batch: Batch) -> None:
        count = sum(1 for i in batch.items if isinstance(i, RecordedEvent))
        if count:
            batches.append(count)
        if sum(batches) >= 11:
            done.set()

    async def on_idle() -> None:
        ready.set()  # assigned and polling: the appends below are read live

    reader = conversation_reader(
        store, f"g-{uuid.uuid4().hex[:8]}", handler=handler, on_idle=on_idle, linger_ms=400
    )
    running = asyncio.create_task(reader.run())
    first = MessageSent(
        conversation_id=room, message_id=uuid.uuid4(), sender_id=sender, client_msg_id="m", body="b"
    )
    await store.producer.append([first])
    async with asyncio.timeout(60):
        await ready.wait()
        while not batches:  # the first record, read before the burst
            await asyncio.sleep(0.01)
        for n in range(10):
            event = msgspec.structs.replace(
                first, message_id=uuid.uuid4(), client_msg_id=f"m{n}", body=f"body {n}"
            )
            await store.producer.append([event])
        await done.wait()
    reader.stop()
    await running
    assert batches[0] == 1
    assert sum(batches[1:]) == 10
    assert len(batches[1:]) <= 2, f"ten records came in {len(batches) - 1} batches: {batches}"


def test_projector_linger_setting() -> None:
    assert linger_ms({}) == 20
    assert linger_ms({"BACKBONE_PROJECTOR_LINGER_MS": "0"}) == 0
    with pytest.raises(ConfigError):
        linger_ms({"BACKBONE_PROJECTOR_LINGER_MS": "soon"})


async def test_a_member_losing_partitions_hears_of_it_under_the_batch_lock(
    store: EventStore,
) -> None:
    """``on_revoked`` gets the partitions a rebalance takes away, while no batch runs: an
    archiver finishes its background writes there before another member reads on."""
    group = f"g-{uuid.uuid4().hex[:8]}"
    revoked: list[tuple[set[Partition], bool]] = []
    readers: list[GroupReader] = []

    async def nothing(batch: Batch) -> None:
        return None

    def member(on_revoked: Callable[[list[Partition]], Awaitable[None]] | None) -> GroupReader:
        reader = conversation_reader(store, group, handler=nothing, on_revoked=on_revoked)
        readers.append(reader)
        return reader

    async def heard(partitions: list[Partition]) -> None:
        revoked.append((set(partitions), first._batch_lock.locked()))

    first = member(heard)
    tasks = [asyncio.create_task(first.run())]
    topic = store.layout.topic("conversation")
    everything = {(topic, p) for p in range(store.settings.conversation_partitions)}
    async with asyncio.timeout(60):
        while first.assignment != everything:
            await asyncio.sleep(0.05)
        tasks.append(asyncio.create_task(member(None).run()))
        while not revoked:
            await asyncio.sleep(0.05)
    for reader in readers:
        reader.stop()
    await asyncio.gather(*tasks)
    partitions, locked = revoked[0]
    assert partitions == everything  # the eager protocol takes everything back, then deals
    assert locked
