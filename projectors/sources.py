"""Where a bounded or archived replay reads its records, and where it stops.

A :class:`RecordSource` hands over the raw records of one partition in offset order, in chunks:
:class:`KafkaSource` reads the log, :class:`ArchiveSource` the S3 archive (the segments'
records exactly as Kafka stored them, re-labelled with the deployment's topic of the same
role, so an archive written under another topic prefix replays too). :func:`replay_source`
applies them partition by partition, cut at an :class:`Until` bound, decoding each chunk with
:func:`~eventstore.codec.decode_compact` into a :class:`BuildBatch` of that partition
and applying it with a :class:`~projectors.projector.Projector`: the offsets are stored in the
batch's transaction as on every other path, so a run that dies resumes where it stopped.

In one process, partitions are applied one after the other, the next chunk read and decoded
while the current one is applied; a long build pass deals the partitions out to worker
processes (each opens the same source from its :class:`SourceSpec` and gets the resolved
:class:`Cut`). The model does not depend on the order *across* partitions.

*The bound.* ``Until(time=T)`` keeps, in every partition, the records up to the last one
whose event time (the record timestamp, which the producer sets from the envelope's ``time``,
to the millisecond) is at or before ``T``: the model is the state at ``T``. ``Until(position=P)``
(a position token) keeps the partition ``P`` names up to ``P``'s offset inclusive, and every
other partition up to ``P``'s event time: the state right after that event.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Collection, Sequence
from typing import Final, Literal, Protocol, TypeVar

import msgspec
from aiokafka import TopicPartition
from aiokafka.errors import KafkaError

from eventstore import (
    Batch,
    EventStore,
    InvalidPosition,
    LogUnavailable,
    OffsetRange,
    Position,
    TopicLayout,
)
from eventstore.archive import Archive, Manifest, absent_partitions, archived_layout
from eventstore.codec import decode_compact
from eventstore.consumer import Partition
from eventstore.ends import end_offsets, range_consumer
from eventstore.objects import s3_client
from projectors.apply import Item
from projectors.errors import ProjectorError
from projectors.projector import Projector

_EPOCH_UTC = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)


class ReplaySourceError(ProjectorError):
    """A replay source or bound that cannot be used (a foreign position, no such record)."""


REPLAY_BATCH: Final = 100_000
"""Records per replay batch (one transaction). A batch reads and rewrites each conversation's
summary and read-marker rows once however many of its messages it holds, so larger batches do
less of that per event: a million-event replay went 10 % faster at 20,000 than at 5,000, and
at 100,000 the worker's CPU per applied event fell by a quarter and PostgreSQL's by a third
against 20,000 (a batch takes several fetches from 20,000 up; see
:meth:`~eventstore.consumer.LogReader.batches_until_end`)."""

REPLAY_BATCH_BYTES: Final = 64 * 1024 * 1024
"""Bytes of record values after which a replay batch takes no further fetch (it then holds at
most this plus one fetch). A decoded record takes several times its value's bytes, and a
replay holds two batches (one applied, one read ahead): :data:`REPLAY_BATCH` records of the
bench's chat log (about 470 bytes a value, 47 MB a batch) stay under this bound and take a
worker to about 640 MB; without it, a log of 4 KB messages would take several gigabytes per
worker."""


class SourceRecord(msgspec.Struct, frozen=True):
    """One raw record of a source (a :class:`~eventstore.codec.RecordLike`)."""

    topic: str
    partition: int
    offset: int
    timestamp: int
    """Milliseconds since the epoch: the event time."""
    value: bytes | None
    headers: Sequence[tuple[str, bytes]]


Chunks = AsyncGenerator[list[SourceRecord], None]


class RecordSource(Protocol):
    """Raw records per partition, in offset order."""

    name: str
    spec: SourceSpec

    async def ends(self) -> dict[Partition, int]:
        """The offset after the last record of every partition the source holds."""
        ...

    def chunks(self, partition: Partition, start: int) -> Chunks:
        """The records of ``partition`` from ``start`` to the end, in chunks."""
        ...


def time_ms(value: dt.datetime) -> int:
    """Whole milliseconds since the epoch (floored, exactly: no float)."""
    return (value - _EPOCH_UTC) // dt.timedelta(milliseconds=1)


class Until(msgspec.Struct, frozen=True):
    """Where a point-in-time replay stops: at a time, or right after one event's position."""

    time: dt.datetime | None = None
    position: Position | None = None

    @classmethod
    def parse(cls, text: str) -> Until:
        """An RFC 3339 time with a zone, or a position token; :class:`ValueError` otherwise."""
        try:
            return cls(position=Position.parse(text))
        except InvalidPosition:
            pass
        parsed = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
        if parsed.tzinfo is None:
            raise ValueError(f"time without a zone offset: {text!r}")
        return cls(time=parsed.astimezone(dt.UTC))

    def __str__(self) -> str:
        return self.position.token() if self.position else str(self.time and self.time.isoformat())


