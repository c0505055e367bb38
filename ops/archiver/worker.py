"""The archiver worker: a consumer-group member writing the log to S3 segments.

It joins the group ``<topic prefix>.archiver``; any number of workers share the partitions.
Records arrive raw (never decoded: the archiver needs neither the key store nor PostgreSQL)
and are buffered per partition until a segment is full (``segment_records`` records or
``segment_bytes`` bytes) or its first record has waited ``flush_seconds``; then the segment is
written (:meth:`eventstore.archive.Archive.append`).

Positions live in the archive itself: on every assignment the reader asks :meth:`Archiver.load`,
which reads (and repairs, after a crash between a segment and its manifest) the chain's tail in
S3 and drops anything buffered for the partition, so the reader resumes right after the last
segment written: no gap, no overlap. A body a crash left without manifest is adopted only when
the log holds exactly its records at its offsets (:func:`kafka_records`); one written from
another log (before a restore, or a replaced cluster) is moved to the archive's quarantine and
those offsets are archived again from this log. A partition that moved to another member is dropped
from the buffers before anything is written for it. Segments are written in the background
while the reader fetches on (see :meth:`Archiver.flush`); before a partition moves to another
member, and before the worker exits on SIGTERM/SIGINT, the writes in flight finish. Records
buffered but not yet in a segment being written are simply read again by the next owner.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Final, cast

import structlog
from aiohttp import web
from aiokafka import TopicPartition
from aiokafka.errors import KafkaError
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest

from eventstore import (
    Batch,
    ConfigError,
    EventStoreError,
    GroupReader,
    LogEnds,
    LogUnavailable,
    Settings,
)
from eventstore.archive import (
    Archive,
    ArchiveConfig,
    ArchivedRecord,
    ChainHead,
    KafkaRecord,
    LogRecords,
)
from eventstore.ends import range_consumer
from eventstore.objects import s3_client
from eventstore.runtime import serve_member

log = structlog.get_logger(__name__)

Partition = tuple[str, int]

METRICS_PORT_VARIABLE: Final = "BACKBONE_ARCHIVER_METRICS_PORT"
METRICS_HOST_VARIABLE: Final = "BACKBONE_ARCHIVER_METRICS_HOST"
WORKER_INDEX_VARIABLE: Final = "BACKBONE_WORKER_INDEX"
_LAG_INTERVAL: Final = 5.0
_CHECK_SECONDS: Final = 60.0
"""The longest reading a pending body's offsets back from the log may take."""
PENDING_SEGMENTS: Final = 8
"""Segments' worth of bytes (``segment_bytes`` each) the archiver writes at once, at most."""

LAG = Gauge(
    "backbone_archiver_lag",
    "Records in the log not yet in an archived segment (log end - next offset), per partition.",
    ["topic", "partition"],
)
ARCHIVED_OFFSET = Gauge(
    "backbone_archiver_last_offset",
    "Last offset in an archived segment, per partition.",
    ["topic", "partition"],
)
SEGMENTS = Counter("backbone_archiver_segments_total", "Segments written.")
RECORDS = Counter("backbone_archiver_records_total", "Records written in segments.")
SEGMENT_SECONDS = Histogram(
    "backbone_archiver_segment_seconds",
    "Time to encode and write one segment and its manifest.",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)


def group_id(settings: Settings) -> str:
    return f"{settings.topic_prefix}.archiver"


def instance_id(settings: Settings, env: Mapping[str, str]) -> str | None:
    """A static member id from ``BACKBONE_WORKER_INDEX``: a restarted worker takes its
    partitions back at once instead of waiting out its dead predecessor's session."""
    index = env.get(WORKER_INDEX_VARIABLE, "").strip()
    return f"{group_id(settings)}-{index}" if index else None


