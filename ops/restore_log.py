"""``backbone restore-log --from s3``: re-publish the S3 archive into empty event topics.

For a lost or replaced Kafka cluster (or deleted topics). The steps, each of which must pass
before the next starts:

1. **Verify the archive.** Every hash chain is recomputed (as ``backbone archive verify``
   does); a damaged archive (missing, altered, reordered, extra segment, broken link) is
   refused, naming each problem. A body without manifest at a chain's tail (an archiver
   that died between its two writes) is not part of the chain and is not restored: before
   anything is published it is moved to the archive's quarantine
   (``<prefix>/_quarantine/<time>/...``, never deleted) and reported, so that the archiver,
   restarted on the restored log, does not adopt it in place of the records the restored log
   gets at those offsets.
2. **Check the targets.** The deployment's event topics (``<topic prefix>.users`` and
   ``.conversations``; the archive's topics are mapped to them by role, so an archive can be
   restored under another prefix) must be absent or empty, with the layout's partition
   counts. Missing topics are created (:func:`eventstore.provision_topics`). The archive
   cannot know how many partitions a topic had when the last ones were empty, so the counts
   come from the settings (``BACKBONE_USER_PARTITIONS`` / ``_CONVERSATION_PARTITIONS``), and a
   setting smaller than the archive's highest partition is refused.
3. **Publish.** Every partition's records, in order, to that same partition, with their keys,
   values, headers and timestamps (as ``CreateTime``: the topics keep the producer's
   timestamp), through one idempotent ``acks=all`` producer, in record batches built here;
   partitions go in parallel, each with a bounded number of batches in flight, and the next
   segment is read from S3 while the current one is sent.
4. **Verify the restore.** Record counts per partition, then the topics are read back and a
   sha256 per partition over every record's (timestamp, key, value, headers) is compared
   with the same digest over the archive. Offsets: Kafka numbers the restored records
   0..n-1; they equal the archived offsets when the chain starts at 0 without holes (a
   verified chain does, unless the archive began later); anything else is reported.
5. **Bump the epoch** in PostgreSQL (``log_meta``): positions of the old log are not
   positions of this one, so clients holding old cursors are told to resync.
6. **Announce** ``{"epoch": N}`` on the Redis channel ``<topic prefix>:epoch``
   (:func:`eventstore.epoch.epoch_channel`); the fan-out tier closes sockets of an older epoch
   with code 4009.

*Safety.* Nothing is written unless every target partition is empty, so a rerun never
duplicates records. If a run dies while publishing, the topics hold a prefix of the archive:
the rerun refuses and says to delete the partially restored topics first. If it dies after
publishing (before the epoch moved), the topics hold exactly the archive: the rerun says so,
and ``--finish`` then verifies them and performs steps 5-6 only. Stop every writer (ingest)
before restoring: records written meanwhile would interleave with the restored ones. Stop
the archiver too (it would be writing the tail this moves) and start it after: it continues
each chain on the restored log (and quarantines any tail body the log does not hold).

Exit status 0 when restored, 1 when refused (damaged archive, topics not empty, a restore
that does not verify), 2 when a part cannot be reached or is misconfigured.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import sys
import time
from collections.abc import Awaitable, Iterable, Mapping, Sequence
from typing import Any, Final, TypeVar

import msgspec
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError
from aiokafka.partitioner import murmur2
from redis.asyncio import Redis
from redis.exceptions import RedisError

from eventstore import (
    ConfigError,
    EventStoreError,
    LogUnavailable,
    RecordRejected,
    Settings,
    TopicLayout,
    bump_epoch,
    create_pool,
    provision_topics,
    read_epoch,
)
from eventstore.archive import (
    Archive,
    ArchiveConfig,
    ArchivedRecord,
    Manifest,
    Verification,
    verify_archive,
)
from eventstore.epoch import epoch_channel
from eventstore.objects import s3_client
from eventstore.runtime import run_command
from ops.archive_cli import command_archive_config
from ops.deployment import command_settings
from schemas.events import StreamKind

Partition = tuple[str, int]

_READY_TIMEOUT: Final = 30.0
_ENTRY = msgspec.msgpack.Encoder()
_STREAMS: Final[tuple[StreamKind, ...]] = ("user", "conversation")
T = TypeVar("T")


class RestoreError(EventStoreError):
    """The log cannot be restored as asked; the message says why and what to do."""


class ArchiveDamaged(RestoreError):
    """The archive's chains do not verify: restoring it would publish a damaged log."""


