"""Fixtures for tests of the event store against the real local stack.

Each test that reads the log gets topics of its own (a fresh prefix), so counts and orders
are never disturbed by other tests; the key store is shared (subjects are random ids).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import msgspec
import pytest

from eventstore import EventStore, Settings, TopicLayout, provision_topics
from eventstore.objects import s3_client
from ops.environment import stack_settings
from ops.provision import migrate_all, provision
from ops.stack import StackInfo


@pytest.fixture(scope="session")
async def base_settings(stack: StackInfo) -> Settings:
    """Settings pointing at the session's stack, with migrations applied."""
    settings = stack_settings(stack)
    await provision(settings)
    return settings


@pytest.fixture
async def conn(base_settings: Settings) -> AsyncIterator[asyncpg.Connection]:
    """A PostgreSQL connection of the test's own, closed after it: asyncpg's own, with none
    of the set-up a pool's connections get (:func:`eventstore.pg.create_pool`)."""
    connection = await asyncpg.connect(base_settings.postgres_dsn)
    try:
        yield connection
    finally:
        await connection.close()


@pytest.fixture(scope="module")
async def client(stack: StackInfo, base_settings: Settings) -> AsyncIterator[Any]:
    """A boto3 S3 client of the stack's S3 server, shared by a module's tests."""
    made = s3_client(base_settings)
    yield made
    made.close()


async def fresh_topics(settings: Settings, **layout: int) -> Settings:
    """``settings`` with a new topic prefix whose topics exist (small layouts are faster)."""
    fresh = msgspec.structs.replace(
        settings,
        topic_prefix=f"t{uuid.uuid4().hex[:10]}",
        user_partitions=layout.get("user_partitions", 2),
        conversation_partitions=layout.get("conversation_partitions", 3),
    )
    await provision_topics(fresh.kafka_bootstrap, TopicLayout.from_settings(fresh))
    return fresh


async def fresh_database(settings: Settings) -> Settings:
    """``settings`` pointing at a new PostgreSQL database of its own, with every migration.

    For tests of read models and ingest state, which must not see each other's rows. The
    databases are small and left behind (the stack's data directory is disposable).
    """
    name = f"t{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(settings.postgres_dsn)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    head, _, _ = settings.postgres_dsn.rpartition("/")
    fresh = msgspec.structs.replace(settings, postgres_dsn=f"{head}/{name}")
    await migrate_all(fresh.postgres_dsn)
    return fresh


async def isolated(settings: Settings, **layout: int) -> Settings:
    """Fresh topics (hence a fresh Redis key namespace) and a fresh database."""
    return await fresh_database(await fresh_topics(settings, **layout))


@pytest.fixture
async def settings(base_settings: Settings) -> Settings:
    return await fresh_topics(base_settings)


@pytest.fixture
async def store(settings: Settings) -> AsyncIterator[EventStore]:
    async with await EventStore.open(settings) as opened:
        yield opened
