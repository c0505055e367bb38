"""The Redis caches the projector keeps beside the read model (keys: :mod:`projectors.read`).

* members (hash ``user_id -> role``): complete or absent;
* a user's conversations (set): one ``SADD``/``SREM`` per membership a batch changed;
* recent history (sorted set, score = offset): the last :data:`RECENT_LIMIT` events of a
  conversation as fan-out frames, for WebSocket resumes;
* a conversation summary (hash, :func:`summary_key`).

They are written per batch, in one script call (atomic, like a ``MULTI``), *before* the
batch's PostgreSQL commit and from the batch's own (uncommitted) state: a crash between the
two replays the batch, and every write here is idempotent (whole hashes are replaced, set
members added or removed, a recent entry replaces whatever sat at its offset), so the replay
converges on the same values.

**Fencing.** A batch's write is versioned by its partitions' next offsets, and each key by
the partition whose records alone decide it (a conversation's keys, and a user's membership
of it, by the conversation's partition; a key of a conversation with no events in the batch,
as an erasure rewrites summaries, by the batch as a whole). The write records, per
partition, the latest version written (hash :func:`fence_key`, field ``<topic>:<partition>``)
and, atomically, skips the commands of every partition whose recorded version is later than
the batch's: the cache then already holds a later state of those keys. That refuses a worker
that was frozen between its reads and its write, whose transaction PostgreSQL has ended since
and whose partitions another worker has applied further and cached (the projection being
a function of the log, a write at a version holds the keys' state at that offset, and a
refused batch's keys hold that of a later one). A replay of the same records writes at most
the same version again. :func:`rebuild_caches` resets the versions to the offsets of the
model it rebuilt from, which is then what the keys hold.

Erasure rewrites recent entries of the erased user in place: their personal values become
``{"kind": "erased"}``, exactly what a replay after the erasure would frame. Entries are not
dropped, so a resuming client still receives every event, without a gap.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any, Final, cast

import msgspec
import structlog
from redis.asyncio import Redis
from redis.typing import EncodableT

from eventstore import Connection, OffsetRange, Pool, RecordedEvent, TopicLayout
from eventstore.cloudevents import frame
from eventstore.consumer import Partition
from eventstore.redisclient import PIPELINE_TIMEOUT, execute_bounded
from projectors.apply import Applied
from projectors.metrics import FENCED_CACHE_WRITES
from projectors.read.contract import (
    LIVE_SCHEMA,
    members_key,
    recent_key,
    user_conversations_key,
)
from projectors.schema import in_schema
from schemas import EVENT_TYPES, format_time

log = structlog.get_logger(__name__)

RECENT_LIMIT: Final = 256
_ERASED: Final = {"kind": "erased"}
_SCAN_BATCH: Final = 1000
_PAIRS_PER_COMMAND: Final = 500
"""Field-value (or score-member) pairs per command of a script (it unpacks its arguments)."""

_FENCED_WRITE: Final = """
local n = tonumber(ARGV[1])
local ok = {[0] = true}
local refused = {}
for i = 1, n do
  local field, version = ARGV[2 * i], ARGV[2 * i + 1]
  local fence = tonumber(redis.call('HGET', KEYS[1], field) or '-1')
  if fence > tonumber(version) then
    ok[i] = false
    ok[0] = false
    refused[#refused + 1] = field
  else
    ok[i] = true
    if fence < tonumber(version) then redis.call('HSET', KEYS[1], field, version) end
  end
end
local at, last = 2 * n + 2, #ARGV
while at <= last do
  local group, count = tonumber(ARGV[at]), tonumber(ARGV[at + 1])
  if ok[group] then redis.call(unpack(ARGV, at + 2, at + 1 + count)) end
  at = at + 2 + count
end
return refused
"""
"""``KEYS[1]``: the fences; ``ARGV``: n, n pairs (field, version), then the commands, each as
(group, argument count, command...). A group ``i`` runs if fence ``i`` is at most its version,
group 0 if every one is; every fence not refused moves up to its version. Returns the fields
refused. (The commands' keys are arguments, not ``KEYS``: a single Redis, not a cluster.)"""


def summary_key(namespace: str, conversation_id: uuid.UUID | str) -> str:
    """A hash summarising a conversation (kind, name, counts, last message)."""
    return f"{namespace}:summary:{conversation_id}"


def fence_key(namespace: str) -> str:
    """A hash ``<topic>:<partition> -> next offset`` of the latest batch written per partition
    (the versions the cache writes are fenced by, see the module doc)."""
    return f"{namespace}:fences"


def fence_field(topic: str, partition: int) -> str:
    return f"{topic}:{partition}"


def _summary(row: Any) -> dict[EncodableT, EncodableT]:
    fields: dict[EncodableT, EncodableT] = {
        "conversation_id": str(row["conversation_id"]),
        "kind": row["kind"],
        "creator_id": str(row["creator_id"]),
        "member_count": str(row["member_count"]),
        "message_count": str(row["message_count"]),
        "last_activity_at": format_time(row["last_activity_at"]),
    }
    if row["name"] is not None:
        fields["name"] = row["name"]
    if row["last_message_id"] is not None:
        fields["last_message_id"] = str(row["last_message_id"])
        fields["last_offset"] = str(row["last_offset"])
    return fields


_SUMMARY_SQL: Final = (
    "SELECT conversation_id, kind, name, creator_id, member_count, message_count, "
    "last_message_id, last_offset, last_activity_at FROM {schema}.conversations"
)
_MEMBERS_SQL: Final = "SELECT conversation_id, user_id, role FROM {schema}.members"
_SOME = " WHERE conversation_id = ANY($1::uuid[])"
_OFFSETS_SQL: Final = "SELECT topic, partition, next_offset FROM {schema}.offsets"


class Caches:
    """Writes the caches of one namespace (the deployment's topic prefix).

    Every round trip is bounded as a whole (:func:`~eventstore.redisclient.execute_bounded`,
    :data:`~eventstore.redisclient.PIPELINE_TIMEOUT`), so ``redis`` may be an
    :func:`~eventstore.redisclient.untimed_sibling`, which spares redis-py a timer per reply
    (the worker's is).
    """

    def __init__(self, redis: Redis, namespace: str) -> None:
        self._redis = redis
        self.namespace = namespace
        self._script = redis.register_script(_FENCED_WRITE)

    async def write(
        self,
        conn: Connection,
        schema: str,
        applied: Applied,
        ranges: Mapping[Partition, OffsetRange] | None = None,
        layout: TopicLayout | None = None,
    ) -> None:
        """Bring the caches in line with the batch ``applied`` describes (see module doc).

        ``ranges`` (with the ``layout`` naming their topics): the batch's partitions, which
        fence its writes; ``None`` (a dead-letter retry, outside log order) writes unfenced.
        """
        write = CacheWrite(ranges, layout)
        await self._gather(conn, schema, applied, write)
        await self._send(write)
        if applied.erased:
            await self._redact_recent(set(applied.erased), applied.redacted_conversations)

    async def _gather(
        self, conn: Connection, schema: str, applied: Applied, write: CacheWrite
    ) -> None:
        """The batch's commands into ``write``, its reads done in the batch's transaction."""
        ns = self.namespace
        _write_recent(write, ns, applied.events)
        if applied.membership:
            rows = await conn.fetch(
                in_schema(schema, _MEMBERS_SQL + _SOME), list(applied.membership)
            )
            members = _members_by_conversation(rows)
            for conversation_id in applied.membership:
                write.replace_hash(
                    write.group_of(conversation_id),
                    members_key(ns, conversation_id),
                    members[conversation_id].items(),
                )
            # The batch holds the partition of each of these conversations, which alone
            # changes its members: each membership is read as of the batch's version.
            for conversation_id, user_id in applied.member_changes:
                command = "SADD" if str(user_id) in members[conversation_id] else "SREM"
                key = user_conversations_key(ns, user_id)
                write.command(write.group_of(conversation_id), command, key, str(conversation_id))
        summaries: list[Mapping[str, Any]] = []
        unread = applied.conversations
        if not applied.erased:  # an erasure may have redacted rows since the projection
            summaries.extend(msgspec.structs.asdict(r) for r in applied.conversation_rows.values())
            unread = unread - applied.conversation_rows.keys()
        if unread:
            summaries.extend(
                await conn.fetch(in_schema(schema, _SUMMARY_SQL + _SOME), list(unread))
            )
        for row in summaries:
            write.replace_hash(
                write.group_of(row["conversation_id"]),
                summary_key(ns, row["conversation_id"]),
                _summary(row).items(),
            )

    async def _send(self, write: CacheWrite) -> list[str]:
        """Send ``write`` (one script call); the partitions it was refused for (module doc)."""
        if not write.args:
            return []
        args: list[EncodableT] = [len(write.fences)]
        for field, version in write.fences:
            args += (field, version)
        args += write.args
        async with asyncio.timeout(PIPELINE_TIMEOUT):
            reply = await self._script(keys=[fence_key(self.namespace)], args=args)
        refused = [f.decode() if isinstance(f, bytes) else str(f) for f in reply]
        if refused:
            FENCED_CACHE_WRITES.inc()
            log.warning("projector.cache_write_fenced", partitions=refused)
        return refused

    async def _redact_recent(
        self, erased: set[uuid.UUID], conversations: Iterable[uuid.UUID]
    ) -> None:
        users = {str(u) for u in erased}
        keys = [recent_key(self.namespace, c) for c in sorted(conversations)]
        reads = self._redis.pipeline(transaction=False)
        for key in keys:
            reads.zrange(key, 0, -1, withscores=True)
        pipe = self._redis.pipeline(transaction=True)
        for key, entries in zip(keys, await execute_bounded(reads), strict=True):
            for raw, score in cast(list[tuple[bytes, float]], entries):
                rewritten = redact_frame(raw, users)
                if rewritten is not None:
                    pipe.zremrangebyscore(key, score, score)
                    pipe.zadd(key, {rewritten: score})
        await execute_bounded(pipe)


class CacheWrite:
    """The commands of one batch's cache write, each in the group of the partition its key
    belongs to (group 0: the batch as a whole), and the fences the groups are checked against
    (``<topic>:<partition>`` and the batch's next offset there; group ``i``, the ``i``-th)."""

    def __init__(
        self, ranges: Mapping[Partition, OffsetRange] | None, layout: TopicLayout | None
    ) -> None:
        self.fences: list[tuple[str, int]] = []
        self.args: list[EncodableT] = []
        self._groups: dict[tuple[str, int], int] = {}
        self._conversations: dict[uuid.UUID, int] = {}
        if ranges:
            if layout is None:
                raise ValueError("fenced cache writes need the layout naming their topics")
            for group, ((topic, partition), span) in enumerate(sorted(ranges.items()), 1):
                self.fences.append((fence_field(topic, partition), span.next))
                self._groups[layout.stream_of(topic), partition] = group

    def group_of_event(self, recorded: RecordedEvent) -> int:
        """The group of the event's partition (and from then on of its conversation)."""
        position = recorded.position
        group = self._groups.get((position.stream, position.partition), 0)
        self._conversations[recorded.event.stream_id] = group
        return group

    def group_of(self, conversation_id: uuid.UUID) -> int:
        """The group of a conversation with events in the batch, else 0 (an erasure's)."""
        return self._conversations.get(conversation_id, 0)

    def command(self, group: int, *command: EncodableT) -> None:
        self.args += (group, len(command), *command)

    def replace_hash(
        self, group: int, key: str, fields: Iterable[tuple[EncodableT, EncodableT]]
    ) -> None:
        """The hash at ``key`` replaced by ``fields`` (deleted if there are none)."""
        self.command(group, "DEL", key)
        self.pairs(group, "HSET", key, fields)

    def pairs(
        self, group: int, name: str, key: str, pairs: Iterable[tuple[EncodableT, EncodableT]]
    ) -> None:
        """``name key a1 b1 a2 b2 ...`` (HSET, ZADD) in commands of at most
        :data:`_PAIRS_PER_COMMAND` pairs; nothing for no pairs."""
        flat: list[EncodableT] = []
        for a, b in pairs:
            flat += (a, b)
            if len(flat) >= 2 * _PAIRS_PER_COMMAND:
                self.command(group, name, key, *flat)
                flat = []
        if flat:
            self.command(group, name, key, *flat)


def _write_recent(write: CacheWrite, ns: str, events: Iterable[RecordedEvent]) -> None:
    """Each event's frame at its offset in its conversation's recent history, replacing what sat
    there, then the history trimmed to :data:`RECENT_LIMIT`: per conversation, one removal of
    the batch's span of offsets and one ``ZADD`` of all its frames. A batch holds every record
    of its partitions' spans and a conversation lives in one partition, so the only entries in
    the span are the batch's own events, from an earlier application of the same records."""
    history: dict[uuid.UUID, dict[EncodableT, int]] = defaultdict(dict)
    groups: dict[uuid.UUID, int] = {}
    for recorded in events:
        conversation_id = recorded.event.stream_id
        if conversation_id not in groups:
            groups[conversation_id] = write.group_of_event(recorded)
        history[conversation_id][frame(recorded)] = recorded.position.offset
    for conversation_id, frames in history.items():
        group, key = groups[conversation_id], recent_key(ns, conversation_id)
        offsets = frames.values()
        write.command(group, "ZREMRANGEBYSCORE", key, min(offsets), max(offsets))
        write.pairs(group, "ZADD", key, ((offset, f) for f, offset in frames.items()))
        write.command(group, "ZREMRANGEBYRANK", key, 0, -(RECENT_LIMIT + 1))


def redact_frame(raw: bytes, users: set[str]) -> bytes | None:
    """``raw`` with the personal values of ``users`` erased, or ``None`` if it holds none."""
    document = msgspec.json.decode(raw)
    event = document["event"]
    cls = EVENT_TYPES.get(event["type"])
    data = event["data"]
    if cls is None or not cls.personal_fields or data.get(cls.subject_field) not in users:
        return None
    changed = False
    for name in cls.personal_fields:
        if data.get(name) is not None and data[name] != _ERASED:
            data[name] = dict(_ERASED)
            changed = True
    return msgspec.json.encode(document) if changed else None


def _members_by_conversation(
    rows: Iterable[Any],
) -> dict[uuid.UUID, dict[EncodableT, EncodableT]]:
    members: dict[uuid.UUID, dict[EncodableT, EncodableT]] = defaultdict(dict)
    for row in rows:
        members[row["conversation_id"]][str(row["user_id"])] = row["role"]
    return members


async def _delete_matching(redis: Redis, pattern: str) -> None:
    batch: list[Any] = []
    async for key in redis.scan_iter(match=pattern, count=_SCAN_BATCH):
        batch.append(key)
        if len(batch) >= _SCAN_BATCH:
            await redis.delete(*batch)
            batch.clear()
    if batch:
        await redis.delete(*batch)


class CachesRebuilt(msgspec.Struct, frozen=True):
    """What :func:`rebuild_caches` wrote: members hashes, users' conversation sets, summaries."""

    conversations: int
    users: int
    summaries: int


async def rebuild_caches(
    pool: Pool, redis: Redis, namespace: str, schema: str = LIVE_SCHEMA
) -> CachesRebuilt:
    """Drop and rebuild the membership, user-conversation and summary caches from PostgreSQL.

    Runs in a transaction holding ``SHARE`` locks on ``members`` and ``conversations``: a
    projector batch that changes them waits, so it cannot interleave its cache writes with
    the rebuild's and leave an older state behind. Recent history comes from the log, not
    from here; a fan-out resume falls back to the read model when it is missing.

    The fences (:func:`fence_key`) keep guarding the keys while they are rewritten, then are
    replaced, in one ``MULTI``, by the model's stored offsets: what the keys now hold. A
    version recorded beyond them (a batch that wrote its caches and never committed) would
    otherwise refuse the batches that apply those records again, over keys rebuilt to older
    values. Batches that wrote none of these keys may commit meanwhile; their partitions'
    versions go back to where the keys still hold the same state.
    """
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(
            in_schema(schema, "LOCK TABLE {schema}.members, {schema}.conversations IN SHARE MODE")
        )
        for pattern in ("members:*", "user:*:convs", "summary:*"):
            await _delete_matching(redis, f"{namespace}:{pattern}")
        members = await conn.fetch(in_schema(schema, _MEMBERS_SQL))
        summaries = await conn.fetch(in_schema(schema, _SUMMARY_SQL))
        offsets = await conn.fetch(in_schema(schema, _OFFSETS_SQL))
        pipe = redis.pipeline(transaction=False)
        by_conversation = _members_by_conversation(members)
        for conversation_id, roles in by_conversation.items():
            pipe.hset(members_key(namespace, conversation_id), mapping=roles)
        conversations: dict[uuid.UUID, list[str]] = defaultdict(list)
        for row in members:
            conversations[row["user_id"]].append(str(row["conversation_id"]))
        for user_id, ids in conversations.items():
            pipe.sadd(user_conversations_key(namespace, user_id), *ids)
        for row in summaries:
            pipe.hset(summary_key(namespace, row["conversation_id"]), mapping=_summary(row))
        await pipe.execute()
        fences = redis.pipeline(transaction=True)
        fences.delete(fence_key(namespace))
        if offsets:
            versions: dict[EncodableT, EncodableT] = {
                fence_field(r["topic"], r["partition"]): r["next_offset"] for r in offsets
            }
            fences.hset(fence_key(namespace), mapping=versions)
        await fences.execute()
    return CachesRebuilt(len(by_conversation), len(conversations), len(summaries))
