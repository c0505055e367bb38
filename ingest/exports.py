"""Personal-data exports (GDPR art. 15 and 20): everything held about the caller, as JSON.

``POST /v1/users/me/export`` records a request and builds the archive in the background;
``GET /v1/users/me/export/{id}`` reports its state and, once done, a presigned download URL
(short-lived). The archive holds, decrypted where the person's key still exists:

* the account (id, role, state, created) and every session and API key (never a secret);
* the public profile and settings as projected;
* memberships, the messages they sent, their reactions and read markers, their media;
* every event of their own stream in the log (registration, profile, sessions, erasure).

After an erasure the same export holds nothing readable of them: the key is gone, the read
model holds no content, and their stream's personal fields decode as erased. Erasure also
deletes every export the person had (:func:`forget_exports`): the archives are plain text.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import uuid
from typing import Any, Final

import structlog

from eventstore import Connection, EventStore
from eventstore.audit import stream_events
from eventstore.cloudevents import structured
from eventstore.objects import EXPORTS_BUCKET, s3_client
from schemas.envelope import format_time

log = structlog.get_logger(__name__)

URL_TTL = 15 * 60
"""Seconds a download URL stays valid."""
STALE_AFTER = dt.timedelta(minutes=10)
"""A ``running`` export older than this died with its process: it is reported ``failed``."""


def _json_default(value: object) -> object:
    if isinstance(value, dt.datetime):
        return format_time(value)
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, bytes | memoryview):
        return None  # never secrets: hashes are not selected, this is a safety net
    raise TypeError(f"cannot export {type(value).__name__}")


def _rows(records: list[Any]) -> list[dict[str, Any]]:
    return [dict(r) for r in records]


READ_MODEL_SQL: Final = {
    "memberships": "SELECT m.conversation_id, c.kind, c.name, m.role, m.joined_at"
    " FROM chat.members m JOIN chat.conversations c ON c.conversation_id = m.conversation_id"
    " WHERE m.user_id = $1 ORDER BY m.joined_at",
    "messages": 'SELECT message_id, conversation_id, partition, "offset", kind, body, reply_to,'
    " media_id, created_at, edited_at, deleted FROM chat.messages WHERE sender_id = $1"
    ' ORDER BY created_at, "offset"',
    "reactions": "SELECT message_id, conversation_id, emoji, reacted_at FROM chat.reactions"
    " WHERE user_id = $1 ORDER BY reacted_at",
    "read_markers": "SELECT r.conversation_id, r.up_to, r.moved_at FROM chat.members m"
    " JOIN chat.read_markers r ON r.conversation_id = m.conversation_id AND r.user_id = m.user_id"
    " WHERE m.user_id = $1 ORDER BY r.moved_at",
    "media": "SELECT media_id, content_type, size, sha256, filename, uploaded_at FROM chat.media"
    " WHERE uploader_id = $1 ORDER BY uploaded_at",
}
"""What an export reads of the read model about one person ($1), by section: each by an index
(a test reads their plans)."""


async def collect(store: EventStore, user_id: uuid.UUID) -> dict[str, Any]:
    """The archive's content for ``user_id``."""
    pool = store.pool
    account = await pool.fetchrow(
        "SELECT user_id, role, state, created_at FROM ingest.accounts WHERE user_id = $1",
        user_id,
    )
    sessions = await pool.fetch(
        "SELECT session_id, created_at, expires_at, revoked_at, reason FROM ingest.sessions"
        " WHERE user_id = $1 ORDER BY created_at",
        user_id,
    )
    api_keys = await pool.fetch(
        "SELECT key_id, name, scopes, created_at, revoked_at, last_used_at FROM ingest.api_keys"
        " WHERE owner_id = $1 ORDER BY created_at",
        user_id,
    )
    profile = await pool.fetchrow(
        "SELECT user_id, username, display_name, status, settings, role, erased, registered_at"
        " FROM chat.users WHERE user_id = $1",
        user_id,
    )
    held = {name: _rows(await pool.fetch(sql, user_id)) for name, sql in READ_MODEL_SQL.items()}
    events = [structured(e) async for e in stream_events(store, "user", user_id)]
    settings = dict(profile) if profile is not None else None
    if settings is not None and isinstance(settings.get("settings"), str):
        settings["settings"] = json.loads(settings["settings"])
    return {
        "format": "backbone-export/1",
        "user_id": str(user_id),
        "account": dict(account) if account is not None else None,
        "sessions": _rows(sessions),
        "api_keys": _rows(api_keys),
        "profile": settings,
        **held,
        "events": events,
    }


