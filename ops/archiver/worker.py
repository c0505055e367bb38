"""The archiver worker: a consumer-group member writing the log to S3 segments.

It joins the group ``<topic prefix>.archiver``; any number of workers share the partitions.
Records arrive raw (never decoded: the archiver needs neither the key store nor PostgreSQL)
and are buffered per partition until a segment is full (``segment_records`` records or
``segment_bytes`` bytes) or its first record has waited ``flush_seconds``; then the segment is
written (:meth:`eventstore.archive.Archive.append`).

Positions live in the archive itself: on every assignment the reader asks :meth:`Archiver.load`,
which reads (and repairs, after a crash between a segment and its manifest) the chain's tail in
S3 and drops anything buffered for the partition, so the reader resumes right after the last
segment written: no gap, no overlap. A partition that moved to another member is dropped
from the buffers before anything is written for it. SIGTERM/SIGINT stop the worker after the
segment in flight; records buffered but not yet written are simply read again by the next
owner.
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
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest

from eventstore import Batch, ConfigError, EventStoreError, GroupReader, LogEnds, Settings
from eventstore.archive import (
    Archive,
    ArchiveConfig,
    ArchivedRecord,
    ChainHead,
    KafkaRecord,
)
from eventstore.objects import s3_client
from eventstore.runtime import serve_member

log = structlog.get_logger(__name__)

Partition = tuple[str, int]

METRICS_PORT_VARIABLE: Final = "BACKBONE_ARCHIVER_METRICS_PORT"
METRICS_HOST_VARIABLE: Final = "BACKBONE_ARCHIVER_METRICS_HOST"
WORKER_INDEX_VARIABLE: Final = "BACKBONE_WORKER_INDEX"
_LAG_INTERVAL: Final = 5.0

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

    def take(self, max_records: int, max_bytes: int) -> list[ArchivedRecord]:
        """The first records up to either bound (at least one)."""
        taken, size = 0, 0
        for record_size in self.sizes:
            if taken and (taken >= max_records or size + record_size > max_bytes):
                break
            taken += 1
            size += record_size
        chunk, self.records = self.records[:taken], self.records[taken:]
        self.sizes = self.sizes[taken:]
        self.size -= size
        return chunk


class Archiver:
    """Turns raw batches into segments; also the reader's position store (see module doc)."""

    def __init__(
        self,
        archive: Archive,
        config: ArchiveConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.archive = archive
        self._config = config
        self._clock = clock
        self._heads: dict[Partition, ChainHead] = {}
        self._buffers: dict[Partition, _Buffer] = {}
        self.owned: Callable[[], set[Partition]] = lambda: set(self._heads)
        """The partitions this member holds now (the worker points it at the reader's)."""

    @property
    def heads(self) -> Mapping[Partition, ChainHead]:
        return self._heads

    async def load(self, partitions: Sequence[Partition]) -> dict[Partition, int]:
        """Next offset to archive per partition, from the archive (repairing its tail)."""
        stored: dict[Partition, int] = {}
        for partition in partitions:
            head = await self.archive.recover(*partition)
            self._heads[partition] = head
            # Whatever was buffered is read again from the head: never twice in a segment.
            self._buffers.pop(partition, None)
            if head.next is not None:
                stored[partition] = head.next
                ARCHIVED_OFFSET.labels(partition[0], str(partition[1])).set(head.next - 1)
        return stored

    async def handle(self, batch: Batch) -> None:
        now = self._clock()
        for partition, records in batch.records.items():
            buffer = self._buffers.get(partition)
            if buffer is None:
                buffer = self._buffers[partition] = _Buffer(now)
            # aiokafka's ConsumerRecord carries key and timestamp too (RecordLike omits them).
            buffer.add(ArchivedRecord.of(r) for r in cast(Sequence[KafkaRecord], records))
        await self.flush()

    async def flush(self, *, everything: bool = False) -> int:
        """Write the segments that are due (all buffered records with ``everything``).

        Partitions are written concurrently (each chain in its own order): a segment is three
        S3 round trips, and one partition after another left the archiver waiting on them.
        """
        owned = self.owned()
        config = self._config

        def due(buffer: _Buffer) -> bool:
            return bool(buffer.records) and (
                everything
                or len(buffer.records) >= config.segment_records
                or buffer.size >= config.segment_bytes
                or self._clock() - buffer.started >= config.flush_seconds
            )

        async def drain(partition: Partition, buffer: _Buffer) -> int:
            written = 0
            while due(buffer):
                chunk = buffer.take(config.segment_records, config.segment_bytes)
                await self._write(partition, chunk)
                written += 1
                buffer.started = self._clock()
            return written

        work: list[tuple[Partition, _Buffer]] = []
        for partition in list(self._buffers):
            buffer = self._buffers[partition]
            if partition not in owned or partition not in self._heads:
                del self._buffers[partition]
            elif due(buffer):
                work.append((partition, buffer))
        outcomes = await asyncio.gather(*(drain(p, b) for p, b in work), return_exceptions=True)
        for partition, buffer in work:
            if not buffer.records:
                self._buffers.pop(partition, None)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome  # the first failure, once every partition has stopped
        return sum(o for o in outcomes if isinstance(o, int))

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
    """Archive the log until SIGTERM/SIGINT (then stop after the segment in flight)."""
    env = os.environ if env is None else env
    port = metrics_port(env)
    client = s3_client(settings)
    try:
        archiver = Archiver(Archive(client, config.bucket, config.prefix), config)
        reader = _reader(settings, archiver, member=instance_id(settings, env))
        await _serve(settings, env, port, reader, archiver, config)
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
    archiver = Archiver(archive, config)
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
