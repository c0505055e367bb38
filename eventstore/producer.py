"""Appending events to the log: idempotent, ``acks=all``, bounded, and self-healing.

An append is reported successful only after Kafka acknowledged every record of it with
``acks=all`` (all in-sync replicas, at least ``min.insync.replicas``). Each append is bounded
by ``send_timeout``; past it the caller gets :class:`SendTimeout` (outcome unknown, retry with
the same event id is safe because readers deduplicate by id).

aiokafka's idempotent producer can wedge after ``OutOfOrderSequenceNumber`` (aio-libs/aiokafka
issue 1017): every later send fails or hangs until the process restarts. The producer here
detects that state (that error, an unknown/fenced producer id, or a dead sender task), builds a
fresh client (new producer id, sequences from zero) and re-sends the records that were not
acknowledged, with their original event ids. Acknowledged records are never re-sent, so
nothing acknowledged is lost or written twice by the recovery itself.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar

import structlog
from aiokafka import AIOKafkaProducer
from aiokafka.errors import (
    InvalidProducerEpoch,
    KafkaConnectionError,
    KafkaError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    NotEnoughReplicasAfterAppendError,
    NotEnoughReplicasError,
    OutOfOrderSequenceNumber,
    ProducerFenced,
    RecordTooLargeError,
    UnknownProducerId,
)
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from eventstore.batching import PartitionBatcher
from eventstore.codec import OutgoingRecord, RecordedEvent, encode_event, uuid_text
from eventstore.deadlines import SharedDeadline
from eventstore.errors import (
    LogUnavailable,
    NotEnoughReplicas,
    RecordRejected,
    SendTimeout,
)
from eventstore.keyring import KeyRing
from eventstore.metrics import PRODUCE_ERRORS, PRODUCER_RECREATED
from eventstore.positions import Position
from eventstore.settings import Settings
from eventstore.topics import TopicLayout
from schemas.envelope import Envelope, new_event_id, utc_now
from schemas.events import Event

log = structlog.get_logger(__name__)

ProducerFactory = Callable[[], AIOKafkaProducer]
_T = TypeVar("_T")

# Errors after which this producer instance can never send again (sequence state is broken).
_WEDGED = (OutOfOrderSequenceNumber, UnknownProducerId, InvalidProducerEpoch, ProducerFenced)


def default_producer_factory(settings: Settings, **overrides: Any) -> ProducerFactory:
    """Factory of correctly configured producers; ``overrides`` tune batching for benchmarks."""

    def make() -> AIOKafkaProducer:
        options: dict[str, Any] = {
            "bootstrap_servers": settings.kafka_bootstrap,
            "client_id": "backbone-eventstore",
            "enable_idempotence": True,
            "acks": "all",
            # Records of one command are small; batch briefly without hurting latency.
            "linger_ms": 1,
            "max_batch_size": 256 * 1024,
            "request_timeout_ms": 30000,
            "retry_backoff_ms": 50,
            "compression_type": None,
        }
        options.update(overrides)
        return AIOKafkaProducer(**options)

    return make


class EventProducer:
    """Writes events to the log. Owns one Kafka producer at a time; use ``async with``."""

    def __init__(
        self,
        settings: Settings,
        keyring: KeyRing,
        epoch: int,
        *,
        producer_factory: ProducerFactory | None = None,
    ) -> None:
        self._settings = settings
        self._layout = TopicLayout.from_settings(settings)
        self._keyring = keyring
        self._epoch = epoch
        self._factory = producer_factory or default_producer_factory(settings)
        self._producer: AIOKafkaProducer | None = None
        self._batcher: PartitionBatcher | None = None
        self._generation = 0
        # Held while the producer is replaced or stopped: one at a time, never both at once.
        self._rebuild_lock = asyncio.Lock()
        self._rebuilding: asyncio.Task[None] | None = None
        # Every append shares the send bound: one sweeper instead of a timer per append.
        self._deadline = SharedDeadline(settings.send_timeout)

    @property
    def layout(self) -> TopicLayout:
        return self._layout

    @property
    def generation(self) -> int:
        """How many Kafka producers this instance has built (1 after start)."""
        return self._generation

    async def start(self) -> None:
        self._producer = await self._build()

    async def stop(self) -> None:
        """Flush what is pending within the send bound, then close regardless.

        A rebuild under way is waited for (it is bounded), so the client it builds is closed
        here rather than left running."""
        async with self._rebuild_lock:
            producer, self._producer = self._producer, None
            if producer is not None:
                await self._retire(producer, self._settings.send_timeout)
        await self._deadline.close()

    async def __aenter__(self) -> EventProducer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def _build(self) -> AIOKafkaProducer:
        producer = self._factory()
        try:
            # Bounded: an idempotent producer waits for a producer id, which a cluster that
            # lost its controller quorum never hands out.
            async with asyncio.timeout(self._settings.send_timeout):
                await producer.start()
        except (KafkaError, TimeoutError) as exc:
            await _unstoppable(_close(producer, grace=1.0))
            reason = str(exc) or f"no producer id within {self._settings.send_timeout}s"
            raise LogUnavailable(
                f"Kafka at {self._settings.kafka_bootstrap} is unreachable: {reason}"
            ) from exc
        except BaseException:
            # Cut off (cancelled): ``start()`` may have begun the client's own tasks (its
            # bootstrap starts a metadata task), which would run on forever.
            await _unstoppable(_close(producer, grace=1.0))
            raise
        self._generation += 1
        self._batcher = PartitionBatcher(producer, _max_request_size(producer))
        return producer

    async def _retire(self, producer: AIOKafkaProducer, grace: float) -> None:
        """Close ``producer`` (bounded by ``grace``), always completely: it runs as a task of
        its own, which a caller cut off by its bound leaves to finish. A retirement stopped
        half-way would leave the old sender retrying (duplicates) while aiokafka, having
        marked the client closed, makes any later ``stop()`` return at once."""
        await _unstoppable(self._retire_now(producer, grace))

    async def _retire_now(self, producer: AIOKafkaProducer, grace: float) -> None:
        # Records still queued fail; their appends see the closed batcher and retry on the
        # next producer (or fail for want of one, after ``stop``).
        batcher = self._batcher
        closed = KafkaConnectionError("the producer was closed")
        if batcher is not None:
            batcher.close(closed)
        await _close(producer, grace)
        if batcher is not None:
            batcher.abandon(closed)

    async def _rebuild(self, broken: AIOKafkaProducer, reason: str) -> None:
        """Replace ``broken`` with a fresh producer, once, however many senders noticed.

        The work runs as a task of its own, which every append that noticed waits for: an
        append cut off by its bound stops waiting, but the rebuild goes on, bounded by its own
        timeouts (the grace to retire, the send bound to build), so a client is never left
        half-built or half-retired, and the next append does not start another."""
        task = self._rebuilding
        if task is None:
            if self._producer is not broken:
                return  # another append already rebuilt it (or the producer was stopped)
            task = self._rebuilding = _background(self._replace(broken, reason))
        await asyncio.shield(task)

    async def _replace(self, broken: AIOKafkaProducer, reason: str) -> None:
        try:
            async with self._rebuild_lock:
                if self._producer is not broken:
                    return  # stopped meanwhile
                PRODUCER_RECREATED.inc()
                log.warning("producer.rebuild", reason=reason, generation=self._generation)
                # Appends that still hold ``broken`` fail on it and retry on the new producer.
                await self._retire(broken, grace=1.0)
                self._producer = await self._build()
        finally:
            self._rebuilding = None

    def envelope_for(
        self,
        event: Event,
        *,
        actor: str | None,
        correlation_id: str | None,
        causation_id: str | None,
        event_id: uuid.UUID | None = None,
    ) -> Envelope:
        return Envelope(
            id=event_id or new_event_id(),
            source=self._settings.source,
            type=event.type_name(),
            subject=uuid_text(event.stream_id),
            time=utc_now(),
            schemaversion=event.version,
            actor=actor,
            correlationid=correlation_id,
            causationid=causation_id,
        )

    async def append(
        self,
        events: Sequence[Event],
        *,
        actor: str | None = None,
        correlation_id: str | None = None,
        causation_id: str | None = None,
    ) -> list[RecordedEvent]:
        """Write ``events``; return them with their positions once Kafka acknowledged all.

        Records are atomic one by one: events of one stream keep their order, but an append
        spanning several records can fail part-way. Commands therefore produce one event.
        """
        if not events:
            return []
        try:
            with self._deadline.bound():
                keys = self._cached_keys(events)
                if keys is None:
                    keys = await self._keys_for(events)
                records = [
                    encode_event(
                        event,
                        self.envelope_for(
                            event,
                            actor=actor,
                            correlation_id=correlation_id,
                            causation_id=causation_id,
                        ),
                        keys,
                        self._layout,
                    )
                    for event in events
                ]
                result = await self.send_records(records)
        except TimeoutError:
            PRODUCE_ERRORS.labels("SendTimeout").inc()
            raise SendTimeout(f"no acknowledgement within {self._settings.send_timeout}s") from None
        except Exception as exc:
            PRODUCE_ERRORS.labels(type(exc).__name__).inc()
            raise
        return result

    def _cached_keys(self, events: Sequence[Event]) -> dict[uuid.UUID, AESGCM] | None:
        """The events' data keys when all are cached (the hot path), else ``None``."""
        keys: dict[uuid.UUID, AESGCM] = {}
        for event in events:
            if event.personal_fields and (subject := event.subject_id) is not None:
                key = self._keyring.cached_write_key(subject)
                if key is None:
                    return None
                keys[subject] = key
        return keys

    async def _keys_for(self, events: Sequence[Event]) -> dict[uuid.UUID, AESGCM]:
        """Data keys of the events' subjects, created or fetched where not cached."""
        subjects = {s for e in events if e.personal_fields and (s := e.subject_id) is not None}
        return await self._keyring.keys_for_write(subjects)

    async def send_records(self, records: Sequence[OutgoingRecord]) -> list[RecordedEvent]:
        """Send encoded records until all are acknowledged, rebuilding a wedged producer.

        The caller bounds the time (``append`` does). Only unacknowledged records are re-sent.
        """
        if len(records) == 1 and (batcher := self._batcher) is not None:
            # One record (a command's event): no bookkeeping lists. A failure that a fresh
            # producer can cure goes the long way below, which rebuilds and re-sends it.
            producer, record = self._producer, records[0]
            if producer is not None and not _sender_dead(producer):
                try:
                    partition, offset = await batcher.submit(record)
                except Exception as exc:  # judged as the long way below judges it
                    if not self._cured_by_rebuild(exc, producer, batcher):
                        raise _translate(exc) from exc
                    await self._rebuild(producer, type(exc).__name__)
                else:
                    position = Position(self._epoch, record.event.stream, partition, offset)
                    return [RecordedEvent(record.envelope, record.event, position)]
        acked: list[RecordedEvent | None] = [None] * len(records)
        pending = list(range(len(records)))
        epoch = self._epoch
        while pending:
            producer, batcher = self._producer, self._batcher
            if producer is None or batcher is None:
                raise LogUnavailable("the producer is not running")
            if _sender_dead(producer):
                # Records handed to a dead sender would wait forever: rebuild first.
                await self._rebuild(producer, "sender task died")
                continue
            futures = [batcher.submit(records[index]) for index in pending]
            if len(futures) == 1:
                try:
                    outcomes: list[Any] = [await futures[0]]
                except Exception as exc:  # noqa: BLE001 - judged below, as gather would
                    outcomes = [exc]
            else:
                outcomes = await asyncio.gather(*futures, return_exceptions=True)
            still: list[int] = []
            wedged: BaseException | None = None
            for index, outcome in zip(pending, outcomes, strict=True):
                record = records[index]
                if isinstance(outcome, BaseException):
                    if self._cured_by_rebuild(outcome, producer, batcher):
                        wedged = outcome
                        still.append(index)
                        continue
                    raise _translate(outcome) from outcome
                partition, offset = outcome
                acked[index] = RecordedEvent(
                    record.envelope,
                    record.event,
                    Position(epoch, record.event.stream, partition, offset),
                )
            if wedged is not None:
                await self._rebuild(producer, type(wedged).__name__)
            pending = still
        return acked  # type: ignore[return-value] # every index was filled above

    def _cured_by_rebuild(
        self, exc: BaseException, producer: AIOKafkaProducer, batcher: PartitionBatcher
    ) -> bool:
        """Whether a record that failed with ``exc`` on ``producer`` is to be re-sent on a new
        producer: the old one is wedged, or it was replaced or closed while the record waited."""
        replaced = self._producer is not producer or batcher.closed
        return isinstance(exc, _WEDGED) or replaced or _sender_dead(producer)


