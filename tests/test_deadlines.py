"""SharedDeadline: one sweeper bounds many operations, with asyncio.timeout's semantics."""

from __future__ import annotations

import asyncio
import gc
import weakref

import pytest

from eventstore.deadlines import SharedDeadline


async def test_operations_within_the_bound_are_untouched() -> None:
    deadline = SharedDeadline(1.0, resolution=0.01)

    async def quick(n: int) -> int:
        with deadline.bound():
            await asyncio.sleep(0.001 * (n % 5))
            return n

    assert await asyncio.gather(*(quick(n) for n in range(500))) == list(range(500))
    await deadline.close()


async def test_an_operation_past_the_bound_raises_timeout_error_promptly() -> None:
    deadline = SharedDeadline(0.2, resolution=0.01)
    loop = asyncio.get_running_loop()

    async def slow() -> None:
        with deadline.bound():
            await asyncio.sleep(10)

    async def quick() -> str:
        with deadline.bound():
            await asyncio.sleep(0.05)
        return "done"

    started = loop.time()
    results = await asyncio.gather(slow(), quick(), slow(), return_exceptions=True)
    elapsed = loop.time() - started
    assert isinstance(results[0], TimeoutError)
    assert results[1] == "done"
    assert isinstance(results[2], TimeoutError)
    assert 0.2 <= elapsed < 1.0
    await deadline.close()


async def test_a_cancellation_from_elsewhere_stays_a_cancellation() -> None:
    deadline = SharedDeadline(5.0, resolution=0.01)

    async def waits() -> None:
        with deadline.bound():
            await asyncio.sleep(10)

    task = asyncio.create_task(waits())
    await asyncio.sleep(0.02)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await deadline.close()


async def test_the_task_can_go_on_after_a_timeout() -> None:
    """Like asyncio.timeout, the expiry is absorbed: the task is not left cancelling."""
    deadline = SharedDeadline(0.05, resolution=0.01)

    async def twice() -> str:
        with pytest.raises(TimeoutError), deadline.bound():
            await asyncio.sleep(10)
        task = asyncio.current_task()
        assert task is not None
        assert task.cancelling() == 0
        with deadline.bound():
            await asyncio.sleep(0.001)
        return "went on"

    assert await twice() == "went on"
    await deadline.close()


async def test_a_finished_block_does_not_keep_its_task_alive() -> None:
    """Entries wait in the queue until the sweeper reaches them, long after their block ended;
    the task (and everything it references) is free as soon as the block is."""
    deadline = SharedDeadline(60.0)

    async def bounded() -> None:
        with deadline.bound():
            await asyncio.sleep(0)

    task = asyncio.create_task(bounded())
    finished = weakref.ref(task)
    del task
    while finished() is not None and not finished().done():  # type: ignore[union-attr]
        await asyncio.sleep(0)
    gc.collect()
    assert finished() is None
    assert len(deadline._pending) == 1, "the entry itself is still queued (swept later)"
    await deadline.close()
