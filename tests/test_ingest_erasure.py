"""Erasure through the API: the key is destroyed and the person's data is gone everywhere."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import aiohttp
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

import ingest.exports as exports_module
from eventstore.objects import EXPORTS_BUCKET, s3_client
from ingest.commands import sent_key
from ingest.context import EXPORTS
from ingest.exports import collect
from ops.privacy import erase_async
from projectors.read import recent_key
from tests.system_fixtures import Api, Reply, System, User


async def _raw_log_values(system: System) -> list[bytes]:
    consumer = AIOKafkaConsumer(bootstrap_servers=system.settings.kafka_bootstrap)
    await consumer.start()
    try:
        partitions: list[TopicPartition] = []
        for topic in (system.store.layout.topic("user"), system.store.layout.topic("conversation")):
            found = consumer.partitions_for_topic(topic) or await _partitions(consumer, topic)
            partitions.extend(TopicPartition(topic, p) for p in sorted(found))
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions)
        values: list[bytes] = []
        while [tp for tp, end in ends.items() if await consumer.position(tp) < end]:
            for records in (await consumer.getmany(timeout_ms=500)).values():
                values.extend(r.value or b"" for r in records)
        return values
    finally:
        await consumer.stop()


async def _partitions(consumer: AIOKafkaConsumer, topic: str) -> set[int]:
    await consumer._client.force_metadata_update()
    return consumer.partitions_for_topic(topic) or set()


async def _room_with_message(
    api: Api, owner: User, member: User, name: str, client_msg_id: str, content: str
) -> tuple[str, Reply]:
    """A group of ``owner`` and ``member`` and one message of ``owner``'s in it."""
    room = await api.call(
        "POST",
        "/v1/conversations",
        token=owner.access,
        json={"name": name, "members": [str(member.user_id)]},
    )
    assert room.status == 201, room.body
    cid: str = room.body["conversation_id"]
    sent = await api.call(
        "POST",
        f"/v1/conversations/{cid}/messages",
        token=owner.access,
        json={"client_msg_id": client_msg_id, "content": content},
    )
    return cid, sent


async def test_erasing_me_redacts_everywhere_and_ends_my_sessions(system: System) -> None:
    api = system.api
    alice, bob = await api.user(), await api.user()
    cid, mine = await _room_with_message(api, alice, bob, "plans", "s1", "my secret words")
    theirs = await api.call(
        "POST",
        f"/v1/conversations/{cid}/messages",
        token=bob.access,
        json={"client_msg_id": "b1", "content": "bob stays readable"},
    )
    assert mine.status == theirs.status == 202
    await api.call(
        "PATCH", "/v1/users/me", token=alice.access, json={"display_name": "Alice Private"}
    )

    erased = await api.call("DELETE", "/v1/users/me", token=alice.access)
    assert erased.status == 202, erased.body

    # Her credentials are gone at once.
    assert (await api.call("GET", "/v1/conversations", token=alice.access)).status == 401
    login = {"login": alice.username, "password": alice.password}
    assert (await api.call("POST", "/v1/auth/login", json=login)).status == 401
    assert (
        await api.call("POST", "/v1/auth/refresh", json={"refresh_token": alice.refresh})
    ).status == 401

    # The read model shows her content as erased; Bob's is intact.
    wait = f"?min_position={erased.body['position']}"
    page = await api.call("GET", f"/v1/conversations/{cid}/messages{wait}", token=bob.access)
    contents = {m["sender_id"]: m["content"] for m in page.body["items"]}
    assert contents == {str(alice.user_id): None, str(bob.user_id): "bob stays readable"}
    profile = await api.call("GET", f"/v1/users/{alice.user_id}", token=bob.access)
    assert profile.body["erased"] is True
    assert profile.body.get("username") is None
    assert profile.body.get("display_name") is None

    # Nowhere in the caches or the raw log, nor her send records (a digest of each content).
    namespace = system.settings.topic_prefix
    assert [
        k async for k in system.redis.scan_iter(match=sent_key(namespace, alice.user_id, "*"))
    ] == []
    assert await system.redis.exists(sent_key(namespace, bob.user_id, "b1"))
    cached = await system.redis.zrange(recent_key(system.settings.topic_prefix, cid), 0, -1)
    assert cached
    assert not any(b"my secret words" in frame for frame in cached)
    assert any(b"bob stays readable" in frame for frame in cached)
    raw = await _raw_log_values(system)
    assert raw
    assert not any(b"my secret words" in value or b"Alice Private" in value for value in raw)

    # Her name is free for others again.
    assert (await api.register(alice.username)) is not None


async def _seen(system: System, token: str, path: str) -> None:
    """A read with ``min_position``: returns once the read model reflects it."""
    assert (await system.api.call("GET", path, token=token)).status == 200


async def _export(system: System, token: str) -> dict[str, object]:
    api = system.api
    started = await api.call("POST", "/v1/users/me/export", token=token)
    assert started.status == 202, started.body
    path = f"/v1/users/me/export/{started.body['export_id']}"
    async with asyncio.timeout(30):
        while (state := await api.call("GET", path, token=token)).body["state"] == "running":
            await asyncio.sleep(0.05)
    assert state.body["state"] == "done", state.body
    async with aiohttp.ClientSession() as http, http.get(state.body["download_url"]) as got:
        assert got.status == 200
        document: dict[str, object] = json.loads(await got.read())
    return document


