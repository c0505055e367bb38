"""What the tests of ingest's credential stores share (accounts, sessions, API keys, tokens): a
clock the tests move by hand, and on the real PostgreSQL and Redis a deployment of each module's
own, its pool and a Redis client.

A test module takes the fixtures by importing them (``clock_fixture``, ``deployment_fixture``,
``pool_fixture``, ``redis_fixture``, with ``# noqa: F401``), so only the modules that use
them see them, under the names ``clock``, ``deployment``, ``pool`` and ``redis``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from eventstore import Pool, Settings, create_pool
from tests.store_fixtures import isolated

T0 = 1_800_000_000.0
"""Where every test clock starts (a fixed time in 2027, Unix seconds)."""


class Clock:
    """A clock tests move by hand (``clock.now += 60``)."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture(name="clock")
def clock_fixture() -> Clock:
    return Clock()


@pytest.fixture(name="deployment", scope="module")
async def deployment_fixture(base_settings: Settings) -> Settings:
    """A deployment (database, Redis namespace) of the module's own."""
    return await isolated(base_settings)


@pytest.fixture(name="pool", scope="module")
async def pool_fixture(deployment: Settings) -> AsyncIterator[Pool]:
    # Room for the concurrent logins and refreshes some tests race against each other.
    made = await create_pool(deployment.postgres_dsn, max_size=6)
    yield made
    await made.close()


@pytest.fixture(name="redis")
async def redis_fixture(deployment: Settings) -> AsyncIterator[Redis]:
    client = Redis.from_url(deployment.redis_url)
    yield client
    await client.aclose()
