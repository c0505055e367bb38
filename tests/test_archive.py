"""The S3 archive against the real stack: Kafka, S3Proxy and PostgreSQL (for the key store).

One module fixture writes a few thousand events and archives them with an in-process archiver;
the damage tests work on copies of that archive under fresh prefixes. The crash drill runs the
archiver as ``python -m ops.archiver`` and SIGKILLs it while writes go on.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gzip
import itertools
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final

import aiohttp
import msgspec
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.structs import ConsumerRecord
from botocore.exceptions import ClientError

from eventstore import Batch, EventStore, OffsetRange, Settings, TopicLayout
from eventstore.archive import (
    FORMAT,
    MANIFEST_SUFFIX,
    QUARANTINE,
    Archive,
    ArchiveConfig,
    ArchivedRecord,
    ArchiveError,
    SegmentBody,
    check_archive,
    decode_segment,
    encode_segment,
    gather_facts,
    parse_name,
    segment_name,
    verify_archive,
)
from eventstore.ends import end_offsets
from ops.archiver.worker import Archiver, archive_until
from ops.environment import stack_env
from ops.stack import StackInfo
from schemas import Event, MessageSent
from tests.samples import sample_events
from tests.store_fixtures import fresh_topics
from tests.test_projector_drills import free_port

Partition = tuple[str, int]
BUCKET = "backbone-archive"
EVENTS = 3000
VERIFY = (sys.executable, "-m", "ops.cli", "archive", "verify", "--json")


def traffic(count: int, *, rooms: int = 12, users: int = 6) -> list[Event]:
    """``count`` events over several users and conversations (every event type included)."""
    people = [uuid.uuid4() for _ in range(users)]
    places = [uuid.uuid4() for _ in range(rooms)]
    events: list[Event] = []
    for user, room in zip(people, places, strict=False):
        events.extend(sample_events(user, room))
    while len(events) < count:
        n = len(events)
        events.append(
            MessageSent(
                conversation_id=places[n % rooms],
                message_id=uuid.uuid4(),
                sender_id=people[n % users],
                client_msg_id=f"c-{n}",
                body=f"message {n} " + "x" * (n % 200),
            )
        )
    return events[:count]


async def wait_for(
    condition: Callable[[], Awaitable[bool]], timeout: float, what: str, every: float = 0.1
) -> None:
    """Poll ``condition`` until it holds; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not await condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(every)


def partitions_of(settings: Settings) -> list[Partition]:
    return TopicLayout.from_settings(settings).every_partition()


async def log_ends(settings: Settings) -> dict[Partition, int]:
    return await end_offsets(settings, partitions_of(settings))


async def archived_next(archive: Archive, partitions: list[Partition]) -> dict[Partition, int]:
    """Next offset after the last manifest per partition (read only: never repairs)."""
    result: dict[Partition, int] = {}
    for topic, partition in partitions:
        under = archive.partition_prefix(topic, partition)
        lasts = [
            parsed[1]
            for key in await archive.list_keys(under)
            if (parsed := parse_name(key[len(under) :])) and parsed[2] == MANIFEST_SUFFIX
        ]
        result[(topic, partition)] = max(lasts) + 1 if lasts else 0
    return result


async def raw_log(settings: Settings) -> dict[Partition, list[ArchivedRecord]]:
    """Every record of the log, as Kafka returns it."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap, enable_auto_commit=False
    )
    await consumer.start()
    try:
        partitions = [TopicPartition(t, p) for t, p in partitions_of(settings)]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions)
        records: dict[Partition, list[ArchivedRecord]] = {
            (tp.topic, tp.partition): [] for tp in partitions
        }
        while any([await consumer.position(tp) < ends[tp] for tp in partitions]):
            for tp, recs in (await consumer.getmany(timeout_ms=500)).items():
                records[(tp.topic, tp.partition)].extend(ArchivedRecord.of(r) for r in recs)
        return records
    finally:
        await consumer.stop()


async def produce_raw(settings: Settings, partition: Partition, count: int, tag: str) -> None:
    """``count`` raw records (the archiver never decodes) appended to one partition."""
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
    await producer.start()
    try:
        for n in range(count):
            await producer.send(
                partition[0], b"%s %d" % (tag.encode(), n), key=b"k", partition=partition[1]
            )
        await producer.flush()
    finally:
        await producer.stop()


async def quarantined(archive: Archive) -> dict[str, bytes]:
    """Every object in the archive's quarantine, by key."""
    keys = await archive.list_keys(f"{archive.prefix}/{QUARANTINE}/")
    return {key: await archive.get(key) for key in keys}


