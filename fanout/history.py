"""Where a resume's missed events come from: the recent-history cache, else the log.

The projectors keep each conversation's last events in Redis as ready fan-out frames
(score = offset). The cache answers a resume when it reaches back to the cursor *and* the
projector has applied everything up to where live delivery took over (cache writes precede
the read model's commit, so "applied" implies "cached"). Otherwise the conversation's
partition is read from the log, from just after the cursor up to that point, with a
group-less reader: the read model does not keep whole CloudEvents, the log always has them.
Either way the frames are built by :func:`eventstore.cloudevents.frame`, byte for byte what
a live delivery carries.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Literal, cast

from redis.asyncio import Redis

from eventstore import EventStore, RecordedEvent
from eventstore.cloudevents import frame
from fanout.wire import text_frame
from projectors.read import ReadSide, recent_key

Source = Literal["none", "cache", "log"]
Frames = list[tuple[int, bytes]]


class ResumeFailed(Exception):
    """The missed events could not be read in time."""


class History:
    def __init__(
        self,
        store: EventStore,
        redis: Redis,
        read_side: ReadSide,
        *,
        cache_wait: float,
        log_timeout: float,
        log_readers: int = 4,
    ) -> None:
        self._store = store
        self._redis = redis
        self._read_side = read_side
        self._topic = store.layout.topic("conversation")
        self._cache_wait = cache_wait
        self._log_timeout = log_timeout
        self._log_slots = asyncio.Semaphore(log_readers)

    async def missed(
        self, conversation_id: uuid.UUID, partition: int, after: int, upto: int
    ) -> tuple[Source, Frames]:
        """The frames of ``conversation_id`` with ``after < offset < upto``, in log order."""
        if after + 1 >= upto:
            return "none", []
        applied = await self._read_side.wait_applied(
            {(self._topic, partition): upto}, within=self._cache_wait
        )
        if applied:
            key = recent_key(self._read_side.namespace, conversation_id)
            entries = cast(
                list[tuple[bytes, float]],
                await self._redis.zrangebyscore(key, "-inf", upto - 1, withscores=True),
            )
            if entries and entries[0][1] <= after:
                return "cache", [
                    (int(score), text_frame(raw)) for raw, score in entries if score > after
                ]
        return "log", await self._from_log(conversation_id, partition, after, upto)

    async def _from_log(
        self, conversation_id: uuid.UUID, partition: int, after: int, upto: int
    ) -> Frames:
        """Read the range from the log; ``log_timeout`` bounds it all, the wait for one of the
        ``log_readers`` slots included (a queue of resumes must not wait unbounded)."""
        found: Frames = []
        deadline = asyncio.get_running_loop().time() + self._log_timeout
        try:
            async with asyncio.timeout_at(deadline):
                await self._log_slots.acquire()
        except TimeoutError:
            raise ResumeFailed(f"no log reader free for {conversation_id} in time") from None
        try:
            reader = self._store.reader(("conversation",), max_records=2000)
            try:
                async with asyncio.timeout_at(deadline):
                    await reader.start("end", offsets={(self._topic, partition): after + 1})
                    while True:
                        batch = await reader.next_batch(timeout_ms=200)
                        for item in batch.items:
                            position = item.position
                            if position.partition != partition or position.offset >= upto:
                                continue
                            if (
                                isinstance(item, RecordedEvent)
                                and item.event.stream_id == conversation_id
                            ):
                                found.append((position.offset, text_frame(frame(item))))
                        span = batch.ranges.get((self._topic, partition))
                        if span is not None and span.last >= upto - 1:
                            return found
            except TimeoutError:
                raise ResumeFailed(f"reading the log for {conversation_id} timed out") from None
            finally:
                await reader.stop()
        finally:
            self._log_slots.release()
