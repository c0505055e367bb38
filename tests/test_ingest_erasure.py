"""Erasure through the API: the key is destroyed and the person's data is gone everywhere."""

from __future__ import annotations

from aiokafka import AIOKafkaConsumer, TopicPartition

from projectors.read import recent_key
from tests.system_fixtures import System


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


async def test_erasing_me_redacts_everywhere_and_ends_my_sessions(system: System) -> None:
    api = system.api
    alice, bob = await api.user(), await api.user()
    room = await api.call(
        "POST",
        "/v1/conversations",
        token=alice.access,
        json={"name": "plans", "members": [str(bob.user_id)]},
    )
    cid = room.body["conversation_id"]
    mine = await api.call(
        "POST",
        f"/v1/conversations/{cid}/messages",
        token=alice.access,
        json={"client_msg_id": "s1", "content": "my secret words"},
    )
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

    # Nowhere in the caches or the raw log.
    cached = await system.redis.zrange(recent_key(system.settings.topic_prefix, cid), 0, -1)
    assert cached
    assert not any(b"my secret words" in frame for frame in cached)
    assert any(b"bob stays readable" in frame for frame in cached)
    raw = await _raw_log_values(system)
    assert raw
    assert not any(b"my secret words" in value or b"Alice Private" in value for value in raw)

    # Her name is free for others again.
    assert (await api.register(alice.username)) is not None
