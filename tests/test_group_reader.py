"""The group reader seeks to positions the caller stored and never relies on Kafka offsets."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Mapping, Sequence

from eventstore import Batch, EventStore, RecordedEvent
from eventstore.consumer import Partition
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
