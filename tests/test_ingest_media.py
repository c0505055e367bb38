"""Media over HTTP against the real S3 server: declare, upload, verify, share, download."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import uuid
from typing import Any

import aiohttp

from eventstore import RecordedEvent
from eventstore.objects import MEDIA_BUCKET, s3_client
from ops.privacy import erase_async
from schemas import MediaUploaded
from tests.system_fixtures import Api, Reply, System, User

PROBLEM = "urn:backbone:problem:"


async def _declare(api: Api, user: User, data: bytes, sha: str | None = None) -> dict[str, Any]:
    reply = await api.call(
        "POST",
        "/v1/media",
        token=user.access,
        json={
            "content_type": "image/png",
            "size": len(data),
            "sha256": sha or hashlib.sha256(data).hexdigest(),
            "filename": "cat.png",
        },
    )
    assert reply.status == 201, reply.body
    return dict(reply.body)


def _checksum(sha256_hex: str) -> str:
    """The ``x-amz-checksum-sha256`` header value of a hex sha256: its digest in base64."""
    return base64.b64encode(bytes.fromhex(sha256_hex)).decode()


async def _try_put(url: str, data: bytes, sha256_hex: str | None = None) -> int:
    """PUT ``data`` to ``url`` with the headers a client sends (the declared content type and,
    when the URL was signed with it, the declared sha256); answer the status."""
    headers = {"Content-Type": "image/png"}
    if sha256_hex is not None and "x-amz-checksum-sha256" in url.lower():
        headers["x-amz-checksum-sha256"] = _checksum(sha256_hex)
    async with aiohttp.ClientSession() as http, http.put(url, data=data, headers=headers) as got:
        await got.read()
        return got.status


async def _put(url: str, data: bytes, sha256_hex: str | None = None) -> None:
    status = await _try_put(url, data, sha256_hex or hashlib.sha256(data).hexdigest())
    assert status == 200, status


async def _put_as_told(declared: dict[str, Any], data: bytes) -> None:
    """PUT ``data`` as a client does: to ``upload_url`` with exactly ``upload_headers``."""
    headers = declared["upload_headers"]
    assert set(headers) == {"Content-Type", "x-amz-checksum-sha256"}
    async with (
        aiohttp.ClientSession() as http,
        http.put(declared["upload_url"], data=data, headers=headers) as got,
    ):
        assert got.status == 200, await got.text()


async def _download_url(api: Api, user: User, media_id: str) -> str:
    """Where ``GET /v1/media/{id}`` sends ``user`` (it must answer 302)."""
    async with api.client.get(
        f"/v1/media/{media_id}",
        headers={"Authorization": f"Bearer {user.access}"},
        allow_redirects=False,
    ) as redirect:
        assert redirect.status == 302
        return str(redirect.headers["Location"])


async def _download(api: Api, user: User, media_id: str) -> bytes:
    location = await _download_url(api, user, media_id)
    async with aiohttp.ClientSession() as http, http.get(location) as got:
        assert got.status == 200
        return await got.read()


async def _room(api: Api, owner: User, member: User, name: str) -> str:
    room = await api.call(
        "POST",
        "/v1/conversations",
        token=owner.access,
        json={"name": name, "members": [str(member.user_id)]},
    )
    return str(room.body["conversation_id"])


async def _send_media(api: Api, user: User, cid: str, media_id: str, client_msg_id: str) -> Reply:
    return await api.call(
        "POST",
        f"/v1/conversations/{cid}/messages",
        token=user.access,
        json={
            "client_msg_id": client_msg_id,
            "content": "look",
            "type": "media",
            "media_id": media_id,
        },
    )


async def _uploaded_events(system: System, media_id: str) -> list[MediaUploaded]:
    async with system.store.reader(("user",)) as reader:
        return [
            item.event
            async for batch in reader.batches_until_end()
            for item in batch.items
            if isinstance(item, RecordedEvent)
            and isinstance(item.event, MediaUploaded)
            and str(item.event.media_id) == media_id
        ]


async def test_upload_verify_share_and_download(system: System) -> None:
    api = system.api
    alice, bob, eve = await api.user(), await api.user(), await api.user()
    data = b"\x89PNG not really" * 100
    declared = await _declare(api, alice, data)
    media_id = declared["media_id"]
    complete = f"/v1/media/{media_id}/complete"

    early = await api.call("POST", complete, token=alice.access)
    assert early.status == 409, early.body
    await _put_as_told(declared, data)
    assert (await api.call("POST", complete, token=bob.access)).status == 404
    done = await api.call("POST", complete, token=alice.access)
    assert done.status == 202, done.body

    cid = await _room(api, alice, bob, "pics")
    # Only your own verified uploads can be sent.
    theirs = await _send_media(api, bob, cid, media_id, "b1")
    assert (theirs.status, theirs.body["type"]) == (422, PROBLEM + "invalid-body")
    sent = await _send_media(api, alice, cid, media_id, "a1")
    assert sent.status == 202, sent.body
    page = await api.call(
        "GET",
        f"/v1/conversations/{cid}/messages?min_position={sent.body['position']}",
        token=bob.access,
    )
    assert page.body["items"][0]["media_id"] == media_id

    # A member downloads through a short-lived URL; anyone else gets 404.
    location = await _download_url(api, bob, media_id)
    async with aiohttp.ClientSession() as http, http.get(location) as got:
        assert await got.read() == data
    assert (await api.call("GET", f"/v1/media/{media_id}", token=eve.access)).status == 404
    assert (await api.call("GET", f"/v1/media/{uuid.uuid4()}", token=bob.access)).status == 404


async def _write_at_upload_key(system: System, media_id: str, data: bytes) -> None:
    """Put ``data`` at the media's upload key straight through S3 (as if a store checked no
    checksum), behind the upload URL's back."""
    key = await system.store.pool.fetchval(
        "SELECT object_key FROM ingest.media_uploads WHERE media_id = $1", uuid.UUID(media_id)
    )
    client = s3_client(system.settings)
    try:
        await asyncio.to_thread(client.put_object, Bucket=MEDIA_BUCKET, Key=key, Body=data)
    finally:
        client.close()


