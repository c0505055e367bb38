"""Fenced cache writes: a worker resuming after its transaction ended writes no older state.

A worker is held between its PostgreSQL reads and its Redis write (its client waits for a
connection until the test lets it go), as a frozen process (SIGSTOP, a VM pause) would be;
``pg_terminate_backend`` stands for ``idle_in_transaction_session_timeout`` ending its
transaction. Nothing here waits on time.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.asyncio import Redis

from eventstore import Batch, Pool, create_pool
from eventstore.consumer import Partition
from projectors.caches import Caches, fence_field, fence_key, rebuild_caches
from projectors.projector import Projector
from projectors.read.contract import members_key, user_conversations_key
from schemas import MemberJoined, MemberLeft
from tests.test_projector_exactly_once import rooms_on_two_partitions
from tests.test_projector_support import (
    World,
    group,
    register,
    world_fixture,  # noqa: F401 - provides the `world` fixture
)


class Held:
    """A worker's Redis client that waits for a connection until :meth:`release`."""

    def __init__(self, url: str) -> None:
        self.redis = Redis.from_url(url)
        self.waiting = asyncio.Event()
        self._go = asyncio.Event()
        pool: Any = self.redis.connection_pool
        original = pool.get_connection

        async def get_connection(*args: Any, **kwargs: Any) -> Any:
            self.waiting.set()
            await self._go.wait()
            return await original(*args, **kwargs)

        pool.get_connection = get_connection

    def release(self) -> None:
        self._go.set()


class Worker(Projector):
    """A second group member: its own pool (named, to be found) and its own held Redis."""

    name: str
    held: Held
    pool: Pool


@pytest.fixture(name="worker")
async def worker_fixture(world: World) -> AsyncIterator[Worker]:
    name = f"fenced-{uuid.uuid4().hex[:8]}"
    pool = await create_pool(
        world.settings.postgres_dsn, server_settings={"application_name": name}
    )
    held = Held(world.settings.redis_url)
    worker = Worker(pool, world.store.layout, caches=Caches(held.redis, world.namespace))
    worker.name, worker.held, worker.pool = name, held, pool
    try:
        yield worker
    finally:
        held.release()
        await held.redis.aclose()
        await pool.close()


async def partition_batch(world: World, partition: Partition) -> Batch:
    """Every record of ``partition`` from its stored offset to its end, as one batch."""
    stored = await world.projector.positions.load([partition])
    reader = world.store.reader()
    await reader.start("beginning", {partition: stored.get(partition, 0)}, partitions=[partition])
    try:
        (batch,) = [b async for b in reader.batches_until_end()]
        return batch
    finally:
        await reader.stop()


async def members(world: World, room: uuid.UUID) -> set[str]:
    keys = await world.redis.hkeys(members_key(world.namespace, room))
    return {k.decode() if isinstance(k, bytes) else k for k in keys}


async def test_a_write_held_past_its_transaction_does_not_undo_a_later_batchs(
    world: World, worker: Worker
) -> None:
    """The reviewer's case: A applies a join, reads the members, and freezes; PostgreSQL ends
    its transaction; B applies the join and a removal, caches and commits; A's write then
    arrives. Unfenced, it put the removed member back into the set ingest authorises from."""
    owner, bob, carol, room = uuid.uuid4(), uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    await world.write([register(owner), register(bob), register(carol), group(room, owner, bob)])
    await world.catch_up()
    (joined,) = await world.write(
        [MemberJoined(conversation_id=room, user_id=carol, added_by=owner)]
    )
    partition: Partition = (world.store.layout.topic("conversation"), joined.position.partition)
    stale = await partition_batch(world, partition)
    await world.write([MemberLeft(conversation_id=room, user_id=bob, removed_by=owner)])

    held = asyncio.create_task(worker.handle(stale))
    await worker.held.waiting.wait()  # A has read the members (with bob) and applied nothing
    await world.store.pool.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
        worker.name,
    )
    await world.catch_up()  # B: the join and the removal, from the stored offset
    after_b = {str(owner), str(carol)}
    assert await members(world, room) == after_b

    worker.held.release()
    with pytest.raises(Exception):  # noqa: B017, PT011 - A's connection is gone, whatever it says
        await held
    assert await members(world, room) == after_b
    convs = await world.redis.smembers(user_conversations_key(world.namespace, bob))
    assert str(room).encode() not in convs
    stored = await world.projector.positions.load([partition])
    fences = await world.redis.hgetall(fence_key(world.namespace))
    assert fences[fence_field(*partition).encode()] == str(stored[partition]).encode()


async def test_users_conversations_written_by_two_workers_at_once_keep_both(
    world: World, worker: Worker
) -> None:
    """Two workers add bob to conversations of two partitions at once, each reading bob's
    memberships before the other commits: both conversations stay in his set (the whole set
    from each one's read, written last-wins, had dropped one)."""
    owner, bob = uuid.uuid4(), uuid.uuid4()
    first, second = rooms_on_two_partitions(world)
    await world.write([register(owner), register(bob), group(first, owner), group(second, owner)])
    await world.catch_up()
    written = await world.write(
        [
            MemberJoined(conversation_id=first, user_id=bob, added_by=owner),
            MemberJoined(conversation_id=second, user_id=bob, added_by=owner),
        ]
    )
    topic = world.store.layout.topic("conversation")
    batches = [await partition_batch(world, (topic, r.position.partition)) for r in written]

    held = asyncio.create_task(worker.handle(batches[0]))
    await worker.held.waiting.wait()  # A has read bob's memberships: only `first` is there
    await world.projector.handle(batches[1])  # B: `second`, cached and committed
    worker.held.release()
    await held

    convs = await world.redis.smembers(user_conversations_key(world.namespace, bob))
    assert convs == {str(first).encode(), str(second).encode()}


async def test_a_rebuild_resets_the_fences_to_the_models_offsets(world: World) -> None:
    """A version recorded by a batch that never committed would refuse the batches applying
    those records again, over keys the rebuild put back to the model's state: the rebuild
    resets the versions to the stored offsets, and the next batch's write goes through."""
    owner, bob, room = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    (created,) = await world.write([group(room, owner)])
    await world.catch_up()
    partition: Partition = (world.store.layout.topic("conversation"), created.position.partition)
    field = fence_field(*partition)
    await world.redis.hset(fence_key(world.namespace), field, 1_000_000)  # written, not committed

    await rebuild_caches(world.store.pool, world.redis, world.namespace)

    stored = await world.projector.positions.load([partition])
    assert await world.redis.hgetall(fence_key(world.namespace)) == {
        field.encode(): str(stored[partition]).encode()
    }
    await world.write([MemberJoined(conversation_id=room, user_id=bob, added_by=owner)])
    await world.catch_up()
    assert await members(world, room) == {str(owner), str(bob)}
