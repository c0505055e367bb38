"""The producer recovers from the aiokafka idempotence stall without losing or duplicating."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import msgspec
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.errors import OutOfOrderSequenceNumber

from eventstore import EventStore, LogUnavailable, RecordedEvent, SendTimeout, Settings
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


def _options(settings: Settings) -> dict[str, Any]:
    return {
        "bootstrap_servers": settings.kafka_bootstrap,
        "enable_idempotence": True,
        "acks": "all",
    }


def _message(n: int) -> MessageSent:
    return MessageSent(
        conversation_id=uuid.uuid4(),
        message_id=uuid.uuid4(),
        sender_id=uuid.uuid4(),
        client_msg_id=f"m{n}",
        body=f"body {n}",
    )


def _client_running(producer: AIOKafkaProducer) -> bool:
    """Whether ``producer``'s client still runs a task of its own (bootstrap starts one)."""
    return producer.client._sync_task is not None


class HangsAfterBootstrap(AIOKafkaProducer):  # type: ignore[misc]
    """A real producer whose ``start()`` bootstraps (its client now runs a metadata task) and
    then never returns, as while a cluster without a controller hands out no producer id."""

    async def start(self) -> None:
        await self.client.bootstrap()
        await asyncio.Event().wait()


async def test_a_rebuild_cut_off_by_the_send_bound_leaves_no_client_running(
    settings: Settings,
) -> None:
    """Every append's bound runs out while the rebuild waits for a new client to start: each
    client built is closed all the same, none is left running."""
    settings = msgspec.structs.replace(settings, send_timeout=0.5)
    made: list[AIOKafkaProducer] = []

    def factory() -> AIOKafkaProducer:
        producer = WedgedAfter(0, **_options(settings)) if not made else None
        producer = producer or HangsAfterBootstrap(**_options(settings))
        made.append(producer)
        return producer

    store = await EventStore.open(settings, producer_factory=factory)
    try:
        for n in range(5):
            with pytest.raises((SendTimeout, LogUnavailable)):
                await store.producer.append([_message(n)])
    finally:
        await store.close()  # waits for a rebuild still under way, which is bounded
    built = made[1:]
    assert 1 <= len(built) <= 5
    assert [p for p in built if _client_running(p)] == [], "a half-built client was left running"


async def test_a_retirement_cut_off_still_stops_the_old_sender(settings: Settings) -> None:
    """A rebuild whose caller is cut off while the old client waits for its flush still
    retires that client completely: its sender is stopped (it would retry, and duplicate,
    forever), though aiokafka already counts the client as closed."""
    never = asyncio.Event()

    async def flush_never() -> None:
        await never.wait()

    async with await EventStore.open(settings) as store:
        producer = store.producer
        old = producer._producer
        assert old is not None
        old._message_accumulator.close = flush_never  # the flush stop() waits for never ends
        try:
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.1):
                    await producer._rebuild(old, "test")
            await producer._rebuild(old, "test")
            assert old._sender.sender_task.done()
            assert not _client_running(old)
            assert producer._producer is not old
            assert len(await producer.append([_message(0)])) == 1
        finally:
            never.set()


async def test_a_stop_during_a_rebuild_closes_the_client_being_built(settings: Settings) -> None:
    entered, gate = asyncio.Event(), asyncio.Event()
    made: list[AIOKafkaProducer] = []
    healthy = default_producer_factory(settings)

    class GatedStart(AIOKafkaProducer):  # type: ignore[misc]
        async def start(self) -> None:
            entered.set()
            await gate.wait()
            await super().start()

    def factory() -> AIOKafkaProducer:
        producer = healthy() if not made else GatedStart(**_options(settings))
        made.append(producer)
        return producer

    async with await EventStore.open(settings, producer_factory=factory) as store:
        producer = store.producer
        old = producer._producer
        assert old is not None
        rebuild = asyncio.create_task(producer._rebuild(old, "test"))
        await entered.wait()
        stopping = asyncio.create_task(producer.stop())
        await asyncio.sleep(0)  # the stop begins while the new client is still starting
        gate.set()
        await stopping
        await asyncio.gather(rebuild, return_exceptions=True)
        assert len(made) == 2
        assert producer._producer is None
        assert made[1]._closed
        assert not _client_running(made[1])
