"""``backbone audit`` and ``backbone erase``: answering for what happened, and forgetting a person.

``audit`` reads the log (the only source of truth) and lists the events that match every
filter given: a user (their own stream and every event naming them), a conversation (only its
partition is read), event types, and a time range. Personal data is decrypted where the
subject's key exists and shown as ``{"kind": "erased"}`` where it was destroyed. Output is a
table, or JSON lines (CloudEvents structured mode plus the position) with ``--json``.

``erase`` is the operator's path to the same erasure as ``DELETE /v1/users/me``
(:func:`ingest.erasure.erase_user`).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import sys
import uuid
from typing import Any

import msgspec
from redis.asyncio import Redis

from eventstore import EventStore, EventStoreError, RecordedEvent, Settings
from eventstore.audit import AuditFilter, audit_events
from eventstore.cloudevents import structured
from ingest.auth.tokens import load_jwt_keys, new_jwt_key, parse_jwt_keys
from ingest.config import load_ingest_config
from ingest.erasure import erase_user
from ingest.security import AuthService
from ops.deployment import command_settings
from schemas import EVENT_TYPES, parse_time

OPERATOR = uuid.UUID(int=0)
"""The actor recorded for operator actions taken from the CLI."""


def _row(recorded: RecordedEvent) -> str:
    data = msgspec.to_builtins(recorded.event)
    data.pop("type", None)
    summary = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    if len(summary) > 100:
        summary = summary[:97] + "..."
    time = recorded.envelope.time.isoformat(timespec="milliseconds")
    return f"{time:<29} {recorded.position.token():<16} {recorded.envelope.type:<32} {summary}"


async def run_audit_async(settings: Settings, wanted: AuditFilter, as_json: bool) -> int:
    count = 0
    async with await EventStore.open(settings, with_producer=False, migrate=False) as store:
        if not as_json:
            print(f"{'time':<29} {'position':<16} {'type':<32} data")
        async for recorded in audit_events(store, wanted):
            count += 1
            if as_json:
                document = structured(recorded)
                document["position"] = recorded.position.token()
                print(json.dumps(document, ensure_ascii=False))
            else:
                print(_row(recorded))
    if not as_json:
        print(f"{count} events", file=sys.stderr)
    return 0


def _time(raw: str | None) -> dt.datetime | None:
    return None if raw is None else parse_time(raw)


def run_audit(args: argparse.Namespace) -> int:
    unknown = set(args.type) - set(EVENT_TYPES)
    if unknown:
        print(f"backbone audit: unknown event types {sorted(unknown)}", file=sys.stderr)
        return 2
    try:
        wanted = AuditFilter(
            user=uuid.UUID(args.user) if args.user else None,
            conversation=uuid.UUID(args.conversation) if args.conversation else None,
            types=frozenset(args.type),
            since=_time(args.since),
            until=_time(args.until),
        )
    except ValueError as exc:
        print(f"backbone audit: {exc}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(run_audit_async(command_settings(), wanted, args.json))
    except EventStoreError as exc:
        print(f"backbone audit: {exc}", file=sys.stderr)
        return 1


async def erase_async(settings: Settings, user_id: uuid.UUID) -> dict[str, Any]:
    config = load_ingest_config()
    try:
        keys = load_jwt_keys()
    except EventStoreError:
        # Erasure issues no tokens: a throw-away key will do when none is configured.
        keys = parse_jwt_keys(new_jwt_key("cli"))
    async with await EventStore.open(settings, migrate=False) as store:
        redis = Redis.from_url(settings.redis_url)
        try:
            auth = AuthService.build(store.pool, redis, settings, config, keys)
            recorded = await erase_user(store, auth, user_id, actor=OPERATOR)
        finally:
            await redis.aclose()
    return {"user_id": str(user_id), "position": recorded.position.token()}


def run_erase(args: argparse.Namespace) -> int:
    try:
        user_id = uuid.UUID(args.user_id)
    except ValueError:
        print(f"backbone erase: {args.user_id!r} is not a user id", file=sys.stderr)
        return 2
    try:
        result = asyncio.run(erase_async(command_settings(), user_id))
    except EventStoreError as exc:
        print(f"backbone erase: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result) if args.json else f"erased {user_id} at {result['position']}")
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    audit = sub.add_parser("audit", help="events from the log, filtered", description=__doc__)
    audit.add_argument("--user", help="a user id: their events and every event naming them")
    audit.add_argument("--conversation", help="a conversation id")
    audit.add_argument("--type", action="append", default=[], help="an event type (repeatable)")
    audit.add_argument("--since", help="RFC 3339 time, inclusive")
    audit.add_argument("--until", help="RFC 3339 time, inclusive")
    audit.add_argument("--json", action="store_true", help="JSON lines")
    audit.set_defaults(func=run_audit)
    erase = sub.add_parser("erase", help="erase a user (operator)", description=__doc__)
    erase.add_argument("user_id")
    erase.add_argument("--json", action="store_true")
    erase.set_defaults(func=run_erase)