async def test_export_holds_everything_and_nothing_readable_after_erasure(system: System) -> None:
    api = system.api
    alice, bob = await api.user(), await api.user()
    cid, sent = await _room_with_message(api, alice, bob, "exported", "e1", "export me please")
    patched = await api.call(
        "PATCH", "/v1/users/me", token=alice.access, json={"status": "exporting"}
    )
    await _seen(system, alice.access, f"/v1/users/me?min_position={patched.body['position']}")
    await _seen(
        system, alice.access, f"/v1/conversations/{cid}?min_position={sent.body['position']}"
    )

    document = await _export(system, alice.access)
    text = json.dumps(document)
    assert document["user_id"] == str(alice.user_id)
    assert "export me please" in text
    assert alice.username in text
    assert "exporting" in text
    assert [m["conversation_id"] for m in document["memberships"]] == [cid]  # type: ignore[index]
    assert document["sessions"]
    assert "password" not in text
    assert "bob stays" not in text
    # Someone else's export is not yours to read.
    foreign = await api.call("GET", "/v1/users/me/export/" + str(uuid.uuid4()), token=bob.access)
    assert foreign.status == 404

    # After erasure an operator's export of her holds nothing readable of her.
    erased = await api.call("DELETE", "/v1/users/me", token=alice.access)
    await _seen(
        system, bob.access, f"/v1/users/{alice.user_id}?min_position={erased.body['position']}"
    )
    after = await collect(system.store, alice.user_id)
    text = json.dumps(after, default=str)
    assert "export me please" not in text
    assert alice.username not in text
    assert "exporting" not in text
    assert '"kind": "erased"' in text


def _export_keys(system: System, user_id: uuid.UUID) -> list[str]:
    """Every archive key of ``user_id`` in the exports bucket (worker thread)."""
    client = s3_client(system.settings)
    try:
        listed = client.list_objects_v2(Bucket=EXPORTS_BUCKET, Prefix=f"exports/{user_id}/")
        return [item["Key"] for item in listed.get("Contents", ())]
    finally:
        client.close()


async def _export_rows(system: System, user_id: uuid.UUID) -> list[str]:
    rows = await system.store.pool.fetch(
        "SELECT state FROM ingest.exports WHERE user_id = $1", user_id
    )
    return [r["state"] for r in rows]


async def test_erasure_deletes_my_exports(system: System) -> None:
    api = system.api
    alice, bob = await api.user(), await api.user()
    await _room_with_message(api, alice, bob, "archived", "x1", "archive me")
    started = await api.call("POST", "/v1/users/me/export", token=alice.access)
    path = f"/v1/users/me/export/{started.body['export_id']}"
    async with asyncio.timeout(30):
        while (state := await api.call("GET", path, token=alice.access)).body["state"] == "running":
            await asyncio.sleep(0.05)
    assert state.body["state"] == "done", state.body
    url = state.body["download_url"]
    assert await asyncio.to_thread(_export_keys, system, alice.user_id)

    erased = await api.call("DELETE", "/v1/users/me", token=alice.access)
    assert erased.status == 202, erased.body

    # The archive is gone, the URL handed out leads nowhere, and the export is unknown: what
    # GET answers 404 to, with no download URL.
    async with aiohttp.ClientSession() as http, http.get(url) as got:
        assert got.status == 404
    assert await asyncio.to_thread(_export_keys, system, alice.user_id) == []
    assert await _export_rows(system, alice.user_id) == []
    export_id = uuid.UUID(started.body["export_id"])
    assert await system.api.client.app[EXPORTS].status(alice.user_id, export_id) is None

    # Erasing again (a retry after a failure) is harmless.
    await erase_async(system.settings, alice.user_id)
    assert await asyncio.to_thread(_export_keys, system, alice.user_id) == []


async def test_an_export_running_during_erasure_writes_nothing(
    system: System, monkeypatch: pytest.MonkeyPatch
) -> None:
    api = system.api
    alice, bob = await api.user(), await api.user()
    cid, sent = await _room_with_message(api, alice, bob, "racing", "r1", "racing words")
    await _seen(
        system, alice.access, f"/v1/conversations/{cid}?min_position={sent.body['position']}"
    )
    collected, release = asyncio.Event(), asyncio.Event()

    async def slow_collect(store: Any, user_id: uuid.UUID) -> dict[str, Any]:
        document = await real_collect(store, user_id)  # before the erasure: in plain text
        collected.set()
        await release.wait()
        return document

    real_collect = exports_module.collect
    monkeypatch.setattr(exports_module, "collect", slow_collect)
    exports = system.api.client.app[EXPORTS]
    started = await api.call("POST", "/v1/users/me/export", token=alice.access)
    assert started.status == 202, started.body
    building = set(exports._tasks)
    async with asyncio.timeout(30):
        await collected.wait()

    erased = await api.call("DELETE", "/v1/users/me", token=alice.access)
    assert erased.status == 202, erased.body
    release.set()
    async with asyncio.timeout(30):
        await asyncio.gather(*building)

    assert await asyncio.to_thread(_export_keys, system, alice.user_id) == []
    assert await _export_rows(system, alice.user_id) == []
    export_id = uuid.UUID(started.body["export_id"])
    assert await exports.status(alice.user_id, export_id) is None
