"""Media over HTTP against the real S3 server: declare, upload, verify, share, download."""

from __future__ import annotations

import hashlib
import uuid

import aiohttp

from tests.system_fixtures import Api, System, User

PROBLEM = "urn:backbone:problem:"


async def _declare(api: Api, user: User, data: bytes, sha: str | None = None) -> dict[str, str]:
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


async def _put(url: str, data: bytes) -> None:
    async with (
        aiohttp.ClientSession() as http,
        http.put(url, data=data, headers={"Content-Type": "image/png"}) as response,
    ):
        assert response.status == 200, await response.text()


async def test_upload_verify_share_and_download(system: System) -> None:
    api = system.api
    alice, bob, eve = await api.user(), await api.user(), await api.user()
    data = b"\x89PNG not really" * 100
    declared = await _declare(api, alice, data)
    media_id = declared["media_id"]
    complete = f"/v1/media/{media_id}/complete"

    early = await api.call("POST", complete, token=alice.access)
    assert early.status == 409, early.body
    await _put(declared["upload_url"], data)
    assert (await api.call("POST", complete, token=bob.access)).status == 404
    done = await api.call("POST", complete, token=alice.access)
    assert done.status == 202, done.body

    room = await api.call(
        "POST",
        "/v1/conversations",
        token=alice.access,
        json={"name": "pics", "members": [str(bob.user_id)]},
    )
    cid = room.body["conversation_id"]
    # Only your own verified uploads can be sent.
    theirs = await api.call(
        "POST",
        f"/v1/conversations/{cid}/messages",
        token=bob.access,
        json={"client_msg_id": "b1", "content": "look", "type": "media", "media_id": media_id},
    )
    assert (theirs.status, theirs.body["type"]) == (422, PROBLEM + "invalid-body")
    sent = await api.call(
        "POST",
        f"/v1/conversations/{cid}/messages",
        token=alice.access,
        json={"client_msg_id": "a1", "content": "look", "type": "media", "media_id": media_id},
    )
    assert sent.status == 202, sent.body
    page = await api.call(
        "GET",
        f"/v1/conversations/{cid}/messages?min_position={sent.body['position']}",
        token=bob.access,
    )
    assert page.body["items"][0]["media_id"] == media_id

    # A member downloads through a short-lived URL; anyone else gets 404.
    async with api.client.get(
        f"/v1/media/{media_id}",
        headers={"Authorization": f"Bearer {bob.access}"},
        allow_redirects=False,
    ) as redirect:
        assert redirect.status == 302
        location = redirect.headers["Location"]
    async with aiohttp.ClientSession() as http, http.get(location) as got:
        assert await got.read() == data
    assert (await api.call("GET", f"/v1/media/{media_id}", token=eve.access)).status == 404
    assert (await api.call("GET", f"/v1/media/{uuid.uuid4()}", token=bob.access)).status == 404


async def test_an_upload_that_does_not_match_its_declaration_is_refused(system: System) -> None:
    api = system.api
    alice = await api.user()
    data = b"the real bytes"
    declared = await _declare(api, alice, data, sha="0" * 64)
    await _put(declared["upload_url"], data)
    refused = await api.call(
        "POST", f"/v1/media/{declared['media_id']}/complete", token=alice.access
    )
    assert (refused.status, refused.body["type"]) == (422, PROBLEM + "upload-mismatch")
    # Never completed: it cannot be sent.
    room = await api.call("POST", "/v1/conversations", token=alice.access, json={"name": "r"})
    sent = await api.call(
        "POST",
        f"/v1/conversations/{room.body['conversation_id']}/messages",
        token=alice.access,
        json={
            "client_msg_id": "x",
            "content": "x",
            "type": "media",
            "media_id": declared["media_id"],
        },
    )
    assert sent.status == 422
