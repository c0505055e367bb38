"""Media: declared, uploaded straight to S3, verified, then shared through messages.

1. ``POST /v1/media`` declares an object (content type, size, sha256, filename) and answers a
   short-lived presigned ``PUT`` URL: the bytes never pass through ingest.
2. ``POST /v1/media/{id}/complete`` checks the stored object against the declared size and
   sha256 (reading it back from S3), then appends ``MediaUploaded``: only verified media exist
   for the rest of the system.
3. A message of type ``media`` names a completed upload of its sender.
4. ``GET /v1/media/{id}`` answers 302 to a short-lived presigned ``GET`` URL, for the uploader
   and for members of a conversation where a message carries it; 404 for anyone else.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import uuid
from typing import Any, Final

from aiohttp import web

from eventstore.objects import MEDIA_BUCKET, s3_client
from ingest.context import STORE, Principal, append
from ingest.http import json_response, path_uuid, read_body
from ingest.openapi import Operation
from ingest.problems import ProblemError
from ingest.security import guard
from schemas import MediaUploaded
from schemas.api import Accepted, MediaBody, MediaCreated

URL_TTL = 15 * 60
"""Seconds an upload or download URL stays valid."""

MEDIA_S3 = web.AppKey("media_s3", object)


def _client(request: web.Request) -> Any:
    return request.app[MEDIA_S3]


def _sha256_of(client: Any, key: str) -> tuple[int, str]:
    """Size and sha256 of the stored object, streamed (runs in a worker thread)."""
    body = client.get_object(Bucket=MEDIA_BUCKET, Key=key)["Body"]
    digest, size = hashlib.sha256(), 0
    with contextlib.closing(body):
        for chunk in iter(lambda: body.read(1024 * 1024), b""):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


async def declare(request: web.Request) -> web.Response:
    caller = await guard(request, "write", scope="messages:write")
    body = await read_body(request, MediaBody)
    media_id = uuid.uuid4()
    key = f"media/{caller.user_id}/{media_id}"
    await request.app[STORE].pool.execute(
        "INSERT INTO ingest.media_uploads (media_id, uploader_id, content_type, size, sha256,"
        " filename, object_key, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        media_id,
        caller.user_id,
        body.content_type,
        body.size,
        body.sha256,
        body.filename,
        key,
        dt.datetime.now(dt.UTC),
    )
    url = await asyncio.to_thread(
        _client(request).generate_presigned_url,
        "put_object",
        Params={"Bucket": MEDIA_BUCKET, "Key": key, "ContentType": body.content_type},
        ExpiresIn=URL_TTL,
    )
    return json_response(MediaCreated(media_id=media_id, upload_url=url, expires_in=URL_TTL), 201)


async def _upload_of(request: web.Request, caller: Principal, media_id: uuid.UUID) -> Any:
    row = await request.app[STORE].pool.fetchrow(
        "SELECT * FROM ingest.media_uploads WHERE media_id = $1 AND uploader_id = $2",
        media_id,
        caller.user_id,
    )
    if row is None:
        raise ProblemError("not-found", "no such upload")
    return row


async def complete(request: web.Request) -> web.Response:
    caller = await guard(request, "write", scope="messages:write")
    upload = await _upload_of(request, caller, path_uuid(request, "media_id"))
    try:
        size, sha = await asyncio.to_thread(_sha256_of, _client(request), upload["object_key"])
    except Exception as exc:
        raise ProblemError("conflict", "nothing was uploaded to the URL yet") from exc
    if (size, sha) != (upload["size"], upload["sha256"]):
        raise ProblemError(
            "upload-mismatch",
            f"stored object has {size} bytes, sha256 {sha}; declared {upload['size']} bytes,"
            f" sha256 {upload['sha256']}",
        )
    event = MediaUploaded(
        media_id=upload["media_id"],
        uploader_id=caller.user_id,
        content_type=upload["content_type"],
        size=upload["size"],
        sha256=upload["sha256"],
        filename=upload["filename"],
    )
    (recorded,) = await append(request, caller.user_id, [event])
    await request.app[STORE].pool.execute(
        "UPDATE ingest.media_uploads SET completed_at = $2 WHERE media_id = $1",
        upload["media_id"],
        dt.datetime.now(dt.UTC),
    )
    return json_response(Accepted(position=recorded.position.token()), 202)


async def completed_by(request: web.Request, media_id: uuid.UUID, uploader: uuid.UUID) -> bool:
    """Whether ``media_id`` is a verified upload of ``uploader`` (what a media message needs)."""
    found = await request.app[STORE].pool.fetchval(
        "SELECT 1 FROM ingest.media_uploads"
        " WHERE media_id = $1 AND uploader_id = $2 AND completed_at IS NOT NULL",
        media_id,
        uploader,
    )
    return found is not None


SHARED_WITH_SQL: Final = (
    "SELECT 1 FROM chat.messages m JOIN chat.members mb"
    " ON mb.conversation_id = m.conversation_id AND mb.user_id = $2"
    " WHERE m.media_id = $1 AND NOT m.deleted LIMIT 1"
)
"""Whether media ``$1`` is in a message that user ``$2`` can read (by ``messages (media_id)``)."""


async def download(request: web.Request) -> web.Response:
    caller = await guard(request, "read", scope="read")
    media_id = path_uuid(request, "media_id")
    pool = request.app[STORE].pool
    row = await pool.fetchrow(
        "SELECT object_key, uploader_id FROM ingest.media_uploads"
        " WHERE media_id = $1 AND completed_at IS NOT NULL",
        media_id,
    )
    allowed = row is not None and (
        row["uploader_id"] == caller.user_id
        or await pool.fetchval(
            SHARED_WITH_SQL,
            media_id,
            caller.user_id,
        )
        is not None
    )
    if not allowed or row is None:
        raise ProblemError("not-found", "no such media")
    url = await asyncio.to_thread(
        _client(request).generate_presigned_url,
        "get_object",
        Params={"Bucket": MEDIA_BUCKET, "Key": row["object_key"]},
        ExpiresIn=URL_TTL,
    )
    return web.Response(status=302, headers={"Location": url})


def media_client(app: web.Application) -> None:
    """Give the app its S3 client (called from the app's start-up, once the store is open)."""
    app[MEDIA_S3] = s3_client(app[STORE].settings)


def close_media_client(app: web.Application) -> None:
    """Close the app's S3 client (its pooled connections), if it got one."""
    if MEDIA_S3 in app:
        client: Any = app[MEDIA_S3]
        client.close()


OPERATIONS = (
    Operation(
        method="POST",
        path="/v1/media",
        handler=declare,
        summary="Declare an upload; answers a presigned URL to PUT the bytes to",
        status=201,
        body=MediaBody,
        answer=MediaCreated,
    ),
    Operation(
        method="POST",
        path="/v1/media/{media_id}/complete",
        handler=complete,
        summary="Verify the uploaded object against its size and sha256, then publish it",
        status=202,
        answer=Accepted,
        problems=(409,),
    ),
    Operation(
        method="GET",
        path="/v1/media/{media_id}",
        handler=download,
        summary="302 to a short-lived download URL (uploader and members who can see it)",
        status=302,
    ),
)
