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

*Deferred commands.* A command nobody waits for (the record of a send, written behind its
answer) need not cost a pipeline of its own: :meth:`AutoPipeline.defer` queues it without
asking for a flush, so it leaves with the next pipeline some caller does wait for, or after
``defer_ms`` if none comes. Under load that is always the former: the records of the sends one
Kafka acknowledgement answered had gone in a pipeline of their own, and now ride with the next
admissions (in ``bench ingest``'s maximum-rate run, 16 commands a pipeline instead of 13).
Order is still arrival order: a command queued after a deferred one goes in the same pipeline,
behind it.
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
DEFER_MS: Final = 2.0
"""How long a deferred command waits at most for a pipeline to ride with."""

_Queued = tuple[tuple[Any, ...], "asyncio.Future[Any]"]


class AutoPipeline:
    """Batches the commands given to :meth:`execute_command` and :meth:`script` per loop turn."""

    def __init__(
        self,
        redis: Redis,
        *,
        max_commands: int = MAX_COMMANDS,
        timeout: float = PIPELINE_TIMEOUT,
        defer_ms: float = DEFER_MS,
    ) -> None:
        self._redis = redis
        self._max = max_commands
        self._timeout = timeout
        self._defer = defer_ms / 1000
        self._queue: list[_Queued] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._flushing: set[asyncio.Task[None]] = set()
        self._scheduled: asyncio.Handle | None = None
        """The pending flush: soon (a caller waits), or later (only deferred commands)."""
        self._soon = False

    def execute_command(self, *args: Any) -> asyncio.Future[Any]:
        """Queue one command; the future resolves to its reply (or fails with its error).

        The pipeline leaves in the next turn of the loop."""
        future = self._enqueue(args)
        if not self._soon:
            if self._scheduled is not None:
                self._scheduled.cancel()
            self._scheduled = self._bound_loop().call_soon(self._flush)
            self._soon = True
        return future

    def defer(self, *args: Any) -> asyncio.Future[Any]:
        """Queue one command that nobody awaits at once: it leaves with the next pipeline, or
        within ``defer_ms`` (see the module doc)."""
        future = self._enqueue(args)
        if self._scheduled is None:
            self._scheduled = self._bound_loop().call_later(self._defer, self._flush)
        return future

    def _bound_loop(self) -> asyncio.AbstractEventLoop:
        loop = self._loop
        if loop is None or loop.is_closed():
            loop = self._loop = asyncio.get_running_loop()
        return loop

    def _enqueue(self, args: tuple[Any, ...]) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = self._bound_loop().create_future()
        self._queue.append((args, future))
        return future

    async def script(self, script: AsyncScript, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        """Run a registered script by its digest, loading it first if Redis has lost it."""
        try:
            return await self.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
        except NoScriptError:
            return await script(keys=keys, args=args)

    def _flush(self) -> None:
        self._scheduled = None
        self._soon = False
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
        """Send what is queued, deferred commands too, and wait for the pipelines in flight
        (their callers are owed an answer)."""
        if self._scheduled is not None:
            self._scheduled.cancel()
            self._flush()
        if self._flushing:
            await asyncio.gather(*self._flushing, return_exceptions=True)
