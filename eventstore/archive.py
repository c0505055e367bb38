"""The S3 archive of the log: compressed segments per partition, chained by their hashes.

Layout in the bucket (names sort by offset, so a listing is the chain in order)::

    <prefix>/<topic>/<partition>/<first:020d>-<last:020d>.seg    the records, zstd
    <prefix>/<topic>/<partition>/<first:020d>-<last:020d>.json   its manifest
    <prefix>/_meta/started/<topic>/<partition>                    the partition has segments
    <prefix>/_quarantine/<time>/<topic>/<partition>/<name>.seg   a body taken out of a chain

A segment holds exactly what Kafka holds for offsets ``first`` .. ``last`` of one partition:
each record's offset, timestamp (and its type), key, value and headers, byte for byte
(payloads stay sealed, so erasing a person's key makes the archive unreadable for them too).
The body is a msgpack array, compressed with Zstandard at level 1 (the same records always give
the same bytes). Sealed payloads are base64 of ciphertext, which no codec shrinks much (to about
70 %): zstd gets there at a tenth of gzip's CPU time, which had been most of the archiver's.
Segments written by earlier versions are gzip; readers tell the two apart by their magic
number and read both.

Segments tile the partition: a segment's ``first`` is the offset right after the previous
segment's ``last``, so offsets without a record (none today) still belong to one segment.

The manifest (JSON) names topic, partition, ``first``, ``last``, ``count``, the body's size and
sha256, the previous segment's sha256 (``null`` for the first: a hash chain per partition), the
time it was made and the format version. A segment counts once its manifest exists.

*Restart safety.* The body is written before its manifest, and S3 writes are atomic per object.
A writer that dies in between leaves a body without manifest at the tail;
:meth:`Archive.recover` finds it, checks it continues the chain and (given the log's records)
holds exactly what the log holds at its offsets, and writes its manifest (or moves it to the
quarantine when it does not fit: a body written from another log is never adopted), so the
next segment starts right after it: no gap, no overlap. Where the chain ends is read from S3
itself, so there is no second store to disagree with. Before each write the writer checks the
tail did not move under it (a zombie member).

*Verification* (:func:`check_archive`, pure) works from facts the shell gathers
(:func:`gather_facts`): every manifest, every body's sha256 and offsets. It names missing
(offsets in no segment, a manifest without body), altered (body or manifest changed), reordered
(a body or manifest stored under another segment's name), extra (overlapping or stray objects)
segments and broken links; a body without manifest at the very tail is *pending* (a writer is
between its two puts), not an error. A partition without any object is missing when the
archive shows it held records (:func:`absent_partitions`).

boto3 is synchronous: every S3 call runs in a worker thread (``asyncio.to_thread``).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import gzip
import hashlib
import itertools
import re
import zlib
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, Final, Literal, Protocol

import msgspec
import structlog
import zstandard

from eventstore.errors import EventStoreError
from eventstore.settings import PREFIX, Settings, env_float, env_int
from eventstore.topics import TopicLayout

log = structlog.get_logger(__name__)

FORMAT: Final = 1
SEGMENT_SUFFIX: Final = ".seg"
MANIFEST_SUFFIX: Final = ".json"
DEFAULT_BUCKET: Final = "backbone-archive"
META: Final = "_meta"
"""Key segment under the prefix for what the archive records about itself: ``_meta/started/
<topic>/<partition>`` exists once a partition's first segment is complete (outside the
partition's own prefix, so losing every object of a partition does not lose it)."""
QUARANTINE: Final = "_quarantine"
"""Key segment under the prefix where bodies taken out of a chain are kept (never a topic
name position: ``<prefix>/_quarantine/<time>/<topic>/<partition>/<name>`` has five parts)."""
_NAME = re.compile(r"^(\d{20})-(\d{20})\.(seg|json)$")
_MSGPACK = msgspec.msgpack.Encoder()
_JSON = msgspec.json.Encoder()

Partition = tuple[str, int]


class ArchiveError(EventStoreError):
    """The archive cannot be read or written (S3 unreachable, refused, a bad object)."""

    retriable = True


class ArchiveConflict(ArchiveError):
    """The chain's tail moved under this writer: another member archived the partition."""

    retriable = False


