"""Media: declared, uploaded straight to S3, verified, then shared through messages.

1. ``POST /v1/media`` declares an object (content type, size, sha256, filename) and answers a
   short-lived presigned ``PUT`` URL: the bytes never pass through ingest. The URL is signed
   with the declared content type and the declared sha256 as ``x-amz-checksum-sha256``, so the
   client sends both headers (``Content-Type``, and ``x-amz-checksum-sha256``: the declared
   digest in base64, not hex); S3 then stores nothing but the declared bytes at that URL, for as
   long as it is valid: other bytes fail the checksum (400 BadDigest), and another or a missing
   checksum header fails the signature (403).
2. ``POST /v1/media/{id}/complete`` copies the uploaded object to a key of its own (the
   *verified copy*, which no upload URL names), checks that copy against the declared size and
   sha256 (reading it back from S3), then appends ``MediaUploaded``: only verified media exist
   for the rest of the system, and what was verified is what is served, whatever is PUT to the
   upload URL afterwards (even on a store that ignores checksums). See :func:`complete` for
   retries.
3. A message of type ``media`` names a completed upload of its sender.
4. ``GET /v1/media/{id}`` answers 302 to a short-lived presigned ``GET`` URL of the verified
   copy, for the uploader and for members of a conversation where a message carries it; 404 for
   anyone else, and for everyone once the uploader is erased.
5. Erasing the uploader (:func:`forget_media`, from :func:`ingest.erasure.erase_user`) clears
   the filename and deletes the upload and every verified copy from S3.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import hashlib
import uuid
from typing import Any, Final

from aiohttp import web

from eventstore import EventStore
from eventstore.objects import MEDIA_BUCKET, s3_client
from ingest.context import STORE, Principal, append
from ingest.exports import ERASED_SQL, delete_objects
from ingest.http import json_response, path_uuid, read_body
from ingest.openapi import Operation
from ingest.problems import ProblemError
from ingest.security import guard
from schemas import MediaUploaded
from schemas.api import Accepted, MediaBody, MediaCreated

URL_TTL = 15 * 60
"""Seconds an upload or download URL stays valid."""

MEDIA_S3 = web.AppKey("media_s3", object)


def upload_prefix(user_id: uuid.UUID) -> str:
    """Where the upload URLs of ``user_id`` write (erasure deletes all of it)."""
    return f"uploads/{user_id}/"


def verified_prefix(user_id: uuid.UUID) -> str:
    """Where the verified copies of ``user_id``'s uploads are (erasure deletes all of it)."""
    return f"verified/{user_id}/"


def _client(request: web.Request) -> Any:
    return request.app[MEDIA_S3]


def _checksum_header(sha256_hex: str) -> str:
    """``x-amz-checksum-sha256``'s value for a hex sha256: the digest's bytes in base64."""
    return base64.b64encode(bytes.fromhex(sha256_hex)).decode("ascii")


def _copy(client: Any, source: str, target: str) -> bool:
    """Copy object ``source`` to ``target`` (server-side); False if ``source`` does not exist
    (runs in a worker thread)."""
    from botocore.exceptions import ClientError  # boto3's, imported with it (see objects.py)

    try:
        client.copy_object(
            Bucket=MEDIA_BUCKET, Key=target, CopySource={"Bucket": MEDIA_BUCKET, "Key": source}
        )
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
            return False
        raise
    return True


def _delete(client: Any, key: str) -> None:
    """Remove ``key``, best effort: what is left behind is never served (worker thread)."""
    with contextlib.suppress(Exception):
        client.delete_object(Bucket=MEDIA_BUCKET, Key=key)


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
    key = f"{upload_prefix(caller.user_id)}{media_id}"
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
        Params={
            "Bucket": MEDIA_BUCKET,
            "Key": key,
            "ContentType": body.content_type,
            "ChecksumSHA256": _checksum_header(body.sha256),
        },
        ExpiresIn=URL_TTL,
    )
    headers = {
        "Content-Type": body.content_type,
        "x-amz-checksum-sha256": _checksum_header(body.sha256),
    }
    return json_response(
        MediaCreated(media_id=media_id, upload_url=url, expires_in=URL_TTL, upload_headers=headers),
        201,
    )


