"""The migration runner: once, in order, concurrently safe, and history is immutable."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from eventstore import EventStore, Migration, MigrationError, load_migrations, migrate


def migrations(component: str, *sqls: str) -> list[Migration]:
    return [Migration(component, i + 1, f"step{i + 1}", sql) for i, sql in enumerate(sqls)]


async def test_migrations_apply_once_in_order_even_from_many_processes(store: EventStore) -> None:
    name = f"t_{uuid.uuid4().hex[:10]}"
    steps = migrations(
        name,
        f"CREATE TABLE {name} (n int)",
        f"INSERT INTO {name} VALUES (1)",
        f"INSERT INTO {name} SELECT max(n) + 1 FROM {name}",
    )

    async def run() -> list[Migration]:
        async with store.pool.acquire() as conn:
            return await migrate(conn, steps)

    results = await asyncio.gather(*(run() for _ in range(4)))
    assert sum(len(r) for r in results) == 3, "each step applied by exactly one runner"
    async with store.pool.acquire() as conn:
        assert [r["n"] for r in await conn.fetch(f"SELECT n FROM {name} ORDER BY n")] == [1, 2]
        assert await migrate(conn, steps) == []


async def test_an_applied_migration_that_changed_stops_start_up(store: EventStore) -> None:
    name = f"t_{uuid.uuid4().hex[:10]}"
    async with store.pool.acquire() as conn:
        await migrate(conn, migrations(name, f"CREATE TABLE {name} (n int)"))
        with pytest.raises(MigrationError, match="changed after it was applied"):
            await migrate(conn, migrations(name, f"CREATE TABLE {name} (n bigint)"))


async def test_a_failing_migration_is_rolled_back_and_named(store: EventStore) -> None:
    name = f"t_{uuid.uuid4().hex[:10]}"
    bad = migrations(name, f"CREATE TABLE {name} (n int)", "CREATE TABLE nonsense (")
    async with store.pool.acquire() as conn:
        with pytest.raises(MigrationError, match="step2"):
            await migrate(conn, bad)
        applied = await conn.fetchval(
            "SELECT count(*) FROM schema_migrations WHERE component=$1", name
        )
    assert applied == 1


def test_shipped_migrations_are_numbered_and_load() -> None:
    loaded = load_migrations("eventstore", "eventstore")
    assert [m.version for m in loaded] == list(range(1, len(loaded) + 1))
