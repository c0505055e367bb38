"""Reading the log for people: one stream's events, or every event matching a filter.

Behind ``backbone audit`` and the personal-data export. The log is the only source of truth;
personal data comes back decrypted where the subject's key exists and as the erased marker
where it was destroyed.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import AsyncIterator

import msgspec

from eventstore.codec import RecordedEvent, stream_placement
from eventstore.store import EventStore
from schemas.events import Event, InitialMember, StreamKind


class AuditFilter(msgspec.Struct, frozen=True, kw_only=True):
    user: uuid.UUID | None = None
    conversation: uuid.UUID | None = None
    types: frozenset[str] = frozenset()
    since: dt.datetime | None = None
    until: dt.datetime | None = None

    def matches(self, recorded: RecordedEvent) -> bool:
        envelope, event = recorded.envelope, recorded.event
        if self.types and envelope.type not in self.types:
            return False
        if self.since is not None and envelope.time < self.since:
            return False
        if self.until is not None and envelope.time > self.until:
            return False
        if self.conversation is not None and event.stream_id != self.conversation:
            return False
        return self.user is None or self.user in _ids_named(event)


def _ids_named(event: Event) -> set[uuid.UUID]:
    """Every user or stream id an event names (its stream, actors, members, targets)."""
    named: set[uuid.UUID] = set()
    for field in event.__struct_fields__:
        value = getattr(event, field)
        if isinstance(value, uuid.UUID):
            named.add(value)
        elif isinstance(value, tuple):
            for item in value:
                if isinstance(item, uuid.UUID):
                    named.add(item)
                elif isinstance(item, InitialMember):
                    named.add(item.user_id)
    return named


async def audit_events(store: EventStore, wanted: AuditFilter) -> AsyncIterator[RecordedEvent]:
    """The matching events, in log order per partition, up to the log end as of the call."""
    if wanted.conversation is not None:
        source = stream_events(store, "conversation", wanted.conversation)
    else:
        source = _all_events(store)
    async for recorded in source:
        if wanted.matches(recorded):
            yield recorded


async def _all_events(store: EventStore) -> AsyncIterator[RecordedEvent]:
    async with store.reader(("user", "conversation")) as reader:
        async for batch in reader.batches_until_end():
            for item in batch.items:
                if isinstance(item, RecordedEvent):
                    yield item


async def stream_events(
    store: EventStore, kind: StreamKind, stream_id: uuid.UUID
) -> AsyncIterator[RecordedEvent]:
    """One stream's events, reading only the partition that holds it (to the end as of now)."""
    topic = store.layout.topic(kind)
    _, mine = stream_placement(stream_id, store.layout.partitions(kind))
    probe = store.reader((kind,))
    await probe.start()
    try:
        ends = await probe.end_offsets()
    finally:
        await probe.stop()
    reader = store.reader((kind,))
    # Every other partition starts at its end, so only this stream's partition is read.
    await reader.start(offsets={p: end for p, end in ends.items() if p != (topic, mine)})
    try:
        async for batch in reader.batches_until_end():
            for item in batch.items:
                if isinstance(item, RecordedEvent) and item.event.stream_id == stream_id:
                    yield item
    finally:
        await reader.stop()