class TargetNotEmpty(RestoreError):
    """A target topic already holds records; nothing was written."""


class AlreadyRestored(TargetNotEmpty):
    """The target topics already hold exactly the archive (a run that died after publishing)."""


class RestoreMismatch(RestoreError):
    """The restored topics do not hold what the archive holds."""


class PublishFailed(RestoreError):
    """Publishing stopped part-way: the topics hold part of the archive."""

    retriable = True


# --- the pure core -------------------------------------------------------------------------


def record_entry(
    timestamp: int, key: bytes | None, value: bytes | None, headers: Iterable[tuple[str, bytes]]
) -> bytes:
    """One record as it enters a partition digest (msgpack: self-delimiting, unambiguous)."""
    return _ENTRY.encode((timestamp, key, value, [(name, data) for name, data in headers]))


class PartitionDigest:
    """The sha256 over a partition's records in order, their count and offsets."""

    def __init__(self) -> None:
        self._sha = hashlib.sha256()
        self.count = 0
        self.first: int | None = None
        self.last: int | None = None
        self.contiguous = True
        """Every offset is the previous one plus one."""

    def add(
        self,
        offset: int,
        timestamp: int,
        key: bytes | None,
        value: bytes | None,
        headers: Iterable[tuple[str, bytes]],
    ) -> None:
        self._sha.update(record_entry(timestamp, key, value, headers))
        if self.last is not None and offset != self.last + 1:
            self.contiguous = False
        if self.first is None:
            self.first = offset
        self.last = offset
        self.count += 1

    def hexdigest(self) -> str:
        return self._sha.hexdigest()


def placed_partition(key: bytes, partitions: int) -> int:
    """Where Kafka's default partitioner (and the event store) puts a record with ``key``."""
    return int((murmur2(key) & 0x7FFFFFFF) % partitions)


class KeyPlacement:
    """Checks that a partition's keys belong there under the layout's partition count.

    Restoring into another count would leave each stream's old events in one partition and
    send its new ones to another: its order would be lost. The archive cannot say how many
    partitions a topic had (trailing ones may have stayed empty), so the keys tell.
    """

    def __init__(self, plan: PartitionPlan, partitions: int) -> None:
        self._plan = plan
        self._partitions = partitions
        self._seen: set[bytes] = set()

    def check(self, key: bytes | None) -> None:
        if key is None or key in self._seen:
            return
        placed = placed_partition(key, self._partitions)
        if placed != self._plan.partition:
            raise ConfigError(
                f"{self._plan.source}/{self._plan.partition} holds key {key!r}, which "
                f"{self._partitions} partitions would place in partition {placed}: the "
                f"archived deployment had another partition count; set "
                f"BACKBONE_{self._plan.stream.upper()}_PARTITIONS to it"
            )
        self._seen.add(key)


class PartitionPlan(msgspec.Struct, frozen=True):
    """Where one archived partition goes."""

    source: str
    """The topic name in the archive."""
    topic: str
    """The target topic."""
    stream: StreamKind
    partition: int
    partitions: int
    """The target topic's partition count."""
    records: int
    """Records in the verified chain."""

    @property
    def target(self) -> Partition:
        return (self.topic, self.partition)


def target_partitions(layout: TopicLayout) -> list[Partition]:
    """Every partition of the deployment's event topics."""
    return [(layout.topic(s), p) for s in _STREAMS for p in range(layout.partitions(s))]


def describe_problems(verification: Verification, limit: int = 10) -> str:
    fatal = [p for p in verification.problems if p.kind != "pending"]
    lines = [f"{p.kind} {p.topic}/{p.partition}/{p.name}: {p.detail}" for p in fatal[:limit]]
    if len(fatal) > limit:
        lines.append(f"... and {len(fatal) - limit} more (backbone archive verify lists all)")
    return "; ".join(lines)


