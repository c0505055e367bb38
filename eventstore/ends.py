"""Where the log ends now, per partition: for "wait until the read model has caught up".

One group-less consumer per process answers ListOffsets requests; it never fetches records.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from eventstore.errors import LogUnavailable
from eventstore.settings import Settings

Partition = tuple[str, int]

METADATA_RETRY_MS: Final = 10
"""aiokafka's ``retry_backoff_ms`` for readers that ask about topics new to them and then are
done (log ends, a replay's reader): the pause between metadata rounds, and after an error."""


def quick_start_options(quick_start: bool) -> dict[str, int]:
    """aiokafka consumer options for a reader that runs once to an end (``quick_start``): it
    asks again for its topics' metadata after :data:`METADATA_RETRY_MS` rather than aiokafka's
    100 ms, so its first answer comes 0.2 s sooner. Not for a reader that stays (a tail, a
    worker's lag): with Kafka down it would ask that often until it came back."""
    return {"retry_backoff_ms": METADATA_RETRY_MS} if quick_start else {}


def range_consumer(settings: Settings, client_id: str) -> AIOKafkaConsumer:
    """A group-less, read-committed consumer (not started) for reading one partition's range
    to an end, as the tiers read it: a replay's source, the archiver's check of a body."""
    return AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap,
        client_id=client_id,
        enable_auto_commit=False,
        isolation_level="read_committed",
        max_partition_fetch_bytes=4 * 1024 * 1024,
        **quick_start_options(True),  # it reads to an end
    )


class LogEnds:
    """The next offset to be written per partition, as of the call (read-committed)."""

    def __init__(self, settings: Settings, *, quick_start: bool = False) -> None:
        """``quick_start``: for a question asked once, or by a run that ends (a rebuild); see
        :func:`quick_start_options`."""
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=settings.kafka_bootstrap,
            group_id=None,
            client_id="backbone-ends",
            enable_auto_commit=False,
            isolation_level="read_committed",
            **quick_start_options(quick_start),
        )
        self._started = False

    async def start(self) -> None:
        try:
            await self._consumer.start()
        except KafkaError as exc:
            await self._consumer.stop()
            raise LogUnavailable(f"Kafka unreachable: {exc}") from exc
        self._started = True

    async def stop(self) -> None:
        if self._started:
            self._started = False
            await self._consumer.stop()

    async def end_offsets(self, partitions: Sequence[Partition]) -> dict[Partition, int]:
        try:
            ends = await self._consumer.end_offsets([TopicPartition(t, p) for t, p in partitions])
        except KafkaError as exc:
            raise LogUnavailable(f"cannot read end offsets: {exc}") from exc
        return {(tp.topic, tp.partition): offset for tp, offset in ends.items()}


async def end_offsets(settings: Settings, partitions: Sequence[Partition]) -> dict[Partition, int]:
    """The end of each of ``partitions`` now, for a one-off question (a :class:`LogEnds` of its
    own: no assignment, so stopping it waits for no fetch in flight)."""
    ends = LogEnds(settings, quick_start=True)
    await ends.start()
    try:
        return await ends.end_offsets(partitions)
    finally:
        await ends.stop()
