"""The producer recovers from the aiokafka idempotence stall without losing or duplicating."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import OutOfOrderSequenceNumber

from eventstore import EventStore, RecordedEvent, Settings
from eventstore.metrics import PRODUCER_RECREATED
from eventstore.producer import default_producer_factory
from schemas import MessageSent
from tests.test_log import read_all


class WedgedAfter(AIOKafkaProducer):  # type: ignore[misc]
    """A real producer that, from its ``n``-th batch on, fails every batch the way a producer
    stuck in aiokafka issue 1017 does: with OutOfOrderSequenceNumber, sending nothing."""

    def __init__(self, n: int, **options: Any) -> None:
        super().__init__(**options)
        self._left = n

    async def send_batch(self, *args: Any, **kwargs: Any) -> asyncio.Future[Any]:
        self._left -= 1
        if self._left < 0:
            future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            future.set_exception(OutOfOrderSequenceNumber())
            return future
        return await super().send_batch(*args, **kwargs)


async def test_a_wedged_producer_is_rebuilt_and_every_append_lands_once(
    settings: Settings,
) -> None:
    made: list[AIOKafkaProducer] = []
    healthy = default_producer_factory(settings)

    def factory() -> AIOKafkaProducer:
        if not made:
            producer: AIOKafkaProducer = WedgedAfter(
                8, bootstrap_servers=settings.kafka_bootstrap, enable_idempotence=True, acks="all"
            )
        else:
            producer = healthy()
        made.append(producer)
        return producer

    room, sender = uuid.uuid4(), uuid.uuid4()
    rebuilt_before = PRODUCER_RECREATED._value.get()
    async with await EventStore.open(settings, producer_factory=factory) as store:
        queue = iter(range(200))

        async def writer() -> list[RecordedEvent]:
            out: list[RecordedEvent] = []
            for n in queue:
                event = MessageSent(
                    conversation_id=room,
                    message_id=uuid.uuid4(),
                    sender_id=sender,
                    client_msg_id=f"m{n}",
                    body=f"body {n}",
                )
                out.extend(await store.producer.append([event]))
            return out

        acked = [r for chunk in await asyncio.gather(*(writer() for _ in range(10))) for r in chunk]
        assert store.producer.generation == 2
        read = await read_all(store)

    assert PRODUCER_RECREATED._value.get() == rebuilt_before + 1
    assert len(made) == 2
    assert len(acked) == 200
    ids = [r.envelope.id for r in read if isinstance(r, RecordedEvent)]
    assert sorted(ids) == sorted(r.envelope.id for r in acked), "each acked event exactly once"
    positions = {r.envelope.id: r.position for r in read if isinstance(r, RecordedEvent)}
    assert all(positions[r.envelope.id] == r.position for r in acked)