def plan_restore(verification: Verification, layout: TopicLayout) -> list[PartitionPlan]:
    """Map every verified chain to a partition of the deployment's topics.

    :class:`ArchiveDamaged` when a chain does not verify, :class:`RestoreError` when the
    archive is empty or holds foreign topics, :class:`ConfigError` when the layout has fewer
    partitions than the archive.
    """
    if not verification.ok:
        raise ArchiveDamaged(
            "the archive does not verify, refusing to restore it: "
            + describe_problems(verification)
        )
    chains = [c for c in verification.chains if c.segments]
    if not chains:
        raise RestoreError("the archive holds no segment: nothing to restore")
    sources: dict[StreamKind, str] = {}
    plans: list[PartitionPlan] = []
    for chain in chains:
        stream = next((s for s in _STREAMS if chain.topic.endswith(f".{s}s")), None)
        if stream is None:
            raise RestoreError(f"the archive holds {chain.topic!r}, which is no event topic")
        if sources.setdefault(stream, chain.topic) != chain.topic:
            raise RestoreError(
                f"the archive holds two {stream} topics ({sources[stream]}, {chain.topic}); "
                "choose one with --prefix"
            )
        if chain.partition >= layout.partitions(stream):
            variable = f"BACKBONE_{stream.upper()}_PARTITIONS"
            raise ConfigError(
                f"the archive has partition {chain.partition} of {chain.topic}, but "
                f"{variable}={layout.partitions(stream)}; set it to the archived deployment's count"
            )
        plans.append(
            PartitionPlan(
                chain.topic,
                layout.topic(stream),
                stream,
                chain.partition,
                layout.partitions(stream),
                chain.records,
            )
        )
    return sorted(plans, key=lambda p: p.target)


# --- results -------------------------------------------------------------------------------


class PartitionResult(msgspec.Struct, frozen=True):
    topic: str
    partition: int
    records: int
    sha256: str
    archived_first: int | None
    archived_last: int | None
    offsets_preserved: bool
    """The restored offsets equal the archived ones (the chain starts at 0, has no holes)."""


class RestoreResult(msgspec.Struct, frozen=True):
    bucket: str
    prefix: str
    topics: dict[str, int]
    """Target topic -> partition count."""
    created: list[str]
    published: bool
    """False under ``--finish`` (the topics already held the archive)."""
    records: int
    publish_seconds: float
    verify_seconds: float
    partitions: list[PartitionResult]
    offsets_preserved: bool
    pending: list[str]
    """Tail bodies without manifest (``topic/partition/name``): not restored."""
    quarantined: list[str]
    """Where each of ``pending`` was moved (its key in the bucket), in the same order."""
    previous_epoch: int
    epoch: int
    channel: str
    subscribers: int
    """Redis clients that received the epoch announcement."""

    @property
    def rate(self) -> float:
        return self.records / self.publish_seconds if self.publish_seconds > 0 else 0.0


# --- Kafka shells --------------------------------------------------------------------------


def _kafka_failed(exc: BaseException, settings: Settings) -> LogUnavailable:
    return LogUnavailable(f"Kafka at {settings.kafka_bootstrap}: {exc or type(exc).__name__}")