class _Buffer:
    """Records of one partition waiting for their segment."""

    def __init__(self, started: float) -> None:
        self.started = started
        self.records: list[ArchivedRecord] = []
        self.sizes: list[int] = []  # each record's size, computed once
        self.size = 0

    def add(self, records: Iterable[ArchivedRecord]) -> None:
        for record in records:
            size = record.size()
            self.records.append(record)
            self.sizes.append(size)
            self.size += size

    def take(self, max_records: int, max_bytes: int) -> tuple[list[ArchivedRecord], int]:
        """The first records up to either bound (at least one), and their size."""
        taken, size = 0, 0
        for record_size in self.sizes:
            if taken and (taken >= max_records or size + record_size > max_bytes):
                break
            taken += 1
            size += record_size
        chunk, self.records = self.records[:taken], self.records[taken:]
        self.sizes = self.sizes[taken:]
        self.size -= size
        return chunk, size


class Archiver:
    """Turns raw batches into segments; also the reader's position store (see module doc)."""

    def __init__(
        self,
        archive: Archive,
        config: ArchiveConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        log_records: LogRecords | None = None,
    ) -> None:
        """``log_records``: reads the log's records at given offsets; a body whose manifest
        a crash did not write is adopted only when it holds exactly those (the worker always
        passes :func:`kafka_records`)."""
        self.archive = archive
        self._log_records = log_records
        self._config = config
        self._clock = clock
        self._heads: dict[Partition, ChainHead] = {}
        self._buffers: dict[Partition, _Buffer] = {}
        self._lanes: dict[Partition, asyncio.Task[None]] = {}
        """Per partition, its last segment write in flight (each awaits the one before)."""
        self._pending = 0
        """Bytes of records in segments being written."""
        self._max_pending = PENDING_SEGMENTS * config.segment_bytes
        self._failure: BaseException | None = None
        self.owned: Callable[[], set[Partition]] = lambda: set(self._heads)
        """The partitions this member holds now (the worker points it at the reader's)."""

    @property
    def heads(self) -> Mapping[Partition, ChainHead]:
        return self._heads

    async def load(self, partitions: Sequence[Partition]) -> dict[Partition, int]:
        """Next offset to archive per partition, from the archive (repairing its tail)."""
        await self.release(partitions)  # the tail is read once our own writes have landed
        stored: dict[Partition, int] = {}
        for partition in partitions:
            head = await self.archive.recover(*partition, log_records=self._log_records)
            self._heads[partition] = head
            # Whatever was buffered is read again from the head: never twice in a segment.
            self._buffers.pop(partition, None)
            if head.next is not None:
                stored[partition] = head.next
                ARCHIVED_OFFSET.labels(partition[0], str(partition[1])).set(head.next - 1)
        return stored

    async def release(self, partitions: Iterable[Partition] | None = None) -> None:
        """Wait until the segments in flight (of ``partitions``, default all) are written or
        have failed. The reader calls it before a partition moves to another member, so the new
        owner finds the chain's tail where this member left it."""
        wanted = None if partitions is None else set(partitions)
        lanes = [t for p, t in self._lanes.items() if wanted is None or p in wanted]
        await asyncio.gather(*lanes, return_exceptions=True)

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise self._failure

    async def handle(self, batch: Batch) -> None:
        self._raise_failure()
        now = self._clock()
        for partition, records in batch.records.items():
            buffer = self._buffers.get(partition)
            if buffer is None:
                buffer = self._buffers[partition] = _Buffer(now)
            # aiokafka's ConsumerRecord carries key and timestamp too (RecordLike omits them).
            buffer.add(ArchivedRecord.of(r) for r in cast(Sequence[KafkaRecord], records))
        await self.flush()

    async def flush(self, *, everything: bool = False) -> int:
        """Start writing the segments that are due (all buffered records with ``everything``,
        which also waits for every write); the number started.

        Writes run in the background, so the reader fetches the next records while segments
        are encoded (compression runs in a thread without the GIL) and stored: each partition's
        segments in order, one after another (a chain), partitions side by side. At most
        ``PENDING_SEGMENTS`` segments' worth of bytes are in flight; beyond that this waits. A
        failed write fails every later segment of its partition and is raised here (or by the
        next batch): the worker stops, and the next owner resumes from the chain's tail.
        """
        self._raise_failure()
        owned = self.owned()
        config = self._config

        def due(buffer: _Buffer) -> bool:
            return bool(buffer.records) and (
                everything
                or len(buffer.records) >= config.segment_records
                or buffer.size >= config.segment_bytes
                or self._clock() - buffer.started >= config.flush_seconds
            )

        started = 0
        for partition in list(self._buffers):
            buffer = self._buffers[partition]
            if partition not in owned or partition not in self._heads:
                del self._buffers[partition]
                continue
            while due(buffer):
                self._start(partition, *buffer.take(config.segment_records, config.segment_bytes))
                started += 1
                buffer.started = self._clock()
            if not buffer.records:
                del self._buffers[partition]
        if everything:
            await self.release()
        while self._pending > self._max_pending and self._failure is None:
            await asyncio.wait(self._lanes.values(), return_when=asyncio.FIRST_COMPLETED)
        self._raise_failure()
        return started

    def _start(self, partition: Partition, records: list[ArchivedRecord], size: int) -> None:
        task = asyncio.create_task(self._after(self._lanes.get(partition), partition, records))
        self._lanes[partition] = task
        self._pending += size

        def done(task: asyncio.Task[None]) -> None:
            self._pending -= size
            if self._lanes.get(partition) is task:
                del self._lanes[partition]
            if not task.cancelled() and (exc := task.exception()) is not None:
                self._failure = self._failure or exc

        task.add_done_callback(done)

    async def _after(
        self,
        previous: asyncio.Task[None] | None,
        partition: Partition,
        records: list[ArchivedRecord],
    ) -> None:
        if previous is not None:
            await previous  # its failure is this segment's: the chain must not skip one
        await self._write(partition, records)

    async def _write(self, partition: Partition, records: list[ArchivedRecord]) -> None:
        topic, number = partition
        began = time.perf_counter()
        head, manifest = await self.archive.append(topic, number, self._heads[partition], records)
        self._heads[partition] = head
        SEGMENT_SECONDS.observe(time.perf_counter() - began)
        SEGMENTS.inc()
        RECORDS.inc(manifest.count)
        ARCHIVED_OFFSET.labels(topic, str(number)).set(manifest.last)
        log.debug("archiver.segment", topic=topic, partition=number, last=manifest.last)

    async def idle(self) -> None:
        """Called when a poll brought nothing: write the segments that waited long enough."""
        await self.flush()


