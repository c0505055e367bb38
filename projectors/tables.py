"""Set-based reads and writes of read-model rows, one statement per table and batch.

The statements are derived from :mod:`projectors.schema` for a given schema name, so the same
code writes the live model and a shadow one being rebuilt. Rows travel as one array per
column through ``unnest``: a batch of thousands of rows is one round trip, not thousands.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from typing import Any

import msgspec

from eventstore import Connection
from projectors.rows import ROW_CLASSES, Key, Row
from projectors.schema import Table, checked_schema_name

_ROW_CLASS: dict[str, type[Row]] = {cls.table.name: cls for cls in ROW_CLASSES}


def _name(column: str) -> str:
    return '"offset"' if column == "offset" else column


def _cast(table: Table, column: str) -> str:
    return f"{table.column(column).type}[]"


def _params(table: Table, columns: Sequence[str], start: int = 1) -> str:
    return ", ".join(f"${i}::{_cast(table, c)}" for i, c in enumerate(columns, start))


@functools.cache
def load_sql(schema: str, table: Table) -> str:
    schema = checked_schema_name(schema)
    columns = ", ".join(f"t.{_name(c.name)}" for c in table.columns)
    pk = table.primary_key
    if len(pk) == 1:
        return (
            f"SELECT {columns} FROM {schema}.{table.name} t "  # noqa: S608 - names from TABLES
            f"WHERE t.{_name(pk[0])} = ANY({_params(table, pk)})"
        )
    keys = ", ".join(_name(c) for c in pk)
    return (
        f"SELECT {columns} FROM unnest({_params(table, pk)}) AS k({keys}) "  # noqa: S608 - names from TABLES
        f"JOIN {schema}.{table.name} t USING ({keys})"
    )


@functools.cache
def upsert_sql(schema: str, table: Table) -> str:
    schema = checked_schema_name(schema)
    names = [c.name for c in table.columns]
    rest = [n for n in names if n not in table.primary_key]
    action = (
        "DO UPDATE SET " + ", ".join(f"{_name(n)} = EXCLUDED.{_name(n)}" for n in rest)
        if rest
        else "DO NOTHING"
    )
    return (
        f"INSERT INTO {schema}.{table.name} ({', '.join(_name(n) for n in names)}) "  # noqa: S608 - names from TABLES
        f"SELECT * FROM unnest({_params(table, names)}) "
        f"ON CONFLICT ({', '.join(_name(n) for n in table.primary_key)}) {action}"
    )


@functools.cache
def delete_sql(schema: str, table: Table) -> str:
    schema = checked_schema_name(schema)
    pk = table.primary_key
    keys = ", ".join(_name(c) for c in pk)
    match = " AND ".join(f"t.{_name(c)} = k.{_name(c)}" for c in pk)
    return (
        f"DELETE FROM {schema}.{table.name} t USING unnest({_params(table, pk)}) AS k({keys}) "  # noqa: S608 - names from TABLES
        f"WHERE {match}"
    )


def _columns_of(keys: Iterable[Key], width: int) -> list[list[Any]]:
    columns: list[list[Any]] = [[] for _ in range(width)]
    for key in keys:
        for i, value in enumerate(key):
            columns[i].append(value)
    return columns


@functools.cache
def _json_columns(table: Table) -> tuple[int, ...]:
    """Positions of the ``jsonb`` columns: the only values that need converting."""
    return tuple(i for i, c in enumerate(table.columns) if c.type == "jsonb")


async def load_rows(conn: Connection, schema: str, table: Table, keys: Iterable[Key]) -> list[Row]:
    """The stored rows of ``table`` with these primary keys (absent ones are left out)."""
    wanted = list(keys)
    if not wanted:
        return []
    cls = _ROW_CLASS[table.name]
    records = await conn.fetch(
        load_sql(schema, table), *_columns_of(wanted, len(table.primary_key))
    )
    json_columns = _json_columns(table)
    if not json_columns:
        return [cls(*r) for r in records]
    rows: list[Row] = []
    for record in records:
        values = list(record)
        for i in json_columns:
            if values[i] is not None:
                values[i] = msgspec.json.decode(values[i])
        rows.append(cls(*values))
    return rows


async def upsert_rows(conn: Connection, schema: str, table: Table, rows: Sequence[Row]) -> None:
    """Insert or replace ``rows`` (all of ``table``) in one statement."""
    if not rows:
        return
    # Row fields are the table's columns in order (a test pins it): transpose, not getattr.
    columns: list[Sequence[Any]] = list(zip(*map(msgspec.structs.astuple, rows), strict=True))
    for i in _json_columns(table):
        columns[i] = [None if v is None else msgspec.json.encode(v).decode() for v in columns[i]]
    await conn.execute(upsert_sql(schema, table), *columns)


async def delete_rows(conn: Connection, schema: str, table: Table, keys: Sequence[Key]) -> None:
    """Delete the rows of ``table`` with these primary keys in one statement."""
    if keys:
        await conn.execute(delete_sql(schema, table), *_columns_of(keys, len(table.primary_key)))
