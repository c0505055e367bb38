"""Provisioning: every PostgreSQL migration and the event topics, idempotently.

Run by ``backbone stack up`` (through :func:`post_up`), by ``backbone up`` and by
``backbone provision`` against any environment. Each tier registers its migrations in
:data:`MIGRATIONS`, in dependency order.
"""

from __future__ import annotations

import asyncio
import sys

from eventstore import (
    Migration,
    Settings,
    TopicLayout,
    create_pool,
    load_migrations,
    migrate,
    provision_topics,
)
from ops.stack import StackInfo
from projectors.schema import ensure_live_schema

MIGRATIONS: tuple[tuple[str, str], ...] = (("eventstore", "eventstore"), ("ingest", "ingest"))
"""(component, package holding ``sql/NNNN_*.sql``), applied in this order."""


def all_migrations() -> list[Migration]:
    return [m for component, package in MIGRATIONS for m in load_migrations(component, package)]


async def migrate_all(dsn: str) -> list[Migration]:
    """Apply every pending migration of every component to the database at ``dsn``."""
    pool = await create_pool(dsn, min_size=1, max_size=2)
    try:
        async with pool.acquire() as conn:
            return await migrate(conn, all_migrations())
    finally:
        await pool.close()


async def provision(settings: Settings) -> tuple[list[Migration], list[str]]:
    """Apply pending migrations, create the live read model and missing topics; what was done.

    The read model is created here too (not only by the projector at start-up), so every tier
    can start in any order: ingest's reads find the tables before a projector ever ran.
    """
    applied = await migrate_all(settings.postgres_dsn)
    pool = await create_pool(settings.postgres_dsn, min_size=1, max_size=1)
    try:
        await ensure_live_schema(pool)
    finally:
        await pool.close()
    created = await provision_topics(settings.kafka_bootstrap, TopicLayout.from_settings(settings))
    return applied, created


def post_up(info: StackInfo) -> None:
    """What ``backbone stack up`` does once every server is healthy."""
    from ops.environment import stack_settings

    applied, created = asyncio.run(provision(stack_settings(info)))
    for migration in applied:
        print(
            f"stack: applied migration {migration.component} "
            f"{migration.version:04d}_{migration.name}",
            file=sys.stderr,
        )
    for topic in created:
        print(f"stack: created topic {topic}", file=sys.stderr)
