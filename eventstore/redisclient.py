"""Redis clients for the tiers: redis-py's asyncio client, its commands packed in C.

redis-py packs a command into the wire protocol in Python on its asyncio connections (its
synchronous ones use hiredis when it is installed). On the ingest hot path that packing was
about a twentieth of the process's time: the admission script alone has a score of arguments.
The connections made here pack with redis-py's own hiredis serializer instead; replies were
already parsed by hiredis.

Pipelines of many commands go through an :func:`untimed_sibling` and :func:`execute_bounded`:
given a socket timeout, redis-py arms an asyncio timeout for every reply it reads and wraps
every write in a task of its own, which for a projector batch of a hundred commands cost more
than packing and parsing them.
"""

from __future__ import annotations

import asyncio
from typing import Any, Final, cast

from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.client import Pipeline, PubSub
from redis.asyncio.connection import Connection
from redis.connection import HiredisRespSerializer
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.utils import HIREDIS_AVAILABLE

if HIREDIS_AVAILABLE:
    from hiredis import pack_command as _pack

PIPELINE_TIMEOUT: Final = 5.0
"""Seconds a whole pipeline may take (connecting included); redis-py's default socket timeout."""


class HiredisPackingConnection(Connection):
    """An asyncio connection that packs commands with hiredis."""

    # Untyped in some redis-py releases, typed in others: called through Any for both.
    _packer = cast(Any, HiredisRespSerializer)()

    def pack_command(self, *args: Any) -> list[bytes]:
        first = args[0]
        if isinstance(first, str) and " " not in first:
            # hiredis directly: the serializer first passes every argument through a Python
            # generator (bytes of a memoryview), two thirds of its time for the admission script.
            try:
                return [_pack(args)]
            except TypeError:  # a memoryview or bytearray: the serializer converts it
                pass
        packed: list[bytes] = self._packer.pack(*args)
        return packed


def redis_client(url: str, **options: Any) -> Redis:
    """A client of the Redis at ``url`` (``options`` as :meth:`Redis.from_url` takes them)."""
    if HIREDIS_AVAILABLE:
        options.setdefault("connection_class", HiredisPackingConnection)
    return Redis.from_url(url, **options)


async def close_pubsub(pubsub: PubSub) -> None:
    """``pubsub.aclose()``, which some redis-py releases leave untyped and others type."""
    await cast(Any, pubsub).aclose()


def untimed_sibling(redis: Redis) -> Redis:
    """A client of the same server, with connections of its own and no socket timeout, for
    pipelines bounded as a whole (:func:`execute_bounded`). Close it with ``aclose``."""
    options = {**redis.connection_pool.connection_kwargs, "socket_timeout": None}
    options["socket_connect_timeout"] = None
    pool = ConnectionPool(connection_class=redis.connection_pool.connection_class, **options)
    return Redis.from_pool(pool)


async def execute_bounded(
    pipe: Pipeline, within: float = PIPELINE_TIMEOUT, *, raise_on_error: bool = True
) -> list[Any]:
    """``pipe.execute()`` within ``within`` seconds in all, else Redis's ``TimeoutError``."""
    try:
        async with asyncio.timeout(within):
            replies: list[Any] = await pipe.execute(raise_on_error=raise_on_error)
    except TimeoutError:
        raise RedisTimeoutError(f"Redis did not answer within {within}s") from None
    return replies
