"""The event store as one object: the pool, the key ring, the producer and the epoch.

Tiers open one :class:`EventStore` at start-up (owned by their app factory or worker ``run``)
and close it at shutdown; every long-lived client inside is created here, in order, and closed
in reverse. Start-up fails fast with a typed error naming what is wrong (an unreachable broker,
an unreachable database, a bad master key), never a hang or a library traceback.
"""

from __future__ import annotations

from collections.abc import Sequence

from eventstore.consumer import BatchHandler, GroupReader, LogReader, PositionStore
from eventstore.epoch import read_epoch
from eventstore.keyring import KeyRing
from eventstore.migrations import migrate_eventstore
from eventstore.pg import Pool, create_pool
from eventstore.producer import EventProducer, ProducerFactory
from eventstore.settings import Settings
from eventstore.topics import TopicLayout
from schemas.events import StreamKind


class EventStore:
    """Everything a tier needs to write and read the log. Use :meth:`open` / ``async with``."""

    def __init__(
        self,
        settings: Settings,
        pool: Pool,
        keyring: KeyRing,
        producer: EventProducer | None,
        epoch: int,
        *,
        owns_pool: bool,
    ) -> None:
        self.settings = settings
        self.pool = pool
        self.keyring = keyring
        self._producer = producer
        self.epoch = epoch
        self.layout = TopicLayout.from_settings(settings)
        self._owns_pool = owns_pool

    @property
    def producer(self) -> EventProducer:
        if self._producer is None:
            raise RuntimeError("this EventStore was opened without a producer")
        return self._producer

    @classmethod
    async def open(
        cls,
        settings: Settings,
        *,
        pool: Pool | None = None,
        with_producer: bool = True,
        producer_factory: ProducerFactory | None = None,
        migrate: bool = True,
    ) -> EventStore:
        """Connect to PostgreSQL and Kafka, apply the store's migrations, start the producer."""
        owns_pool = pool is None
        pool = pool or await create_pool(settings.postgres_dsn)
        keyring: KeyRing | None = None
        producer: EventProducer | None = None
        try:
            if migrate:
                async with pool.acquire() as conn:
                    await migrate_eventstore(conn)
            epoch = await read_epoch(pool)
            keyring = KeyRing(pool, settings.master_keys)
            await keyring.start()
            if with_producer:
                producer = EventProducer(
                    settings, keyring, epoch, producer_factory=producer_factory
                )
                await producer.start()
        except BaseException:
            if keyring is not None:
                await keyring.close()
            if owns_pool:
                await pool.close()
            raise
        return cls(settings, pool, keyring, producer, epoch, owns_pool=owns_pool)

    async def close(self) -> None:
        if self._producer is not None:
            await self._producer.stop()
        await self.keyring.close()
        if self._owns_pool:
            await self.pool.close()

    async def __aenter__(self) -> EventStore:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def reader(
        self,
        streams: Sequence[StreamKind] = ("user", "conversation"),
        *,
        max_records: int = 5000,
        max_bytes: int | None = None,
        quick_start: bool = False,
        decode: bool = True,
    ) -> LogReader:
        """A group-less reader over ``streams`` (start it with ``start()`` or ``async with``);
        ``max_bytes``, ``quick_start``, ``decode``: see :class:`LogReader`."""
        return LogReader(
            self.settings,
            streams=streams,
            keys=self.keyring.keys_for_read,
            epoch=self.epoch,
            max_records=max_records,
            max_bytes=max_bytes,
            quick_start=quick_start,
            decode=decode,
        )

    def group_reader(
        self,
        *,
        group_id: str,
        streams: Sequence[StreamKind],
        positions: PositionStore,
        handler: BatchHandler,
        max_records: int = 5000,
    ) -> GroupReader:
        """A consumer-group member handing batches to ``handler``; see :class:`GroupReader`."""
        return GroupReader(
            self.settings,
            group_id=group_id,
            streams=streams,
            positions=positions,
            handler=handler,
            keys=self.keyring.keys_for_read,
            epoch=self.epoch,
            max_records=max_records,
        )
