"""PostgreSQL access shared by every tier: pool creation and the connection type."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final, TypeAlias
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
                init=use_cached_timestamps,
            )
    except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
        raise KeyStoreUnavailable(
            f"PostgreSQL at {redact_dsn(dsn)} is unreachable: {exc or type(exc).__name__}"
        ) from exc
    return pool


async def _keep_session(conn: asyncpg.Connection[Any]) -> None:
    """A pool's reset that keeps the session (asyncpg has rolled back any transaction)."""


_PG_EPOCH: Final = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)
# asyncpg's infinities: its stand-ins for PostgreSQL's, and the raw values that mean them.
_INFINITY: Final = dt.datetime.max
_NEGATIVE_INFINITY: Final = dt.datetime.min
_PG_INFINITY: Final = 0x7FFFFFFFFFFFFFFF
_PG_NEGATIVE_INFINITY: Final = -0x8000000000000000
_ASYNCPG_INFINITY_TS: Final = 252455615999999999
_ASYNCPG_NEGATIVE_INFINITY_TS: Final = -63082281600000000
_TIMESTAMPS_KEPT: Final = 65536


class _TimestampEncodings(dict[dt.datetime, tuple[int]]):
    """A ``timestamptz`` value -> its wire form, ``(microseconds since 2000-01-01 UTC,)``,
    worked out the way asyncpg's own encoder does, once per distinct value.

    The read model's times are the events' times, and events share their millisecond: a replay
    writes a few distinct times per hundred rows. asyncpg's encoder compares every value with
    its two infinities (a mixed naive/aware comparison), converts it to UTC and subtracts the
    epoch, about 0.6 µs a value; a lookup here is a dictionary probe on the datetime's cached
    hash, called by asyncpg in C (``dict.__getitem__``), Python only on a miss. A ``date`` is
    taken as asyncpg takes it (midnight at the local offset of the moment) and not kept, as that
    offset may change.
    """

    def __missing__(self, value: dt.datetime | dt.date) -> tuple[int]:
        if not isinstance(value, dt.datetime):
            if not isinstance(value, dt.date):
                raise TypeError(
                    "expected a datetime.date or datetime.datetime instance, "
                    f"got {type(value).__name__!r}"
                )
            offset = dt.datetime.now(dt.UTC).astimezone().utcoffset() or dt.timedelta()
            midnight = dt.datetime(value.year, value.month, value.day, tzinfo=dt.timezone(offset))
            return (_wire_time(midnight),)
        if len(self) >= _TIMESTAMPS_KEPT:
            self.clear()
        encoded = self[value] = (_wire_time(value),)
        return encoded


def _wire_time(value: dt.datetime) -> int:
    """asyncpg's wire value of a ``timestamptz``: microseconds since 2000-01-01 UTC, or one of
    PostgreSQL's infinities for asyncpg's stand-ins."""
    if value == _INFINITY:
        return _PG_INFINITY
    if value == _NEGATIVE_INFINITY:
        return _PG_NEGATIVE_INFINITY
    delta = value.astimezone(dt.UTC) - _PG_EPOCH
    wire = (delta.days * 86400 + delta.seconds) * 1_000_000 + delta.microseconds
    if wire == _ASYNCPG_INFINITY_TS:
        return _PG_INFINITY
    if wire == _ASYNCPG_NEGATIVE_INFINITY_TS:
        return _PG_NEGATIVE_INFINITY
    return wire


def _decode_timestamp(wire: tuple[int]) -> dt.datetime:
    """asyncpg's decoding of a ``timestamptz`` (an aware UTC datetime, or its infinities)."""
    (microseconds,) = wire
    if microseconds == _PG_INFINITY:
        return _INFINITY
    if microseconds == _PG_NEGATIVE_INFINITY:
        return _NEGATIVE_INFINITY
    return _PG_EPOCH + dt.timedelta(microseconds=microseconds)


async def use_cached_timestamps(conn: asyncpg.Connection[Any]) -> None:
    """Encode ``timestamptz`` values through :class:`_TimestampEncodings` on ``conn`` (every
    pool's connections get it when they open): the same values on the wire, decoded to the
    same datetimes, at a fraction of the encoding's CPU on bulk writes."""
    await conn.set_type_codec(
        "timestamptz",
        schema="pg_catalog",
        encoder=_TimestampEncodings().__getitem__,
        decoder=_decode_timestamp,
        format="tuple",
    )
