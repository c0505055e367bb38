"""The log epoch, stored in PostgreSQL beside the key store (see ``sql/0001_keystore.sql``)."""

from __future__ import annotations

from eventstore.pg import Connection, Pool


async def read_epoch(conn: Connection | Pool) -> int:
    """The current epoch of the log."""
    epoch = await conn.fetchval("SELECT epoch FROM log_meta")
    return int(epoch)


async def bump_epoch(conn: Connection | Pool) -> int:
    """Start a new epoch (after the log was restored elsewhere); return it."""
    epoch = await conn.fetchval("UPDATE log_meta SET epoch = epoch + 1 RETURNING epoch")
    return int(epoch)
