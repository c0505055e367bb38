"""``backbone dlq list|retry``: the live projector's dead letters, and retrying them.

A dead letter is a log record the projector could not apply (see
:mod:`projectors.dead_letters`). ``retry`` reads the record again from the log, decodes it with
today's code and keys and applies it to the live read model and its caches, out of log order:
that is the operator's call, which is why retries are explicit. ``--all`` retries every
unresolved dead letter in log order.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

import msgspec
from redis.asyncio import Redis

from eventstore import EventStore, EventStoreError, Settings, create_pool
from ops.deployment import command_settings
from projectors.caches import Caches
from projectors.dead_letters import DeadLetter, list_dead_letters, retry_dead_letter
from projectors.errors import ProjectorError
from projectors.projector import Projector
from projectors.schema import in_schema, require_live_schema

_ERROR_SQL = (
    'SELECT error FROM {schema}.dead_letters WHERE topic = $1 AND partition = $2 AND "offset" = $3'
)


class RetryOutcome(msgspec.Struct, frozen=True):
    topic: str
    partition: int
    offset: int
    applied: bool
    error: str | None


async def dead_letters(settings: Settings, *, include_resolved: bool = False) -> list[DeadLetter]:
    """The live read model's dead letters in log order."""
    pool = await create_pool(settings.postgres_dsn, min_size=1, max_size=1)
    try:
        async with pool.acquire() as conn:
            await require_live_schema(conn)
            return await list_dead_letters(conn, include_resolved=include_resolved)
    finally:
        await pool.close()


async def retry(
    settings: Settings, targets: list[tuple[str, int, int]] | None
) -> list[RetryOutcome]:
    """Retry the dead letters at ``targets`` (``None``: every unresolved one), in order."""
    redis = Redis.from_url(settings.redis_url)
    try:
        async with await EventStore.open(settings, with_producer=False) as store:
            await require_live_schema(store.pool)
            if targets is None:
                async with store.pool.acquire() as conn:
                    found = await list_dead_letters(conn)
                targets = [(d.topic, d.partition, d.offset) for d in found]
            projector = Projector(
                store.pool, store.layout, caches=Caches(redis, settings.topic_prefix)
            )
            outcomes: list[RetryOutcome] = []
            for topic, partition, offset in targets:
                applied = await retry_dead_letter(store, projector, topic, partition, offset)
                error = None
                if not applied:
                    error = await store.pool.fetchval(
                        in_schema(projector.schema, _ERROR_SQL),
                        topic,
                        partition,
                        offset,
                    )
                outcomes.append(RetryOutcome(topic, partition, offset, applied, error))
            return outcomes
    finally:
        await redis.aclose()


def run_list(args: argparse.Namespace) -> int:
    try:
        letters = asyncio.run(dead_letters(command_settings(), include_resolved=args.resolved))
    except (EventStoreError, ProjectorError) as exc:
        print(f"backbone dlq list: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(msgspec.to_builtins(letters), indent=2))
        return 0
    if not letters:
        print("no dead letters")
        return 0
    print(f"{'TOPIC':<28} {'PART':>4} {'OFFSET':>8}  {'REASON':<10} {'TYPE':<28} ERROR")
    for d in letters:
        state = " (resolved)" if d.resolved else ""
        print(
            f"{d.topic:<28} {d.partition:>4} {d.offset:>8}  {d.reason:<10} {d.type:<28} "
            f"{d.error}{state}"
        )
    return 0


def run_retry(args: argparse.Namespace) -> int:
    given = (args.topic, args.partition, args.offset)
    if args.all == any(v is not None for v in given) or (not args.all and None in given):
        print("backbone dlq retry: give <topic> <partition> <offset>, or --all", file=sys.stderr)
        return 2
    targets = None if args.all else [(args.topic, args.partition, args.offset)]
    try:
        outcomes = asyncio.run(retry(command_settings(), targets))
    except (EventStoreError, ProjectorError) as exc:
        print(f"backbone dlq retry: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(msgspec.to_builtins(outcomes), indent=2))
    else:
        for o in outcomes:
            verdict = "applied" if o.applied else f"failed again: {o.error}"
            print(f"{o.topic}/{o.partition}/{o.offset}: {verdict}")
        if not outcomes:
            print("no dead letters to retry")
    return 0 if all(o.applied for o in outcomes) else 1


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "dlq", help="list or retry the projector's dead letters", description=__doc__
    )
    commands = parser.add_subparsers(dest="dlq_command", required=True, metavar="COMMAND")
    listing = commands.add_parser("list", help="dead letters in log order")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    listing.add_argument("--resolved", action="store_true", help="include resolved ones")
    listing.set_defaults(func=run_list)
    again = commands.add_parser("retry", help="read a dead letter again from the log, apply it")
    again.add_argument("topic", nargs="?")
    again.add_argument("partition", nargs="?", type=int)
    again.add_argument("offset", nargs="?", type=int)
    again.add_argument("--all", action="store_true", help="every unresolved dead letter")
    again.add_argument("--json", action="store_true", help="machine-readable output")
    again.set_defaults(func=run_retry)
