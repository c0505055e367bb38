"""The log epoch, stored in PostgreSQL beside the key store (see ``sql/0001_keystore.sql``),
and the Redis channel on which a change of epoch is announced."""

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


def epoch_channel(topic_prefix: str) -> str:
    """The Redis channel on which a log restore announces its new epoch.

    The message is JSON ``{"epoch": N}``. The fan-out tier subscribes to it and closes every
    socket of an older epoch with code 4009 (resync), so nobody waits for a connection to drop.
    """
    return f"{topic_prefix}:epoch"
