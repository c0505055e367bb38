"""The system under test for HTTP tests: a real ingest app and a real projector, in-process.

Each test gets its own topics, database and Redis namespace (:func:`isolated`), an ingest app
served on a loopback port by aiohttp's test server, and a projector (a consumer-group member
of its own group) applying the log to the read model, exactly as the tier processes do.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import msgspec
import pytest
from aiohttp.test_utils import TestClient, TestServer
from multidict import CIMultiDict
from redis.asyncio import Redis

from eventstore import Batch, EventStore, Settings, create_pool
from ingest.app import create_app
from ingest.auth.tokens import TokenKeys, new_jwt_key, parse_jwt_keys
from ingest.config import IngestConfig
from ingest.ratelimit import DEFAULT_LIMITS, ClassLimits, Limit
from projectors.caches import Caches
from projectors.projector import Projector
from projectors.schema import ensure_live_schema
from tests.store_fixtures import isolated

GENEROUS = {
    name: ClassLimits(per_user=Limit(10_000, 10_000), per_ip=Limit(10_000, 10_000))
    for name in DEFAULT_LIMITS
}
"""Limits no functional test reaches; rate-limit tests configure their own."""


class Reply(msgspec.Struct):
    status: int
    body: Any
    headers: Mapping[str, str]


class User(msgspec.Struct):
    user_id: uuid.UUID
    username: str
    password: str
    access: str
    refresh: str


class Api:
    """A thin client of the public API."""

    def __init__(self, client: TestClient[Any, Any]) -> None:
        self.client = client

    async def call(
        self,
        method: str,
        path: str,
        *,
        token: str | None = None,
        json: Any = None,
        data: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Reply:
        sent = dict(headers or {})
        if token is not None:
            sent["Authorization"] = f"Bearer {token}"
        body: Any = io.BytesIO(data) if data is not None else None
        if json is not None:
            body = msgspec.json.encode(json)
            sent.setdefault("Content-Type", "application/json")
        async with self.client.request(method, path, data=body, headers=sent) as response:
            raw = await response.read()
            decoded: Any = (
                msgspec.json.decode(raw) if raw and response.content_type.endswith("json") else raw
            )
            return Reply(response.status, decoded, CIMultiDict(response.headers))

    async def register(
        self, name: str | None = None, password: str = "correct horse battery"
    ) -> uuid.UUID:
        username = name or f"u{uuid.uuid4().hex[:12]}"
        reply = await self.call(
            "POST",
            "/v1/auth/register",
            json={"username": username, "email": f"{username}@example.test", "password": password},
        )
        assert reply.status == 201, reply.body
        return uuid.UUID(reply.body["user_id"])

    async def user(self, name: str | None = None) -> User:
        """A registered, logged-in user."""
        username = name or f"u{uuid.uuid4().hex[:12]}"
        password = "correct horse battery"
        user_id = await self.register(username, password)
        reply = await self.call(
            "POST", "/v1/auth/login", json={"login": username, "password": password}
        )
        assert reply.status == 200, reply.body
        return User(
            user_id, username, password, reply.body["access_token"], reply.body["refresh_token"]
        )


class System(msgspec.Struct):
    settings: Settings
    api: Api
    store: EventStore
    redis: Redis
    config: IngestConfig


def ingest_config(**changes: Any) -> IngestConfig:
    return msgspec.structs.replace(IngestConfig(rate_limits=dict(GENEROUS)), **changes)


@contextlib.asynccontextmanager
async def running_system(
    base: Settings,
    config: IngestConfig | None = None,
    keys: TokenKeys | None = None,
    *,
    projection_delay: float = 0.0,
) -> AsyncIterator[System]:
    """A whole ingest + projector system; ``projection_delay`` holds every batch back that
    long before the projector applies it (a lagging read model, on purpose)."""
    settings = await isolated(base)
    config = config or ingest_config()
    pool = await create_pool(settings.postgres_dsn)
    redis = Redis.from_url(settings.redis_url)
    await ensure_live_schema(pool)
    store = await EventStore.open(settings, pool=pool, migrate=False)
    projector = Projector(pool, store.layout, caches=Caches(redis, settings.topic_prefix))
    reader = store.group_reader(
        group_id=f"{settings.topic_prefix}.projector.chat",
        streams=("user", "conversation"),
        positions=projector.positions,
        handler=projector.handle if not projection_delay else _delayed(projector, projection_delay),
    )
    task = asyncio.create_task(reader.run())
    app = create_app(settings, config, keys or parse_jwt_keys(new_jwt_key("t1")))
    client: TestClient[Any, Any] = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    try:
        yield System(settings, Api(client), store, redis, config)
    finally:
        await client.close()
        reader.stop()
        await task
        await store.close()
        await redis.aclose()
        await pool.close()


def _delayed(projector: Projector, seconds: float) -> Callable[[Batch], Awaitable[None]]:
    async def handle(batch: Batch) -> None:
        await asyncio.sleep(seconds)
        await projector.handle(batch)

    return handle


@pytest.fixture
async def system(base_settings: Settings) -> AsyncIterator[System]:
    async with running_system(base_settings) as running:
        yield running
