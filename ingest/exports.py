"""Personal-data exports (GDPR art. 15 and 20): everything held about the caller, as JSON.

``POST /v1/users/me/export`` records a request and builds the archive in the background;
``GET /v1/users/me/export/{id}`` reports its state and, once done, a presigned download URL
(short-lived). The archive holds, decrypted where the person's key still exists:

* the account (id, role, state, created) and every session and API key (never a secret);
* the public profile and settings as projected;
* memberships, the messages they sent, their reactions and read markers, their media;
* every event of their own stream in the log (registration, profile, sessions, erasure).

After an erasure the same export holds nothing readable of them: the key is gone, the read
model holds no content, and their stream's personal fields decode as erased.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import uuid
from typing import Any

import structlog

from eventstore import EventStore
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
    memberships = await pool.fetch(
        "SELECT m.conversation_id, c.kind, c.name, m.role, m.joined_at FROM chat.members m"
        " JOIN chat.conversations c ON c.conversation_id = m.conversation_id"
        " WHERE m.user_id = $1 ORDER BY m.joined_at",
        user_id,
    )
    messages = await pool.fetch(
        'SELECT message_id, conversation_id, partition, "offset", kind, body, reply_to,'
        " media_id, created_at, edited_at, deleted FROM chat.messages WHERE sender_id = $1"
        ' ORDER BY created_at, "offset"',
        user_id,
    )
    reactions = await pool.fetch(
        "SELECT message_id, conversation_id, emoji, reacted_at FROM chat.reactions"
        " WHERE user_id = $1 ORDER BY reacted_at",
        user_id,
    )
    markers = await pool.fetch(
        "SELECT r.conversation_id, r.up_to, r.moved_at FROM chat.read_markers r"
        " WHERE r.user_id = $1 AND r.conversation_id IN"
        " (SELECT conversation_id FROM chat.members WHERE user_id = $1)",
        user_id,
    )
    media = await pool.fetch(
        "SELECT media_id, content_type, size, sha256, filename, uploaded_at FROM chat.media"
        " WHERE uploader_id = $1 ORDER BY uploaded_at",
        user_id,
    )
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
        "memberships": _rows(memberships),
        "messages": _rows(messages),
        "reactions": _rows(reactions),
        "read_markers": _rows(markers),
        "media": _rows(media),
        "events": events,
    }


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
        key = f"exports/{user_id}/{export_id}.json"
        try:
            document = await collect(self._store, user_id)
            body = json.dumps(document, default=_json_default, ensure_ascii=False).encode()
            await asyncio.to_thread(
                self._s3.put_object,
                Bucket=EXPORTS_BUCKET,
                Key=key,
                Body=body,
                ContentType="application/json",
            )
        except Exception as exc:
            log.exception("privacy.export_failed", export_id=str(export_id))
            await self._finish(export_id, "failed", None, type(exc).__name__)
            return
        await self._finish(export_id, "done", key, None)
        log.info(
            "privacy.exported", export_id=str(export_id), user_id=str(user_id), bytes=len(body)
        )

    async def _finish(
        self, export_id: uuid.UUID, state: str, key: str | None, error: str | None
    ) -> None:
        await self._store.pool.execute(
            "UPDATE ingest.exports SET state = $2, object_key = $3, error = $4, finished_at = $5"
            " WHERE export_id = $1",
            export_id,
            state,
            key,
            error,
            dt.datetime.now(dt.UTC),
        )

    async def status(self, user_id: uuid.UUID, export_id: uuid.UUID) -> dict[str, Any] | None:
        """The export's state (and download URL once done); None if not the caller's."""
        row = await self._store.pool.fetchrow(
            "SELECT state, object_key, created_at, finished_at FROM ingest.exports"
            " WHERE export_id = $1 AND user_id = $2",
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
