"""Operations drills on the real stack (see docs/operations.md)."""

from __future__ import annotations

from projectors.checksum import checksum
from projectors.read.contract import LIVE_SCHEMA, members_key
from projectors.rebuild import Rebuild
from projectors.schema import ensure_live_schema
from tests.test_projector_drills import produce, workload
from tests.test_projector_support import World, world_fixture  # noqa: F401 - the `world` fixture


async def test_drop_the_read_models_and_caches_then_replay_from_kafka(world: World) -> None:
    events, _ = workload(rooms=12, users=20, messages=1500, seed=7)
    await produce(world.store, events)
    await world.catch_up()
    async with world.store.pool.acquire() as conn:
        before = await checksum(conn, LIVE_SCHEMA)
    room = next(iter(await world.rows("SELECT conversation_id FROM chat.conversations LIMIT 1")))
    key = members_key(world.namespace, room["conversation_id"])
    members_before = await world.redis.hgetall(key)
    assert members_before

    # Disaster: the read model and every cache of this deployment are gone.
    async with world.store.pool.acquire() as conn:
        await conn.execute(f"DROP SCHEMA {LIVE_SCHEMA} CASCADE")
    lost = [k async for k in world.redis.scan_iter(match=f"{world.namespace}:*")]
    await world.redis.delete(*lost)
    assert await world.redis.hgetall(key) == {}

    # Recovery: provision recreates an empty schema, replay rebuilds it and the caches.
    await ensure_live_schema(world.store.pool)
    result = await Rebuild(world.store, redis=world.redis, batch=500).run()
    assert result.checksum == before
    async with world.store.pool.acquire() as conn:
        assert await checksum(conn, LIVE_SCHEMA) == before
    assert await world.redis.hgetall(key) == members_before