async def existing_partitions(settings: Settings, topics: Sequence[str]) -> dict[str, int]:
    """Partition count of each of ``topics`` that exists."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    try:
        await admin.start()
        found = await admin.describe_topics(list(topics))
    except KafkaError as exc:
        raise _kafka_failed(exc, settings) from exc
    finally:
        await admin.close()
    return {
        t["topic"]: len(t["partitions"])
        for t in found
        if t.get("error_code", 0) == 0 and t["partitions"]
    }


def _consumer(settings: Settings) -> AIOKafkaConsumer:
    return AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap,
        group_id=None,
        client_id="backbone-restore",
        enable_auto_commit=False,
        isolation_level="read_committed",
        max_partition_fetch_bytes=4 * 1024 * 1024,
        fetch_max_bytes=32 * 1024 * 1024,
    )


async def end_offsets(settings: Settings, partitions: Sequence[Partition]) -> dict[Partition, int]:
    consumer = _consumer(settings)
    try:
        await consumer.start()
        ends = await consumer.end_offsets([TopicPartition(t, p) for t, p in partitions])
    except KafkaError as exc:
        raise _kafka_failed(exc, settings) from exc
    finally:
        await consumer.stop()
    return {(tp.topic, tp.partition): end for tp, end in ends.items()}


async def read_digests(
    settings: Settings, partitions: Sequence[Partition]
) -> dict[Partition, PartitionDigest]:
    """Read ``partitions`` from their beginning to their end as of now; digest each."""
    digests = {p: PartitionDigest() for p in partitions}
    consumer = _consumer(settings)
    try:
        await consumer.start()
        assigned = [TopicPartition(t, p) for t, p in partitions]
        consumer.assign(assigned)
        await consumer.seek_to_beginning(*assigned)
        ends = await consumer.end_offsets(assigned)
        remaining = {tp for tp in assigned if ends[tp] > 0}
        while remaining:
            batch = await consumer.getmany(*remaining, timeout_ms=500, max_records=20_000)
            for tp, records in batch.items():
                digest = digests[(tp.topic, tp.partition)]
                for r in records:
                    if r.offset < ends[tp]:
                        digest.add(r.offset, r.timestamp, r.key, r.value, r.headers)
            for tp in list(remaining):
                if await consumer.position(tp) >= ends[tp]:
                    remaining.discard(tp)
    except KafkaError as exc:
        raise _kafka_failed(exc, settings) from exc
    finally:
        await consumer.stop()
    return digests


async def ensure_topics(settings: Settings, layout: TopicLayout) -> list[str]:
    """Create the missing event topics and wait until every partition has a leader."""
    created = await provision_topics(settings.kafka_bootstrap, layout)
    wanted = {layout.topic(s): layout.partitions(s) for s in _STREAMS}
    deadline = time.monotonic() + _READY_TIMEOUT
    # A topic deleted just before may still be going away: creating it again reports
    # "already exists" until it is gone, so provision again until both are really there.
    while (await existing_partitions(settings, list(wanted))) != wanted:
        if time.monotonic() > deadline:
            raise LogUnavailable(f"the topics {sorted(wanted)} did not become ready in time")
        await asyncio.sleep(0.5)
        created += await provision_topics(settings.kafka_bootstrap, layout)
    return sorted(set(created))


# --- reading the archive and publishing ----------------------------------------------------


class PartitionWriter:
    """Appends one partition's records to the log in order, as whole record batches.

    Batches are built here (aiokafka's ``create_batch``/``send_batch``) rather than record by
    record through ``send``, which costs a future and a coroutine per record. The accumulator
    queues one batch per partition at a time, so batches of a partition are written in the
    order they are submitted; at most ``in_flight`` of them await their acknowledgement.
    """

    def __init__(
        self, producer: AIOKafkaProducer, topic: str, partition: int, *, in_flight: int = 8
    ) -> None:
        self._producer = producer
        self._topic = topic
        self._partition = partition
        self._in_flight = in_flight
        self._batch: Any = None
        self._pending: list[asyncio.Future[Any]] = []

    def _append(self, record: ArchivedRecord) -> bool:
        if self._batch is None:
            self._batch = self._producer.create_batch()
        metadata = self._batch.append(
            timestamp=record.timestamp, key=record.key, value=record.value, headers=record.headers
        )
        return metadata is not None

    async def add(self, record: ArchivedRecord) -> None:
        if self._append(record):
            return
        await self._submit()
        if not self._append(record):
            raise RecordRejected(
                f"{self._topic}/{self._partition}: the record archived at offset "
                f"{record.offset} is larger than a producer batch"
            )

    async def _submit(self) -> None:
        batch, self._batch = self._batch, None
        if batch is None:
            return
        future = await self._producer.send_batch(batch, self._topic, partition=self._partition)
        self._pending.append(future)
        if len(self._pending) >= self._in_flight:
            await self._settle()

    async def _settle(self) -> None:
        pending, self._pending = self._pending, []
        try:
            await asyncio.gather(*pending)
        finally:
            for future in pending:
                # Retrieve every outcome, so none is reported as never retrieved.
                future.add_done_callback(lambda f: f.cancelled() or f.exception())

    async def flush(self) -> None:
        """Submit the open batch and wait for every acknowledgement."""
        await self._submit()
        await self._settle()


async def stream_partition(
    archive: Archive, plan: PartitionPlan, writer: PartitionWriter | None
) -> PartitionDigest:
    """Every record of one archived partition in order, digested (and written, given
    ``writer``). The next segment is fetched from S3 while the current one is written."""
    digest = PartitionDigest()
    placement = KeyPlacement(plan, plan.partitions)
    manifests: list[Manifest] = await archive.segments(plan.source, plan.partition)
    ahead: asyncio.Task[list[ArchivedRecord]] | None = None
    try:
        if manifests:
            ahead = asyncio.create_task(archive.read_segment(manifests[0]))
        for index in range(len(manifests)):
            assert ahead is not None
            records = await ahead
            ahead = None
            if index + 1 < len(manifests):
                ahead = asyncio.create_task(archive.read_segment(manifests[index + 1]))
            for record in records:
                placement.check(record.key)
                digest.add(
                    record.offset, record.timestamp, record.key, record.value, record.headers
                )
                if writer is not None:
                    await writer.add(record)
        if writer is not None:
            await writer.flush()
    finally:
        if ahead is not None:
            ahead.cancel()
    return digest


async def all_or_nothing(jobs: Iterable[Awaitable[T]]) -> list[T]:
    """Run ``jobs`` concurrently; the first failure cancels the others and is raised."""
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(_awaited(job)) for job in jobs]
    except BaseExceptionGroup as failed:
        raise failed.exceptions[0] from None
    return [task.result() for task in tasks]


async def _awaited(job: Awaitable[T]) -> T:
    return await job


async def archive_digests(
    archive: Archive, plans: Sequence[PartitionPlan]
) -> list[PartitionDigest]:
    return await all_or_nothing(stream_partition(archive, p, None) for p in plans)


async def check_placement(archive: Archive, plans: Sequence[PartitionPlan]) -> None:
    """Check the keys of each partition's first segment, before anything is written (every
    other key is checked as it is sent)."""

    async def first_segment(plan: PartitionPlan) -> None:
        manifests = await archive.segments(plan.source, plan.partition)
        placement = KeyPlacement(plan, plan.partitions)
        for record in await archive.read_segment(manifests[0]):
            placement.check(record.key)

    await all_or_nothing(first_segment(p) for p in plans)


async def publish(
    settings: Settings, archive: Archive, plans: Sequence[PartitionPlan]
) -> list[PartitionDigest]:
    """Send every planned partition's records to its target partition, in order."""
    producer = AIOKafkaProducer(
        bootstrap_servers=settings.kafka_bootstrap,
        client_id="backbone-restore",
        # Idempotence keeps each partition's order and writes nothing twice across retries.
        enable_idempotence=True,
        acks="all",
        max_batch_size=1024 * 1024,
        request_timeout_ms=30000,
        retry_backoff_ms=50,
    )

    try:
        await producer.start()
    except KafkaError as exc:
        await producer.stop()
        raise _kafka_failed(exc, settings) from exc
    try:
        return await all_or_nothing(
            stream_partition(archive, p, PartitionWriter(producer, p.topic, p.partition))
            for p in plans
        )
    except (KafkaError, EventStoreError) as exc:
        topics = ", ".join(sorted({p.topic for p in plans}))
        raise PublishFailed(
            f"publishing stopped part-way ({exc or type(exc).__name__}); the topics hold part "
            f"of the archive: delete them ({topics}) and rerun restore-log"
        ) from exc
    finally:
        await producer.stop()


