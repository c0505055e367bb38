"""The tiers' Redis client: commands packed by hiredis, byte for byte as redis-py packs them."""

from __future__ import annotations

import uuid

import pytest
from redis.asyncio.connection import Connection

from eventstore import Settings
from eventstore.redisclient import HiredisPackingConnection, redis_client

COMMANDS = [
    ("SET", "key", b"value", "EX", 60),
    ("EVALSHA", "0" * 40, 2, "k:one", "k:two", "1", 2, 0.25, "ünïcode"),
    ("CONFIG GET", "maxmemory"),
    ("HSET", b"hash", "field", b"\x00\xff binary"),
    ("SET", "view", memoryview(b"from a view")),
    ("SET", "array", bytearray(b"from an array")),
    ("CLIENT SETINFO", "LIB-NAME", "redis-py"),
]


@pytest.mark.parametrize("args", COMMANDS, ids=[c[0] for c in COMMANDS])
def test_commands_are_packed_exactly_as_redis_py_packs_them(args: tuple[object, ...]) -> None:
    packed = b"".join(HiredisPackingConnection().pack_command(*args))
    assert packed == b"".join(Connection().pack_command(*args))


async def test_a_tier_client_talks_to_the_real_redis(base_settings: Settings) -> None:
    client = redis_client(base_settings.redis_url)
    assert client.connection_pool.connection_class is HiredisPackingConnection
    key = f"t-client-{uuid.uuid4().hex}"
    try:
        assert await client.set(key, "ü", ex=60)
        assert await client.get(key) == "ü".encode()
        script = client.register_script("return redis.call('STRLEN', KEYS[1])")
        assert await script(keys=[key]) == 2
        pipe = client.pipeline(transaction=False)
        pipe.incr(key + ":n").incr(key + ":n").delete(key, key + ":n")
        assert await pipe.execute() == [1, 2, 2]
    finally:
        await client.aclose()
