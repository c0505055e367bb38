"""The node-wide tail: one group-less reader over both event topics, from the live end.

It commits nothing and shares nothing with other nodes: every node reads every partition.
The offsets it starts from are fetched first and handed to the reader, so the node knows
exactly which offsets it has handed over (``offsets``), which is what resumes and membership
bootstraps are reconciled against.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping

import structlog

from eventstore import Batch, EventStore, LogEnds, LogReader

log = structlog.get_logger(__name__)

Offsets = dict[int, int]


class Tail:
    def __init__(self, store: EventStore) -> None:
        self._store = store
        self._conversations = store.layout.topic("conversation")
        self._reader: LogReader | None = None
        self.offsets: Offsets = {}
        """Next offset to hand over per conversations partition; replaced, never mutated,
        so a socket may keep a reference as the snapshot of where it subscribed."""
        self.start_offsets: Offsets = {}
        self._advanced = asyncio.Condition()
        self.batches = 0

    async def start(self) -> None:
        layout = self._store.layout
        partitions = [
            (layout.topic(stream), p)
            for stream in ("user", "conversation")
            for p in range(layout.partitions(stream))
        ]
        ends = LogEnds(self._store.settings)
        await ends.start()
        try:
            start = await ends.end_offsets(partitions)
        finally:
            await ends.stop()
        reader = self._store.reader(("user", "conversation"), max_records=10_000)
        await reader.start("end", offsets=start)
        self._reader = reader
        self.offsets = {p: o for (t, p), o in start.items() if t == self._conversations}
        self.start_offsets = dict(self.offsets)
        log.info("fanout.tail_started", partitions=len(partitions))

    async def stop(self) -> None:
        reader, self._reader = self._reader, None
        if reader is not None:
            await reader.stop()

    async def run(self, handle: Callable[[Batch], None]) -> None:
        """Hand every batch to ``handle`` (synchronously, so delivery order is log order)."""
        reader = self._reader
        assert reader is not None, "start() first"
        topic = self._conversations
        while True:
            batch = await reader.next_batch(timeout_ms=500)
            if not batch.ranges:
                continue
            handle(batch)
            moved = {p: span.next for (t, p), span in batch.ranges.items() if t == topic}
            if moved:
                self.offsets = {**self.offsets, **moved}
            self.batches += 1
            async with self._advanced:
                self._advanced.notify_all()

    def passed(self, offsets: Mapping[int, int]) -> bool:
        current = self.offsets
        return all(current.get(p, 0) >= o for p, o in offsets.items())

    async def reached(self, offsets: Mapping[int, int], within: float) -> None:
        """Return once the tail has handed over everything below ``offsets``."""
        if self.passed(offsets):
            return
        async with asyncio.timeout(within), self._advanced:
            await self._advanced.wait_for(lambda: self.passed(offsets))
