"""The Redis caches the projector keeps beside the read model (keys: :mod:`projectors.read`).

* members (hash ``user_id -> role``) and a user's conversations (set): complete or absent;
* recent history (sorted set, score = offset): the last :data:`RECENT_LIMIT` events of a
  conversation as fan-out frames, for WebSocket resumes;
* a conversation summary (hash, :func:`summary_key`).

They are written per batch, in one pipelined ``MULTI``, *before* the batch's PostgreSQL
commit and from the batch's own (uncommitted) state: a crash between the two replays the
batch, and every write here is idempotent (whole hashes and sets are replaced, a recent entry
replaces whatever sat at its offset), so the replay converges on the same values.

Erasure rewrites recent entries of the erased user in place: their personal values become
``{"kind": "erased"}``, exactly what a replay after the erasure would frame. Entries are not
dropped, so a resuming client still receives every event, without a gap.
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any, Final, cast

import msgspec
from redis.asyncio import Redis
from redis.typing import EncodableT

from eventstore import Connection, Pool, RecordedEvent
from eventstore.cloudevents import frame
from eventstore.redisclient import execute_bounded
from projectors.apply import Applied
from projectors.read.contract import (
    LIVE_SCHEMA,
    members_key,
    recent_key,
    user_conversations_key,
)
from projectors.schema import in_schema
from schemas import EVENT_TYPES, format_time

RECENT_LIMIT: Final = 256
_ERASED: Final = {"kind": "erased"}
_SCAN_BATCH: Final = 1000


def summary_key(namespace: str, conversation_id: uuid.UUID | str) -> str:
    """A hash summarising a conversation (kind, name, counts, last message)."""
    return f"{namespace}:summary:{conversation_id}"


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
_USER_CONVERSATIONS_SQL: Final = (
    "SELECT user_id, conversation_id FROM {schema}.members WHERE user_id = ANY($1::uuid[])"
)


class Caches:
    """Writes the caches of one namespace (the deployment's topic prefix).

    Every round trip is bounded as a whole (:func:`~eventstore.redisclient.execute_bounded`),
    so ``redis`` may be an :func:`~eventstore.redisclient.untimed_sibling`, which spares
    redis-py a timer per reply (the worker's is).
    """

    def __init__(self, redis: Redis, namespace: str) -> None:
        self._redis = redis
        self.namespace = namespace

    async def write(self, conn: Connection, schema: str, applied: Applied) -> None:
        """Bring the caches in line with the batch ``applied`` describes (see module doc)."""
        ns = self.namespace
        pipe = self._redis.pipeline(transaction=True)
        _write_recent(pipe, ns, applied.events)
        if applied.membership:
            rows = await conn.fetch(
                in_schema(schema, _MEMBERS_SQL + _SOME), list(applied.membership)
            )
            _replace_members(pipe, ns, applied.membership, rows)
        if applied.member_users:
            rows = await conn.fetch(
                in_schema(schema, _USER_CONVERSATIONS_SQL), list(applied.member_users)
            )
            _replace_user_conversations(pipe, ns, applied.member_users, rows)
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
            key = summary_key(ns, row["conversation_id"])
            pipe.delete(key)
            pipe.hset(key, mapping=_summary(row))
        await execute_bounded(pipe)
        if applied.erased:
            await self._redact_recent(set(applied.erased), applied.redacted_conversations)

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


def _write_recent(pipe: Any, ns: str, events: Iterable[RecordedEvent]) -> None:
    """Each event's frame at its offset in its conversation's recent history, replacing what sat
    there, then the history trimmed to :data:`RECENT_LIMIT`: per conversation, one removal of
    the batch's span of offsets and one ``ZADD`` of all its frames. A batch holds every record
    of its partitions' spans and a conversation lives in one partition, so the only entries in
    the span are the batch's own events, from an earlier application of the same records."""
    history: dict[str, dict[EncodableT, float]] = defaultdict(dict)
    for recorded in events:
        key = recent_key(ns, recorded.event.stream_id)
        history[key][frame(recorded)] = recorded.position.offset
    for key, frames in history.items():
        offsets = frames.values()
        pipe.zremrangebyscore(key, min(offsets), max(offsets))
        pipe.zadd(key, frames)
        pipe.zremrangebyrank(key, 0, -(RECENT_LIMIT + 1))


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


def _replace_members(
    pipe: Any, ns: str, conversations: Iterable[uuid.UUID], rows: Iterable[Any]
) -> None:
    members: dict[uuid.UUID, dict[EncodableT, EncodableT]] = defaultdict(dict)
    for row in rows:
        members[row["conversation_id"]][str(row["user_id"])] = row["role"]
    for conversation_id in conversations:
        key = members_key(ns, conversation_id)
        pipe.delete(key)
        if members[conversation_id]:
            pipe.hset(key, mapping=members[conversation_id])


def _replace_user_conversations(
    pipe: Any, ns: str, users: Iterable[uuid.UUID], rows: Iterable[Any]
) -> None:
    conversations: dict[uuid.UUID, list[str]] = defaultdict(list)
    for row in rows:
        conversations[row["user_id"]].append(str(row["conversation_id"]))
    for user_id in users:
        key = user_conversations_key(ns, user_id)
        pipe.delete(key)
        if conversations[user_id]:
            pipe.sadd(key, *conversations[user_id])


async def _delete_matching(redis: Redis, pattern: str) -> None:
    batch: list[Any] = []
    async for key in redis.scan_iter(match=pattern, count=_SCAN_BATCH):
        batch.append(key)
        if len(batch) >= _SCAN_BATCH:
            await redis.delete(*batch)
            batch.clear()
    if batch:
        await redis.delete(*batch)


async def rebuild_caches(
    pool: Pool, redis: Redis, namespace: str, schema: str = LIVE_SCHEMA
) -> None:
    """Drop and rebuild the membership, user-conversation and summary caches from PostgreSQL.

    Runs in a transaction holding ``SHARE`` locks on ``members`` and ``conversations``: a
    projector batch that changes them waits, so it cannot interleave its cache writes with
    the rebuild's and leave an older state behind. Recent history comes from the log, not
    from here; a fan-out resume falls back to the read model when it is missing.
    """
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(
            in_schema(schema, "LOCK TABLE {schema}.members, {schema}.conversations IN SHARE MODE")
        )
        for pattern in ("members:*", "user:*:convs", "summary:*"):
            await _delete_matching(redis, f"{namespace}:{pattern}")
        members = await conn.fetch(in_schema(schema, _MEMBERS_SQL))
        summaries = await conn.fetch(in_schema(schema, _SUMMARY_SQL))
        pipe = redis.pipeline(transaction=False)
        conversations = {r["conversation_id"] for r in members}
        users = {r["user_id"] for r in members}
        _replace_members(pipe, namespace, conversations, members)
        _replace_user_conversations(pipe, namespace, users, members)
        for row in summaries:
            pipe.hset(summary_key(namespace, row["conversation_id"]), mapping=_summary(row))
        await pipe.execute()
