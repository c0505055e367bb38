"""Reading the log in batches, with positions stored by the caller, never by Kafka.

Two ways to read:

* :class:`GroupReader`: a consumer-group member (projectors, archiver). Kafka only balances
  partitions; offsets are never committed to Kafka. On every assignment the reader asks the
  caller's :class:`PositionStore` where each partition stands and seeks there. A batch is handed
  to the caller's handler together with the offset range it covers per partition, so the handler
  can store its effects and the new offsets in one transaction (and compare-and-set them, so a
  member that lost a partition mid-batch cannot apply it twice).
* :class:`LogReader`: no group, every partition of the chosen topics (fan-out, replay, audit,
  tests), from the beginning, the live end, or given offsets; optionally only up to the end
  offsets as they stood when it started.
"""

from __future__ import annotations

import asyncio
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Collection,
    Iterable,
    Mapping,
    Sequence,
)
from typing import Literal, Protocol

import msgspec
import structlog
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError

from eventstore.codec import Decoded, KeyFetcher, RecordLike, decode_records
from eventstore.ends import quick_start_options
from eventstore.errors import EventStoreError, LogUnavailable
from eventstore.settings import Settings
from eventstore.topics import TopicLayout
from schemas.events import StreamKind

log = structlog.get_logger(__name__)

Partition = tuple[str, int]
StartAt = Literal["beginning", "end"]


class OffsetRange(msgspec.Struct, frozen=True):
    """The records of one partition in a batch: ``first`` .. ``last`` inclusive."""

    first: int
    last: int

    @property
    def next(self) -> int:
        """The offset to resume from after this range."""
        return self.last + 1


class Batch(msgspec.Struct, frozen=True):
    """Decoded records in log order per partition, and the offset range of each partition.

    A reader made with ``decode=False`` (the archiver) leaves ``items`` empty and hands over
    the records exactly as Kafka returned them in ``records`` instead.
    """

    items: list[Decoded]
    ranges: dict[Partition, OffsetRange]
    records: dict[Partition, Sequence[RecordLike]] = msgspec.field(default_factory=dict)


class PositionsMoved(EventStoreError):
    """Raised by a batch handler whose stored positions no longer match the batch.

    Another member applied these partitions (a rebalance overtook this one), or an operator
    moved them. The handler rolls back; the reader seeks the batch's partitions to the stored
    positions again and reads on from there.
    """

    retriable = True


class PositionStore(Protocol):
    """Where the caller keeps its read positions (next offset to read per partition)."""

    async def load(self, partitions: Sequence[Partition]) -> Mapping[Partition, int]: ...


BatchHandler = Callable[[Batch], Awaitable[None]]
IdleHandler = Callable[[], Awaitable[None]]
RevokeHandler = Callable[[list[Partition]], Awaitable[None]]


def _consumer(
    settings: Settings,
    group_id: str | None,
    *topics: str,
    instance_id: str | None = None,
    linger_ms: int = 0,
    quick_start: bool = False,
) -> AIOKafkaConsumer:
    # ``linger_ms``: the broker holds a fetch until that long has passed (or a megabyte is
    # ready) instead of answering as soon as one record is: fewer, larger batches.
    waiting = (
        {"fetch_min_bytes": 1024 * 1024, "fetch_max_wait_ms": linger_ms} if linger_ms > 0 else {}
    )
    return AIOKafkaConsumer(
        *topics,
        bootstrap_servers=settings.kafka_bootstrap,
        group_id=group_id,
        group_instance_id=instance_id,
        client_id="backbone-reader",
        # Offsets live with the caller's effects, never in Kafka.
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        isolation_level="read_committed",
        max_partition_fetch_bytes=4 * 1024 * 1024,
        fetch_max_bytes=16 * 1024 * 1024,
        max_poll_records=None,
        **waiting,
        **quick_start_options(quick_start),
    )


async def _decode(
    records: Mapping[TopicPartition, Sequence[RecordLike]],
    layout: TopicLayout,
    epoch: int,
    keys: KeyFetcher,
) -> Batch:
    flat: list[RecordLike] = []
    ranges: dict[Partition, OffsetRange] = {}
    for tp, recs in records.items():
        if not recs:
            continue
        flat.extend(recs)
        ranges[(tp.topic, tp.partition)] = OffsetRange(recs[0].offset, recs[-1].offset)
    items = await decode_records(flat, layout, epoch, keys)
    return Batch(items, ranges)