class KafkaRecord(Protocol):
    """What a segment keeps of a consumed record (aiokafka's ConsumerRecord fits)."""

    @property
    def offset(self) -> int: ...
    @property
    def timestamp(self) -> int: ...
    @property
    def timestamp_type(self) -> int: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...
    @property
    def headers(self) -> Sequence[tuple[str, bytes]]: ...


class ArchivedRecord(msgspec.Struct, frozen=True, array_like=True):
    """One record exactly as Kafka stored it."""

    offset: int
    timestamp: int
    timestamp_type: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]

    @classmethod
    def of(cls, record: KafkaRecord) -> ArchivedRecord:
        return cls(
            record.offset,
            record.timestamp,
            record.timestamp_type,
            record.key,
            record.value,
            list(record.headers or ()),
        )

    def size(self) -> int:
        """Roughly the bytes this record takes (for bounding a segment's size)."""
        headers = sum(len(name) + len(value) for name, value in self.headers)
        return 24 + len(self.key or b"") + len(self.value or b"") + headers


class SegmentBody(msgspec.Struct, frozen=True, array_like=True):
    """What a segment object holds, before compression."""

    format: int
    topic: str
    partition: int
    records: list[ArchivedRecord]


_BODY = msgspec.msgpack.Decoder(SegmentBody)


class Manifest(msgspec.Struct, frozen=True, kw_only=True):
    """The description of one segment, and its link in the partition's hash chain."""

    format: int
    topic: str
    partition: int
    first: int
    last: int
    count: int
    size: int
    sha256: str
    prev_sha256: str | None
    created: str

    @property
    def next(self) -> int:
        return self.last + 1


_MANIFEST = msgspec.json.Decoder(Manifest)


class ChainHead(msgspec.Struct, frozen=True):
    """Where a partition's chain ends: the next offset to archive and the last segment's hash.

    ``next`` is None for a partition with no segment yet.
    """

    next: int | None = None
    sha256: str | None = None
    key: str | None = None
    """The last segment's body key (listing after it shows whether the tail moved)."""


# --- names ---------------------------------------------------------------------------------


def partition_prefix(prefix: str, topic: str, partition: int) -> str:
    return f"{prefix}/{topic}/{partition}/"


def segment_name(first: int, last: int, suffix: str = SEGMENT_SUFFIX) -> str:
    return f"{first:020d}-{last:020d}{suffix}"


def parse_name(name: str) -> tuple[int, int, str] | None:
    """``(first, last, suffix)`` of a segment or manifest file name, None for anything else."""
    match = _NAME.match(name)
    if match is None:
        return None
    return int(match[1]), int(match[2]), "." + match[3]


# --- segments (pure) -------------------------------------------------------------------------


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


_ZSTD_LEVEL: Final = 1
_ZSTD_MAGIC: Final = b"\x28\xb5\x2f\xfd"
_GZIP_MAGIC: Final = b"\x1f\x8b"
SEGMENT_MAX_BYTES: Final = 1 << 30
"""The most a segment body may claim to unpack to (a damaged or hostile header must not make a
reader allocate without bound); the archiver's segments are megabytes."""


def encode_segment(topic: str, partition: int, records: Sequence[ArchivedRecord]) -> bytes:
    """The compressed body of a segment (deterministic: same records, same bytes)."""
    body = _MSGPACK.encode(SegmentBody(FORMAT, topic, partition, list(records)))
    # A compressor per call: they are not thread-safe, and segments are encoded in threads. The
    # frame's checksum makes a damaged body fail to decompress instead of yielding other bytes.
    return zstandard.ZstdCompressor(level=_ZSTD_LEVEL, write_checksum=True).compress(body)


def decode_segment(data: bytes) -> SegmentBody:
    """The records of a segment body (zstd, or gzip as earlier versions wrote them);
    :class:`ArchiveError` when it is not one."""
    try:
        return _BODY.decode(_decompressed(data))
    except (OSError, EOFError, zlib.error, zstandard.ZstdError, msgspec.DecodeError) as exc:
        raise ArchiveError(f"not a segment body: {exc}") from None


