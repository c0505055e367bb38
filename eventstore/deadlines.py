"""One timer for many concurrent operations that share the same time bound.

``asyncio.timeout`` arms a timer per use; on the append hot path (tens of thousands per
second) those timers and their heap churn cost about a fifth of the producer's throughput.
Appends all share one bound, so their deadlines expire in the order they started: a FIFO
queue swept by one task does the same job. Semantics follow ``asyncio.timeout``: when the
bound passes, the waiting task is cancelled and the ``with`` block raises ``TimeoutError``;
a cancellation that came from elsewhere still propagates as ``CancelledError``. Expiry is
detected within ``resolution`` seconds after the deadline.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from types import TracebackType


class _Pending:
    __slots__ = ("cancelling", "deadline", "done", "expired", "task")

    def __init__(self, deadline: float, task: asyncio.Task[object]) -> None:
        self.deadline = deadline
        self.task: asyncio.Task[object] | None = task
        self.cancelling = task.cancelling()
        self.done = False
        self.expired = False


class SharedDeadline:
    """Bounds each ``with deadline.bound():`` block (inside a task) to ``timeout`` seconds."""

    def __init__(self, timeout: float, *, resolution: float = 0.05) -> None:
        self.timeout = timeout
        self._resolution = resolution
        self._pending: deque[_Pending] = deque()
        self._sweeper: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    def bound(self) -> _Bound:
        return _Bound(self)

    def _enter(self) -> _Pending:
        # The task is looked up on the loop of the last use: asking asyncio for the running
        # loop costs a getpid() system call on Python 3.11, once per bounded block.
        task = asyncio.current_task(self._loop) if self._loop is not None else None
        if task is None:
            task = asyncio.current_task()
            if task is None:
                raise RuntimeError("SharedDeadline is used outside a task")
            self._loop = task.get_loop()
        # Deadlines and the sweeper both read time.monotonic, whatever the loop's clock.
        entry = _Pending(time.monotonic() + self.timeout, task)
        self._pending.append(entry)
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = task.get_loop().create_task(
                self._sweep(), name="shared-deadline-sweeper"
            )
        if not self._wake.is_set():
            self._wake.set()
        return entry

    async def _sweep(self) -> None:
        pending = self._pending
        while True:
            while pending and pending[0].done:
                pending.popleft()
            if not pending:
                self._wake.clear()
                await self._wake.wait()
                continue
            now = time.monotonic()
            while pending and (pending[0].done or pending[0].deadline <= now):
                entry = pending.popleft()
                if not entry.done and entry.task is not None:
                    entry.expired = True
                    entry.task.cancel()
            wait = pending[0].deadline - now if pending else self._resolution
            await asyncio.sleep(max(self._resolution, wait))

    async def close(self) -> None:
        """Stop the sweeper (blocks still running are no longer bounded)."""
        sweeper, self._sweeper = self._sweeper, None
        if sweeper is not None:
            sweeper.cancel()
            try:
                await sweeper
            except asyncio.CancelledError:
                if (task := asyncio.current_task()) is not None and task.cancelling():
                    raise


class _Bound:
    __slots__ = ("_deadline", "_entry")

    def __init__(self, deadline: SharedDeadline) -> None:
        self._deadline = deadline
        self._entry: _Pending | None = None

    def __enter__(self) -> None:
        # Synchronous on purpose: entering costs no coroutine on the append hot path.
        self._entry = self._deadline._enter()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        entry = self._entry
        assert entry is not None
        entry.done = True
        # The entry stays queued until the sweeper reaches it (up to the whole bound later):
        # it must not keep the task, and all the task holds (a request, its response), alive
        # that long. At a thousand appends a second that was tens of thousands of objects that
        # every young-generation collection walked again: pauses of 20-50 ms.
        task, entry.task = entry.task, None
        if (
            entry.expired
            and exc_type is asyncio.CancelledError
            and task is not None
            and task.uncancel() <= entry.cancelling
        ):
            raise TimeoutError from exc
