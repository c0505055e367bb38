"""PostgreSQL access shared by every tier: pool creation and the connection type."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, TypeAlias
from urllib.parse import urlsplit, urlunsplit

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from eventstore.errors import KeyStoreUnavailable

if TYPE_CHECKING:  # asyncpg's classes are generic only in its stubs
    Connection: TypeAlias = asyncpg.Connection[Any] | PoolConnectionProxy[Any]
    Pool: TypeAlias = asyncpg.Pool[Any]
else:
    Connection = asyncpg.Connection | PoolConnectionProxy
    Pool = asyncpg.Pool


def redact_dsn(dsn: str) -> str:
    """The DSN without its password, for error messages and logs."""
    parts = urlsplit(dsn)
    if parts.password is None:
        return dsn
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


async def create_pool(
    dsn: str,
    *,
    min_size: int = 1,
    max_size: int = 10,
    keep_sessions: bool = False,
    server_settings: Mapping[str, str] | None = None,
) -> Pool:
    """An asyncpg pool, or :class:`KeyStoreUnavailable` naming the (redacted) DSN.

    ``keep_sessions``: a connection given back is not reset beyond rolling back an open
    transaction. asyncpg otherwise sends a reset statement (unlock, close cursors, unlisten,
    reset settings) at every release, a round trip per use; a pool whose users leave no
    session state behind (transaction-scoped settings and locks only) does not need it.
    ``server_settings``: PostgreSQL settings of every connection (sent when it opens).
    """
    reset = _keep_session if keep_sessions else None
    try:
        async with asyncio.timeout(15):
            pool = await asyncpg.create_pool(
                dsn,
                min_size=min_size,
                max_size=max_size,
                reset=reset,
                server_settings=dict(server_settings) if server_settings else None,
            )
    except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
        raise KeyStoreUnavailable(
            f"PostgreSQL at {redact_dsn(dsn)} is unreachable: {exc or type(exc).__name__}"
        ) from exc
    return pool


async def _keep_session(conn: asyncpg.Connection[Any]) -> None:
    """A pool's reset that keeps the session (asyncpg has rolled back any transaction)."""
