"""A fingerprint of a read model: equal checksums mean byte-identical tables.

Replaying the same log must reproduce the read model exactly; this is how a test, a rebuild
or an operator proves it. Every table is hashed row by row in primary-key order, through
PostgreSQL's text form of the row (with the time zone and bytea format pinned, so the session
cannot change the text). Wall-clock bookkeeping columns (:attr:`Table.unchecked`) are left out.
"""

from __future__ import annotations

import hashlib

from eventstore import Connection
from projectors.schema import TABLES, Table, checked_schema_name


def _quoted(column: str) -> str:
    return '"offset"' if column == "offset" else column


def _table_sql(schema: str, table: Table) -> str:
    columns = ", ".join(_quoted(c.name) for c in table.columns if c.name not in table.unchecked)
    order = ", ".join(_quoted(c) for c in table.primary_key)
    return (
        f"SELECT count(*), md5(string_agg(md5(ROW({columns})::text), '' ORDER BY {order})) "  # noqa: S608 - names from TABLES
        f"FROM {schema}.{table.name}"
    )


async def checksum(conn: Connection, schema: str) -> str:
    """A hex SHA-256 over every read-model table of ``schema``."""
    schema = checked_schema_name(schema)
    digest = hashlib.sha256()
    async with conn.transaction():
        await conn.execute("SET LOCAL TimeZone = 'UTC'")
        await conn.execute("SET LOCAL bytea_output = 'hex'")
        for table in TABLES:
            row = await conn.fetchrow(_table_sql(schema, table))
            assert row is not None  # an aggregate always yields one row
            count, table_digest = row
            digest.update(f"{table.name}:{count}:{table_digest or ''}\n".encode())
    return digest.hexdigest()
