"""Ingest under broker faults: a 202 means durable, and a degraded cluster answers 503.

Three brokers of its own (RF 3, min ISR 2): HTTP senders post messages while the leader of
the conversation's partition is SIGKILLed and restarted; afterwards every message answered 202
is in the log, once. With two brokers down the ISR is below the minimum: every send answers
503 with Retry-After, never 2xx.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest

from eventstore import RecordedEvent, Settings, stream_placement
from ops.stack import KafkaCluster
from schemas import MessageSent
from tests.system_fixtures import Api, User, running_system
from tests.test_log import read_all
from tests.test_log_faults import cluster_settings, leader_of

pytestmark = pytest.mark.fault


@pytest.fixture
def three_brokers(tmp_path: Path) -> Iterator[KafkaCluster]:
    with KafkaCluster(tmp_path / "k3", brokers=3) as cluster:
        yield cluster


class Senders:
    """HTTP clients posting messages until stopped; they keep what was answered 202."""

    def __init__(self, api: Api, user: User, cid: str, workers: int = 6) -> None:
        self.api, self.user, self.cid = api, user, cid
        self.accepted: list[str] = []
        self.refused: list[int] = []
        self._stop = asyncio.Event()
        self._tasks = [asyncio.create_task(self._run(w)) for w in range(workers)]

    async def _run(self, worker: int) -> None:
        n = 0
        while not self._stop.is_set():
            n += 1
            reply = await self.api.call(
                "POST",
                f"/v1/conversations/{self.cid}/messages",
                token=self.user.access,
                json={"client_msg_id": f"w{worker}-{n}", "content": f"message {worker}/{n}"},
            )
            if reply.status == 202:
                self.accepted.append(reply.body["message_id"])
            else:
                assert reply.status == 503, reply.body
                assert "Retry-After" in reply.headers
                self.refused.append(reply.status)
                await asyncio.sleep(0.05)

    async def more(self, count: int, timeout: float = 90) -> None:
        target = len(self.accepted) + count
        async with asyncio.timeout(timeout):
            while len(self.accepted) < target:
                await asyncio.sleep(0.02)

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)


async def test_leader_kills_lose_no_accepted_message_and_low_isr_answers_503(
    base_settings: Settings, three_brokers: KafkaCluster
) -> None:
    settings = await cluster_settings(base_settings, three_brokers, 3)
    async with running_system(settings) as system:
        api = system.api
        alice = await api.user()
        created = await api.call(
            "POST", "/v1/conversations", token=alice.access, json={"name": "f"}
        )
        assert created.status == 201
        cid = created.body["conversation_id"]
        topic = system.store.layout.topic("conversation")
        _, partition = stream_placement(uuid.UUID(cid), system.settings.conversation_partitions)

        senders = Senders(api, alice, cid)
        try:
            await senders.more(100)
            for _round in range(2):
                leader, _ = await leader_of(system.settings.kafka_bootstrap, topic, partition)
                await asyncio.to_thread(three_brokers.kill, leader)
                await senders.more(100)  # two replicas left: sends go on
                await asyncio.to_thread(three_brokers.restart, leader)
                async with asyncio.timeout(90):
                    while (
                        len((await leader_of(system.settings.kafka_bootstrap, topic, partition))[1])
                        < 3
                    ):
                        await asyncio.sleep(0.2)
                await senders.more(50)
        finally:
            await senders.stop()

        read = await read_all(system.store)
        events: dict[str, set[uuid.UUID]] = defaultdict(set)
        for item in read:
            if isinstance(item, RecordedEvent) and isinstance(item.event, MessageSent):
                events[str(item.event.message_id)].add(item.envelope.id)
        missing = [m for m in senders.accepted if m not in events]
        assert not missing, f"{len(missing)} accepted messages are not in the log"
        assert all(len(events[m]) == 1 for m in senders.accepted), "a message was written twice"
        assert len(set(senders.accepted)) == len(senders.accepted)

        # Two brokers down: the ISR is below min.insync.replicas. No 2xx, only 503.
        leader, _ = await leader_of(system.settings.kafka_bootstrap, topic, partition)
        others = [n for n in three_brokers.node_ids if n != leader]
        await asyncio.gather(*(asyncio.to_thread(three_brokers.kill, n) for n in others))
        try:
            for n in range(3):
                reply = await api.call(
                    "POST",
                    f"/v1/conversations/{cid}/messages",
                    token=alice.access,
                    json={"client_msg_id": f"degraded-{n}", "content": "while degraded"},
                )
                assert reply.status == 503, reply.body
                assert reply.headers["Retry-After"]
                assert reply.body["type"] in (
                    "urn:backbone:problem:log-unavailable",
                    "urn:backbone:problem:dependency-unavailable",
                )
        finally:
            await asyncio.gather(*(asyncio.to_thread(three_brokers.restart, n) for n in others))