ERASED_SQL: Final = (
    "SELECT EXISTS (SELECT 1 FROM ingest.accounts WHERE user_id = $1 AND state = 'erased')"
    " OR EXISTS (SELECT 1 FROM data_keys WHERE subject = $1 AND erased_at IS NOT NULL)"
)
"""Whether person ``$1`` is erased (their account released, or their data key destroyed)."""


def object_prefix(user_id: uuid.UUID) -> str:
    """Where every export archive of ``user_id`` is stored (erasure deletes it all)."""
    return f"exports/{user_id}/"


def object_key(user_id: uuid.UUID, export_id: uuid.UUID) -> str:
    return f"{object_prefix(user_id)}{export_id}.json"


async def forget_exports(store: EventStore, s3: Any, user_id: uuid.UUID) -> int:
    """Erasure's step: delete every export of ``user_id``, rows then archives; the number of
    archives deleted. Idempotent.

    The rows go first (a GET of one answers 404 from then on, as for an unknown export,
    and no download URL is issued), waiting for any export that is writing its archive
    (see :meth:`Exports._write`), then every object under the person's prefix, whether a
    row names it or not: a rerun after a failure here finds what is left by the prefix.
    Called after the account is marked erased, so that no export writes afterwards.
    """
    rows = await store.pool.fetch(
        "DELETE FROM ingest.exports WHERE user_id = $1 RETURNING object_key", user_id
    )
    named = {r["object_key"] for r in rows if r["object_key"] is not None}
    return await asyncio.to_thread(
        delete_objects, s3, EXPORTS_BUCKET, [object_prefix(user_id)], named
    )


def delete_objects(s3: Any, bucket: str, prefixes: list[str], keys: set[str]) -> int:
    """Delete ``keys`` and every object under ``prefixes`` in ``bucket``; how many were found
    (worker thread). Errors propagate: erasure must fail, to be run again, if one stays."""
    found = set(keys)
    paginator = s3.get_paginator("list_objects_v2")
    for prefix in prefixes:
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
            found.update(item["Key"] for item in page.get("Contents", ()))
    for key in sorted(found):
        s3.delete_object(Bucket=bucket, Key=key)  # deleting a missing key succeeds
    return len(found)