def kafka_records(settings: Settings) -> LogRecords:
    """Reads a partition's records at offsets ``first`` .. ``last`` from the log (as the
    archiver's reader gets them: read-committed), for checking a body before adopting it."""

    async def read(topic: str, partition: int, first: int, last: int) -> list[ArchivedRecord]:
        consumer = range_consumer(settings, "backbone-archiver-check")
        tp = TopicPartition(topic, partition)
        found: list[ArchivedRecord] = []
        try:
            await consumer.start()
            consumer.assign([tp])
            start = (await consumer.beginning_offsets([tp]))[tp]
            end = min((await consumer.end_offsets([tp]))[tp], last + 1)
            if start > first or end <= first:
                return found  # the log does not hold the first of those offsets
            consumer.seek(tp, first)
            async with asyncio.timeout(_CHECK_SECONDS):
                while await consumer.position(tp) < end:
                    fetched = await consumer.getmany(tp, timeout_ms=500)
                    found.extend(
                        ArchivedRecord.of(r) for r in fetched.get(tp, ()) if first <= r.offset < end
                    )
        except (KafkaError, TimeoutError) as exc:
            raise LogUnavailable(
                f"Kafka at {settings.kafka_bootstrap}: reading {topic}/{partition} offsets "
                f"{first}..{last}: {exc or type(exc).__name__}"
            ) from exc
        finally:
            await consumer.stop()
        return found

    return read


async def never_decrypts(subjects: Iterable[uuid.UUID], /) -> dict[uuid.UUID, AESGCM | None]:
    raise RuntimeError("the archiver reads raw records and never decrypts")