async def test_an_upload_that_does_not_match_its_declaration_is_refused(system: System) -> None:
    api = system.api
    alice = await api.user()
    data = b"the real bytes"
    declared = await _declare(api, alice, data, sha="0" * 64)
    media_id = declared["media_id"]
    # The upload URL is signed for the declared sha256: S3 itself refuses other bytes, with or
    # without the header, and with their own checksum (the signature covers its value).
    assert await _try_put(declared["upload_url"], data, "0" * 64) == 400
    assert await _try_put(declared["upload_url"], data) == 403
    assert await _try_put(declared["upload_url"], data, hashlib.sha256(data).hexdigest()) == 403
    nothing = await api.call("POST", f"/v1/media/{media_id}/complete", token=alice.access)
    assert (nothing.status, nothing.body["type"]) == (409, PROBLEM + "conflict")
    # Should a store not check checksums, complete still does (bytes written behind the URL).
    await _write_at_upload_key(system, media_id, data)
    refused = await api.call("POST", f"/v1/media/{media_id}/complete", token=alice.access)
    assert (refused.status, refused.body["type"]) == (422, PROBLEM + "upload-mismatch")
    # Never completed: it cannot be sent, nor downloaded.
    room = await api.call("POST", "/v1/conversations", token=alice.access, json={"name": "r"})
    sent = await api.call(
        "POST",
        f"/v1/conversations/{room.body['conversation_id']}/messages",
        token=alice.access,
        json={"client_msg_id": "x", "content": "x", "type": "media", "media_id": media_id},
    )
    assert sent.status == 422
    assert (await api.call("GET", f"/v1/media/{media_id}", token=alice.access)).status == 404


async def test_a_put_after_complete_cannot_change_what_is_downloaded(system: System) -> None:
    api = system.api
    alice = await api.user()
    good, evil = b"hello", b"not what was verified"
    declared = await _declare(api, alice, good)
    media_id, url = declared["media_id"], declared["upload_url"]
    await _put(url, good)
    done = await api.call("POST", f"/v1/media/{media_id}/complete", token=alice.access)
    assert done.status == 202, done.body
    assert await _download(api, alice, media_id) == good

    # The upload URL is still valid; every way of sending other bytes through it is refused.
    declared_sha = hashlib.sha256(good).hexdigest()
    assert await _try_put(url, evil) != 200
    assert await _try_put(url, evil, declared_sha) != 200
    assert await _try_put(url, evil, hashlib.sha256(evil).hexdigest()) != 200
    # Even bytes landing at the upload key (a store that checks no checksum) are never served:
    # downloads come from the copy complete verified, which the upload URL cannot reach.
    await _write_at_upload_key(system, media_id, evil)
    assert await _download(api, alice, media_id) == good
    # A retried complete does not pick the new bytes up either.
    again = await api.call("POST", f"/v1/media/{media_id}/complete", token=alice.access)
    assert (again.status, again.body) == (202, done.body)
    assert await _download(api, alice, media_id) == good