# --- the restore ---------------------------------------------------------------------------


def _compare(
    plans: Sequence[PartitionPlan],
    expected: Sequence[PartitionDigest],
    restored: Mapping[Partition, PartitionDigest],
) -> list[str]:
    """What differs between the archive's digests and the restored partitions' digests."""
    differences: list[str] = []
    planned = {p.target: d for p, d in zip(plans, expected, strict=True)}
    for target, actual in sorted(restored.items()):
        want = planned.get(target, PartitionDigest())
        where = f"{target[0]}/{target[1]}"
        if actual.count != want.count:
            differences.append(f"{where}: {actual.count} records, the archive has {want.count}")
        elif actual.hexdigest() != want.hexdigest():
            differences.append(f"{where}: records differ from the archive (sha256)")
        elif actual.count and (actual.first != 0 or not actual.contiguous):
            differences.append(f"{where}: offsets do not run 0..{actual.count - 1}")
    return differences


async def quarantine_pending(archive: Archive, verification: Verification) -> list[str]:
    """Move every pending tail body out of its chain (see the module docstring, step 1);
    the keys they were moved to."""
    moved: list[str] = []
    for problem in verification.problems:
        if problem.kind == "pending":
            moved.append(
                await archive.quarantine(
                    archive.partition_prefix(problem.topic, problem.partition) + problem.name,
                    "restore-log: a body without manifest is not part of the restored log",
                )
            )
    return moved