def _raw(records: Mapping[TopicPartition, Sequence[RecordLike]]) -> Batch:
    by_partition: dict[Partition, Sequence[RecordLike]] = {}
    ranges: dict[Partition, OffsetRange] = {}
    for tp, recs in records.items():
        if recs:
            by_partition[(tp.topic, tp.partition)] = recs
            ranges[(tp.topic, tp.partition)] = OffsetRange(recs[0].offset, recs[-1].offset)
    return Batch([], ranges, by_partition)


class _SeekOnAssign(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, reader: GroupReader) -> None:
        self._reader = reader

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        # Wait for the batch in flight: its transaction must finish before another member
        # may start on these partitions.
        reader = self._reader
        async with reader._batch_lock:
            taken = [(tp.topic, tp.partition) for tp in revoked]
            if taken and reader._on_revoked is not None:
                await reader._on_revoked(taken)

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        await self._reader._seek_to_stored(list(assigned))


class GroupReader:
    """A consumer-group member that hands decoded batches to ``handler``; see module doc."""

    def __init__(
        self,
        settings: Settings,
        *,
        group_id: str,
        streams: Sequence[StreamKind],
        positions: PositionStore,
        handler: BatchHandler,
        keys: KeyFetcher,
        epoch: int,
        max_records: int = 5000,
        poll_timeout_ms: int = 200,
        instance_id: str | None = None,
        decode: bool = True,
        on_idle: IdleHandler | None = None,
        on_revoked: RevokeHandler | None = None,
        linger_ms: int = 0,
    ) -> None:
        """``instance_id`` makes this a static member (KIP-345): a restarted process with the
        same id takes its partitions back at once instead of waiting for the session of its
        dead predecessor to time out. Ids must be unique within the group.

        ``decode=False`` hands over raw records (:attr:`Batch.records`) without decoding.
        ``on_idle`` is awaited after a poll that brought nothing, under the same lock as a
        batch (so no partition is revoked meanwhile): a handler that buffers can flush there.
        ``on_revoked`` is awaited with the partitions about to move to another member, under
        that lock too: a handler that writes in the background finishes their writes there.
        ``linger_ms`` lets the broker gather records for that long before answering a fetch:
        a handler with a fixed cost per batch (a transaction) trades that much latency for
        far fewer batches under load."""
        self._settings = settings
        self._instance_id = instance_id
        self._layout = TopicLayout.from_settings(settings)
        self._group_id = group_id
        self._topics = [self._layout.topic(s) for s in streams]
        self._positions = positions
        self._handler = handler
        self._keys = keys
        self._epoch = epoch
        self._max_records = max_records
        self._poll_timeout_ms = poll_timeout_ms
        self._decode = decode
        self._on_idle = on_idle
        self._on_revoked = on_revoked
        self._linger_ms = linger_ms
        self._batch_lock = asyncio.Lock()
        # Next offset to hand over per partition (set from the stored position on assignment).
        self._next: dict[Partition, int] = {}
        self._consumer: AIOKafkaConsumer | None = None
        self._stopping = asyncio.Event()

    @property
    def assignment(self) -> set[Partition]:
        if self._consumer is None:
            return set()
        return {(tp.topic, tp.partition) for tp in self._consumer.assignment()}

    async def _seek_to_stored(self, assigned: list[TopicPartition]) -> None:
        consumer = self._consumer
        if consumer is None or not assigned:
            return
        async with self._batch_lock:
            await self._seek_locked(consumer, assigned)
        log.info("reader.assigned", group=self._group_id, partitions=len(assigned))

    async def _seek_locked(
        self, consumer: AIOKafkaConsumer, assigned: list[TopicPartition]
    ) -> None:
        """Seek ``assigned`` to the stored positions; the caller holds the batch lock."""
        stored = await self._positions.load([(tp.topic, tp.partition) for tp in assigned])
        for tp in assigned:
            partition = (tp.topic, tp.partition)
            # No stored position: nothing of the partition is applied, so read it from its
            # first offset (topics keep every event). Seeking matters after a refused batch:
            # the consumer is already past that batch's records, which nothing stored.
            offset = stored.get(partition, 0)
            consumer.seek(tp, offset)
            self._next[partition] = offset

    def _unseen(
        self, records: Mapping[TopicPartition, Sequence[RecordLike]], mine: set[TopicPartition]
    ) -> dict[TopicPartition, list[RecordLike]]:
        """Records of partitions still assigned, from the next offset to deliver on.

        While a new assignment looks up its stored positions, the consumer may already fetch
        from the earliest offset; those records (and any fetched again after the seek) are
        below the next offset to deliver and are dropped here, so every record is handed
        over once per assignment.
        """
        fresh: dict[TopicPartition, list[RecordLike]] = {}
        for tp, recs in records.items():
            if tp not in mine:
                continue
            floor = self._next.get((tp.topic, tp.partition), 0)
            kept = [r for r in recs if r.offset >= floor]
            if kept:
                fresh[tp] = kept
        return fresh

    async def run(self) -> None:
        """Read and hand over batches until :meth:`stop`."""
        consumer = _consumer(
            self._settings,
            self._group_id,
            instance_id=self._instance_id,
            linger_ms=self._linger_ms,
        )
        self._consumer = consumer
        try:
            consumer.subscribe(self._topics, listener=_SeekOnAssign(self))
            await consumer.start()
        except KafkaError as exc:
            await consumer.stop()
            raise LogUnavailable(f"Kafka unreachable: {exc}") from exc
        try:
            while not self._stopping.is_set():
                records = await consumer.getmany(
                    timeout_ms=self._poll_timeout_ms, max_records=self._max_records
                )
                if not records:
                    if self._on_idle is not None:
                        async with self._batch_lock:
                            await self._on_idle()
                    continue
                async with self._batch_lock:
                    fresh = self._unseen(records, consumer.assignment())
                    if not fresh:
                        continue
                    if self._decode:
                        batch = await _decode(fresh, self._layout, self._epoch, self._keys)
                    else:
                        batch = _raw(fresh)
                    try:
                        await self._handler(batch)
                    except PositionsMoved as exc:
                        log.warning("reader.positions_moved", group=self._group_id, reason=str(exc))
                        await self._seek_locked(consumer, list(fresh))
                        continue
                    for partition, span in batch.ranges.items():
                        self._next[partition] = span.next
        finally:
            self._consumer = None
            await consumer.stop()

    def stop(self) -> None:
        self._stopping.set()