async def archived_records(archive: Archive) -> dict[Partition, list[ArchivedRecord]]:
    records: dict[Partition, list[ArchivedRecord]] = {}
    for topic, partition in await archive.partitions():
        for manifest in await archive.segments(topic, partition):
            records.setdefault((topic, partition), []).extend(await archive.read_segment(manifest))
    return records


async def copy_archive(archive: Archive, client: Any) -> Archive:
    """A copy of ``archive`` under a fresh prefix (to damage without touching the original)."""
    copy = Archive(client, archive.bucket, f"copy-{uuid.uuid4().hex[:10]}")
    keys = await archive.list_keys(archive.prefix + "/")

    async def one(key: str) -> None:
        await asyncio.to_thread(
            client.copy_object,
            Bucket=archive.bucket,
            Key=copy.prefix + key[len(archive.prefix) :],
            CopySource={"Bucket": archive.bucket, "Key": key},
        )

    await asyncio.gather(*(one(k) for k in keys))
    return copy


class Archived(msgspec.Struct):
    settings: Settings
    client: Any
    archive: Archive
    ends: dict[Partition, int]


async def archive_log(settings: Settings, archive: Archive, *, segment_records: int) -> None:
    """Run the archiver in-process until every record of ``settings``' topics is archived."""
    config = ArchiveConfig(
        bucket=archive.bucket,
        prefix=archive.prefix,
        segment_records=segment_records,
        flush_seconds=0.3,
    )
    async with asyncio.timeout(60):
        await archive_until(settings, archive, config, await log_ends(settings))


@pytest.fixture(scope="module")
async def archived(base_settings: Settings, client: Any) -> Archived:
    """A few thousand events written to fresh topics and archived by an in-process archiver."""
    settings = await fresh_topics(base_settings)
    async with await EventStore.open(settings) as store:
        for start in range(0, EVENTS, 500):
            await store.producer.append(traffic(EVENTS)[start : start + 500])
    archive = Archive(client, BUCKET, settings.topic_prefix)
    await archive_log(settings, archive, segment_records=250)
    ends = await log_ends(settings)
    return Archived(settings, client, archive, ends)


async def test_archive_holds_every_record_byte_for_byte(archived: Archived) -> None:
    """Every record of every partition is in exactly one segment, with Kafka's exact bytes
    (key, value, headers, timestamp, offset), and every chain verifies."""
    expected = await raw_log(archived.settings)
    assert sum(len(r) for r in expected.values()) == EVENTS
    actual = await archived_records(archived.archive)
    assert {p: r for p, r in expected.items() if r} == actual
    result = await verify_archive(archived.archive)
    assert result.problems == []
    assert result.ok
    chains = {(c.topic, c.partition): (c.first, c.next) for c in result.chains}
    assert {p: (0, end) for p, end in archived.ends.items() if end} == chains
    assert len(expected) > 3, "the events spread over several partitions"


async def test_segment_names_and_manifests_chain(archived: Archived) -> None:
    """Segments are bounded by the record limit, named by their offsets, and each manifest
    links to the sha256 of the segment before it (the first links to nothing)."""
    for topic, partition in await archived.archive.partitions():
        manifests = await archived.archive.segments(topic, partition)
        assert manifests[0].prev_sha256 is None
        assert manifests[0].first == 0
        for before, after in itertools.pairwise(manifests):
            assert after.prev_sha256 == before.sha256
            assert after.first == before.last + 1
        assert all(1 <= m.count <= 250 for m in manifests)
        assert all(m.format == 1 for m in manifests)