async def test_a_second_complete_answers_the_first_and_appends_nothing(system: System) -> None:
    api = system.api
    alice = await api.user()
    data = b"\x89PNG once" * 10
    declared = await _declare(api, alice, data)
    media_id = declared["media_id"]
    complete = f"/v1/media/{media_id}/complete"
    await _put(declared["upload_url"], data)
    first = await api.call("POST", complete, token=alice.access)
    assert first.status == 202, first.body
    again = await api.call("POST", complete, token=alice.access)
    assert (again.status, again.body) == (202, first.body)
    # Concurrent retries too: one event in all.
    racing = await asyncio.gather(
        *(api.call("POST", complete, token=alice.access) for _ in range(4))
    )
    assert {(r.status, r.body["position"]) for r in racing} == {(202, first.body["position"])}
    (event,) = await _uploaded_events(system, media_id)
    assert (event.size, event.sha256) == (len(data), hashlib.sha256(data).hexdigest())


async def test_concurrent_first_completes_append_one_event(system: System) -> None:
    api = system.api
    alice = await api.user()
    data = b"raced"
    declared = await _declare(api, alice, data)
    media_id = declared["media_id"]
    await _put(declared["upload_url"], data)
    answers = await asyncio.gather(
        *(api.call("POST", f"/v1/media/{media_id}/complete", token=alice.access) for _ in range(5))
    )
    assert {r.status for r in answers} == {202}, [r.body for r in answers]
    assert len({r.body["position"] for r in answers}) == 1
    assert len(await _uploaded_events(system, media_id)) == 1
    assert await _download(api, alice, media_id) == data


def _stored_keys(system: System, prefix: str) -> list[str]:
    """Every key under ``prefix`` in the media bucket (worker thread)."""
    client = s3_client(system.settings)
    try:
        listed = client.list_objects_v2(Bucket=MEDIA_BUCKET, Prefix=prefix)
        return [item["Key"] for item in listed.get("Contents", ())]
    finally:
        client.close()


async def test_erasing_the_uploader_forgets_their_media(system: System) -> None:
    api = system.api
    alice, bob = await api.user(), await api.user()
    data = b"\x89PNG my face" * 50
    declared = await _declare(api, alice, data)
    media_id = declared["media_id"]
    await _put_as_told(declared, data)
    done = await api.call("POST", f"/v1/media/{media_id}/complete", token=alice.access)
    assert done.status == 202, done.body
    # A second upload, PUT but never completed: its object is hers too.
    pending = await _declare(api, alice, b"never completed")
    await _put_as_told(pending, b"never completed")
    cid = await _room(api, alice, bob, "faces")
    sent = await _send_media(api, alice, cid, media_id, "m1")
    assert sent.status == 202, sent.body
    seen = f"/v1/conversations/{cid}/messages?min_position={sent.body['position']}"
    assert (await api.call("GET", seen, token=bob.access)).status == 200
    location = await _download_url(api, bob, media_id)
    prefixes = (f"uploads/{alice.user_id}/", f"verified/{alice.user_id}/")
    assert all([await asyncio.to_thread(_stored_keys, system, p) for p in prefixes])

    erased = await api.call("DELETE", "/v1/users/me", token=alice.access)
    assert erased.status == 202, erased.body

    # Not served any more, to anyone; the URL handed out before leads nowhere.
    missing = await api.call("GET", f"/v1/media/{media_id}", token=bob.access)
    assert missing.status == 404, missing.body
    async with aiohttp.ClientSession() as http, http.get(location) as got:
        assert got.status == 404
    # No filename left in ingest's records, and no object of hers in the bucket.
    names = await system.store.pool.fetch(
        "SELECT filename FROM ingest.media_uploads WHERE uploader_id = $1", alice.user_id
    )
    assert [r["filename"] for r in names] == [None, None]
    for prefix in prefixes:
        assert await asyncio.to_thread(_stored_keys, system, prefix) == []

    # Erasing again (a retry after a failure) is harmless and changes nothing.
    await erase_async(system.settings, alice.user_id)
    assert (await api.call("GET", f"/v1/media/{media_id}", token=bob.access)).status == 404
