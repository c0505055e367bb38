"""A migration runner for PostgreSQL schemas: versioned SQL files, applied once, in order.

Each component (``eventstore``, ``projectors``, ``ingest`` ...) keeps its files in a directory
of its own, named ``NNNN_description.sql``. A file is applied in one transaction together with
its row in ``schema_migrations``; an advisory lock lets several processes start at once. The
sha256 of every applied file is recorded, and a file that changed after it was applied stops
start-up: applied migrations are history, fix forward with a new file.
"""

from __future__ import annotations

import hashlib
import re
from importlib import resources
from importlib.resources.abc import Traversable

import asyncpg
import msgspec

from eventstore.errors import MigrationError
from eventstore.pg import Connection

_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
# Arbitrary but fixed: every process of every tier serialises migrations on this lock.
_LOCK_KEY = 0x6261636B626F6E65  # "backbone"

_BOOTSTRAP = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    component  text        NOT NULL,
    version    integer     NOT NULL,
    name       text        NOT NULL,
    sha256     text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (component, version)
)
"""


class Migration(msgspec.Struct, frozen=True):
    component: str
    version: int
    name: str
    sql: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def load_migrations(component: str, package: str, directory: str = "sql") -> list[Migration]:
    """Read ``<package>/<directory>/NNNN_*.sql`` in version order."""
    root: Traversable = resources.files(package).joinpath(directory)
    found: list[Migration] = []
    for entry in root.iterdir():
        match = _FILE.match(entry.name)
        if match is None:
            if entry.name.endswith(".sql"):
                raise MigrationError(f"{component}: {entry.name} is not named NNNN_name.sql")
            continue
        found.append(
            Migration(component, int(match.group(1)), match.group(2), entry.read_text("utf-8"))
        )
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise MigrationError(f"{component}: two migrations share a version")
    return found


async def migrate(conn: Connection, migrations: list[Migration]) -> list[Migration]:
    """Apply the migrations not yet applied; return those applied now. Idempotent."""
    applied_now: list[Migration] = []
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _LOCK_KEY)
        await conn.execute(_BOOTSTRAP)
    for migration in migrations:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _LOCK_KEY)
            row = await conn.fetchrow(
                "SELECT sha256 FROM schema_migrations WHERE component = $1 AND version = $2",
                migration.component,
                migration.version,
            )
            if row is not None:
                if row["sha256"] != migration.sha256:
                    raise MigrationError(
                        f"{migration.component} migration {migration.version:04d}_"
                        f"{migration.name} changed after it was applied; add a new migration "
                        "instead of editing an applied one"
                    )
                continue
            try:
                await conn.execute(migration.sql)
            except asyncpg.PostgresError as exc:
                raise MigrationError(
                    f"{migration.component} migration {migration.version:04d}_"
                    f"{migration.name} failed: {exc}"
                ) from exc
            await conn.execute(
                "INSERT INTO schema_migrations (component, version, name, sha256) "
                "VALUES ($1, $2, $3, $4)",
                migration.component,
                migration.version,
                migration.name,
                migration.sha256,
            )
            applied_now.append(migration)
    return applied_now


async def migrate_eventstore(conn: Connection) -> list[Migration]:
    """Apply the event store's own schema (key store, log epoch)."""
    return await migrate(conn, load_migrations("eventstore", "eventstore"))