def _decompressed(data: bytes) -> bytes:
    if data.startswith(_GZIP_MAGIC):
        return gzip.decompress(data)  # BadGzipFile is an OSError
    if not data.startswith(_ZSTD_MAGIC):
        raise ArchiveError("not a segment body: neither zstd nor gzip")
    size = zstandard.frame_content_size(data)
    if not 0 <= size <= SEGMENT_MAX_BYTES:
        raise ArchiveError(f"not a segment body: it claims {size} bytes unpacked")
    return zstandard.ZstdDecompressor().decompress(data)


def build_manifest(
    topic: str,
    partition: int,
    first: int,
    records: Sequence[ArchivedRecord],
    body: bytes,
    prev_sha256: str | None,
    created: dt.datetime,
) -> Manifest:
    return Manifest(
        format=FORMAT,
        topic=topic,
        partition=partition,
        first=first,
        last=records[-1].offset,
        count=len(records),
        size=len(body),
        sha256=sha256_hex(body),
        prev_sha256=prev_sha256,
        created=created.astimezone(dt.UTC).isoformat(timespec="milliseconds"),
    )


def encode_manifest(manifest: Manifest) -> bytes:
    return _JSON.encode(manifest)


def decode_manifest(data: bytes) -> Manifest:
    try:
        return _MANIFEST.decode(data)
    except msgspec.DecodeError as exc:
        raise ArchiveError(f"not a manifest: {exc}") from None


def records_sha256(records: Iterable[ArchivedRecord]) -> str:
    """The sha256 over records exactly as a segment keeps them (offsets included)."""
    digest = hashlib.sha256()
    for record in records:
        digest.update(_MSGPACK.encode(record))
    return digest.hexdigest()


LogRecords = Callable[[str, int, int, int], Awaitable[Sequence[ArchivedRecord]]]
"""``(topic, partition, first, last)`` -> the log's records at offsets ``first`` .. ``last``,
as the archiver would archive them (fewer when the log does not hold them all)."""


# --- configuration -------------------------------------------------------------------------


class ArchiveConfig(msgspec.Struct, frozen=True, kw_only=True):
    """Where the archive lives and how large its segments grow."""

    bucket: str = DEFAULT_BUCKET
    prefix: str = "chat"
    segment_records: int = 20_000
    segment_bytes: int = 8 * 1024 * 1024
    flush_seconds: float = 5.0
    """A segment is written at the latest this long after its first record arrived."""

    @classmethod
    def from_env(
        cls,
        settings: Settings,
        env: Mapping[str, str],
        *,
        prefix: str | None = None,
        bucket: str | None = None,
    ) -> ArchiveConfig:
        """``BACKBONE_ARCHIVE_{BUCKET,PREFIX,SEGMENT_RECORDS,SEGMENT_BYTES,FLUSH_SECONDS}``;
        the prefix defaults to the deployment's topic prefix. ``prefix``/``bucket`` (a
        command's options), when given, take the place of the environment's."""
        bucket = (bucket or "").strip() or env.get(PREFIX + "ARCHIVE_BUCKET", "").strip()
        prefix = (prefix or "").strip("/") or env.get(PREFIX + "ARCHIVE_PREFIX", "").strip()
        return cls(
            bucket=bucket or DEFAULT_BUCKET,
            prefix=prefix.strip("/") or settings.topic_prefix,
            segment_records=env_int(env, "ARCHIVE_SEGMENT_RECORDS", 20_000),
            segment_bytes=env_int(env, "ARCHIVE_SEGMENT_BYTES", 8 * 1024 * 1024, minimum=1024),
            flush_seconds=env_float(env, "ARCHIVE_FLUSH_SECONDS", 5.0),
        )


# --- the archive (S3 shell) ------------------------------------------------------------------


