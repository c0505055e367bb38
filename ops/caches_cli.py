"""``backbone caches rebuild``: drop the projector's Redis caches and rebuild them from PostgreSQL.

For a Redis that lost its data, or a rebuild that died between its swap and its cache rebuild
(the membership and summary caches then still describe the model from before the swap). It
rebuilds every conversation's members hash, every user's conversation set and every
conversation summary from the live read model, and resets the cache fences to the model's
stored offsets (:func:`projectors.caches.rebuild_caches`); the live projector may keep
running, its batches wait on the tables' locks meanwhile. The recent-history caches are left
as they are: they hold frames of the log, which no read model changes, and a fan-out resume
that misses them reads the log instead while the projector refills them as events arrive.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

import msgspec
from redis.asyncio import Redis
from redis.exceptions import RedisError

from eventstore import EventStoreError, Settings, create_pool
from ops.deployment import command_settings
from projectors.caches import CachesRebuilt, rebuild_caches
from projectors.errors import ProjectorError
from projectors.read.contract import LIVE_SCHEMA
from projectors.schema import require_live_schema


async def rebuild(settings: Settings) -> CachesRebuilt:
    """Rebuild the caches of the live read model of ``settings``' deployment."""
    pool = await create_pool(settings.postgres_dsn, min_size=1, max_size=1)
    redis = Redis.from_url(settings.redis_url)
    try:
        await require_live_schema(pool)
        return await rebuild_caches(pool, redis, settings.topic_prefix)
    finally:
        await redis.aclose()
        await pool.close()


def run_rebuild(args: argparse.Namespace) -> int:
    try:
        rebuilt = asyncio.run(rebuild(command_settings()))
    except (EventStoreError, ProjectorError, RedisError, OSError) as exc:
        print(f"backbone caches rebuild: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"schema": LIVE_SCHEMA, **msgspec.to_builtins(rebuilt)}))
    else:
        print(
            f"caches rebuilt from {LIVE_SCHEMA}: members of {rebuilt.conversations} "
            f"conversations, conversation sets of {rebuilt.users} users, "
            f"{rebuilt.summaries} summaries"
        )
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser("caches", help="the projector's Redis caches", description=__doc__)
    commands = parser.add_subparsers(dest="caches_command", required=True, metavar="COMMAND")
    again = commands.add_parser(
        "rebuild", help="drop and rebuild them from the live read model", description=__doc__
    )
    again.add_argument("--json", action="store_true", help="machine-readable output")
    again.set_defaults(func=run_rebuild)
