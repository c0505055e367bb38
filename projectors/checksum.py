"""A fingerprint of a read model: equal checksums mean byte-identical tables.

Replaying the same log must reproduce the read model exactly; this is how a test, a rebuild
or an operator proves it. Every table is hashed row by row in primary-key order, through
PostgreSQL's text form of the row (with the time zone and bytea format pinned, so the session
cannot change the text). Wall-clock bookkeeping columns (:attr:`Table.unchecked`) are left out.

Each row's text is hashed to 64 bits by PostgreSQL's ``hashtextextended`` (the hash behind
hash partitioning, kept stable across versions), and a table's rows are combined by XOR with
their count: no sort, and the result does not depend on the order rows are read in. A row's
text holds its primary key, and keys are unique, so no two rows of a table can cancel out; a
table that differs anywhere gives another value but with a chance of 2^-64. The digest is the
SHA-256 of every table's name, count and combined hash. It tells replays apart; it is no seal
against someone forging rows (the archive's hash chain is that).

Before, each row went through ``md5`` and a table's hashes were joined in key order: that took
twice the database's time (5.4 against 2.9 s for a million 1 KB messages), most of it MD5 and
the sort, which a rebuild spends after its swap.

Tables keyed by a UUID are read in :data:`KEY_RANGES` ranges of that key, combined here the
same way (the digest does not depend on the split); given several connections that share one
snapshot (:class:`SnapshotReaders`), the ranges are read side by side. Most of the work is the
database printing each row, so a million-row model is hashed about twice as fast on two
connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import itertools
import operator
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Final

from eventstore import Connection, Pool
from projectors.schema import TABLES, Table, checked_schema_name

KEY_RANGES: Final = 4
"""Key ranges a UUID-keyed table is read in."""
READERS: Final = 2
"""Connections a rebuild hashes its result on (one per core of the reference machine)."""

_BITS_64: Final = (1 << 64) - 1
_EDGES: Final = [uuid.UUID(int=i * (2**128 // KEY_RANGES)) for i in range(1, KEY_RANGES)]


def _quoted(column: str) -> str:
    return '"offset"' if column == "offset" else column


class _Part:
    """One query of the checksum: a table, or one key range of it."""

    def __init__(self, schema: str, table: Table, low: uuid.UUID | None, high: uuid.UUID | None):
        columns = ", ".join(_quoted(c.name) for c in table.columns if c.name not in table.unchecked)
        first = _quoted(table.primary_key[0])
        where: list[str] = []
        self.args: list[uuid.UUID] = []
        for bound, op in ((low, ">="), (high, "<")):
            if bound is not None:
                self.args.append(bound)
                where.append(f"{first} {op} ${len(self.args)}")
        self.table = table
        self.sql = (
            f"SELECT count(*), bit_xor(hashtextextended(ROW({columns})::text, 0)) "  # noqa: S608 - names from TABLES
            f"FROM {schema}.{table.name}" + (f" WHERE {' AND '.join(where)}" if where else "")
        )


def _parts(schema: str) -> list[_Part]:
    parts: list[_Part] = []
    for table in TABLES:
        if table.column(table.primary_key[0]).type == "uuid":
            bounds = [None, *_EDGES, None]
            parts.extend(_Part(schema, table, lo, hi) for lo, hi in itertools.pairwise(bounds))
        else:
            parts.append(_Part(schema, table, None, None))
    return parts


async def checksum(conn: Connection, schema: str, *more: Connection) -> str:
    """A hex SHA-256 over every read-model table of ``schema``, read on ``conn`` and on the
    ``more`` connections side by side (all must see the same snapshot for the result to be a
    consistent one: :class:`SnapshotReaders`)."""
    schema = checked_schema_name(schema)
    parts = _parts(schema)
    results: list[tuple[int, int] | None] = [None] * len(parts)
    todo = iter(range(len(parts)))

    async def read(reader: Connection) -> None:
        async with reader.transaction():
            await reader.execute("SET LOCAL TimeZone = 'UTC'")
            await reader.execute("SET LOCAL bytea_output = 'hex'")
            for i in todo:  # shared: each part is read once, by whichever reader is free
                row = await reader.fetchrow(parts[i].sql, *parts[i].args)
                assert row is not None  # an aggregate always yields one row
                results[i] = (row[0], row[1] or 0)

    reads = [asyncio.ensure_future(read(reader)) for reader in (conn, *more)]
    try:
        await asyncio.gather(*reads)
    except BaseException:
        for pending in reads:  # no query may still run when the caller's transactions end
            pending.cancel()
        await asyncio.gather(*reads, return_exceptions=True)
        raise
    digest = hashlib.sha256()
    for table in TABLES:
        counted = [r for p, r in zip(parts, results, strict=True) if p.table is table]
        count = sum(r[0] for r in counted if r is not None)
        combined = functools.reduce(operator.xor, (r[1] for r in counted if r is not None), 0)
        digest.update(f"{table.name}:{count}:{combined & _BITS_64:016x}\n".encode())
    return digest.hexdigest()


class SnapshotReaders:
    """Connections in read-only repeatable-read transactions that will share one snapshot.

    The transactions begin without a snapshot; :meth:`adopt` gives each the one exported by
    another transaction (a rebuild's swap, so the checksum is of exactly what it swapped in),
    :meth:`own` the first reader's.
    """

    def __init__(self, connections: Sequence[Connection]) -> None:
        self.connections = list(connections)

    async def adopt(self, snapshot: str) -> None:
        for conn in self.connections:
            await conn.execute(f"SET TRANSACTION SNAPSHOT '{snapshot}'")

    async def own(self) -> None:
        first, *rest = self.connections
        snapshot = await first.fetchval("SELECT pg_export_snapshot()")
        for conn in rest:
            await conn.execute(f"SET TRANSACTION SNAPSHOT '{snapshot}'")

    async def checksum(self, schema: str) -> str:
        return await checksum(self.connections[0], schema, *self.connections[1:])


@contextlib.asynccontextmanager
async def snapshot_readers(pool: Pool, count: int = READERS) -> AsyncIterator[SnapshotReaders]:
    """``count`` connections of ``pool`` as :class:`SnapshotReaders`, rolled back after."""
    async with contextlib.AsyncExitStack() as stack:
        connections = [await stack.enter_async_context(pool.acquire()) for _ in range(count)]
        for conn in connections:
            reading = conn.transaction(isolation="repeatable_read", readonly=True)
            await reading.start()
            stack.push_async_callback(reading.rollback)
        yield SnapshotReaders(connections)