def metrics_port(env: Mapping[str, str]) -> int:
    """``BACKBONE_ARCHIVER_METRICS_PORT`` (0, the default, serves nothing)."""
    raw = env.get(METRICS_PORT_VARIABLE, "").strip() or "0"
    if not raw.isdigit() or int(raw) > 65535:
        raise ConfigError(f"{METRICS_PORT_VARIABLE}={raw!r} is not a port number")
    return int(raw)


async def _track_lag(reader: GroupReader, archiver: Archiver, ends: LogEnds) -> None:
    while True:
        owned = sorted(reader.assignment)
        try:
            if owned:
                for (topic, partition), end in (await ends.end_offsets(owned)).items():
                    head = archiver.heads.get((topic, partition))
                    done = head.next if head is not None and head.next is not None else 0
                    LAG.labels(topic, str(partition)).set(max(end - done, 0))
        except (EventStoreError, OSError) as exc:
            log.warning("archiver.lag_unknown", error=str(exc))
        await asyncio.sleep(_LAG_INTERVAL)


def _http_app(reader: GroupReader) -> web.Application:
    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "partitions": len(reader.assignment)})

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    return app


async def run(
    settings: Settings, config: ArchiveConfig, env: Mapping[str, str] | None = None
) -> None:
    """Archive the log until SIGTERM/SIGINT (then stop once the segments in flight are
    written)."""
    env = os.environ if env is None else env
    port = metrics_port(env)
    client = s3_client(settings)
    try:
        archiver = Archiver(
            Archive(client, config.bucket, config.prefix),
            config,
            log_records=kafka_records(settings),
        )
        reader = _reader(settings, archiver, member=instance_id(settings, env))
        try:
            await _serve(settings, env, port, reader, archiver, config)
        finally:
            await archiver.release()
    finally:
        await asyncio.to_thread(client.close)


def _reader(
    settings: Settings,
    archiver: Archiver,
    *,
    member: str | None = None,
    max_records: int = 5000,
) -> GroupReader:
    """The archiver's group member: raw records of both topics, positions from the archive."""
    reader = GroupReader(
        settings,
        group_id=group_id(settings),
        streams=("user", "conversation"),
        positions=archiver,
        handler=archiver.handle,
        keys=never_decrypts,
        epoch=0,
        instance_id=member,
        decode=False,
        on_idle=archiver.idle,
        on_revoked=archiver.release,
        max_records=max_records,
    )
    archiver.owned = lambda: reader.assignment
    return reader


async def _serve(
    settings: Settings,
    env: Mapping[str, str],
    port: int,
    reader: GroupReader,
    archiver: Archiver,
    config: ArchiveConfig,
) -> None:
    await serve_member(
        reader,
        settings,
        name="archiver",
        http=_http_app(reader),
        host=env.get(METRICS_HOST_VARIABLE, "127.0.0.1"),
        port=port,
        track_lag=lambda ends: _track_lag(reader, archiver, ends),
        group=group_id(settings),
        bucket=config.bucket,
        prefix=config.prefix,
    )


async def archive_until(
    settings: Settings,
    archive: Archive,
    config: ArchiveConfig,
    ends: Mapping[tuple[str, int], int],
    *,
    max_records: int = 5000,
) -> None:
    """Run an archiver in this process until every partition's chain reaches ``ends``.

    For benchmarks and tests: the same :class:`Archiver` the tier runs, as a group member of
    its own (``<prefix>.archiver``), stopped once the archive holds the log up to ``ends``.
    """
    archiver = Archiver(archive, config, log_records=kafka_records(settings))
    reader = _reader(settings, archiver, max_records=max_records)
    wanted = {p: end for p, end in ends.items() if end}
    task = asyncio.create_task(reader.run())
    try:
        while True:
            if task.done():
                task.result()
            heads = archiver.heads
            if all((h := heads.get(p)) is not None and h.next == e for p, e in wanted.items()):
                return
            await asyncio.sleep(0.05)
    finally:
        reader.stop()
        await task
        await archiver.release()
