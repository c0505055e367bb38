"""Dead letters: log records the projector could not apply, and retrying them.

A dead letter keeps the record's position, type, reason (``poison``: it did not decode;
``projection``: applying it raised), the error and the payload (for poison, the raw record
value, still sealed; for a projection failure, the data with personal values withheld, so a
dead letter never outlives an erasure). A retry never trusts that copy: it reads the record
again from the log at its position, decodes it with today's code and keys, and applies it.
A retried event is applied out of log order; that is the operator's call, and why retries
are explicit.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Final

import msgspec

from eventstore import Connection, Decoded, EventStore, Skipped
from projectors.errors import DeadLetterNotFound
from projectors.projector import Projector
from projectors.read.contract import LIVE_SCHEMA
from projectors.schema import in_schema

_READ_BOUND: Final = 30.0


class DeadLetter(msgspec.Struct, frozen=True):
    topic: str
    partition: int
    offset: int
    position: str
    type: str
    reason: str
    error: str
    failed_at: dt.datetime
    retried_at: dt.datetime | None
    resolved: bool


async def list_dead_letters(
    conn: Connection, schema: str = LIVE_SCHEMA, *, include_resolved: bool = False
) -> list[DeadLetter]:
    """Dead letters in log order (unresolved only, unless ``include_resolved``)."""
    rows = await conn.fetch(
        in_schema(
            schema,
            'SELECT topic, partition, "offset", position, type, reason, error, failed_at, '
            "retried_at, resolved FROM {schema}.dead_letters "
            'WHERE $1 OR NOT resolved ORDER BY topic, partition, "offset"',
        ),
        include_resolved,
    )
    return [DeadLetter(*row) for row in rows]


async def _read_record(store: EventStore, topic: str, partition: int, offset: int) -> Decoded:
    """The record at the position, decoded now (bounded: the log keeps every record)."""
    reader = store.reader([store.layout.stream_of(topic)])
    # Every other partition starts at its end: only this one is fetched from the past.
    await reader.start("end", {(topic, partition): offset})
    try:
        async with asyncio.timeout(_READ_BOUND):
            while True:
                batch = await reader.next_batch(timeout_ms=500)
                for item in batch.items:
                    if (item.position.partition, item.position.offset) == (partition, offset):
                        return item
    except TimeoutError:
        raise DeadLetterNotFound(f"no record at {topic}/{partition}/{offset} in the log") from None
    finally:
        await reader.stop()


async def retry_dead_letter(
    store: EventStore, projector: Projector, topic: str, partition: int, offset: int
) -> bool:
    """Read the dead-lettered record again and apply it; return whether it applied.

    On success the dead letter is marked resolved; otherwise its error is updated. Either way
    ``retried_at`` records the attempt.
    """
    schema = projector.schema
    found = await store.pool.fetchval(
        in_schema(
            schema,
            "SELECT true FROM {schema}.dead_letters "
            'WHERE topic = $1 AND partition = $2 AND "offset" = $3',
        ),
        topic,
        partition,
        offset,
    )
    if not found:
        raise DeadLetterNotFound(f"no dead letter at {topic}/{partition}/{offset}")
    item = await _read_record(store, topic, partition, offset)
    if isinstance(item, Skipped):
        error: str | None = f"{item.reason}: {item.error}"
    else:
        error = await projector.reapply(item)
    await store.pool.execute(
        in_schema(
            schema,
            "UPDATE {schema}.dead_letters SET retried_at = now(), resolved = $4, "
            "error = coalesce($5, error) "
            'WHERE topic = $1 AND partition = $2 AND "offset" = $3',
        ),
        topic,
        partition,
        offset,
        error is None,
        error,
    )
    return error is None
