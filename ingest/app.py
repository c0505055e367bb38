"""The ingest application: its clients, its middleware, its routes.

:func:`create_app` builds an aiohttp app whose ``cleanup_ctx`` owns every long-lived client
(the event store with its producer and pool, Redis, the log-end reader, the auth services),
opened in order at start-up and closed in reverse at shutdown, after in-flight requests
finish. The app is stateless: run as many processes as cores (``backbone up --ingest-workers``),
all sharing the port (``SO_REUSEPORT``), Redis and PostgreSQL.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import prometheus_client
import structlog
from aiohttp import web

from eventstore import EventStore, LogEnds, Settings
from eventstore.redisclient import redis_client, untimed_sibling
from eventstore.runtime import started
from ingest import authroutes, commands, media, reads
from ingest.auth.tokens import TokenKeys, load_jwt_keys
from ingest.config import IngestConfig
from ingest.context import CONFIG, ENDS, EXPORTS, READ, REDIS, SETTINGS_KEY, STORE
from ingest.exports import Exports
from ingest.http import json_response, request_middleware
from ingest.openapi import Operation, add_routes, build_document
from ingest.reads import READS
from ingest.security import AUTH, PUBLIC, AuthService, auth_middleware
from projectors.read import ReadSide
from projectors.read.queries import Reads

log = structlog.get_logger(__name__)

OPENAPI = web.AppKey("openapi", bytes)
KEYS = web.AppKey("jwt_keys", TokenKeys)


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """200 when PostgreSQL, Redis and Kafka answer within a second each, else 503."""
    app = request.app
    store = app[STORE]
    checks: dict[str, str] = {}

    async def probe(name: str, check: asyncio.Future[object] | object) -> None:
        try:
            async with asyncio.timeout(1.0):
                await check  # type: ignore[misc]
            checks[name] = "ok"
        except Exception as exc:  # noqa: BLE001 - any failure means "not ready"; it is reported
            checks[name] = f"unavailable: {type(exc).__name__}"

    topic = store.layout.topic("user")
    await asyncio.gather(
        probe("postgres", store.pool.fetchval("SELECT 1")),
        probe("redis", app[REDIS].ping()),
        probe("kafka", app[ENDS].end_offsets([(topic, 0)])),
    )
    ready = all(v == "ok" for v in checks.values())
    return json_response({"ready": ready, "checks": checks}, 200 if ready else 503)


async def metrics(request: web.Request) -> web.Response:
    body = prometheus_client.generate_latest()
    return web.Response(body=body, headers={"Content-Type": prometheus_client.CONTENT_TYPE_LATEST})


async def openapi(request: web.Request) -> web.Response:
    return web.Response(body=request.app[OPENAPI], content_type="application/json")


SERVICE = (
    Operation(method="GET", path="/healthz", handler=healthz, summary="Alive", public=True),
    Operation(
        method="GET",
        path="/readyz",
        handler=readyz,
        summary="Dependencies reachable",
        public=True,
        problems=(503,),
    ),
    Operation(
        method="GET",
        path="/metrics",
        handler=metrics,
        summary="Prometheus metrics",
        public=True,
        content_type="text/plain",
    ),
    Operation(
        method="GET",
        path="/v1/openapi.json",
        handler=openapi,
        summary="This document",
        public=True,
    ),
)

OPERATIONS: tuple[Operation, ...] = (
    # The router tries dynamic routes in this order: the hottest (sending) first.
    *commands.OPERATIONS,
    *reads.OPERATIONS,
    *authroutes.OPERATIONS,
    *media.OPERATIONS,
    *SERVICE,
)


def openapi_document() -> bytes:
    import msgspec

    return msgspec.json.encode(build_document(OPERATIONS, title="backbone", version="1"))


def create_app(
    settings: Settings, config: IngestConfig, keys: TokenKeys | None = None
) -> web.Application:
    """The ingest app for ``settings``; nothing connects until the app starts."""
    app = web.Application(
        middlewares=[request_middleware, auth_middleware],
        client_max_size=config.max_body,
    )
    app[SETTINGS_KEY] = settings
    app[CONFIG] = config
    app[OPENAPI] = openapi_document()
    app[KEYS] = keys or load_jwt_keys()
    app[PUBLIC] = frozenset((op.method, op.path) for op in OPERATIONS if op.public)
    app.cleanup_ctx.append(_clients)
    add_routes(app, OPERATIONS)
    return app


async def _clients(app: web.Application) -> AsyncIterator[None]:
    settings = app[SETTINGS_KEY]
    store = await EventStore.open(settings, migrate=False)
    redis = redis_client(settings.redis_url)
    pipelined = untimed_sibling(redis)
    ends = LogEnds(settings)
    try:
        await ends.start()
        app[STORE] = store
        app[REDIS] = redis
        app[ENDS] = ends
        app[READ] = ReadSide(store.pool, redis, settings.topic_prefix)
        app[READS] = Reads(store.pool, store.layout, store.epoch)
        app[EXPORTS] = Exports(store)
        media.media_client(app)
        app[AUTH] = AuthService.build(
            store.pool, redis, settings, app[CONFIG], app[KEYS], pipelined=pipelined
        )
        await app[AUTH].start()
        started()
        log.info("ingest.started")
        yield
    finally:
        log.info("ingest.stopping")
        if AUTH in app:
            await app[AUTH].close()
        if EXPORTS in app:
            await app[EXPORTS].close()
        media.close_media_client(app)
        await ends.stop()
        await pipelined.aclose()
        await redis.aclose()
        await store.close()


__all__ = ["OPERATIONS", "AuthService", "create_app", "openapi_document"]
