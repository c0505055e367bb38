"""The S3 archive of the log: compressed segments per partition, chained by their hashes.

Layout in the bucket (names sort by offset, so a listing is the chain in order)::

    <prefix>/<topic>/<partition>/<first:020d>-<last:020d>.seg    the records, zstd
    <prefix>/<topic>/<partition>/<first:020d>-<last:020d>.json   its manifest

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
:meth:`Archive.recover` finds it, checks it continues the chain, and writes its manifest (or
deletes it when it does not fit), so the next segment starts right after it: no gap, no
overlap. Where the chain ends is read from S3 itself, so there is no second store to disagree
with. Before each write the writer checks the tail did not move under it (a zombie member).

*Verification* (:func:`check_archive`, pure) works from facts the shell gathers
(:func:`gather_facts`): every manifest, every body's sha256 and offsets. It names missing
(offsets in no segment, a manifest without body), altered (body or manifest changed), reordered
(a body or manifest stored under another segment's name), extra (overlapping or stray objects)
segments and broken links; a body without manifest at the very tail is *pending* (a writer is
between its two puts), not an error.

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
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Final, Literal, Protocol

import msgspec
import structlog
import zstandard

from eventstore.errors import EventStoreError
from eventstore.settings import PREFIX, Settings, env_float, env_int

log = structlog.get_logger(__name__)

FORMAT: Final = 1
SEGMENT_SUFFIX: Final = ".seg"
MANIFEST_SUFFIX: Final = ".json"
DEFAULT_BUCKET: Final = "backbone-archive"
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
    def from_env(cls, settings: Settings, env: Mapping[str, str]) -> ArchiveConfig:
        """``BACKBONE_ARCHIVE_{BUCKET,PREFIX,SEGMENT_RECORDS,SEGMENT_BYTES,FLUSH_SECONDS}``;
        the prefix defaults to the deployment's topic prefix."""
        bucket = env.get(PREFIX + "ARCHIVE_BUCKET", "").strip() or DEFAULT_BUCKET
        prefix = env.get(PREFIX + "ARCHIVE_PREFIX", "").strip().strip("/")
        return cls(
            bucket=bucket,
            prefix=prefix or settings.topic_prefix,
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
            if len(parts) == 3 and parts[1].isdigit():
                found.add((parts[0], int(parts[1])))
        return sorted(found)

    async def recover(self, topic: str, partition: int) -> ChainHead:
        """Where the partition's chain ends, completing a segment whose writer died.

        A body without manifest after the last manifest is adopted when it continues the chain
        (its manifest is written now) and deleted otherwise (it was never part of the chain).
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
            head = await self._adopt(topic, partition, head, first, key)
        return head

    async def _adopt(
        self, topic: str, partition: int, head: ChainHead, first: int, key: str
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
            log.warning("archive.orphan_deleted", key=key, chain_next=head.next)
            await self.delete(key)
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


def check_archive(facts: Sequence[PartitionFacts]) -> Verification:
    """Recompute every partition's chain from ``facts``; name every problem found."""
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
    archive: Archive, partitions: Iterable[Partition] | None = None
) -> Verification:
    """Gather the archive's facts from S3 and check every chain."""
    return check_archive(await gather_facts(archive, partitions))