async def restore_log(
    settings: Settings, archive: Archive, redis: Redis, *, finish: bool = False
) -> RestoreResult:
    """Restore the deployment's event topics from ``archive``; see the module docstring."""
    layout = TopicLayout.from_settings(settings)
    verification = await verify_archive(archive, layout=layout)
    plans = plan_restore(verification, layout)
    pending = [
        f"{p.topic}/{p.partition}/{p.name}" for p in verification.problems if p.kind == "pending"
    ]
    targets = target_partitions(layout)
    topics = {layout.topic(s): layout.partitions(s) for s in _STREAMS}
    existing = await existing_partitions(settings, list(topics))
    for topic, count in existing.items():
        if count != topics[topic]:
            raise TargetNotEmpty(
                f"topic {topic} exists with {count} partitions, the archive is restored into "
                f"{topics[topic]}; delete the topic (or fix the partition setting) and rerun"
            )
    present = [p for p in targets if p[0] in existing]
    ends = await end_offsets(settings, present) if present else {}
    holding = {p: end for p, end in ends.items() if end}
    created: list[str] = []
    started = time.monotonic()
    if holding:
        expected = await archive_digests(archive, plans)
        differences = _compare(plans, expected, await read_digests(settings, targets))
        if differences:
            held = ", ".join(f"{t}/{p} ({end} records)" for (t, p), end in sorted(holding.items()))
            raise TargetNotEmpty(
                f"the target topics already hold records: {held}. Nothing was written. If "
                "they are a partial restore (a run that died), delete the topics "
                f"({', '.join(sorted(existing))}) and rerun restore-log"
            )
        if not finish:
            raise AlreadyRestored(
                "the target topics already hold exactly the archive (a restore that stopped "
                "after publishing). Nothing was written. Rerun with --finish to verify them, "
                "bump the epoch and announce it"
            )
        quarantined = await quarantine_pending(archive, verification)
        published = False
    else:
        if finish:
            raise RestoreError("--finish needs topics that hold the archive; they are empty")
        await check_placement(archive, plans)
        quarantined = await quarantine_pending(archive, verification)
        created = await ensure_topics(settings, layout)
        expected = await publish(settings, archive, plans)
        published = True
    publish_seconds = time.monotonic() - started
    started = time.monotonic()
    counts = await end_offsets(settings, targets)
    planned = {p.target: d.count for p, d in zip(plans, expected, strict=True)}
    wrong = [
        f"{t}/{p}: {end} records, expected {planned.get((t, p), 0)}"
        for (t, p), end in sorted(counts.items())
        if end != planned.get((t, p), 0)
    ]
    restored = await read_digests(settings, targets) if not wrong else {}
    differences = wrong or _compare(plans, expected, restored)
    if differences:
        raise RestoreMismatch(
            "the restored topics do not match the archive (the epoch was not changed): "
            + "; ".join(differences)
        )
    verify_seconds = time.monotonic() - started
    pool = await create_pool(settings.postgres_dsn, min_size=1, max_size=1)
    try:
        previous = await read_epoch(pool)
        epoch = await bump_epoch(pool)
    finally:
        await pool.close()
    channel = epoch_channel(settings.topic_prefix)
    try:
        subscribers = int(await redis.publish(channel, json.dumps({"epoch": epoch})))
    except RedisError as exc:
        raise RestoreError(
            f"restored and bumped the epoch to {epoch}, but announcing it on Redis channel "
            f"{channel} failed ({exc}); clients learn it when they reconnect"
        ) from exc
    results = [
        PartitionResult(
            topic=plan.topic,
            partition=plan.partition,
            records=digest.count,
            sha256=digest.hexdigest(),
            archived_first=digest.first,
            archived_last=digest.last,
            offsets_preserved=digest.first in (0, None) and digest.contiguous,
        )
        for plan, digest in zip(plans, expected, strict=True)
    ]
    return RestoreResult(
        bucket=archive.bucket,
        prefix=archive.prefix,
        topics=topics,
        created=created,
        published=published,
        records=sum(r.records for r in results),
        publish_seconds=publish_seconds,
        verify_seconds=verify_seconds,
        partitions=results,
        offsets_preserved=all(r.offsets_preserved for r in results),
        pending=pending,
        quarantined=quarantined,
        previous_epoch=previous,
        epoch=epoch,
        channel=channel,
        subscribers=subscribers,
    )