class Cut(msgspec.Struct, frozen=True):
    """The resolved bound: a time for every partition, an offset for one."""

    time_ms: int | None
    partition: Partition | None = None
    offset: int | None = None

    def admits(self, partition: Partition, record: SourceRecord) -> bool:
        if partition == self.partition and self.offset is not None:
            return record.offset <= self.offset
        return self.time_ms is None or record.timestamp <= self.time_ms

    def kept(self, partition: Partition, chunk: list[SourceRecord]) -> list[SourceRecord]:
        """The records of ``chunk`` (in offset order) before the first one past the bound."""
        if self.time_ms is None and (self.offset is None or partition != self.partition):
            return chunk  # no bound here: not a method call per record to say so
        for at, record in enumerate(chunk):
            if not self.admits(partition, record):
                return chunk[:at]
        return chunk


async def resolve_cut(until: Until | None, source: RecordSource, store: EventStore) -> Cut:
    """The bound ``until`` resolved against ``source`` (a position becomes its event time)."""
    if until is None:
        return Cut(None)
    if until.time is not None:
        return Cut(time_ms(until.time))
    position = until.position
    assert position is not None
    if position.epoch != store.epoch:
        raise ReplaySourceError(
            f"position {position} is of epoch {position.epoch}, the log is at {store.epoch}"
        )
    partition = (store.layout.topic(position.stream), position.partition)
    async with contextlib.aclosing(source.chunks(partition, position.offset)) as chunks:
        async for chunk in chunks:
            if chunk[0].offset == position.offset:
                return Cut(chunk[0].timestamp, partition, position.offset)
            break
    raise ReplaySourceError(f"no record at position {position} in {source.name}")


class SourceSpec(msgspec.Struct, frozen=True):
    """How another process opens the same source (a replay worker): the log, or the archive
    in ``bucket`` under ``prefix``."""

    kind: Literal["kafka", "s3"]
    bucket: str = ""
    prefix: str = ""


@contextlib.asynccontextmanager
async def open_source(
    spec: SourceSpec, store: EventStore, batch: int
) -> AsyncIterator[RecordSource]:
    """The source ``spec`` names, for ``store``'s deployment; its S3 client closed after."""
    if spec.kind == "kafka":
        yield KafkaSource(store, batch=batch)
        return
    client = s3_client(store.settings)
    try:
        yield ArchiveSource(Archive(client, spec.bucket, spec.prefix), store.layout, batch=batch)
    finally:
        client.close()


class KafkaSource:
    """The records of the log, read without a consumer group."""

    name = "kafka"
    spec = SourceSpec("kafka")

    def __init__(self, store: EventStore, *, batch: int = REPLAY_BATCH) -> None:
        self._store = store
        self._batch = batch

    async def ends(self) -> dict[Partition, int]:
        return await end_offsets(self._store.settings, self._store.layout.every_partition())

    async def chunks(self, partition: Partition, start: int) -> Chunks:
        settings = self._store.settings
        consumer = range_consumer(settings, "backbone-replay")
        tp = TopicPartition(*partition)
        try:
            await consumer.start()
            consumer.assign([tp])
            consumer.seek(tp, start)
            end = (await consumer.end_offsets([tp]))[tp]
            while await consumer.position(tp) < end:
                fetched = await consumer.getmany(tp, timeout_ms=500, max_records=self._batch)
                chunk = [
                    SourceRecord(r.topic, r.partition, r.offset, r.timestamp, r.value, r.headers)
                    for r in fetched.get(tp, ())
                    if r.offset < end
                ]
                if chunk:
                    yield chunk
        except KafkaError as exc:
            raise LogUnavailable(f"Kafka unreachable: {exc}") from exc
        finally:
            await consumer.stop()


