"""The projector: applies batches of the log to one read-model schema and its caches.

It is a :class:`~eventstore.GroupReader`'s handler and position store. One batch is one
PostgreSQL transaction: claim the partitions (compare-and-set on ``offsets``), apply the
items, write the caches, advance the offsets, commit. A crash anywhere before the commit
leaves nothing behind but idempotent cache writes, and the batch is applied again from the
stored offsets; after the commit, the stored offsets say it is done. The cache writes carry
the batch's offsets, and Redis refuses one a later batch of the same partition has overtaken
(a worker frozen before its write, whose transaction has ended since: see
:mod:`projectors.caches`).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Protocol

import structlog

from eventstore import OffsetRange, Pool, RecordedEvent, TopicLayout
from eventstore.consumer import Partition, PositionsMoved
from projectors.apply import Applied, Item, apply_items
from projectors.metrics import BATCH_EVENTS, BATCH_SECONDS, LAST_APPLIED, POSITIONS_MOVED
from projectors.offsets import StoredPositions, advance, claim
from projectors.read.contract import LIVE_SCHEMA
from projectors.schema import checked_schema_name

if TYPE_CHECKING:  # see projectors.rebuild: a replay worker loads no Redis client
    from projectors.caches import Caches

log = structlog.get_logger(__name__)


class Applicable(Protocol):
    """A batch to apply: a reader's :class:`~eventstore.Batch`, or a build's
    :class:`~projectors.sources.BuildBatch` (whose sent messages are compact)."""

    @property
    def items(self) -> Sequence[Item]: ...
    @property
    def ranges(self) -> Mapping[Partition, OffsetRange]: ...


class Projector:
    """Applies batches to ``schema`` (and to ``caches`` unless ``None``, e.g. a shadow build).

    ``durable_commits=False`` (the live worker, shadow builds) commits without waiting for the
    WAL flush. The log is the record and the read model is derived from it: rows and offsets
    commit together, so a crash of PostgreSQL can only lose a suffix of batches as a whole,
    offsets included, which the worker applies again from the offsets that survived (a worker
    still running meets the older offsets as :class:`PositionsMoved` and seeks back). The
    caches were written before those commits, as before any commit, and take the same writes
    again. A shadow's swap commits durably (and so flushes everything before it).
    """

    def __init__(
        self,
        pool: Pool,
        layout: TopicLayout,
        *,
        schema: str = LIVE_SCHEMA,
        caches: Caches | None = None,
        durable_commits: bool = True,
    ) -> None:
        self._pool = pool
        self._durable = durable_commits
        self._layout = layout
        self.schema = checked_schema_name(schema)
        self._caches = caches
        self.positions = StoredPositions(pool, self.schema)
        self.applied: dict[Partition, int] = {}
        """Next offset to apply per partition, as of the last batch this process committed."""

    async def handle(self, batch: Applicable) -> None:
        """Apply ``batch`` exactly once, or raise :class:`PositionsMoved` having changed nothing."""
        if not batch.ranges:
            return
        started = time.perf_counter()
        async with self._pool.acquire() as conn, conn.transaction():
            if not self._durable:
                await conn.execute("SET LOCAL synchronous_commit TO off")
            try:
                await claim(conn, self.schema, batch.ranges)
            except PositionsMoved:
                POSITIONS_MOVED.inc()
                raise
            applied = await apply_items(
                conn, self.schema, self._layout, batch.items, history=self._caches is not None
            )
            if self._caches is not None:
                await self._caches.write(conn, self.schema, applied, batch.ranges, self._layout)
            await advance(conn, self.schema, batch.ranges)
        self._committed(batch.ranges, applied, len(batch.items), time.perf_counter() - started)

    def _committed(
        self,
        ranges: Mapping[Partition, OffsetRange],
        applied: Applied,
        items: int,
        seconds: float,
    ) -> None:
        BATCH_SECONDS.observe(seconds)
        BATCH_EVENTS.observe(items)
        for (topic, partition), span in ranges.items():
            self.applied[(topic, partition)] = span.next
            LAST_APPLIED.labels(topic, str(partition)).set(span.last)
        if applied.failures:
            log.warning("projector.dead_letters", count=len(applied.failures))

    async def reapply(self, recorded: RecordedEvent) -> str | None:
        """Apply one event outside log order (a dead-letter retry); its error if it failed.

        The offsets are not touched: the record's position was passed long ago.
        """
        async with self._pool.acquire() as conn, conn.transaction():
            applied = await apply_items(conn, self.schema, self._layout, [recorded])
            if applied.failures:
                return applied.failures[0]
            if self._caches is not None:
                await self._caches.write(conn, self.schema, applied)
        return None
