"""Redis clients for the tiers: redis-py's asyncio client, its commands packed in C.

redis-py packs a command into the wire protocol in Python on its asyncio connections (its
synchronous ones use hiredis when it is installed). On the ingest hot path that packing was
about a twentieth of the process's time: the admission script alone has a score of arguments.
The connections made here pack with redis-py's own hiredis serializer instead; replies were
already parsed by hiredis.
"""

from __future__ import annotations

from typing import Any, cast

from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.asyncio.connection import Connection
from redis.connection import HiredisRespSerializer
from redis.utils import HIREDIS_AVAILABLE


class HiredisPackingConnection(Connection):
    """An asyncio connection that packs commands with hiredis."""

    # Untyped in some redis-py releases, typed in others: called through Any for both.
    _packer = cast(Any, HiredisRespSerializer)()

    def pack_command(self, *args: Any) -> list[bytes]:
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
