"""Automatic pipelining: the Redis commands that concurrent requests issue in one turn of the
event loop travel to Redis together, as one pipeline.

A send costs two Redis round trips (the admission script, then the record of the send). Issued
one by one, each is a connection taken from the pool, a write system call, a read and a reply
parsed alone, and on the server a read and a write of its own: at a thousand sends a second
that was about a quarter of the ingest process's time. Queued instead, and flushed once per
turn of the loop, the commands of every request that ran in that turn share one connection,
one write and one read (ioredis calls this auto-pipelining; redis-py has no such mode).

Each command keeps its own outcome: a command Redis refuses fails only its caller, a lost
connection fails every command of that pipeline (as it would have failed each alone), and a
caller that stopped waiting is skipped. Nothing is reordered within a request: a request waits
for one command before it issues the next. Scripts go as ``EVALSHA``; a Redis that does not
know the script yet (restarted, flushed) makes that call load it and run again on its own.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Sequence
from typing import Any, Final

from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError

from eventstore.redisclient import PIPELINE_TIMEOUT, execute_bounded

MAX_COMMANDS: Final = 512
"""Commands per pipeline at most; more queued in one turn go in further pipelines."""

_Queued = tuple[tuple[Any, ...], "asyncio.Future[Any]"]


class AutoPipeline:
    """Batches the commands given to :meth:`execute_command` and :meth:`script` per loop turn."""

    def __init__(
        self, redis: Redis, *, max_commands: int = MAX_COMMANDS, timeout: float = PIPELINE_TIMEOUT
    ) -> None:
        self._redis = redis
        self._max = max_commands
        self._timeout = timeout
        self._queue: list[_Queued] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._flushing: set[asyncio.Task[None]] = set()

    def execute_command(self, *args: Any) -> asyncio.Future[Any]:
        """Queue one command; the future resolves to its reply (or fails with its error)."""
        loop = self._loop
        if loop is None or loop.is_closed():
            loop = self._loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        if not self._queue:
            loop.call_soon(self._flush)
        self._queue.append((args, future))
        return future

    async def script(self, script: AsyncScript, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        """Run a registered script by its digest, loading it first if Redis has lost it."""
        try:
            return await self.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
        except NoScriptError:
            return await script(keys=keys, args=args)

    def _flush(self) -> None:
        queue, self._queue = self._queue, []
        loop = self._loop
        assert loop is not None
        for start in range(0, len(queue), self._max):
            task = loop.create_task(self._send(queue[start : start + self._max]))
            self._flushing.add(task)
            task.add_done_callback(self._flushing.discard)

    async def _send(self, queued: list[_Queued]) -> None:
        pipe = self._redis.pipeline(transaction=False)
        for args, _ in queued:
            pipe.execute_command(*args)
        try:
            # One bound for the whole pipeline, on a client without a socket timeout (see
            # eventstore.redisclient.untimed_sibling).
            replies = await execute_bounded(pipe, self._timeout, raise_on_error=False)
        except BaseException as exc:  # every caller of this pipeline gets it
            failure: BaseException = exc
            if not isinstance(exc, Exception):
                failure = RedisConnectionError("the pipeline was cancelled")
            for _, future in queued:
                if not future.done():
                    future.set_exception(copy.copy(failure))
            if not isinstance(exc, Exception):
                raise
            return
        for (_, future), reply in zip(queued, replies, strict=True):
            if future.done():
                continue  # its caller stopped waiting
            if isinstance(reply, Exception):
                future.set_exception(reply)
            else:
                future.set_result(reply)

    async def close(self) -> None:
        """Wait for the pipelines in flight (their callers are owed an answer)."""
        if self._flushing:
            await asyncio.gather(*self._flushing, return_exceptions=True)
