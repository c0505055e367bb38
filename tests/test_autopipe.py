"""Automatic pipelining of Redis commands, on the real Redis."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from eventstore import Settings
from eventstore.redisclient import untimed_sibling
from ingest.autopipe import AutoPipeline
from ingest.commands import SENDS_NOT_REMEMBERED, _sent_recorded
from ops.stack.ports import ephemeral_port


class CountingRedis(Redis):  # type: ignore[misc]
    """The real client, counting the pipelines made on it."""

    pipelines = 0

    def pipeline(self, *args: Any, **kwargs: Any) -> Any:
        self.pipelines += 1
        return super().pipeline(*args, **kwargs)


@pytest.fixture
async def redis(base_settings: Settings) -> AsyncIterator[CountingRedis]:
    client = CountingRedis.from_url(base_settings.redis_url)
    yield client
    await client.aclose()


def _key() -> str:
    return f"t-autopipe-{uuid.uuid4().hex}"


async def test_commands_of_one_loop_turn_share_one_pipeline_and_each_gets_its_reply(
    redis: CountingRedis,
) -> None:
    auto = AutoPipeline(redis)
    keys = [_key() for _ in range(200)]
    stored = [auto.execute_command("SET", k, str(n), "EX", 60) for n, k in enumerate(keys)]
    assert await asyncio.gather(*stored) == [True] * 200
    assert redis.pipelines == 1
    values = await asyncio.gather(*(auto.execute_command("GET", k) for k in keys))
    assert values == [str(n).encode() for n in range(200)]
    assert redis.pipelines == 2
    await redis.delete(*keys)


async def test_more_commands_than_a_pipeline_holds_go_in_several(redis: CountingRedis) -> None:
    auto = AutoPipeline(redis, max_commands=16)
    key = _key()
    replies = await asyncio.gather(*(auto.execute_command("INCR", key) for _ in range(40)))
    assert sorted(replies) == list(range(1, 41))
    assert redis.pipelines == 3
    await redis.delete(key)


async def test_a_refused_command_fails_only_its_caller(redis: CountingRedis) -> None:
    auto = AutoPipeline(redis)
    text, counter = _key(), _key()
    await redis.set(text, "not a number", ex=60)
    good = auto.execute_command("INCR", counter)
    bad = auto.execute_command("INCR", text)
    also_good = auto.execute_command("INCR", counter)
    assert await good == 1
    with pytest.raises(ResponseError):
        await bad
    assert await also_good == 2
    await redis.delete(text, counter)


async def test_a_script_redis_lost_is_loaded_and_run(redis: CountingRedis) -> None:
    auto = AutoPipeline(redis)
    script = redis.register_script("return redis.call('INCRBY', KEYS[1], ARGV[1])")
    key = _key()
    await redis.script_flush()
    assert await auto.script(script, [key], [5]) == 5  # NOSCRIPT: loaded, then run once
    assert await auto.script(script, [key], [2]) == 7  # known now: EVALSHA in the pipeline
    await redis.delete(key)


async def test_a_lost_connection_fails_every_caller_of_the_pipeline() -> None:
    dead = Redis(host="127.0.0.1", port=ephemeral_port(), socket_connect_timeout=1, retry=None)
    auto = AutoPipeline(dead)
    calls = [auto.execute_command("GET", _key()) for _ in range(5)]
    outcomes = await asyncio.gather(*calls, return_exceptions=True)
    assert all(isinstance(o, RedisConnectionError) for o in outcomes), outcomes
    await auto.close()
    await dead.aclose()


async def test_a_caller_that_stopped_waiting_does_not_disturb_the_others(
    redis: CountingRedis,
) -> None:
    auto = AutoPipeline(redis)
    key = _key()
    abandoned = auto.execute_command("INCR", key)
    kept = auto.execute_command("INCR", key)
    abandoned.cancel()
    assert await kept == 2  # the abandoned command was still sent: Redis ran both
    await auto.close()
    await redis.delete(key)


async def test_a_deferred_command_rides_with_the_next_pipeline_ahead_of_later_commands(
    redis: CountingRedis,
) -> None:
    auto = AutoPipeline(redis, defer_ms=60_000)  # nothing but a waiting caller sends it
    key = _key()
    stored = auto.defer("SET", key, "v", "EX", 60)
    for _ in range(5):
        await asyncio.sleep(0)  # several turns of the loop: no pipeline of its own
    assert redis.pipelines == 0
    assert not stored.done()
    assert await redis.get(key) is None
    assert await auto.execute_command("GET", key) == b"v"  # queued behind it, same pipeline
    assert stored.result() is True
    assert redis.pipelines == 1
    await redis.delete(key)


async def test_a_deferred_command_alone_leaves_within_its_bound(redis: CountingRedis) -> None:
    auto = AutoPipeline(redis, defer_ms=5)
    key = _key()
    async with asyncio.timeout(5):
        assert await auto.defer("SET", key, "v", "EX", 60) is True
    assert redis.pipelines == 1
    assert await redis.get(key) == b"v"
    await redis.delete(key)


async def test_closing_sends_the_deferred_commands(redis: CountingRedis) -> None:
    auto = AutoPipeline(redis, defer_ms=60_000)
    keys = [_key() for _ in range(3)]
    stored = [auto.defer("SET", k, "v", "EX", 60) for k in keys]
    await auto.close()
    assert [f.result() for f in stored] == [True] * 3
    assert await redis.mget(keys) == [b"v"] * 3
    await redis.delete(*keys)


async def test_a_send_record_redis_refused_is_counted_and_logged() -> None:
    """The record of a send is written behind its answer: a failure cannot reach the client
    (the send is in the log), so it is counted instead."""
    before = SENDS_NOT_REMEMBERED._value.get()
    refused: asyncio.Future[object] = asyncio.get_running_loop().create_future()
    refused.set_exception(RedisConnectionError("gone"))
    _sent_recorded(refused)
    stored: asyncio.Future[object] = asyncio.get_running_loop().create_future()
    stored.set_result(True)
    _sent_recorded(stored)
    assert SENDS_NOT_REMEMBERED._value.get() == before + 1


async def test_a_pipeline_redis_does_not_answer_fails_its_callers_within_the_bound() -> None:
    """A server that takes the connection and never replies (a hung Redis)."""

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.read(4096):
            pass
        writer.close()

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    hung = untimed_sibling(Redis(host="127.0.0.1", port=port, retry=None))
    auto = AutoPipeline(hung, timeout=0.3)
    calls = [auto.execute_command("GET", _key()) for _ in range(3)]
    async with asyncio.timeout(5):
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
    assert all(isinstance(o, RedisTimeoutError) for o in outcomes), outcomes
    await auto.close()
    await hung.aclose()
    server.close()
    await server.wait_closed()


async def test_an_untimed_sibling_talks_to_the_same_server_without_a_socket_timeout(
    redis: CountingRedis,
) -> None:
    sibling = untimed_sibling(redis)
    try:
        assert sibling.connection_pool.connection_kwargs["socket_timeout"] is None
        assert sibling.connection_pool is not redis.connection_pool
        key = _key()
        auto = AutoPipeline(sibling)
        assert await auto.execute_command("SET", key, "v", "EX", 60) is True
        assert await redis.get(key) == b"v"
        await redis.delete(key)
    finally:
        await sibling.aclose()