async def _two_adjacent(archive: Archive) -> tuple[str, str, str]:
    """A partition prefix and two adjacent segment names in it (not the first)."""
    for topic, partition in await archive.partitions():
        manifests = await archive.segments(topic, partition)
        if len(manifests) >= 3:
            a, b = manifests[1], manifests[2]
            return (
                archive.partition_prefix(topic, partition),
                segment_name(a.first, a.last),
                segment_name(b.first, b.last),
            )
    raise AssertionError("no partition with three segments")


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        ("alter", {("altered", "a")}),
        ("delete", {("missing", "a")}),
        ("delete-body", {("missing", "a")}),
        ("swap", {("reordered", "a"), ("reordered", "b")}),
        ("extra", {("extra", "x")}),
    ],
)
async def test_verify_names_each_damaged_segment(
    archived: Archived, damage: str, expected: set[tuple[str, str]]
) -> None:
    """Altering one byte, deleting a segment (or only its body), swapping two bodies or adding
    an overlapping segment: ``verify`` names exactly the damaged segment and the kind."""
    archive = await copy_archive(archived.archive, archived.client)
    under, a, b = await _two_adjacent(archive)
    names = {"a": a, "b": b}
    if damage == "alter":
        body = bytearray(await archive.get(under + a))
        body[len(body) // 2] ^= 0x01
        await archive.put(under + a, bytes(body), "application/octet-stream")
    elif damage == "delete":
        # The whole segment goes: its successor now starts after a gap.
        await archive.delete(under + a)
        await archive.delete(under + a.replace(".seg", MANIFEST_SUFFIX))
    elif damage == "delete-body":
        await archive.delete(under + a)
    elif damage == "swap":
        body_a, body_b = await archive.get(under + a), await archive.get(under + b)
        await archive.put(under + a, body_b, "application/octet-stream")
        await archive.put(under + b, body_a, "application/octet-stream")
    else:
        first_a, last_a, _ = parse_name(a) or (0, 0, "")
        extra = segment_name(first_a + 1, last_a)
        names["x"] = extra.replace(".seg", MANIFEST_SUFFIX)
        manifest = await archive.get(under + a.replace(".seg", MANIFEST_SUFFIX))
        doc = json.loads(manifest)
        doc["first"] = first_a + 1
        await archive.put(under + extra, await archive.get(under + a), "application/octet-stream")
        await archive.put(under + names["x"], json.dumps(doc).encode(), "application/json")
    result = await verify_archive(archive)
    assert not result.ok
    found = {(p.kind, p.name) for p in result.problems}
    named = {(kind, names[which]) for kind, which in expected}
    assert named <= found, result.problems
    # Nothing but the damaged segments is blamed.
    blamed = {p.name.replace(MANIFEST_SUFFIX, ".seg") for p in result.problems}
    assert blamed <= {n.replace(MANIFEST_SUFFIX, ".seg") for n in names.values()}


async def delete_partition(archive: Archive, partition: Partition) -> None:
    """Every object of one partition's prefix deleted."""
    for key in await archive.list_keys(archive.partition_prefix(*partition)):
        await archive.delete(key)


async def test_verify_names_a_partition_that_lost_every_object(archived: Archived) -> None:
    """Every object of a partition deleted: verify names it missing, whether a partition above
    it is intact or not, since the archive recorded that it held segments; in an archive
    without those records (written before them), it names one below an intact partition of its
    topic and cannot tell the highest from an empty one. The layout's partitions that hold no
    object and that nothing shows held records are listed as empty chains."""
    layout = TopicLayout.from_settings(archived.settings)
    rooms = [p for p in partitions_of(archived.settings) if p[0] == layout.topic("conversation")]
    assert all(archived.ends[p] for p in rooms), "every conversation partition holds records"
    archive = await copy_archive(archived.archive, archived.client)
    await delete_partition(archive, rooms[1])
    for given in (layout, None):
        result = await verify_archive(archive, layout=given)
        assert not result.ok
        assert [(p.kind, p.topic, p.partition) for p in result.problems] == [("missing", *rooms[1])]
    for key in await archive.list_keys(f"{archive.prefix}/_meta/"):
        await archive.delete(key)  # an archive as written before the records existed
    result = await verify_archive(archive, layout=layout)
    assert [(p.kind, p.topic, p.partition) for p in result.problems] == [("missing", *rooms[1])]
    # The highest partition: the record shows it held segments; without it, nothing does.
    archive = await copy_archive(archived.archive, archived.client)
    await delete_partition(archive, rooms[-1])
    result = await verify_archive(archive, layout=layout)
    assert [(p.kind, p.topic, p.partition) for p in result.problems] == [("missing", *rooms[-1])]
    for key in await archive.list_keys(f"{archive.prefix}/_meta/"):
        await archive.delete(key)
    result = await verify_archive(archive, layout=layout)
    assert result.problems == []
    empty = [(c.topic, c.partition) for c in result.chains if not c.segments]
    assert empty == [rooms[-1]], "the highest partition cannot be told from an empty one"
    # The layout names partitions no listing shows: one more conversation partition, empty.
    wider = msgspec.structs.replace(layout, conversation_partitions=len(rooms) + 1)
    result = await verify_archive(archive, layout=wider)
    empty = [(c.topic, c.partition) for c in result.chains if not c.segments]
    assert empty == [rooms[-1], (rooms[0][0], len(rooms))]


async def test_verify_cli_exit_status_and_json(archived: Archived, stack: StackInfo) -> None:
    """``backbone archive verify --json`` exits 0 on a sound archive and 1 naming the altered
    segment after one byte changed."""
    archive = await copy_archive(archived.archive, archived.client)
    env = stack_env(stack)

    def verify() -> tuple[int, dict[str, Any]]:
        done = subprocess.run(
            [*VERIFY, "--prefix", archive.prefix],
            env=env,
            capture_output=True,
            timeout=60,
            check=False,
        )
        return done.returncode, json.loads(done.stdout)

    code, document = await asyncio.to_thread(verify)
    assert (code, document["ok"], document["problems"]) == (0, True, [])
    under, a, _ = await _two_adjacent(archive)
    body = bytearray(await archive.get(under + a))
    body[-5] ^= 0xFF
    await archive.put(under + a, bytes(body), "application/octet-stream")
    code, document = await asyncio.to_thread(verify)
    assert (code, document["ok"]) == (1, False)
    assert [("altered", a)] == [(p["kind"], p["name"]) for p in document["problems"]]


async def test_recover_completes_a_segment_whose_manifest_was_never_written(
    archived: Archived,
) -> None:
    """A crash between a segment's body and its manifest: the next run finds the body,
    writes the same manifest it would have written, and continues after it."""
    archive = await copy_archive(archived.archive, archived.client)
    under, _, _ = await _two_adjacent(archive)
    topic, number = under[len(archive.prefix) + 1 :].rstrip("/").split("/")
    manifests = await archive.segments(topic, int(number))
    last = manifests[-1]
    await archive.delete(under + segment_name(last.first, last.last, MANIFEST_SUFFIX))
    assert (await verify_archive(archive)).problems[0].kind == "pending"
    head = await archive.recover(topic, int(number))
    assert (last.next, last.sha256) == (head.next, head.sha256)
    rewritten = (await archive.segments(topic, int(number)))[-1]
    assert msgspec.structs.replace(rewritten, created=last.created) == last
    assert (await verify_archive(archive)).ok


async def test_the_archiver_adopts_a_pending_body_only_when_the_log_holds_its_records(
    base_settings: Settings, client: Any
) -> None:
    """A body without manifest at a chain's tail is adopted when the log holds exactly its
    records (a crash between the two writes); one written from another log (the old log's
    offsets 30..39, before a restore) is moved to the quarantine, never adopted, and the
    log's own records at those offsets are archived: the archive equals the log."""
    settings = await fresh_topics(base_settings, user_partitions=1, conversation_partitions=1)
    users, rooms = partitions_of(settings)
    await produce_raw(settings, users, 30, "first")
    await produce_raw(settings, rooms, 30, "first")
    archive = Archive(client, BUCKET, settings.topic_prefix)
    await archive_log(settings, archive, segment_records=10)
    # rooms: a crash lost the last manifest; the log holds the body's records.
    crashed = (await archive.segments(*rooms))[-1]
    await archive.delete(
        archive.partition_prefix(*rooms) + segment_name(crashed.first, 29, MANIFEST_SUFFIX)
    )
    # users: a body of other records at the offsets the log is about to get.
    foreign = encode_segment(
        users[0],
        users[1],
        [
            ArchivedRecord(o, 1_700_000_000_000, 0, b"k", b"old log %d" % o, [])
            for o in range(30, 40)
        ],
    )
    foreign_key = archive.partition_prefix(*users) + segment_name(30, 39)
    await archive.put(foreign_key, foreign, "application/octet-stream")
    await produce_raw(settings, users, 15, "new log")
    await archive_log(settings, archive, segment_records=10)
    log = await raw_log(settings)
    assert await archived_records(archive) == log
    assert (await verify_archive(archive)).problems == []
    assert (await archive.segments(*rooms))[-1].sha256 == crashed.sha256, "adopted"
    moved = await quarantined(archive)
    assert list(moved.values()) == [foreign]
    [key] = moved
    assert key.startswith(f"{archive.prefix}/{QUARANTINE}/")
    assert key.endswith(foreign_key[len(archive.prefix) :])


def test_check_archive_is_clean_on_an_empty_archive() -> None:
    """No partitions, no problems."""
    result = check_archive([])
    assert result.ok
    assert result.chains == []


async def test_body_survives_encoding_byte_for_byte(archived: Archived) -> None:
    """A segment decodes to the records it was made from (None keys and empty headers too)."""
    facts = await gather_facts(archived.archive)
    assert all(not p.strays for p in facts)
    part = facts[0]
    name = sorted(part.bodies)[0]
    body = await archived.archive.get(
        archived.archive.partition_prefix(part.topic, part.partition) + name
    )
    records = decode_segment(body).records
    assert records[0].offset == 0


def _gzip_segment(topic: str, partition: int, records: list[ArchivedRecord]) -> bytes:
    """A segment body as versions before zstd wrote it."""
    return gzip.compress(
        msgspec.msgpack.encode(SegmentBody(FORMAT, topic, partition, records)),
        compresslevel=1,
        mtime=0,
    )


def _some_records() -> list[ArchivedRecord]:
    return [
        ArchivedRecord(offset, 1_700_000_000_000 + offset, 0, b"k", b"v" * offset, [("h", b"x")])
        for offset in range(40)
    ]


def test_segments_are_zstd_deterministic_and_gzip_ones_still_read() -> None:
    """New bodies are zstd frames, the same bytes for the same records; bodies written by
    earlier versions (gzip) decode to their records; anything else is refused."""
    records = _some_records()
    body = encode_segment("t.conversations", 3, records)
    assert body.startswith(b"\x28\xb5\x2f\xfd")
    assert body == encode_segment("t.conversations", 3, records)
    assert decode_segment(body) == SegmentBody(FORMAT, "t.conversations", 3, records)
    old = _gzip_segment("t.conversations", 3, records)
    assert decode_segment(old) == decode_segment(body)
    for junk in (b"", b"not a segment", body[:10]):
        with pytest.raises(ArchiveError):
            decode_segment(junk)


@pytest.mark.parametrize("kind", ["zstd", "gzip"])
def test_every_altered_byte_of_a_segment_is_refused_or_harmless(kind: str) -> None:
    """Whichever byte of a body is altered, decoding raises ArchiveError (a damaged frame or
    deflate stream, a bad checksum or CRC, a cut trailer, bad msgpack) or, for free header
    fields, yields the same records: never another exception that would escape ``verify``,
    never other records."""
    records = _some_records()
    if kind == "zstd":
        body = encode_segment("t.conversations", 0, records)
    else:
        body = _gzip_segment("t.conversations", 0, records)
    outcomes: collections.Counter[str] = collections.Counter()
    for at in range(len(body)):
        for flip in (0x01, 0x80):
            altered = bytearray(body)
            altered[at] ^= flip
            try:
                decoded = decode_segment(bytes(altered))
            except ArchiveError:
                outcomes["refused"] += 1
                continue
            assert decoded.records == records, at
            outcomes["harmless"] += 1
    assert outcomes["refused"] > len(body), outcomes


class _HeldGets:
    """The stack's S3 client, with each ``get_object`` held until released and the closing of
    every answered body noted."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self.entered = threading.Event()
        self.release = threading.Event()
        self.closed = threading.Event()

    def get_object(self, **kwargs: Any) -> Any:
        self.entered.set()
        self.release.wait(10)
        answer = self._client.get_object(**kwargs)
        body = answer["Body"]
        close = body.close

        def noted() -> None:
            close()
            self.closed.set()

        body.close = noted
        return answer


async def test_a_cancelled_get_releases_its_connection(archived: Archived) -> None:
    """A read cancelled while S3 answers (a replay stopping at its cut) still reads and closes
    the answer, so the pooled connection is not left open until the garbage collector runs."""
    part = (await gather_facts(archived.archive))[0]
    key = archived.archive.partition_prefix(part.topic, part.partition) + min(part.bodies)
    held = _HeldGets(archived.client)
    archive = Archive(held, archived.archive.bucket, archived.archive.prefix)
    reading = asyncio.create_task(archive.get(key))
    assert await asyncio.to_thread(held.entered.wait, 10)
    reading.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reading
    held.release.set()
    assert await asyncio.to_thread(held.closed.wait, 10), "the cancelled read's body was closed"


class _GatedPuts:
    """The stack's S3 client, with segment bodies held until ``gate`` opens; the body of
    ``fail`` (a segment name) is refused as S3 would refuse it."""

    def __init__(self, client: Any, fail: str | None = None) -> None:
        self._client = client
        self.gate = threading.Event()
        self.fail = fail

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def put_object(self, **kwargs: Any) -> Any:
        if kwargs["Key"].endswith(".seg"):
            self.gate.wait(10)
            if self.fail is not None and kwargs["Key"].endswith(self.fail):
                raise ClientError({"Error": {"Code": "SlowDown", "Message": "no"}}, "PutObject")
        return self._client.put_object(**kwargs)


def _raw_batch(partition: Partition, offsets: range) -> Batch:
    records = [  # as the raw reader hands them over
        ConsumerRecord(*partition, o, 1_700_000_000_000 + o, 0, b"k", b"v%d" % o, None, 1, 2, [])
        for o in offsets
    ]
    return Batch([], {partition: OffsetRange(offsets[0], offsets[-1])}, {partition: records})


async def _gated_archiver(client: Any, fail: str | None = None) -> tuple[Archiver, _GatedPuts]:
    gated = _GatedPuts(client, fail)
    prefix = f"gated-{uuid.uuid4().hex[:8]}"
    config = ArchiveConfig(bucket=BUCKET, prefix=prefix, segment_records=10, flush_seconds=60)
    archiver = Archiver(Archive(gated, BUCKET, prefix), config)
    archiver.owned = lambda: {PARTITION}
    assert await archiver.load([PARTITION]) == {}
    return archiver, gated


PARTITION: Final = ("t.conversations", 0)


async def test_segments_are_written_while_the_reader_goes_on(client: Any) -> None:
    """A full segment is written in the background: the batch handler returns at once, the
    next batch is taken meanwhile, and ``release`` waits for the writes (the reader calls it
    before a partition moves away)."""
    archiver, gated = await _gated_archiver(client)
    await archiver.handle(_raw_batch(PARTITION, range(0, 15)))  # one segment due, 5 kept
    await archiver.handle(_raw_batch(PARTITION, range(15, 25)))  # a second one, chained
    assert archiver.heads[PARTITION].next is None, "nothing written while S3 is held"
    gated.gate.set()
    await archiver.release([PARTITION])
    assert archiver.heads[PARTITION].next == 20
    stored = await archiver.archive.segments(*PARTITION)
    assert [(m.first, m.last) for m in stored] == [(0, 9), (10, 19)]
    assert (await verify_archive(archiver.archive)).ok


async def test_a_failed_segment_stops_its_chain_and_the_archiver(client: Any) -> None:
    """S3 refuses the first segment: the one chained after it is not written (no gap in the
    chain), and the failure is raised to the reader, which stops; nothing else is lost, the
    records are read again by the next run."""
    archiver, gated = await _gated_archiver(client, fail=segment_name(0, 9))
    await archiver.handle(_raw_batch(PARTITION, range(0, 20)))
    gated.gate.set()
    await archiver.release()
    assert archiver.heads[PARTITION].next is None
    assert await archiver.archive.segments(*PARTITION) == []
    with pytest.raises(ArchiveError, match="SlowDown"):
        await archiver.handle(_raw_batch(PARTITION, range(20, 21)))


# --- the crash drill ------------------------------------------------------------------------


def _archiver_env(stack: StackInfo, settings: Settings) -> dict[str, str]:
    env = stack_env(stack)
    env.update(
        BACKBONE_TOPIC_PREFIX=settings.topic_prefix,
        BACKBONE_USER_PARTITIONS=str(settings.user_partitions),
        BACKBONE_CONVERSATION_PARTITIONS=str(settings.conversation_partitions),
        BACKBONE_ARCHIVE_SEGMENT_RECORDS="100",
        BACKBONE_ARCHIVE_FLUSH_SECONDS="0.2",
        BACKBONE_WORKER_INDEX="0",
        BACKBONE_LOG_LEVEL="warning",
    )
    return env


async def _start(env: Mapping[str, str]) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "ops.archiver",
        env=dict(env),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )


@pytest.mark.fault
async def test_archiver_killed_at_random_points_leaves_a_complete_chain(
    base_settings: Settings, stack: StackInfo, client: Any
) -> None:
    """SIGKILL ``python -m ops.archiver`` five times at random points while events are
    written; after a final run the chain covers every offset exactly once, equals the log
    byte for byte, and verifies; SIGTERM then stops the worker cleanly."""
    settings = await fresh_topics(base_settings)
    env = _archiver_env(stack, settings)
    archive = Archive(client, BUCKET, settings.topic_prefix)
    partitions = partitions_of(settings)
    rng = random.Random(os.environ.get("BACKBONE_TEST_SEED", "archive-kill"))
    stop_writing = asyncio.Event()

    async with await EventStore.open(settings) as store:

        async def write() -> int:
            written = 0
            while not stop_writing.is_set():
                await store.producer.append(traffic(50))
                written += 50
                await asyncio.sleep(0.02)
            return written

        writer = asyncio.create_task(write())
        try:
            for _ in range(5):
                before = sum((await archived_next(archive, partitions)).values())
                proc = await _start(env)
                try:

                    async def progressed(before: int = before) -> bool:
                        now = sum((await archived_next(archive, partitions)).values())
                        return now > before

                    await wait_for(progressed, 30, "the archiver to write a segment")
                    await asyncio.sleep(rng.uniform(0.0, 0.4))  # the random kill point
                finally:
                    proc.send_signal(signal.SIGKILL)
                    await proc.wait()
        finally:
            stop_writing.set()
            written = await writer
    assert written > 0
    ends = await log_ends(settings)
    port = free_port()
    proc = await _start({**env, "BACKBONE_ARCHIVER_METRICS_PORT": str(port)})
    try:

        async def caught_up() -> bool:
            return await archived_next(archive, partitions) == ends

        await wait_for(caught_up, 60, "the archive to reach the log end", every=0.2)

        async def serving() -> bool:
            # Its signal handlers are installed once it serves; a SIGTERM during interpreter
            # start-up (the killed runs may have archived everything already) kills it outright.
            with contextlib.suppress(aiohttp.ClientError):
                async with (
                    aiohttp.ClientSession() as session,
                    session.get(f"http://127.0.0.1:{port}/healthz") as response,
                ):
                    return response.status == 200
            return False

        await wait_for(serving, 30, "the archiver to serve /healthz", every=0.05)
    finally:
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(proc.wait(), 30)
    assert code == 0
    result = await verify_archive(archive)
    assert result.problems == []
    expected = await raw_log(settings)
    assert {p: r for p, r in expected.items() if r} == await archived_records(archive)