class Archive:
    """Segments of one deployment in one bucket under one prefix. The client is injected."""

    def __init__(self, client: Any, bucket: str, prefix: str) -> None:
        self._client = client
        self.bucket = bucket
        self.prefix = prefix.strip("/")

    async def _call(self, what: str, call: Callable[..., Any], **kwargs: Any) -> Any:
        """``call(**kwargs)`` in a worker thread, S3 failures as :class:`ArchiveError`."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return await asyncio.to_thread(call, **kwargs)
        except (BotoCoreError, ClientError) as exc:
            raise ArchiveError(f"S3 {what} failed: {exc}") from exc

    async def list_keys(self, under: str, *, start_after: str | None = None) -> list[str]:
        """Every key under ``under`` (a prefix ending in ``/``), in key order."""
        keys: list[str] = []
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": under}
        if start_after is not None:
            kwargs["StartAfter"] = start_after
        while True:
            page = await self._call(f"list {under}", self._client.list_objects_v2, **kwargs)
            keys.extend(item["Key"] for item in page.get("Contents", ()))
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return keys
            kwargs["ContinuationToken"] = token

    def _read(self, key: str) -> bytes:
        """The object's bytes, read and its connection released in the calling thread.

        One thread call, so a cancelled ``get`` cannot leave a response body unread: an unread
        body holds its pooled connection (and socket) until the garbage collector finds it.
        """
        body = self._client.get_object(Bucket=self.bucket, Key=key)["Body"]
        with contextlib.closing(body):
            data: bytes = body.read()
            return data

    async def get(self, key: str) -> bytes:
        data: bytes = await self._call(f"get {key}", self._read, key=key)
        return data

    async def put(self, key: str, body: bytes, content_type: str) -> None:
        await self._call(
            f"put {key}",
            self._client.put_object,
            Bucket=self.bucket,
            Key=key,
            Body=body,
            ContentType=content_type,
        )

    async def delete(self, key: str) -> None:
        await self._call(f"delete {key}", self._client.delete_object, Bucket=self.bucket, Key=key)

    def partition_prefix(self, topic: str, partition: int) -> str:
        return partition_prefix(self.prefix, topic, partition)

    async def partitions(self) -> list[Partition]:
        """Every (topic, partition) with at least one object in the archive."""
        found: set[Partition] = set()
        for key in await self.list_keys(self.prefix + "/"):
            parts = key[len(self.prefix) + 1 :].split("/")
            if len(parts) == 3 and parts[1].isdigit() and parts[0] not in (META, QUARANTINE):
                found.add((parts[0], int(parts[1])))
        return sorted(found)

    def _started_key(self, topic: str, partition: int) -> str:
        return f"{self.prefix}/{META}/started/{topic}/{partition}"

    async def started(self) -> list[Partition]:
        """Every (topic, partition) recorded as having had a complete segment (see
        :data:`META`), whether or not its segments are still there."""
        under = f"{self.prefix}/{META}/started/"
        found: set[Partition] = set()
        for key in await self.list_keys(under):
            topic, _, number = key[len(under) :].rpartition("/")
            if topic and number.isdigit():
                found.add((topic, int(number)))
        return sorted(found)

    async def mark_started(self, topic: str, partition: int) -> None:
        """Record that the partition has a complete segment (idempotent)."""
        await self.put(
            self._started_key(topic, partition),
            _JSON.encode({"topic": topic, "partition": partition}),
            "application/json",
        )

    async def recover(
        self, topic: str, partition: int, *, log_records: LogRecords | None = None
    ) -> ChainHead:
        """Where the partition's chain ends, completing a segment whose writer died.

        A body without manifest after the last manifest is adopted when it continues the chain
        (its manifest is written now) and, given ``log_records``, holds exactly the log's
        records at its offsets; otherwise it is moved to the quarantine (:meth:`quarantine`):
        it is not part of this log's chain, and the next segment is archived from the log.
        """
        under = self.partition_prefix(topic, partition)
        keys = await self.list_keys(under)
        manifests: list[tuple[int, int, str]] = []
        bodies: dict[tuple[int, int], str] = {}
        for key in keys:
            parsed = parse_name(key[len(under) :])
            if parsed is None:
                continue
            first, last, suffix = parsed
            if suffix == MANIFEST_SUFFIX:
                manifests.append((first, last, key))
            else:
                bodies[(first, last)] = key
        head = ChainHead()
        if manifests:
            first, last, key = max(manifests)
            manifest = decode_manifest(await self.get(key))
            head = ChainHead(manifest.next, manifest.sha256, under + segment_name(first, last))
        done = {(first, last) for first, last, _ in manifests}
        tail = head.next if head.next is not None else -1
        for (first, last), key in sorted(bodies.items()):
            if (first, last) in done or last < tail:
                continue
            head = await self._adopt(topic, partition, head, first, key, log_records)
        if head.next is not None:
            # Archives written before the marker existed get it here (and a crash between a
            # first segment and its marker is repaired).
            await self.mark_started(topic, partition)
        return head

    async def _adopt(
        self,
        topic: str,
        partition: int,
        head: ChainHead,
        first: int,
        key: str,
        log_records: LogRecords | None,
    ) -> ChainHead:
        body = await self.get(key)
        try:
            records = decode_segment(body).records
        except ArchiveError:
            records = []
        fits = (
            bool(records)
            and (head.next is None or first == head.next)
            and records[0].offset >= first
            and key
            == self.partition_prefix(topic, partition) + segment_name(first, records[-1].offset)
        )
        if not fits:
            await self.quarantine(key, f"it does not continue the chain (next {head.next})")
            return head
        if log_records is not None:
            logged = await log_records(topic, partition, first, records[-1].offset)
            if records_sha256(logged) != records_sha256(records):
                await self.quarantine(
                    key,
                    f"the log holds other records at offsets {first}..{records[-1].offset} "
                    f"({len(logged)} found, the body has {len(records)}): it was written from "
                    "another log (one since restored or replaced); those offsets are archived "
                    "again from this one",
                )
                return head
        manifest = build_manifest(
            topic, partition, first, records, body, head.sha256, dt.datetime.now(dt.UTC)
        )
        await self.put(
            key[: -len(SEGMENT_SUFFIX)] + MANIFEST_SUFFIX,
            encode_manifest(manifest),
            "application/json",
        )
        log.info("archive.segment_adopted", key=key, first=first, last=manifest.last)
        return ChainHead(manifest.next, manifest.sha256, key)

    def quarantine_key(self, key: str, stamp: str) -> str:
        """Where :meth:`quarantine` moves ``key`` (a key under this archive's prefix)."""
        return f"{self.prefix}/{QUARANTINE}/{stamp}/{key[len(self.prefix) + 1 :]}"

    async def quarantine(self, key: str, reason: str) -> str:
        """Move ``key`` out of its chain to ``<prefix>/_quarantine/<UTC time>/<topic>/...``
        (copied, then deleted: never lost), loudly; return its new key.

        The quarantine is no partition of the archive: listings of partitions, chains,
        ``verify``, restores and replays do not see it. An operator inspects and deletes it.
        """
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        moved = self.quarantine_key(key, stamp)
        await self._call(
            f"copy {key}",
            self._client.copy_object,
            Bucket=self.bucket,
            Key=moved,
            CopySource={"Bucket": self.bucket, "Key": key},
        )
        await self.delete(key)
        log.error("archive.body_quarantined", key=key, moved_to=moved, reason=reason)
        return moved

    async def append(
        self,
        topic: str,
        partition: int,
        head: ChainHead,
        records: Sequence[ArchivedRecord],
        *,
        now: dt.datetime | None = None,
    ) -> tuple[ChainHead, Manifest]:
        """Write one segment after ``head`` (body, then manifest); return the new head.

        :class:`ArchiveConflict` when anything was written after ``head`` meanwhile.
        """
        under = self.partition_prefix(topic, partition)
        newer = await self.list_keys(under, start_after=head.key)
        if newer:
            raise ArchiveConflict(
                f"{topic}/{partition}: the archive moved past offset {head.next} "
                f"({newer[0]}); another archiver wrote this partition"
            )
        first = records[0].offset if head.next is None else head.next
        if records[0].offset < first:
            raise ArchiveError(f"{topic}/{partition}: record {records[0].offset} < {first}")
        body = await asyncio.to_thread(encode_segment, topic, partition, records)
        manifest = build_manifest(
            topic, partition, first, records, body, head.sha256, now or dt.datetime.now(dt.UTC)
        )
        key = under + segment_name(first, manifest.last)
        await self.put(key, body, "application/octet-stream")
        await self.put(
            under + segment_name(first, manifest.last, MANIFEST_SUFFIX),
            encode_manifest(manifest),
            "application/json",
        )
        if head.next is None:
            await self.mark_started(topic, partition)
        return ChainHead(manifest.next, manifest.sha256, key), manifest

    async def segments(self, topic: str, partition: int) -> list[Manifest]:
        """The manifests of a partition in offset order (for readers: replay, restore)."""
        under = self.partition_prefix(topic, partition)
        keys = [k for k in await self.list_keys(under) if k.endswith(MANIFEST_SUFFIX)]
        return [decode_manifest(await self.get(k)) for k in keys]

    async def read_segment(self, manifest: Manifest) -> list[ArchivedRecord]:
        """A segment's records, after checking its sha256 against the manifest."""
        key = self.partition_prefix(manifest.topic, manifest.partition) + segment_name(
            manifest.first, manifest.last
        )
        body = await self.get(key)
        if sha256_hex(body) != manifest.sha256:
            raise ArchiveError(f"{key}: sha256 does not match its manifest")
        return decode_segment(body).records


# --- verification --------------------------------------------------------------------------

ProblemKind = Literal["missing", "altered", "reordered", "extra", "broken", "pending"]
FATAL: Final[frozenset[str]] = frozenset({"missing", "altered", "reordered", "extra", "broken"})


class BodyFacts(msgspec.Struct, frozen=True):
    """What the verifier learned from one segment body."""

    sha256: str
    topic: str = ""
    partition: int = -1
    count: int = 0
    first_offset: int = -1
    last_offset: int = -1
    ordered: bool = False
    error: str | None = None


class PartitionFacts(msgspec.Struct):
    """Everything stored under one partition's prefix."""

    topic: str
    partition: int
    manifests: dict[str, Manifest | str] = msgspec.field(default_factory=dict)
    """Manifest file name -> the manifest, or why it does not parse."""
    bodies: dict[str, BodyFacts] = msgspec.field(default_factory=dict)
    """Body file name -> its facts."""
    strays: list[str] = msgspec.field(default_factory=list)
    """Names that are neither."""


class Problem(msgspec.Struct, frozen=True):
    kind: ProblemKind
    topic: str
    partition: int
    name: str
    detail: str


class ChainSummary(msgspec.Struct, frozen=True):
    topic: str
    partition: int
    segments: int
    records: int
    first: int | None
    next: int | None


class Verification(msgspec.Struct, frozen=True):
    chains: list[ChainSummary]
    problems: list[Problem]

    @property
    def ok(self) -> bool:
        return not any(p.kind in FATAL for p in self.problems)


def body_facts(data: bytes) -> BodyFacts:
    sha = sha256_hex(data)
    try:
        body = decode_segment(data)
    except ArchiveError as exc:
        return BodyFacts(sha, error=str(exc))
    offsets = [r.offset for r in body.records]
    if not offsets:
        return BodyFacts(sha, body.topic, body.partition, error="segment holds no record")
    ordered = all(a < b for a, b in itertools.pairwise(offsets))
    return BodyFacts(
        sha, body.topic, body.partition, len(offsets), offsets[0], offsets[-1], ordered
    )


async def gather_facts(
    archive: Archive, partitions: Iterable[Partition] | None = None, *, concurrency: int = 8
) -> list[PartitionFacts]:
    """Read every manifest and body of the archive (or of ``partitions``)."""
    chosen = sorted(set(partitions)) if partitions is not None else await archive.partitions()
    limit = asyncio.Semaphore(concurrency)
    result: list[PartitionFacts] = []
    for topic, partition in chosen:
        facts = PartitionFacts(topic, partition)
        under = archive.partition_prefix(topic, partition)

        async def fetch(key: str, name: str, facts: PartitionFacts = facts) -> None:
            async with limit:
                data = await archive.get(key)
            if name.endswith(MANIFEST_SUFFIX):
                try:
                    facts.manifests[name] = decode_manifest(data)
                except ArchiveError as exc:
                    facts.manifests[name] = str(exc)
            else:
                facts.bodies[name] = await asyncio.to_thread(body_facts, data)

        tasks = []
        for key in await archive.list_keys(under):
            name = key[len(under) :]
            if parse_name(name) is None:
                facts.strays.append(name)
            else:
                tasks.append(fetch(key, name))
        await asyncio.gather(*tasks)
        result.append(facts)
    return result


def archived_layout(topics: Iterable[str], layout: TopicLayout) -> list[Partition]:
    """Every partition the layout's counts give the archive's event topics, by role.

    The archive's topics may be another deployment's (``old.users``, a restore maps them by
    role); a topic of one role found names the other role's (``old.conversations``).
    """
    prefixes: set[str] = set()
    for topic in topics:
        for stream in ("user", "conversation"):
            if topic.endswith(f".{stream}s"):
                prefixes.add(topic[: -len(f".{stream}s")])
    return sorted(
        partition
        for prefix in prefixes
        for partition in msgspec.structs.replace(layout, prefix=prefix).every_partition()
    )


def absent_partitions(
    present: Iterable[Partition], started: Iterable[Partition], expected: Iterable[Partition]
) -> tuple[list[Problem], list[Partition]]:
    """The partitions without any object in the archive, split into problems (provably lost)
    and the rest (empty, as far as anything shows).

    Provably lost: a partition whose first segment the archive recorded (``started``: the
    marker lies outside the partition's prefix). In an archive without any marker (written
    before they existed), a partition numbered below one of its topic's that has segments: it
    existed, and nothing can show it was empty. Any other partition without objects (one of
    ``expected``, the layout's, or a higher-numbered one in an archive without markers) cannot
    be told from one that never received a record, and is reported empty.
    """
    present, started = set(present), set(started)
    highest: dict[str, int] = {}
    for topic, partition in present:
        highest[topic] = max(highest.get(topic, -1), partition)
    below = {(topic, p) for topic, top in highest.items() for p in range(top)}
    problems: list[Problem] = []
    empty: list[Partition] = []
    for topic, partition in sorted((set(expected) | started | below) - present):
        if (topic, partition) in started:
            why = (
                "the archive recorded segments of this partition "
                f"({META}/started/{topic}/{partition}), but it holds none: all were deleted"
            )
        elif not started and partition < highest.get(topic, -1):
            why = (
                f"no segment, while partition {highest[topic]} of the topic has segments: "
                "it existed, and nothing shows it never held a record"
            )
        else:
            empty.append((topic, partition))
            continue
        problems.append(Problem("missing", topic, partition, "*", why))
    return problems, empty


def check_archive(
    facts: Sequence[PartitionFacts],
    *,
    started: Iterable[Partition] = (),
    expected: Iterable[Partition] = (),
) -> Verification:
    """Recompute every partition's chain from ``facts``; name every problem found, and every
    partition without objects that provably held records (:func:`absent_partitions`; empty
    ones are listed as chains of no segment)."""
    # Where each recorded sha256 belongs, to recognise a body stored under the wrong name.
    owners: dict[str, str] = {}
    for part in facts:
        for name, manifest in part.manifests.items():
            if isinstance(manifest, Manifest):
                owners[manifest.sha256] = f"{part.topic}/{part.partition}/{name}"
    problems: list[Problem] = []
    chains: list[ChainSummary] = []
    for part in facts:
        found, chain = _check_partition(part, owners)
        problems.extend(found)
        chains.append(chain)
    lost, empty = absent_partitions(((f.topic, f.partition) for f in facts), started, expected)
    problems.extend(lost)
    chains.extend(ChainSummary(topic, partition, 0, 0, None, None) for topic, partition in empty)
    chains.sort(key=lambda c: (c.topic, c.partition))
    return Verification(chains, problems)


def _check_partition(
    part: PartitionFacts, owners: Mapping[str, str]
) -> tuple[list[Problem], ChainSummary]:
    topic, partition = part.topic, part.partition
    problems: list[Problem] = []

    def problem(kind: ProblemKind, name: str, detail: str) -> None:
        problems.append(Problem(kind, topic, partition, name, detail))

    for name in part.strays:
        problem("extra", name, "an object that is neither a segment nor a manifest")
    # The chain is walked in the order the manifests claim; a manifest under another name is
    # reported once, here, rather than as a cascade of broken links.
    claimed: list[tuple[int, int, str, Manifest]] = []
    for name, manifest in sorted(part.manifests.items()):
        first, last, _ = parse_name(name) or (0, 0, "")
        body_name = segment_name(first, last)
        if isinstance(manifest, str):
            problem("altered", name, f"manifest unreadable: {manifest}")
            continue
        if (manifest.topic, manifest.partition, manifest.first, manifest.last) != (
            topic,
            partition,
            first,
            last,
        ):
            problem(
                "reordered",
                name,
                f"manifest describes {manifest.topic}/{manifest.partition} offsets "
                f"{manifest.first}..{manifest.last}",
            )
        claimed.append((manifest.first, manifest.last, name, manifest))
        body = part.bodies.get(body_name)
        if body is None:
            problem("missing", body_name, f"segment body of offsets {first}..{last} is missing")
        elif body.sha256 != manifest.sha256:
            owner = owners.get(body.sha256)
            if owner is not None:
                problem("reordered", body_name, f"holds the segment recorded as {owner}")
            else:
                problem("altered", body_name, "sha256 differs from its manifest")
        elif body.error is not None:
            problem("altered", body_name, body.error)
        elif (
            (body.topic, body.partition) != (manifest.topic, manifest.partition)
            or body.count != manifest.count
            or body.last_offset != manifest.last
            or body.first_offset < manifest.first
            or not body.ordered
        ):
            problem("altered", name, "the manifest disagrees with its segment's records")
    # Bodies without manifest: the tail one is a write in progress, any other is extra.
    manifested = {segment_name(*(parse_name(n) or (0, 0, ""))[:2]) for n in part.manifests}
    tail_last = max((last for _, last, _, _ in claimed), default=-1)
    for name in sorted(set(part.bodies) - manifested):
        first, last, _ = parse_name(name) or (0, 0, "")
        if first > tail_last and name == max(set(part.bodies) - manifested):
            problem("pending", name, "segment body without manifest at the tail (being written)")
        else:
            problem("extra", name, "segment body without manifest")
    segments, records, chain_first, expected, prev_sha = 0, 0, None, None, None
    claimed.sort()
    successors = {m.prev_sha256 for _, _, _, m in claimed}
    index = 0
    while index < len(claimed):
        first, last, name, manifest = claimed[index]
        # Several manifests claiming the same start: keep the one the chain continues from.
        rivals = [c for c in claimed[index:] if c[0] == first]
        index += len(rivals)
        if len(rivals) > 1:
            rivals.sort(key=lambda c: (c[3].prev_sha256 != prev_sha, c[3].sha256 not in successors))
            for _, _, extra, _ in rivals[1:]:
                problem("extra", extra, f"another segment also starts at offset {first}")
            first, last, name, manifest = rivals[0]
        if expected is None:
            chain_first = first
            if manifest.prev_sha256 is not None:
                problem(
                    "missing",
                    name,
                    f"segments before offset {first} are missing (the chain starts with a link)",
                )
        elif first > expected:
            problem(
                "missing",
                segment_name(expected, first - 1),
                f"offsets {expected}..{first - 1} are in no segment (the chain resumes at {name})",
            )
        elif first < expected:
            problem("extra", name, f"offsets {first}..{last} overlap the chain (next {expected})")
            continue
        elif manifest.prev_sha256 != prev_sha:
            problem("broken", name, "prev_sha256 is not the sha256 of the segment before")
        segments += 1
        records += manifest.count
        expected, prev_sha = last + 1, manifest.sha256
    return problems, ChainSummary(topic, partition, segments, records, chain_first, expected)


async def verify_archive(
    archive: Archive,
    partitions: Iterable[Partition] | None = None,
    *,
    layout: TopicLayout | None = None,
) -> Verification:
    """Gather the archive's facts from S3 and check every chain (of ``partitions``, default
    all); for the whole archive, also every partition that should be there: recorded by the
    archive, or given by ``layout``'s counts (see :func:`absent_partitions`)."""
    facts = await gather_facts(archive, partitions)
    if partitions is not None:
        return check_archive(facts)
    started = await archive.started()
    topics = {f.topic for f in facts} | {topic for topic, _ in started}
    expected = archived_layout(topics, layout) if layout is not None else []
    return check_archive(facts, started=started, expected=expected)
