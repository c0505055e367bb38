"""The projector worker process: ``python -m projectors`` (``backbone serve projectors``).

``run`` owns every long-lived client (pool, Redis, event store, log-end reader, HTTP server),
creates them in order and closes them in reverse. The worker joins the consumer group
``<topic prefix>.projector.chat``; any number of workers share the partitions, and a crash
or a rebalance at any instant neither loses nor double-applies an event (see
:mod:`projectors.projector`). SIGTERM and SIGINT stop it after the batch in flight.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping
from typing import Final

import asyncpg
import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.asyncio import Redis

from eventstore import (
    ConfigError,
    EventStore,
    EventStoreError,
    GroupReader,
    LogEnds,
    Pool,
    Settings,
    create_pool,
)
from eventstore.redisclient import redis_client, untimed_sibling
from eventstore.runtime import serve_member
from projectors.caches import Caches
from projectors.metrics import LAG
from projectors.projector import Projector
from projectors.schema import ensure_live_schema

log = structlog.get_logger(__name__)

METRICS_PORT_VARIABLE: Final = "BACKBONE_PROJECTOR_METRICS_PORT"
LINGER_VARIABLE: Final = "BACKBONE_PROJECTOR_LINGER_MS"
DEFAULT_LINGER_MS: Final = 20
METRICS_HOST_VARIABLE: Final = "BACKBONE_PROJECTOR_METRICS_HOST"
WORKER_INDEX_VARIABLE: Final = "BACKBONE_WORKER_INDEX"
_LAG_INTERVAL: Final = 5.0
BATCH_SERVER_SETTINGS: Final = {"idle_in_transaction_session_timeout": "10s"}
"""PostgreSQL ends a batch's transaction that waits on this worker for 10 s, the group
session's length (aiokafka's default): a worker stopped inside a batch (a VM pause, SIGSTOP)
holds its partitions' offsets rows locked, and the member the group gives those partitions to
would wait on them for as long as the stop lasts. Between two statements a batch computes for
milliseconds. The stopped worker, once resumed, finds its connection closed: its batch
committed nothing, and it exits for its supervisor to start it again."""


def group_id(settings: Settings) -> str:
    """The consumer group of the live projector of this deployment."""
    return f"{settings.topic_prefix}.projector.chat"


def instance_id(settings: Settings, env: Mapping[str, str]) -> str | None:
    """A static group-member id from ``BACKBONE_WORKER_INDEX`` (set by the supervisor).

    A worker restarted after a crash then takes its partitions back at once, instead of
    waiting out its dead predecessor's session. Without an index, membership is dynamic.
    """
    index = env.get(WORKER_INDEX_VARIABLE, "").strip()
    return f"{group_id(settings)}-{index}" if index else None


def application_name(env: Mapping[str, str]) -> str:
    """The name the worker's PostgreSQL sessions carry (``pg_stat_activity.application_name``):
    ``backbone-projector-<index>`` under the supervisor, so an operator looking at a lock wait
    or a long transaction sees which worker holds it."""
    index = env.get(WORKER_INDEX_VARIABLE, "").strip()
    return f"backbone-projector-{index}" if index else "backbone-projector"


def linger_ms(env: Mapping[str, str]) -> int:
    """``BACKBONE_PROJECTOR_LINGER_MS`` (default 20): how long the broker may gather records
    for one fetch. Every batch is a transaction with a fixed cost (claim, prefetch, writes,
    caches, offsets, commit: a dozen round trips, a few milliseconds of CPU across the worker,
    PostgreSQL and Redis), so the batch rate sets the projector's cost more than the event
    rate does: at 5 ms a projector following 2,000 events a second took about half a core
    with PostgreSQL, which the ingest tier on the same machine went without. The projection
    lags by up to this much more; WebSocket subscribers do not wait for it (the fan-out tier
    reads the log itself)."""
    raw = env.get(LINGER_VARIABLE, "").strip() or str(DEFAULT_LINGER_MS)
    if not raw.isdigit() or int(raw) > 1000:
        raise ConfigError(f"{LINGER_VARIABLE}={raw!r} is not a number of milliseconds (0-1000)")
    return int(raw)


def metrics_port(env: Mapping[str, str]) -> int:
    """``BACKBONE_PROJECTOR_METRICS_PORT`` (0, the default, serves nothing)."""
    raw = env.get(METRICS_PORT_VARIABLE, "").strip() or "0"
    if not raw.isdigit() or int(raw) > 65535:
        raise ConfigError(f"{METRICS_PORT_VARIABLE}={raw!r} is not a port number")
    return int(raw)


async def _track_lag(reader: GroupReader, projector: Projector, ends: LogEnds) -> None:
    """Publish per-partition lag every few seconds (last-applied is set per batch)."""
    while True:
        owned = sorted(reader.assignment)
        try:
            if owned:
                stored = await projector.positions.load(owned)
                for (topic, partition), end in (await ends.end_offsets(owned)).items():
                    behind = end - stored.get((topic, partition), 0)
                    LAG.labels(topic, str(partition)).set(max(behind, 0))
        except (EventStoreError, OSError, asyncpg.PostgresError) as exc:
            log.warning("projector.lag_unknown", error=str(exc))
        await asyncio.sleep(_LAG_INTERVAL)


def _http_app(pool: Pool, redis: Redis, reader: GroupReader) -> web.Application:
    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(request: web.Request) -> web.Response:
        try:
            async with asyncio.timeout(2):
                await pool.fetchval("SELECT 1")
                await redis.ping()
        except Exception as exc:  # noqa: BLE001 - any failure means "not ready", reported
            return web.json_response({"status": "unavailable", "error": str(exc)}, status=503)
        if not reader.assignment:
            return web.json_response({"status": "waiting for partitions"}, status=503)
        return web.json_response({"status": "ready"})

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app


async def run(settings: Settings, env: Mapping[str, str] | None = None) -> None:
    """Project the log into the live read model until SIGTERM/SIGINT."""
    env = os.environ if env is None else env
    port = metrics_port(env)
    # Batches use transaction-scoped settings and locks only: no reset round trip per batch.
    pool = await create_pool(
        settings.postgres_dsn,
        keep_sessions=True,
        server_settings={**BATCH_SERVER_SETTINGS, "application_name": application_name(env)},
    )
    redis = redis_client(settings.redis_url)
    untimed = untimed_sibling(redis)  # for the caches, which bound each pipeline as a whole
    try:
        async with await EventStore.open(settings, pool=pool, with_producer=False) as store:
            await ensure_live_schema(pool)
            caches = Caches(untimed, settings.topic_prefix)
            # Commits wait for no WAL flush (see Projector): a commit then takes ~1 ms where a
            # busy disk held a flush for up to 300 ms, which every reader of the model waited.
            projector = Projector(pool, store.layout, caches=caches, durable_commits=False)
            reader = GroupReader(
                settings,
                group_id=group_id(settings),
                streams=("user", "conversation"),
                positions=projector.positions,
                handler=projector.handle,
                keys=store.keyring.keys_for_read,
                epoch=store.epoch,
                instance_id=instance_id(settings, env),
                linger_ms=linger_ms(env),
            )
            await _serve(settings, env, port, pool, redis, reader, projector)
    finally:
        await untimed.aclose()
        await redis.aclose()
        await pool.close()


async def _serve(
    settings: Settings,
    env: Mapping[str, str],
    port: int,
    pool: Pool,
    redis: Redis,
    reader: GroupReader,
    projector: Projector,
) -> None:
    await serve_member(
        reader,
        settings,
        name="projector",
        http=_http_app(pool, redis, reader),
        host=env.get(METRICS_HOST_VARIABLE, "127.0.0.1"),
        port=port,
        track_lag=lambda ends: _track_lag(reader, projector, ends),
        group=group_id(settings),
    )
