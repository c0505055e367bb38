"""Group commit: records of concurrent appends share one Kafka batch per partition.

aiokafka's ``send()`` costs tens of microseconds of Python per record (metadata check,
partitioning, a future per message, the accumulator's bookkeeping), and its sender keeps one
request in flight per broker. The event store already knows each record's partition, so it
queues records per partition instead and hands them to the client as whole batches
(``create_batch`` + ``send_batch``): one lane per partition, which takes everything queued
while the previous batch was on its way. Under load that is one batch per request round
trip; at rest a lone record leaves as soon as the lane runs (no linger).

Order is kept: a lane sends its queue in arrival order and ``send_batch`` waits for the
partition's previous batch to be drained before queueing the next. A record's offset is the
batch's base offset plus its index in the batch. A failed batch fails each record in it with
the same error, which the producer treats exactly as it treated a failed single send.
"""

from __future__ import annotations

import asyncio
import copy
import time
from collections import deque
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaConnectionError, MessageSizeTooLargeError

from eventstore.codec import OutgoingRecord
from eventstore.metrics import PRODUCE_LATENCY

# Kafka's record batch framing (61 bytes) plus per-record varints and attribute bytes; a
# record whose parts approach the request limit is refused before it can spoil a batch.
_RECORD_OVERHEAD = 96

Acked = tuple[int, int]
"""(partition, offset) of an acknowledged record."""


class _Lane:
    __slots__ = ("queue", "task")

    def __init__(self) -> None:
        self.queue: deque[tuple[OutgoingRecord, asyncio.Future[Acked], float]] = deque()
        self.task: asyncio.Task[None] | None = None


class PartitionBatcher:
    """Queues records per partition and sends each queue as Kafka batches on ``producer``."""

    def __init__(self, producer: AIOKafkaProducer, max_request_size: int) -> None:
        self._producer = producer
        # Built by the producer's owner inside its loop. Asking asyncio for the running loop
        # per record costs a getpid() system call on Python 3.11 (its fork check).
        self._loop = asyncio.get_running_loop()
        self._max_record = max_request_size - _RECORD_OVERHEAD
        self._lanes: dict[tuple[str, int], _Lane] = {}
        self._closed = False
        self._in_flight: dict[int, list[asyncio.Future[Acked]]] = {}

    @property
    def closed(self) -> bool:
        return self._closed

    def submit(self, record: OutgoingRecord) -> asyncio.Future[Acked]:
        """Queue ``record``; the future resolves to its (partition, offset) once acknowledged."""
        loop = self._loop
        future: asyncio.Future[Acked] = loop.create_future()
        if self._closed:
            future.set_exception(RuntimeError("the batcher is closed"))
            return future
        size = record.size
        if size > self._max_record:
            # Alone in a batch it would be refused by the broker anyway; refused here, it
            # cannot fail records that happened to share its batch.
            future.set_exception(MessageSizeTooLargeError(f"{size} bytes exceed the request limit"))
            return future
        tp = (record.topic, record.partition)
        lane = self._lanes.get(tp)
        if lane is None:
            lane = self._lanes[tp] = _Lane()
        lane.queue.append((record, future, time.perf_counter()))
        if lane.task is None:
            lane.task = loop.create_task(self._run(tp, lane), name=f"batch-lane-{tp[0]}-{tp[1]}")
        return future

    async def _run(self, tp: tuple[str, int], lane: _Lane) -> None:
        topic, partition = tp
        queue = lane.queue
        producer = self._producer
        try:
            while queue:
                batch = producer.create_batch()
                taken: list[asyncio.Future[Acked]] = []
                queued_at = queue[0][2]
                while queue:
                    record, future, _ = queue[0]
                    if future.done():  # its append gave up (bound or cancellation)
                        queue.popleft()
                        continue
                    appended = batch.append(
                        timestamp=record.timestamp_ms,
                        key=record.key,
                        value=record.value,
                        headers=record.headers,
                    )
                    if appended is None:
                        break  # full: the rest goes in the next batch
                    queue.popleft()
                    taken.append(future)
                if not taken:
                    continue
                batch.close()  # complete: the sender need not linger for more
                try:
                    sent = await producer.send_batch(batch, topic, partition=partition)
                except asyncio.CancelledError:
                    # Cancelled before the client took the batch (it takes it without a
                    # suspension point), so none of it was sent.
                    _fail(taken, KafkaConnectionError("the producer was closed"))
                    raise
                except Exception as exc:  # noqa: BLE001 - each record's append reports it
                    _fail(taken, exc)
                    continue
                self._in_flight[id(taken)] = taken
                sent.add_done_callback(
                    lambda done, taken=taken, t=queued_at: self._settle(done, taken, partition, t)
                )
        finally:
            lane.task = None
            if queue and not self._closed:
                # Cancelled mid-way with records still queued: a new lane takes over.
                lane.task = asyncio.get_running_loop().create_task(self._run(tp, lane))

    def close(self, exc: BaseException) -> None:
        """Refuse new records and fail those not yet handed to the client with ``exc``.

        Batches the client holds stay pending: closing the client delivers or fails them.
        """
        self._closed = True
        for lane in self._lanes.values():
            if lane.task is not None:
                lane.task.cancel()
            _fail([future for _, future, _ in lane.queue], exc)
            lane.queue.clear()

    def abandon(self, exc: BaseException) -> None:
        """After the client is closed: fail records whose batches it never settled (a client
        stopped by force drops them unacknowledged)."""
        for taken in self._in_flight.values():
            _fail(taken, exc)
        self._in_flight.clear()

    def _settle(
        self,
        done: asyncio.Future[Any],
        taken: list[asyncio.Future[Acked]],
        partition: int,
        queued_at: float,
    ) -> None:
        self._in_flight.pop(id(taken), None)
        if done.cancelled():
            _fail(taken, KafkaConnectionError("the batch was dropped"))
            return
        exc = done.exception()
        if exc is not None:
            _fail(taken, exc)
            return
        PRODUCE_LATENCY.observe(time.perf_counter() - queued_at)
        base = done.result().offset
        for index, future in enumerate(taken):
            if not future.done():
                future.set_result((partition, base + index))


def _fail(futures: list[asyncio.Future[Acked]], exc: BaseException) -> None:
    for future in futures:
        if not future.done():
            # A copy each, as aiokafka does, so tracebacks do not pile up on one object.
            future.set_exception(copy.copy(exc))