class Exports:
    """Export requests of one deployment (rows in ``ingest.exports``, objects in S3)."""

    def __init__(self, store: EventStore) -> None:
        self._store = store
        self._s3 = s3_client(store.settings)
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, user_id: uuid.UUID) -> uuid.UUID:
        export_id = uuid.uuid4()
        await self._store.pool.execute(
            "INSERT INTO ingest.exports (export_id, user_id, state, created_at)"
            " VALUES ($1, $2, 'running', $3)",
            export_id,
            user_id,
            dt.datetime.now(dt.UTC),
        )
        task = asyncio.create_task(self._build(export_id, user_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return export_id

    async def _build(self, export_id: uuid.UUID, user_id: uuid.UUID) -> None:
        key = object_key(user_id, export_id)
        try:
            document = await collect(self._store, user_id)
            body = json.dumps(document, default=_json_default, ensure_ascii=False).encode()
            written = await self._write(export_id, user_id, key, body)
        except Exception as exc:
            log.exception("privacy.export_failed", export_id=str(export_id))
            await self._finish(export_id, "failed", None, type(exc).__name__)
            return
        if not written:
            log.info("privacy.export_dropped", export_id=str(export_id), user_id=str(user_id))
            return
        log.info(
            "privacy.exported", export_id=str(export_id), user_id=str(user_id), bytes=len(body)
        )

    async def _write(self, export_id: uuid.UUID, user_id: uuid.UUID, key: str, body: bytes) -> bool:
        """Store the archive and mark the export done; False (nothing stored) if the person was
        erased meanwhile.

        An export still running while its person is erased must not leave its archive behind
        (it was collected, maybe before the read models were redacted, in plain text). The
        object is written only while this transaction holds the export's row lock, after
        checking that the row still exists and that the person is not erased, and the row is
        marked done in the same transaction. Erasure (:func:`forget_exports`) marks the
        account erased, *then* deletes the rows (waiting for any such lock), *then* deletes
        every object under the person's prefix. So either this write finished before the
        rows were deleted, and erasure deletes the object after it, or it starts after, and
        finds the row gone or the account erased and writes nothing. An archive that was
        written by a process that died before committing stays under the prefix with its row
        ``running``: erasure deletes it all the same.
        """
        async with self._store.pool.acquire() as conn, conn.transaction():
            found = await conn.fetchval(
                "SELECT 1 FROM ingest.exports WHERE export_id = $1 FOR UPDATE", export_id
            )
            if found is None:
                return False  # deleted by an erasure
            if await conn.fetchval(ERASED_SQL, user_id):
                await conn.execute("DELETE FROM ingest.exports WHERE export_id = $1", export_id)
                return False
            await asyncio.to_thread(
                self._s3.put_object,
                Bucket=EXPORTS_BUCKET,
                Key=key,
                Body=body,
                ContentType="application/json",
            )
            await self._finish(export_id, "done", key, None, conn)
        return True

    async def _finish(
        self,
        export_id: uuid.UUID,
        state: str,
        key: str | None,
        error: str | None,
        conn: Connection | None = None,
    ) -> None:
        """Record how the export ended (on ``conn``, inside its transaction, if given)."""
        await (conn or self._store.pool).execute(
            "UPDATE ingest.exports SET state = $2, object_key = $3, error = $4, finished_at = $5"
            " WHERE export_id = $1",
            export_id,
            state,
            key,
            error,
            dt.datetime.now(dt.UTC),
        )

    async def status(self, user_id: uuid.UUID, export_id: uuid.UUID) -> dict[str, Any] | None:
        """The export's state (and download URL once done); None if not the caller's, or if
        the caller is erased (from the instant their key is destroyed: erasure then deletes
        the rows and archives, see :func:`forget_exports`)."""
        row = await self._store.pool.fetchrow(
            "SELECT state, object_key, created_at, finished_at FROM ingest.exports"
            " WHERE export_id = $1 AND user_id = $2 AND NOT EXISTS (SELECT 1 FROM data_keys"
            " WHERE subject = $2 AND erased_at IS NOT NULL)",
            export_id,
            user_id,
        )
        if row is None:
            return None
        state = row["state"]
        if state == "running" and dt.datetime.now(dt.UTC) - row["created_at"] > STALE_AFTER:
            state = "failed"
        answer: dict[str, Any] = {
            "export_id": str(export_id),
            "state": state,
            "created_at": format_time(row["created_at"]),
        }
        if row["finished_at"] is not None:
            answer["finished_at"] = format_time(row["finished_at"])
        if state == "done":
            answer["download_url"] = await asyncio.to_thread(
                self._s3.generate_presigned_url,
                "get_object",
                Params={"Bucket": EXPORTS_BUCKET, "Key": row["object_key"]},
                ExpiresIn=URL_TTL,
            )
            answer["expires_in"] = URL_TTL
        return answer

    async def close(self) -> None:
        """Let exports in flight finish (bounded by the caller's shutdown), then close the S3
        client's connections."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._s3.close()
