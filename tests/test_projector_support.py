"""Shared pieces of the projector tests (no tests here): a projected world and its helpers."""

from __future__ import annotations

import asyncio
import base64
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

import msgspec
import pytest
from redis.asyncio import Redis

from eventstore import EventStore, RecordedEvent, Settings
from projectors.caches import Caches
from projectors.projector import Projector
from projectors.schema import ensure_live_schema
from schemas import (
    ConversationCreated,
    Event,
    InitialMember,
    MessageSent,
    UserRegistered,
)
from tests.store_fixtures import isolated


class World(msgspec.Struct):
    """An isolated deployment (topics, database, Redis namespace) and a live projector."""

    settings: Settings
    store: EventStore
    redis: Redis
    projector: Projector

    @property
    def namespace(self) -> str:
        return self.settings.topic_prefix

    async def write(self, events: Sequence[Event]) -> list[RecordedEvent]:
        return await self.store.producer.append(events)

    async def catch_up(self) -> None:
        """Apply everything in the log, from the stored positions, batch by batch."""
        await catch_up(self.store, self.projector)

    async def row(self, sql: str, *args: object) -> dict[str, object] | None:
        found = await self.store.pool.fetchrow(sql, *args)
        return None if found is None else dict(found)

    async def rows(self, sql: str, *args: object) -> list[dict[str, object]]:
        return [dict(r) for r in await self.store.pool.fetch(sql, *args)]


async def catch_up(store: EventStore, projector: Projector, *, max_records: int = 5000) -> None:
    """Read from ``projector``'s stored positions to the log end and apply every batch."""
    partitions = [
        (store.layout.topic(stream), p)
        for stream in ("user", "conversation")
        for p in range(store.layout.partitions(stream))
    ]
    stored = await projector.positions.load(partitions)
    reader = store.reader(max_records=max_records)
    await reader.start("beginning", dict(stored))
    try:
        async for batch in reader.batches_until_end():
            await projector.handle(batch)
    finally:
        await reader.stop()


@pytest.fixture(name="world")
async def world_fixture(base_settings: Settings) -> AsyncIterator[World]:
    """A fresh :class:`World` (import this into a test module to use ``world``)."""
    settings = await isolated(base_settings)
    redis = Redis.from_url(settings.redis_url)
    async with await EventStore.open(settings) as store:
        await ensure_live_schema(store.pool)
        projector = Projector(store.pool, store.layout, caches=Caches(redis, settings.topic_prefix))
        try:
            yield World(settings, store, redis, projector)
        finally:
            await redis.aclose()


def settings_env(settings: Settings) -> dict[str, str]:
    """The ``BACKBONE_*`` environment a worker process needs to run against ``settings``."""
    keys = ",".join(f"{k.key_id}:{base64.b64encode(k.key).decode()}" for k in settings.master_keys)
    return {
        "BACKBONE_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "BACKBONE_POSTGRES_DSN": settings.postgres_dsn,
        "BACKBONE_REDIS_URL": settings.redis_url,
        "BACKBONE_MASTER_KEY": keys,
        "BACKBONE_TOPIC_PREFIX": settings.topic_prefix,
        "BACKBONE_USER_PARTITIONS": str(settings.user_partitions),
        "BACKBONE_CONVERSATION_PARTITIONS": str(settings.conversation_partitions),
    }


def group(room: uuid.UUID, owner: uuid.UUID, *members: uuid.UUID, name: str = "room") -> Event:
    return ConversationCreated(
        conversation_id=room,
        creator_id=owner,
        name=name,
        members=(InitialMember(owner, "owner"), *(InitialMember(m) for m in members)),
    )


def register(user: uuid.UUID, name: str = "user") -> Event:
    return UserRegistered(
        user_id=user, username=f"{name}{user.hex[:6]}", email=f"{user.hex[:8]}@example.org"
    )


def message(room: uuid.UUID, sender: uuid.UUID, body: str, mid: uuid.UUID | None = None) -> Event:
    return MessageSent(
        conversation_id=room,
        message_id=mid or uuid.uuid4(),
        sender_id=sender,
        client_msg_id=uuid.uuid4().hex[:12],
        body=body,
    )


async def log_end(store: EventStore) -> int:
    """How many records the store's topics hold (the sum of their partitions' end offsets)."""
    async with store.reader() as reader:
        return sum((await reader.end_offsets()).values())


async def wait_for(condition: Callable[[], Awaitable[bool]], within: float, what: str) -> None:
    """Poll ``condition()`` until it holds; fail naming ``what`` after ``within`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    delay = 0.02
    while not await condition():
        if loop.time() > deadline:
            raise AssertionError(f"not within {within}s: {what}")
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.5)
