"""Fault drills on real brokers: no acknowledged event is ever lost.

Each drill runs its own Kafka cluster in a temporary directory (the session stack is left
alone), writes continuously while brokers are SIGKILLed and restarted, then reads the whole
log back: every event that was acknowledged must be there, exactly once after dedup by id.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
from aiokafka.admin import AIOKafkaAdminClient

from eventstore import (
    EventStore,
    EventStoreError,
    RecordedEvent,
    Settings,
    TopicLayout,
    provision_topics,
)
from ops.stack import KafkaCluster
from schemas import MessageSent
from tests.test_log import read_all

pytestmark = pytest.mark.fault


class Writers:
    """Concurrent writers appending until told to stop; they record what was acknowledged."""

    def __init__(self, store: EventStore, rooms: int = 20, workers: int = 8) -> None:
        self.store = store
        self.rooms = [uuid.uuid4() for _ in range(rooms)]
        self.sender = uuid.uuid4()
        self.acked: list[uuid.UUID] = []
        self.failed = 0
        self._workers = workers
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            event = MessageSent(
                conversation_id=random.choice(self.rooms),
                message_id=uuid.uuid4(),
                sender_id=self.sender,
                client_msg_id=f"m{n}",
                body=f"body {n}",
            )
            try:
                written = await self.store.producer.append([event])
            except EventStoreError:
                self.failed += 1  # not acknowledged: the writer may retry, never counts it
                await asyncio.sleep(0.05)
                continue
            self.acked.extend(r.envelope.id for r in written)

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._run()) for _ in range(self._workers)]

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    async def wait_for_more(self, count: int, timeout: float = 60) -> None:
        target = len(self.acked) + count
        async with asyncio.timeout(timeout):
            while len(self.acked) < target:
                await asyncio.sleep(0.02)


async def cluster_settings(base: Settings, cluster: KafkaCluster, brokers: int) -> Settings:
    settings = msgspec.structs.replace(
        base,
        kafka_bootstrap=cluster.bootstrap,
        topic_prefix=f"f{uuid.uuid4().hex[:10]}",
        user_partitions=1,
        conversation_partitions=3,
        kafka_replication_factor=3 if brokers == 3 else 1,
        kafka_min_insync=2 if brokers == 3 else 1,
        send_timeout=20.0,
    )
    await provision_topics(settings.kafka_bootstrap, TopicLayout.from_settings(settings))
    return settings


def assert_every_acked_event_once(acked: list[uuid.UUID], read: list[object]) -> None:
    ids = Counter(r.envelope.id for r in read if isinstance(r, RecordedEvent))
    missing = set(acked) - set(ids)
    assert not missing, f"{len(missing)} acknowledged events lost"
    assert len(set(acked)) == len(acked), "no event was acknowledged twice"


@pytest.fixture
def single_broker(tmp_path: Path) -> Iterator[KafkaCluster]:
    with KafkaCluster(tmp_path / "k1", brokers=1) as cluster:
        yield cluster


@pytest.fixture
def three_brokers(tmp_path: Path) -> Iterator[KafkaCluster]:
    with KafkaCluster(tmp_path / "k3", brokers=3) as cluster:
        yield cluster


async def test_acknowledged_events_survive_a_broker_kill_and_restart(
    base_settings: Settings, single_broker: KafkaCluster
) -> None:
    settings = await cluster_settings(base_settings, single_broker, 1)
    async with await EventStore.open(settings) as store:
        writers = Writers(store)
        writers.start()
        try:
            await writers.wait_for_more(300)
            await asyncio.to_thread(single_broker.kill, 1)
            await asyncio.sleep(1.0)  # writes now fail or wait: the broker is gone
            await asyncio.to_thread(single_broker.restart, 1)
            await writers.wait_for_more(300)
        finally:
            await writers.stop()
        read = await read_all(store)
    assert_every_acked_event_once(writers.acked, read)


async def leader_of(bootstrap: str, topic: str, partition: int) -> tuple[int, list[int]]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        (meta,) = await admin.describe_topics([topic])
    finally:
        await admin.close()
    for p in meta["partitions"]:
        if p["partition"] == partition:
            return p["leader"], list(p["isr"])
    raise AssertionError(f"no partition {partition} in {topic}")


async def test_killing_the_partition_leader_during_sends_loses_nothing(
    base_settings: Settings, three_brokers: KafkaCluster
) -> None:
    """RF 3, min ISR 2: SIGKILL the leader three times while 8 writers send."""
    settings = await cluster_settings(base_settings, three_brokers, 3)
    topic = TopicLayout.from_settings(settings).topic("conversation")
    async with await EventStore.open(settings) as store:
        writers = Writers(store)
        writers.start()
        try:
            await writers.wait_for_more(200)
            for _round in range(3):
                leader, _ = await leader_of(settings.kafka_bootstrap, topic, 0)
                await asyncio.to_thread(three_brokers.kill, leader)
                await writers.wait_for_more(200)  # two replicas left: writes go on
                await asyncio.to_thread(three_brokers.restart, leader)
                async with asyncio.timeout(90):  # wait until it is back in sync
                    while len((await leader_of(settings.kafka_bootstrap, topic, 0))[1]) < 3:
                        await asyncio.sleep(0.2)
                await writers.wait_for_more(100)
        finally:
            await writers.stop()
        read = await read_all(store)
    assert len(writers.acked) >= 1100
    assert_every_acked_event_once(writers.acked, read)

    # With two of three brokers gone, the ISR is below min.insync.replicas=2: no append may be
    # acknowledged; each fails with a retriable error within the send bound.
    short = msgspec.structs.replace(settings, send_timeout=4.0)
    async with await EventStore.open(short) as store:
        leader, _ = await leader_of(settings.kafka_bootstrap, topic, 0)
        others = [n for n in three_brokers.node_ids if n != leader]
        await asyncio.gather(*(asyncio.to_thread(three_brokers.kill, n) for n in others))
        room = uuid.uuid4()
        for n in range(3):
            event = MessageSent(
                conversation_id=room,
                message_id=uuid.uuid4(),
                sender_id=uuid.uuid4(),
                client_msg_id=f"isr{n}",
                body="while degraded",
            )
            with pytest.raises(EventStoreError) as caught:
                await store.producer.append([event])
            assert caught.value.retriable
    # Both at once: with one controller left there is no quorum until both are back.
    await asyncio.gather(*(asyncio.to_thread(three_brokers.restart, n) for n in others))