class ArchiveSource:
    """The records of the S3 archive, segment by segment (each checked against its manifest)."""

    name = "s3"

    def __init__(self, archive: Archive, layout: TopicLayout, *, batch: int = REPLAY_BATCH) -> None:
        self._archive = archive
        self._layout = layout
        self._batch = batch
        self._segments: dict[Partition, list[Manifest]] = {}
        self.spec = SourceSpec("s3", archive.bucket, archive.prefix)

    def _topic(self, archived: str) -> str | None:
        """The deployment's topic of the archived topic's role (``.users``, ``.conversations``)."""
        for stream in ("user", "conversation"):
            if archived.endswith(f".{stream}s"):
                return self._layout.topic(stream)
        return None

    async def _manifests(self) -> dict[Partition, list[Manifest]]:
        if not self._segments:
            present = await self._archive.partitions()
            started = await self._archive.started()
            topics = {t for t, _ in present} | {t for t, _ in started}
            lost, _ = absent_partitions(present, started, archived_layout(topics, self._layout))
            if lost:
                raise ReplaySourceError(
                    f"the archive s3://{self._archive.bucket}/{self._archive.prefix}/ lost "
                    + "; ".join(f"{p.topic}/{p.partition} ({p.detail})" for p in lost)
                    + ": a model built from it would miss them (backbone archive verify)"
                )
            for archived, partition in present:
                topic = self._topic(archived)
                if topic is not None:
                    found = await self._archive.segments(archived, partition)
                    self._segments[(topic, partition)] = found
        return self._segments

    async def ends(self) -> dict[Partition, int]:
        return {p: found[-1].next for p, found in (await self._manifests()).items() if found}

    async def chunks(self, partition: Partition, start: int) -> Chunks:
        topic, number = partition
        for manifest in (await self._manifests()).get(partition, []):
            if manifest.next <= start:
                continue
            records = await self._archive.read_segment(manifest)
            chunk = [
                SourceRecord(topic, number, r.offset, r.timestamp, r.value, r.headers)
                for r in records
                if r.offset >= start
            ]
            for at in range(0, len(chunk), self._batch):
                yield chunk[at : at + self._batch]


async def replay_source(
    store: EventStore,
    projector: Projector,
    source: RecordSource,
    cut: Cut,
    on_batch: Callable[[int], None],
    *,
    partitions: Collection[Partition] | None = None,
) -> None:
    """Apply ``source`` (or ``partitions`` of it) up to ``cut`` to ``projector``'s schema, from
    its stored offsets; ``on_batch`` gets each batch's record count. The next chunk is read and
    decoded while the current one is applied."""
    ends = await source.ends()
    wanted = sorted(ends if partitions is None else set(partitions) & set(ends))
    stored = await projector.positions.load(wanted)

    async def batches() -> AsyncGenerator[BuildBatch, None]:
        for partition in wanted:
            start = stored.get(partition, 0)
            if start >= ends[partition]:
                continue
            async with contextlib.aclosing(source.chunks(partition, start)) as chunks:
                async for chunk in chunks:
                    kept = cut.kept(partition, chunk)
                    if kept:
                        items = await decode_compact(
                            kept, store.layout, store.epoch, store.keyring.keys_for_read
                        )
                        span = OffsetRange(kept[0].offset, kept[-1].offset)
                        yield BuildBatch(items, {partition: span})
                    if len(kept) < len(chunk):
                        break

    async with contextlib.aclosing(batches()) as ahead:
        async for batch in read_ahead(ahead):
            await projector.handle(batch)
            on_batch(sum(span.next - span.first for span in batch.ranges.values()))


class BuildBatch(msgspec.Struct, frozen=True):
    """A batch a build applies: :class:`~eventstore.Batch`'s items and ranges, the sent
    messages among the items read compactly (:func:`~eventstore.codec.decode_compact`)."""

    items: list[Item]
    ranges: dict[Partition, OffsetRange]


async def build_batches(
    raw: AsyncIterator[Batch], store: EventStore
) -> AsyncGenerator[BuildBatch, None]:
    """The raw batches of a reader made with ``decode=False``, decoded for a build."""
    async for batch in raw:
        records = [record for records in batch.records.values() for record in records]
        keys = store.keyring.keys_for_read
        items = await decode_compact(records, store.layout, store.epoch, keys)
        yield BuildBatch(items, batch.ranges)


B = TypeVar("B")


async def _next(batches: AsyncIterator[B]) -> B | None:
    try:
        return await anext(batches)
    except StopAsyncIteration:
        return None


async def read_ahead(batches: AsyncIterator[B]) -> AsyncIterator[B]:
    """``batches``, with the next one fetched and decoded while the caller applies this one.

    Decoding is CPU work in this process, applying mostly waits for PostgreSQL (its own
    process): overlapping the two keeps both busy on a replay.
    """
    pending = asyncio.ensure_future(_next(batches))
    try:
        while (batch := await pending) is not None:
            pending = asyncio.ensure_future(_next(batches))
            yield batch
    finally:
        pending.cancel()
        await asyncio.gather(pending, return_exceptions=True)