async def _upload_of(request: web.Request, caller: Principal, media_id: uuid.UUID) -> Any:
    row = await request.app[STORE].pool.fetchrow(
        "SELECT * FROM ingest.media_uploads WHERE media_id = $1 AND uploader_id = $2",
        media_id,
        caller.user_id,
    )
    if row is None:
        raise ProblemError("not-found", "no such upload")
    return row


def _already_completed(upload: Any) -> web.Response:
    if upload["completed_position"] is None:  # completed before positions were recorded
        raise ProblemError("conflict", "this upload was completed already")
    return json_response(Accepted(position=upload["completed_position"]), 202)


async def complete(request: web.Request) -> web.Response:
    """Verify the upload and publish it, once: a retry answers the first completion.

    Completing an already completed upload answers 202 with the position its
    ``MediaUploaded`` was written at, appending nothing and touching no bytes: the answer the
    first call had (or lost on the way back), as API.md's "202 once the object is verified"
    still holds. A 409 would make a client whose answer was lost tell "done" from "not
    uploaded yet" (also 409) by the problem's detail; the idempotent answer needs no special
    case, like message sends and refresh-token reuse elsewhere in ingest.

    The bytes verified are a copy at a key of this attempt's own, which no upload URL reaches,
    and the one downloads are served from. Concurrent completes each copy and verify; the row
    lock then lets exactly one append and record its copy (the others answer its position and
    delete theirs). The lock spans only the append (a Kafka acknowledgement), not the copy or
    the hashing. The uploader's erasure takes the same lock (:func:`forget_media`): a complete
    that locks after it finds the person erased and records nothing. Should the process die
    between the append and the commit, a retry appends ``MediaUploaded`` again for the same
    media id; the projector keeps the first.
    """
    caller = await guard(request, "write", scope="messages:write")
    upload = await _upload_of(request, caller, path_uuid(request, "media_id"))
    if upload["completed_at"] is not None:
        return _already_completed(upload)
    client = _client(request)
    verified = f"{verified_prefix(caller.user_id)}{upload['media_id']}/{uuid.uuid4().hex}"
    if not await asyncio.to_thread(_copy, client, upload["object_key"], verified):
        # A concurrent complete may have recorded its copy and deleted the upload meanwhile.
        again = await _upload_of(request, caller, upload["media_id"])
        if again["completed_at"] is not None:
            return _already_completed(again)
        raise ProblemError("conflict", "nothing was uploaded to the URL yet")
    recorded_here = False
    try:
        size, sha = await asyncio.to_thread(_sha256_of, client, verified)
        if (size, sha) != (upload["size"], upload["sha256"]):
            raise ProblemError(
                "upload-mismatch",
                f"stored object has {size} bytes, sha256 {sha}; declared {upload['size']} bytes,"
                f" sha256 {upload['sha256']}",
            )
        async with request.app[STORE].pool.acquire() as conn, conn.transaction():
            current = await conn.fetchrow(
                "SELECT completed_at, completed_position FROM ingest.media_uploads"
                " WHERE media_id = $1 FOR UPDATE",
                upload["media_id"],
            )
            if current is None or await conn.fetchval(ERASED_SQL, caller.user_id):
                raise ProblemError("not-found", "no such upload")
            if current["completed_at"] is not None:  # another complete won the race
                return _already_completed(current)
            event = MediaUploaded(
                media_id=upload["media_id"],
                uploader_id=caller.user_id,
                content_type=upload["content_type"],
                size=upload["size"],
                sha256=upload["sha256"],
                filename=upload["filename"],
            )
            (recorded,) = await append(request, caller.user_id, [event])
            position = recorded.position.token()
            await conn.execute(
                "UPDATE ingest.media_uploads SET completed_at = $2, verified_key = $3,"
                " completed_position = $4 WHERE media_id = $1",
                upload["media_id"],
                dt.datetime.now(dt.UTC),
                verified,
                position,
            )
        recorded_here = True
    finally:
        # The upload itself is never served: only the verified copy recorded above is.
        await asyncio.to_thread(
            _delete, client, upload["object_key"] if recorded_here else verified
        )
    return json_response(Accepted(position=position), 202)


