"""The pools every tier uses: ``timestamptz`` values through the cached encoder go to and come
from PostgreSQL exactly as through asyncpg's own codec."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from eventstore import Pool, Settings
from eventstore.pg import _TIMESTAMPS_KEPT, _TimestampEncodings, create_pool

IST = dt.timezone(dt.timedelta(hours=5, minutes=30))
TIMES = [
    dt.datetime(2026, 12, 5, 6, 30, 1, 123456, tzinfo=dt.UTC),
    dt.datetime(2026, 12, 5, 12, 0, 1, 123456, tzinfo=IST),  # the same instant as the first
    dt.datetime(1999, 12, 31, 23, 59, 59, 999999, tzinfo=dt.UTC),  # before PostgreSQL's epoch
    dt.datetime(1, 1, 1, 0, 0, tzinfo=dt.UTC),
    dt.datetime(2000, 1, 1, tzinfo=dt.UTC),
    dt.datetime(9999, 12, 30, 1, 2, 3, 4, tzinfo=IST),
    dt.datetime(2026, 6, 1, 8, 0),  # naive: local time, as asyncpg takes it
    dt.datetime.max,  # asyncpg's stand-in for PostgreSQL's infinity
    dt.datetime.min,  # and for -infinity
    dt.datetime.max.replace(tzinfo=dt.UTC),  # encodes as infinity in asyncpg too
    dt.date(2026, 12, 5),  # midnight at the local offset, as asyncpg takes a date
]


@pytest.fixture
async def table(conn: asyncpg.Connection) -> AsyncIterator[str]:
    """A table of the test's own, ``(n int, v timestamptz)``."""
    name = f"pg_times_{uuid.uuid4().hex[:8]}"
    await conn.execute(f"CREATE TABLE {name} (n int, v timestamptz)")
    try:
        yield name
    finally:
        await conn.execute(f"DROP TABLE {name}")


@pytest.fixture
async def pool(base_settings: Settings) -> AsyncIterator[Pool]:
    made = await create_pool(base_settings.postgres_dsn, min_size=1, max_size=1)
    try:
        yield made
    finally:
        await made.close()


async def _wire(conn: asyncpg.Connection, table: str) -> list[tuple[int, str]]:
    """What PostgreSQL stored: each value as microseconds from its epoch, or infinity."""
    rows = await conn.fetch(
        f"SELECT n, CASE WHEN isfinite(v) THEN (extract(epoch FROM v - '2000-01-01 UTC') "
        f"* 1000000)::bigint::text ELSE v::text END AS wire FROM {table} ORDER BY n"
    )
    return [(r["n"], r["wire"]) for r in rows]


async def test_a_pool_writes_and_reads_times_as_asyncpg_does(
    pool: Pool, conn: asyncpg.Connection, table: str
) -> None:
    await conn.executemany(
        f"INSERT INTO {table} VALUES ($1, $2)", [(n, v) for n, v in enumerate(TIMES)]
    )
    expected = await _wire(conn, table)
    await conn.execute(f"TRUNCATE {table}")
    async with pool.acquire() as pooled:
        # Twice over: the second time every value comes from the cache.
        for _ in range(2):
            await pooled.executemany(
                f"INSERT INTO {table} VALUES ($1, $2)", [(n, v) for n, v in enumerate(TIMES)]
            )
            assert await _wire(conn, table) == expected
            await conn.execute(f"TRUNCATE {table}")
            await pooled.copy_records_to_table(table, records=list(enumerate(TIMES)))
            assert await _wire(conn, table) == expected
            read = await pooled.fetch(f"SELECT n, v FROM {table} ORDER BY n")
            await conn.execute(f"TRUNCATE {table}")
            await conn.copy_records_to_table(table, records=list(enumerate(TIMES)))
            assert read == await conn.fetch(f"SELECT n, v FROM {table} ORDER BY n")
            await conn.execute(f"TRUNCATE {table}")
    assert expected[-2][1] == "infinity"
    assert expected[-3][1] == "-infinity"
    assert expected[0][1] == expected[1][1]


async def test_a_value_that_is_not_a_datetime_is_refused_as_asyncpg_refuses_it(
    pool: Pool, conn: asyncpg.Connection, table: str
) -> None:
    insert = f"INSERT INTO {table} VALUES (1, $1)"
    for bad in ("2026-12-05T06:30:00Z", 1764916200, dt.timedelta(1), ["2026-12-05"]):
        with pytest.raises(asyncpg.DataError):
            await conn.execute(insert, bad)
        async with pool.acquire() as pooled:
            # The message names what was expected; an unhashable value fails the lookup.
            expected = "unhashable" if isinstance(bad, list) else "expected a datetime.date or"
            with pytest.raises(asyncpg.DataError, match=expected):
                await pooled.execute(insert, bad)
    assert await conn.fetchval(f"SELECT count(*) FROM {table}") == 0


def test_the_encoding_cache_is_bounded() -> None:
    encodings = _TimestampEncodings()
    start = dt.datetime(2026, 12, 5, tzinfo=dt.UTC)
    for n in range(_TIMESTAMPS_KEPT + 10):
        value = start + dt.timedelta(microseconds=n)
        assert encodings[value] == (encodings[start][0] + n,)
        assert len(encodings) <= _TIMESTAMPS_KEPT
