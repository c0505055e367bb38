"""The read model's positions in the log, kept in its own ``offsets`` table.

Offsets are stored in the same transaction as the effects of the batch that reached them, so
the read model and its position never disagree, whatever instant a process dies at. A batch
first *claims* its partitions: it locks their rows and checks that the stored next offset is
exactly where the batch starts. Anything else means another group member applied (or is
applying) those records, and the batch is refused with
:class:`~eventstore.consumer.PositionsMoved` before it writes anything.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from eventstore import Connection, OffsetRange, Pool
from eventstore.consumer import Partition, PositionsMoved
from projectors.schema import checked_schema_name, in_schema

_STORED_SQL = (
    "SELECT o.topic, o.partition, o.next_offset FROM {schema}.offsets o "
    "JOIN unnest($1::text[], $2::int[]) AS k(topic, partition) USING (topic, partition)"
)


class StoredPositions:
    """The :class:`~eventstore.PositionStore` of one read-model schema."""

    def __init__(self, pool: Pool, schema: str) -> None:
        self._pool = pool
        self._schema = checked_schema_name(schema)

    async def load(self, partitions: Sequence[Partition]) -> Mapping[Partition, int]:
        rows = await self._pool.fetch(
            in_schema(self._schema, _STORED_SQL),
            [t for t, _ in partitions],
            [p for _, p in partitions],
        )
        return {(r[0], r[1]): r[2] for r in rows}


async def claim(conn: Connection, schema: str, ranges: Mapping[Partition, OffsetRange]) -> None:
    """Lock the batch's partitions and check the stored offsets are where the batch starts.

    A partition without a row is being applied for the first time: its row is created at 0
    (topics keep every event, so a partition's first batch starts there) and locked by this
    transaction. Two members racing on it serialise on the primary key, and the loser sees the
    winner's offset. Rows exist after a partition's first batch, so the insert is only tried
    when the lock found one missing.

    A batch of a partition without a row that does not start at 0 is refused like any other
    that does not start at the stored offset (:class:`PositionsMoved`; the reader reads the
    partition again from 0): its reader moved on past records nothing stored, as when the
    partition's first batch was refused beside another's, or when a crash of PostgreSQL took
    back the commit that created the row. Recording the batch's own start had skipped those
    records for good.
    """
    ordered = sorted(ranges.items())  # one lock order for every member: no deadlocks
    topics = [t for (t, _), _ in ordered]
    partitions = [p for (_, p), _ in ordered]
    locking = in_schema(schema, _STORED_SQL + " ORDER BY o.topic, o.partition FOR UPDATE OF o")
    rows = await conn.fetch(locking, topics, partitions)
    if len(rows) < len(ordered):
        await conn.execute(
            in_schema(
                schema,
                "INSERT INTO {schema}.offsets (topic, partition, next_offset) "
                "SELECT * FROM unnest($1::text[], $2::int[], $3::bigint[]) "
                "ON CONFLICT (topic, partition) DO NOTHING",
            ),
            topics,
            partitions,
            [0] * len(ordered),
        )
        rows = await conn.fetch(locking, topics, partitions)
    stored = {(r[0], r[1]): r[2] for r in rows}
    moved = {p: (stored.get(p), r.first) for p, r in ranges.items() if stored.get(p) != r.first}
    if moved:
        detail = ", ".join(f"{t}/{p}: stored {s}, batch at {f}" for (t, p), (s, f) in moved.items())
        raise PositionsMoved(f"stored offsets moved: {detail}")


async def advance(conn: Connection, schema: str, ranges: Mapping[Partition, OffsetRange]) -> None:
    """Record that the batch's records are applied (in the batch's transaction)."""
    await conn.execute(
        in_schema(
            schema,
            "UPDATE {schema}.offsets o SET next_offset = k.next_offset "
            "FROM unnest($1::text[], $2::int[], $3::bigint[]) AS k(topic, partition, next_offset) "
            "WHERE o.topic = k.topic AND o.partition = k.partition",
        ),
        [t for t, _ in ranges],
        [p for _, p in ranges],
        [r.next for r in ranges.values()],
    )