# --- the command ---------------------------------------------------------------------------


def summary(result: RestoreResult) -> str:
    lines = [f"restore-log from s3://{result.bucket}/{result.prefix}/"]
    for r in result.partitions:
        span = f"offsets {r.archived_first}..{r.archived_last}" if r.records else "empty"
        moved = "" if r.offsets_preserved else "  (OFFSETS RENUMBERED from the archive's)"
        lines.append(
            f"  {r.topic}/{r.partition}: {r.records:,} records, {span}, sha256 {r.sha256[:16]}"
            f"{moved}"
        )
    for name, moved in zip(result.pending, result.quarantined, strict=True):
        lines.append(
            f"  not restored (a body without manifest): {name}, moved to "
            f"s3://{result.bucket}/{moved}"
        )
    if result.published:
        lines.append(
            f"published {result.records:,} records in {result.publish_seconds:.1f} s "
            f"({result.rate:,.0f}/s)"
            + (f"; created {', '.join(result.created)}" if result.created else "")
        )
    else:
        lines.append(f"the topics already held the archive ({result.records:,} records)")
    lines.append(f"verified counts and sha256 of every partition in {result.verify_seconds:.1f} s")
    lines.append(
        f"epoch {result.previous_epoch} -> {result.epoch}; announced on Redis channel "
        f"{result.channel} ({result.subscribers} subscribers)"
    )
    return "\n".join(lines)


async def _run(settings: Settings, config: ArchiveConfig, *, finish: bool) -> RestoreResult:
    client = s3_client(settings)
    redis = Redis.from_url(settings.redis_url)
    try:
        return await restore_log(
            settings, Archive(client, config.bucket, config.prefix), redis, finish=finish
        )
    finally:
        await redis.aclose()
        await asyncio.to_thread(client.close)


def run_restore(args: argparse.Namespace) -> int:
    try:
        settings = command_settings()
        config = command_archive_config(settings, args)
        result = run_command(_run(settings, config, finish=args.finish))
    except RestoreError as exc:
        print(f"backbone restore-log: refused: {exc}", file=sys.stderr)
        return 1
    except EventStoreError as exc:
        print(f"backbone restore-log: {exc}", file=sys.stderr)
        return 2
    if args.json:
        document = msgspec.to_builtins(result)
        document["rate"] = round(result.rate, 1)
        print(json.dumps(document))
    else:
        print(summary(result))
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "restore-log",
        help="re-publish the S3 archive into empty event topics and bump the epoch",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--from", dest="source", choices=["s3"], required=True, help="where the log comes from"
    )
    parser.add_argument("--prefix", help="key prefix in the bucket (default: the topic prefix)")
    parser.add_argument("--bucket", help="bucket (default: backbone-archive)")
    parser.add_argument(
        "--finish",
        action="store_true",
        help="the topics already hold the archive (an earlier run stopped after publishing): "
        "verify them, bump the epoch and announce it",
    )
    parser.add_argument("--json", action="store_true", help="one JSON document on stdout")
    parser.set_defaults(func=run_restore)