_finishing: set[asyncio.Task[Any]] = set()
"""Tasks that must run to their end whoever waited for them (a reference keeps them alive)."""


def _background(work: Coroutine[Any, Any, _T]) -> asyncio.Task[_T]:
    task = asyncio.create_task(work)
    _finishing.add(task)
    task.add_done_callback(_finished)
    return task


def _finished(task: asyncio.Task[Any]) -> None:
    _finishing.discard(task)
    # Whoever waited may have been cut off: the outcome is retrieved here, not reported as
    # "never retrieved" (failures were logged or reached the appends that waited).
    if not task.cancelled():
        task.exception()


async def _unstoppable(work: Coroutine[Any, Any, _T]) -> _T:
    """Run ``work`` to its end even if the caller is cancelled (the caller still is)."""
    return await asyncio.shield(_background(work))


async def _close(producer: AIOKafkaProducer, grace: float) -> None:
    """Stop ``producer``, waiting at most ``grace`` seconds for pending records.

    aiokafka's ``stop()`` waits until every pending batch is delivered, and an idempotent
    producer retries without limit, so while the ISR is below minimum it would never return.
    Past the grace period the sender is cancelled and the connections closed: the records
    still pending were never acknowledged, and their appends fail by their own bound.
    """
    try:
        async with asyncio.timeout(grace):
            await producer.stop()
        return
    except TimeoutError:
        log.warning("producer.stop_forced", grace=grace)
    except KafkaError as exc:
        log.warning("producer.stop_failed", error=str(exc))
    sender = getattr(producer, "_sender", None)
    if sender is not None:
        await sender.close()
    await producer.client.close()


def _sender_dead(producer: AIOKafkaProducer) -> bool:
    sender = getattr(producer, "_sender", None)
    task = getattr(sender, "sender_task", None)
    return task is not None and task.done()


def _max_request_size(producer: AIOKafkaProducer) -> int:
    size = getattr(producer, "_max_request_size", None)
    return size if isinstance(size, int) else 1024 * 1024


def _translate(exc: BaseException) -> Exception:
    """Map a Kafka client error onto the event store's typed errors."""
    if isinstance(exc, NotEnoughReplicasError | NotEnoughReplicasAfterAppendError):
        return NotEnoughReplicas(f"too few in-sync replicas: {exc}")
    if isinstance(exc, RecordTooLargeError | MessageSizeTooLargeError):
        return RecordRejected(f"record too large: {exc}")
    if isinstance(exc, KafkaConnectionError | KafkaTimeoutError):
        return LogUnavailable(f"Kafka unreachable: {exc}")
    if isinstance(exc, KafkaError):
        if exc.retriable:
            return LogUnavailable(f"Kafka error: {exc}")
        return RecordRejected(f"Kafka refused the record: {exc}")
    if isinstance(exc, Exception):
        return exc
    raise exc
