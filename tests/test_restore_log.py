"""``backbone restore-log --from s3`` against the real stack: Kafka, S3Proxy, PostgreSQL, Redis.

One module fixture writes a few thousand events (users, conversations, messages) into a
deployment of its own (fresh topics and database), archives them with an in-process archiver,
projects them into a read model, deletes the event topics and restores them from the archive.
The refusal tests restore into other deployments (the archive maps to them by topic role).
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
import uuid
from typing import Any

import msgspec
import pytest
from aiokafka.admin import AIOKafkaAdminClient
from redis.asyncio import Redis

from eventstore import (
    ConfigError,
    EventStore,
    RecordedEvent,
    Settings,
    TopicLayout,
    read_epoch,
)
from eventstore.archive import (
    MANIFEST_SUFFIX,
    QUARANTINE,
    Archive,
    ArchivedRecord,
    ChainSummary,
    Problem,
    Verification,
    segment_name,
    verify_archive,
)
from eventstore.epoch import epoch_channel
from ops.environment import stack_env
from ops.restore_log import (
    AlreadyRestored,
    ArchiveDamaged,
    PartitionDigest,
    RestoreError,
    RestoreResult,
    TargetNotEmpty,
    plan_restore,
    restore_log,
    summary,
)
from ops.stack import StackInfo
from projectors.checksum import checksum
from projectors.projector import Projector
from projectors.schema import create_schema
from projectors.sources import ArchiveSource, ReplaySourceError
from schemas import MessageSent, UserRegistered
from tests.store_fixtures import fresh_database, isolated
from tests.test_archive import (
    archive_log,
    archived_records,
    copy_archive,
    log_ends,
    produce_raw,
    quarantined,
    raw_log,
    traffic,
)
from tests.test_projector_drills import produce, workload
from tests.test_projector_support import catch_up

Partition = tuple[str, int]
BUCKET = "backbone-archive"
RESTORE = (sys.executable, "-m", "ops.cli", "restore-log", "--from", "s3", "--json")


async def delete_topics(settings: Settings) -> None:
    """Delete the event topics and wait until Kafka no longer lists them."""
    topics = list(TopicLayout.from_settings(settings).topics)
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        await admin.delete_topics(topics, timeout_ms=30000)
        deadline = time.monotonic() + 30
        while set(topics) & set(await admin.list_topics()):
            assert time.monotonic() < deadline, "the topics were not deleted in time"
            await asyncio.sleep(0.2)
    finally:
        await admin.close()


async def project_checksum(store: EventStore, schema: str) -> str:
    """Project the whole log into a new read-model schema and return its checksum."""
    async with store.pool.acquire() as conn:
        await create_schema(conn, schema)
    await catch_up(store, Projector(store.pool, store.layout, schema=schema))
    async with store.pool.acquire() as conn:
        return await checksum(conn, schema)


def without_offsets(log: dict[Partition, list[ArchivedRecord]]) -> dict[Partition, list[Any]]:
    return {p: [(r.key, r.value, r.headers, r.timestamp) for r in rs] for p, rs in log.items()}


class Restored(msgspec.Struct):
    settings: Settings
    events: int
    client: Any
    archive: Archive
    before: dict[Partition, list[ArchivedRecord]]
    after: dict[Partition, list[ArchivedRecord]]
    checksum_before: str
    epoch_before: int
    result: RestoreResult
    announced: list[dict[str, Any]]


@pytest.fixture(scope="module")
async def restored(base_settings: Settings, client: Any) -> Restored:
    """Write, archive and project; delete the topics; restore them from the archive."""
    settings = await isolated(base_settings)
    archive = Archive(client, BUCKET, settings.topic_prefix)
    events, _ = workload(rooms=30, users=40, messages=3500, seed=6)
    async with await EventStore.open(settings) as store:
        await produce(store, events, chunk=500)
        checksum_before = await project_checksum(store, "before_restore")
        epoch_before = await read_epoch(store.pool)
    await archive_log(settings, archive, segment_records=300)
    before = await raw_log(settings)
    await delete_topics(settings)
    redis = Redis.from_url(settings.redis_url)
    pubsub = redis.pubsub()
    await pubsub.subscribe(epoch_channel(settings.topic_prefix))
    try:
        result = await restore_log(settings, archive, redis)
        announced: list[dict[str, Any]] = []
        deadline = time.monotonic() + 5
        while not announced and time.monotonic() < deadline:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.5)
            if message is not None:
                announced.append(json.loads(message["data"]))
    finally:
        await pubsub.aclose()
        await redis.aclose()
    after = await raw_log(settings)
    return Restored(
        settings,
        len(events),
        client,
        archive,
        before,
        after,
        checksum_before,
        epoch_before,
        result,
        announced,
    )


async def test_restore_brings_back_every_record_byte_for_byte(restored: Restored) -> None:
    """After deleting the topics and restoring, every partition holds the same records in the
    same order at the same offsets, with identical keys, values, headers and timestamps."""
    assert sum(len(r) for r in restored.before.values()) == restored.events
    assert len([p for p, r in restored.before.items() if r]) > 3, "several partitions used"
    assert restored.before == restored.after
    result = restored.result
    assert result.published
    assert result.records == restored.events
    assert result.offsets_preserved
    assert set(result.created) == set(TopicLayout.from_settings(restored.settings).topics)
    counts = {(r.topic, r.partition): r.records for r in result.partitions}
    assert counts == {p: len(r) for p, r in restored.before.items() if r}


async def test_partition_digests_equal_on_both_sides(restored: Restored) -> None:
    """The sha256 reported per partition is the digest of the archived records, and the same
    digest computed over the restored topic."""
    archived = await archived_records(restored.archive)
    for partition in restored.result.partitions:
        mine, theirs = PartitionDigest(), PartitionDigest()
        for r in archived[(partition.topic, partition.partition)]:
            mine.add(r.offset, r.timestamp, r.key, r.value, r.headers)
        for r in restored.after[(partition.topic, partition.partition)]:
            theirs.add(r.offset, r.timestamp, r.key, r.value, r.headers)
        assert partition.sha256 == mine.hexdigest() == theirs.hexdigest()


async def test_restored_events_decode_and_personal_fields_decrypt(restored: Restored) -> None:
    """The restored log reads like the original: every event decodes, message bodies and
    usernames decrypt (the key store was untouched), positions carry the new epoch."""
    decoded: list[RecordedEvent] = []
    store = await EventStore.open(restored.settings, with_producer=False)
    async with store, store.reader() as reader:
        async for batch in reader.batches_until_end():
            for item in batch.items:
                assert isinstance(item, RecordedEvent), item
                decoded.append(item)
    assert len(decoded) == restored.events > 3500
    assert {e.position.epoch for e in decoded} == {restored.result.epoch}
    bodies = [e.event.body for e in decoded if isinstance(e.event, MessageSent)]
    assert sorted(bodies) == sorted(f"message {n}" for n in range(3500)), "bodies decrypt"
    names = [e.event.username for e in decoded if isinstance(e.event, UserRegistered)]
    assert len(names) == 40
    assert all(isinstance(n, str) and n.startswith("user") for n in names)


async def test_epoch_went_up_by_one_and_was_announced(restored: Restored) -> None:
    """The restore bumped the epoch in PostgreSQL by one and published ``{"epoch": N}`` on
    ``<prefix>:epoch``."""
    result = restored.result
    assert (result.previous_epoch, result.epoch) == (
        restored.epoch_before,
        restored.epoch_before + 1,
    )
    assert result.channel == f"{restored.settings.topic_prefix}:epoch"
    assert restored.announced == [{"epoch": result.epoch}]
    assert result.subscribers == 1


async def test_drill_replay_after_restore_gives_the_same_read_model(restored: Restored) -> None:
    """Drill: a read model projected from the restored log has the checksum of the read model
    projected before the topics were deleted (the read model stores raw offsets)."""
    async with await EventStore.open(restored.settings, with_producer=False) as store:
        assert await project_checksum(store, "after_restore") == restored.checksum_before
        # Dead letters record a position token, which carries the epoch: the drill's workload
        # has none, so the two read models can be byte-identical.
        assert await store.pool.fetchval("SELECT count(*) FROM after_restore.dead_letters") == 0


async def test_rerun_refuses_and_finish_only_bumps_the_epoch(restored: Restored) -> None:
    """Rerunning on the restored topics writes nothing: it says they already hold the
    archive; ``finish=True`` verifies them, bumps the epoch once more and announces it."""
    settings = restored.settings
    ends = await log_ends(settings)
    redis = Redis.from_url(settings.redis_url)
    try:
        with pytest.raises(AlreadyRestored, match="--finish"):
            await restore_log(settings, restored.archive, redis)
        async with await EventStore.open(settings, with_producer=False) as store:
            epoch = await read_epoch(store.pool)
        finished = await restore_log(settings, restored.archive, redis, finish=True)
    finally:
        await redis.aclose()
    assert not finished.published
    assert (finished.previous_epoch, finished.epoch) == (epoch, epoch + 1)
    assert await log_ends(settings) == ends


async def test_refuses_topics_that_hold_records(
    restored: Restored, base_settings: Settings
) -> None:
    """Topics with records (a partial restore, or a live log): refused with what to do, and
    nothing is written, the epoch unchanged."""
    settings = await isolated(base_settings)
    async with await EventStore.open(settings) as store:
        await store.producer.append(traffic(30))
        epoch = await read_epoch(store.pool)
    ends = await log_ends(settings)
    redis = Redis.from_url(settings.redis_url)
    try:
        with pytest.raises(TargetNotEmpty, match="delete the topics") as refused:
            await restore_log(settings, restored.archive, redis)
    finally:
        await redis.aclose()
    assert not isinstance(refused.value, AlreadyRestored)
    assert await log_ends(settings) == ends
    async with await EventStore.open(settings, with_producer=False) as store:
        assert await read_epoch(store.pool) == epoch


async def test_refuses_a_damaged_archive_naming_the_segment(
    restored: Restored, base_settings: Settings
) -> None:
    """One byte altered in one segment: refused before anything is created or written,
    naming the segment."""
    archive = await copy_archive(restored.archive, restored.client)
    topic, partition = next(p for p, r in restored.before.items() if len(r) > 600)
    manifest = (await archive.segments(topic, partition))[1]
    name = segment_name(manifest.first, manifest.last)
    key = archive.partition_prefix(topic, partition) + name
    body = bytearray(await archive.get(key))
    body[len(body) // 2] ^= 0x01
    await archive.put(key, bytes(body), "application/octet-stream")
    settings = msgspec.structs.replace(
        await fresh_database(restored.settings), topic_prefix=f"t{uuid.uuid4().hex[:10]}"
    )
    await _refused_without_topics(
        settings, archive, ArchiveDamaged, re.escape(f"altered {topic}/{partition}/{name}")
    )


async def test_a_partition_that_lost_every_object_is_refused(
    restored: Restored, base_settings: Settings
) -> None:
    """Every object of one conversation partition deleted while the others are intact:
    restore-log refuses before creating anything, naming the partition (it had restored the
    others and reported success), and so does a replay from the archive (it had built a model
    without that partition)."""
    archive = await copy_archive(restored.archive, restored.client)
    layout = TopicLayout.from_settings(restored.settings)
    lost = (layout.topic("conversation"), 1)
    assert restored.before[lost], "the partition held records"
    for key in await archive.list_keys(archive.partition_prefix(*lost)):
        await archive.delete(key)
    settings = msgspec.structs.replace(
        await fresh_database(restored.settings), topic_prefix=f"t{uuid.uuid4().hex[:10]}"
    )
    await _refused_without_topics(
        settings, archive, ArchiveDamaged, re.escape(f"missing {lost[0]}/{lost[1]}/*")
    )
    source = ArchiveSource(archive, TopicLayout.from_settings(settings))
    with pytest.raises(ReplaySourceError, match=re.escape(f"lost {lost[0]}/{lost[1]} ")):
        await source.ends()


async def test_cli_restores_into_another_prefix_and_prints_json(
    restored: Restored, base_settings: Settings, stack: StackInfo
) -> None:
    """``backbone restore-log --from s3 --prefix P --json`` restores the archive of one
    deployment into the (absent) topics of another, exits 0 and reports the new epoch; run
    again it exits 1 and says the topics already hold the archive."""
    target = msgspec.structs.replace(
        await fresh_database(restored.settings), topic_prefix=f"t{uuid.uuid4().hex[:10]}"
    )
    env = stack_env(stack)
    env.update(
        BACKBONE_TOPIC_PREFIX=target.topic_prefix,
        BACKBONE_POSTGRES_DSN=target.postgres_dsn,
        BACKBONE_USER_PARTITIONS=str(target.user_partitions),
        BACKBONE_CONVERSATION_PARTITIONS=str(target.conversation_partitions),
    )

    def run() -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [*RESTORE, "--prefix", restored.archive.prefix],
            env=env,
            capture_output=True,
            timeout=120,
            check=False,
        )

    done = await asyncio.to_thread(run)
    assert done.returncode == 0, done.stderr.decode()
    document = json.loads(done.stdout)
    assert document["records"] == restored.events
    assert document["epoch"] == document["previous_epoch"] + 1
    assert document["channel"] == f"{target.topic_prefix}:epoch"
    after = await raw_log(target)
    assert without_offsets(after) == {
        (p[0].replace(restored.settings.topic_prefix, target.topic_prefix, 1), p[1]): r
        for p, r in without_offsets(restored.before).items()
    }
    again = await asyncio.to_thread(run)
    assert again.returncode == 1
    assert b"already hold exactly the archive" in again.stderr


async def test_refuses_another_partition_count_before_writing(
    restored: Restored,
) -> None:
    """The archive cannot say how many partitions a topic had, but its keys can: restoring
    into a layout that would place them elsewhere is refused, naming the setting, before
    any topic is created."""
    settings = msgspec.structs.replace(
        await fresh_database(restored.settings),
        topic_prefix=f"t{uuid.uuid4().hex[:10]}",
        conversation_partitions=restored.settings.conversation_partitions + 2,
    )
    await _refused_without_topics(
        settings, restored.archive, ConfigError, "BACKBONE_CONVERSATION_PARTITIONS"
    )


async def test_a_pending_tail_is_quarantined_and_the_new_log_archived_in_its_place(
    base_settings: Settings, client: Any
) -> None:
    """The chain ends at N and a body without manifest covers N..M. restore-log publishes
    0..N-1 and moves that body out of the chain (to the quarantine, reported); records then
    written at N..M are archived by the restarted archiver, not the old body: the archive
    equals the restored log."""
    settings = await isolated(base_settings, user_partitions=1, conversation_partitions=1)
    async with await EventStore.open(settings) as store:
        await store.producer.append(traffic(60, rooms=2, users=2))
    archive = Archive(client, BUCKET, settings.topic_prefix)
    await archive_log(settings, archive, segment_records=15)
    partition = (TopicLayout.from_settings(settings).topic("conversation"), 0)
    pending = (await archive.segments(*partition))[-1]
    body_key = archive.partition_prefix(*partition) + segment_name(pending.first, pending.last)
    body = await archive.get(body_key)
    await archive.delete(body_key[: -len(".seg")] + MANIFEST_SUFFIX)
    await delete_topics(settings)
    redis = Redis.from_url(settings.redis_url)
    try:
        result = await restore_log(settings, archive, redis)
    finally:
        await redis.aclose()
    name = f"{partition[0]}/{partition[1]}/{segment_name(pending.first, pending.last)}"
    assert result.pending == [name]
    assert await quarantined(archive) == {result.quarantined[0]: body}
    assert result.quarantined[0].startswith(f"{archive.prefix}/{QUARANTINE}/")
    assert result.quarantined[0].endswith(name)
    assert f"moved to s3://{BUCKET}/{result.quarantined[0]}" in summary(result)
    assert (await verify_archive(archive)).problems == []
    assert (await log_ends(settings))[partition] == pending.first
    await produce_raw(settings, partition, pending.count + 5, "after the restore")
    await archive_log(settings, archive, segment_records=15)
    assert await archived_records(archive) == {
        p: r for p, r in (await raw_log(settings)).items() if r
    }


def test_plan_refuses_a_damaged_or_empty_archive_and_maps_topics_by_role() -> None:
    """Pure planning: fatal problems are named, a pending tail is not fatal, an empty archive
    is refused, archived topics map to the deployment's topics by role."""
    layout = TopicLayout("new", 2, 3, 1, 1)
    chains = [
        ChainSummary("old.users", 1, 2, 10, 0, 10),
        ChainSummary("old.conversations", 2, 1, 5, 0, 5),
    ]
    pending = Problem("pending", "old.users", 1, "x.seg", "being written")
    plans = plan_restore(Verification(chains, [pending]), layout)
    assert [(p.source, p.topic, p.partition, p.records) for p in plans] == [
        ("old.conversations", "new.conversations", 2, 5),
        ("old.users", "new.users", 1, 10),
    ]
    broken = Problem("broken", "old.users", 1, "a.json", "prev_sha256 is not ...")
    with pytest.raises(ArchiveDamaged, match=re.escape("broken old.users/1/a.json")):
        plan_restore(Verification(chains, [broken]), layout)
    with pytest.raises(RestoreError, match="no segment"):
        plan_restore(Verification([], []), layout)
    with pytest.raises(ConfigError, match="BACKBONE_USER_PARTITIONS=2"):
        plan_restore(Verification([ChainSummary("old.users", 2, 1, 1, 0, 1)], []), layout)


async def test_summary_names_partitions_rate_and_epoch(restored: Restored) -> None:
    """The human summary lists every restored partition, the rate and the new epoch."""
    text = summary(restored.result)
    for partition in restored.result.partitions:
        assert f"{partition.topic}/{partition.partition}: {partition.records:,} records" in text
    assert f"published {restored.events:,} records" in text
    result = restored.result
    assert f"epoch {result.previous_epoch} -> {result.epoch}; announced" in text
    assert "RENUMBERED" not in text


async def _refused_without_topics(
    settings: Settings, archive: Archive, error: type[Exception], match: str
) -> None:
    """``restore_log`` refuses with ``error`` and has created none of the event topics."""
    redis = Redis.from_url(settings.redis_url)
    try:
        with pytest.raises(error, match=match):
            await restore_log(settings, archive, redis)
    finally:
        await redis.aclose()
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        assert not set(TopicLayout.from_settings(settings).topics) & set(await admin.list_topics())
    finally:
        await admin.close()