class LogReader:
    """Reads every partition of the chosen streams without a consumer group."""

    def __init__(
        self,
        settings: Settings,
        *,
        streams: Sequence[StreamKind],
        keys: KeyFetcher,
        epoch: int,
        max_records: int = 5000,
        max_bytes: int | None = None,
        quick_start: bool = False,
        decode: bool = True,
    ) -> None:
        """``quick_start``: a reader that runs once to an end (a replay's); see
        :func:`~eventstore.ends.quick_start_options`. ``max_bytes``: see
        :meth:`batches_until_end`. ``decode=False`` hands over raw records
        (:attr:`Batch.records`) without decoding (a build decodes them its own way)."""
        self._settings = settings
        self._quick_start = quick_start
        self._decode = decode
        self._layout = TopicLayout.from_settings(settings)
        self._streams = streams
        self._keys = keys
        self._epoch = epoch
        self._max_records = max_records
        self._max_bytes = max_bytes
        self._consumer: AIOKafkaConsumer | None = None

    async def start(
        self,
        start_at: StartAt = "beginning",
        offsets: Mapping[Partition, int] | None = None,
        *,
        partitions: Collection[Partition] | None = None,
    ) -> None:
        """Assign every partition (or only ``partitions``, e.g. one worker's share of a
        parallel replay) and position it at ``start_at`` or at ``offsets``."""
        consumer = _consumer(self._settings, None, quick_start=self._quick_start)
        try:
            await consumer.start()
            assigned: list[TopicPartition] = []
            for stream in self._streams:
                topic = self._layout.topic(stream)
                found = consumer.partitions_for_topic(topic)
                if not found:
                    await consumer._client.force_metadata_update()
                    found = consumer.partitions_for_topic(topic) or set()
                assigned.extend(
                    TopicPartition(topic, p)
                    for p in sorted(found)
                    if partitions is None or (topic, p) in partitions
                )
            consumer.assign(assigned)
            if start_at == "end":
                await consumer.seek_to_end(*assigned)
            else:
                await consumer.seek_to_beginning(*assigned)
            for (topic, partition), offset in (offsets or {}).items():
                if partitions is None or (topic, partition) in partitions:
                    consumer.seek(TopicPartition(topic, partition), offset)
        except KafkaError as exc:
            await consumer.stop()
            raise LogUnavailable(f"Kafka unreachable: {exc}") from exc
        self._consumer = consumer

    async def stop(self) -> None:
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            await consumer.stop()

    async def __aenter__(self) -> LogReader:
        if self._consumer is None:
            await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    def _require(self) -> AIOKafkaConsumer:
        if self._consumer is None:
            raise RuntimeError("LogReader is not started")
        return self._consumer

    async def end_offsets(self) -> dict[Partition, int]:
        """The next offset to be written, per partition, as of now."""
        consumer = self._require()
        ends = await consumer.end_offsets(list(consumer.assignment()))
        return {(tp.topic, tp.partition): offset for tp, offset in ends.items()}

    async def next_batch(self, timeout_ms: int = 200) -> Batch:
        """The next decoded batch (possibly empty when nothing arrived within the timeout)."""
        consumer = self._require()
        records = await consumer.getmany(timeout_ms=timeout_ms, max_records=self._max_records)
        return await self._batch(records)

    async def _batch(self, records: Mapping[TopicPartition, Sequence[RecordLike]]) -> Batch:
        if not self._decode:
            return _raw(records)
        return await _decode(records, self._layout, self._epoch, self._keys)

    async def batches_until_end(self, timeout_ms: int = 500) -> AsyncIterator[Batch]:
        """Batches up to the end offsets as they stand when this is called, then stop.

        A batch takes fetches until it holds ``max_records`` records or, with ``max_bytes``, that
        many bytes of record values or more: a fetch holds at most ``max_partition_fetch_bytes``
        of one partition, so a batch never holds more than ``max_bytes`` plus one fetch. (A
        decoded record takes several times its bytes in memory: the byte bound keeps a
        replay's batches of large events about as small in memory as its batches of small
        ones.)

        The reader can be used on afterwards (another ``batches_until_end``, ``next_batch``):
        a partition that reached its end is paused, so nothing past the end is fetched for it,
        and any records past the end that were fetched before (and dropped here) are fetched
        again, since the partition is sought back to its end when this stops.
        """
        consumer = self._require()
        target = await self.end_offsets()
        remaining: set[Partition] = set()
        done: list[TopicPartition] = []
        for p, end in target.items():
            if await self._position(p) < end:
                remaining.add(p)
            else:
                done.append(TopicPartition(*p))
        consumer.pause(*done)
        paused = set(done)
        trimmed: set[TopicPartition] = set()
        try:
            while remaining:
                # A batch may take several fetches: one holds at most ``fetch_max_bytes``
                # (some 20,000 records of a chat log), and ``max_records`` may ask for more.
                kept: dict[TopicPartition, list[RecordLike]] = {}
                count = size = 0
                max_bytes = self._max_bytes
                while remaining and count < self._max_records:
                    records = await consumer.getmany(
                        timeout_ms=timeout_ms, max_records=self._max_records - count
                    )
                    for tp, recs in records.items():
                        end = target[(tp.topic, tp.partition)]
                        if recs and recs[-1].offset >= end:
                            trimmed.add(tp)
                            recs = [r for r in recs if r.offset < end]
                        if recs:
                            kept.setdefault(tp, []).extend(recs)
                            count += len(recs)
                            if max_bytes is not None:
                                size += sum(r.serialized_value_size for r in recs)
                    for p in list(remaining):
                        if await self._position(p) >= target[p]:
                            remaining.discard(p)
                            tp = TopicPartition(*p)
                            consumer.pause(tp)
                            paused.add(tp)
                    if not records:
                        break  # nothing arrived within the timeout: hand over what there is
                    if max_bytes is not None and size >= max_bytes:
                        break
                batch = await self._batch(kept)
                if batch.ranges:
                    yield batch
        finally:
            # Unless the reader was stopped meanwhile (then the consumer is closed).
            if self._consumer is not None:
                for tp in trimmed:
                    consumer.seek(tp, target[(tp.topic, tp.partition)])
                consumer.resume(*paused)

    async def _position(self, partition: Partition) -> int:
        consumer = self._require()
        position: int = await consumer.position(TopicPartition(*partition))
        return position