async def completed_by(request: web.Request, media_id: uuid.UUID, uploader: uuid.UUID) -> bool:
    """Whether ``media_id`` is a verified upload of ``uploader`` (what a media message needs)."""
    found = await request.app[STORE].pool.fetchval(
        "SELECT 1 FROM ingest.media_uploads"
        " WHERE media_id = $1 AND uploader_id = $2 AND completed_at IS NOT NULL",
        media_id,
        uploader,
    )
    return found is not None


async def forget_media(store: EventStore, s3: Any, user_id: uuid.UUID) -> int:
    """Erasure's step: forget every upload of ``user_id``; the number of objects deleted.
    Idempotent.

    Media are the uploader's personal data. Their rows keep the id, size and digest but lose
    the filename and the verified key (a completed upload without one is never served), then
    every object under the person's two prefixes is deleted (uploads, verified copies, and
    copies of completes that lost a race), whether a row names it or not: a rerun after a
    failure here finds what is left by the prefixes. The update locks the rows as
    :func:`complete` does, so a complete in flight either recorded its copy before (and the
    copy is deleted here) or finds the person erased and records nothing. Downloads answer
    404 from the instant the key is destroyed (see :func:`download`), before this step runs.
    """
    rows = await store.pool.fetch(
        "WITH old AS (SELECT media_id, object_key, verified_key FROM ingest.media_uploads"
        " WHERE uploader_id = $1 FOR UPDATE)"
        " UPDATE ingest.media_uploads u SET filename = NULL, verified_key = NULL FROM old"
        " WHERE u.media_id = old.media_id RETURNING old.object_key, old.verified_key",
        user_id,
    )
    named = {k for r in rows for k in (r["object_key"], r["verified_key"]) if k is not None}
    prefixes = [upload_prefix(user_id), verified_prefix(user_id)]
    return await asyncio.to_thread(delete_objects, s3, MEDIA_BUCKET, prefixes, named)


SHARED_WITH_SQL: Final = (
    "SELECT 1 FROM chat.messages m JOIN chat.members mb"
    " ON mb.conversation_id = m.conversation_id AND mb.user_id = $2"
    " WHERE m.media_id = $1 AND NOT m.deleted LIMIT 1"
)
"""Whether media ``$1`` is in a message that user ``$2`` can read (by ``messages (media_id)``)."""


async def download(request: web.Request) -> web.Response:
    """302 to the verified copy; 404 unless the caller may see it, and for everyone once the
    uploader's data key is destroyed (erasure's first step) or their upload forgotten."""
    caller = await guard(request, "read", scope="read")
    media_id = path_uuid(request, "media_id")
    pool = request.app[STORE].pool
    row = await pool.fetchrow(
        "SELECT verified_key, uploader_id FROM ingest.media_uploads u"
        " WHERE media_id = $1 AND completed_at IS NOT NULL AND verified_key IS NOT NULL"
        " AND NOT EXISTS (SELECT 1 FROM data_keys k"
        " WHERE k.subject = u.uploader_id AND k.erased_at IS NOT NULL)",
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
        Params={"Bucket": MEDIA_BUCKET, "Key": row["verified_key"]},
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
        summary=(
            "Declare an upload; answers a presigned URL to PUT the bytes to, with the headers"
            " the PUT must carry (upload_headers: Content-Type, x-amz-checksum-sha256)"
        ),
        status=201,
        body=MediaBody,
        answer=MediaCreated,
    ),
    Operation(
        method="POST",
        path="/v1/media/{media_id}/complete",
        handler=complete,
        summary=(
            "Verify the uploaded object against its size and sha256, then publish it"
            " (a retry answers the first completion's position)"
        ),
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
