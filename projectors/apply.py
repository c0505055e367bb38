"""Applying decoded log items to the read model inside one PostgreSQL transaction.

The thin shell around :mod:`projectors.projection`: prefetch every row the items may read
(one query per table), run the pure projection event by event over that working set, then
write what changed with one statement per table. Erasures run last, as set-based updates, so
that no row written earlier in the same batch can bring an erased value back.

Items that cannot be applied become dead letters (same transaction): poison records the codec
could not decode, and events whose projection raised. Unknown types are skipped and counted.

*Assumed keys.* A batch does not read the rows its new messages would replace: a
``MessageSent`` creates its row only if the id is new (:func:`~projectors.projection.creates`),
and nearly every id is. The batch assumes them absent, inside a savepoint, and writes its new
rows with ``COPY``, which the primary key refuses if one was stored after all; then the
savepoint is rolled back and the batch applied again reading every key. Either way the outcome
is the same. The assumption saves a lookup per message: in a live batch, the read of the
messages table had been most of PostgreSQL's work (and whenever the table had grown since its
statistics were taken, a sequential scan of it).

*A build's sent messages.* A build (a replay into a shadow schema) decodes its records with
:func:`~eventstore.codec.decode_compact`, which reads a well-formed ``MessageSent`` (most of
any log) as a :class:`~eventstore.codec.CompactSent`: no envelope, parsed record or recorded
event. The loop projects one with the rows :func:`~projectors.projection.sent_rows` makes (as
the pure projection does), written straight into the working set instead of through ``Put``
operations. Anything else about it (a conversation that does not exist, a batch that keeps a
recent history) goes the general way, through :meth:`~eventstore.codec.CompactSent.recorded`.
Tests apply the same batches both ways and compare the models.
"""

from __future__ import annotations

import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Final

import asyncpg
import msgspec
import structlog

from eventstore import Connection, Decoded, RecordedEvent, Skipped, TopicLayout
from eventstore.codec import CompactSent, envelope_headers
from projectors import schema
from projectors.metrics import ASSUMED_KEYS_TAKEN, EVENTS
from projectors.projection import Drop, EraseUser, Put, creates, needs, project, sent_rows
from projectors.rows import ConversationRow, Key, MemberRow, Row, key_getter
from projectors.schema import Table, checked_schema_name, defer_erasures, in_schema, redact
from projectors.tables import delete_rows, insert_rows, load_rows, upsert_rows
from schemas import ConversationEvent, Event, MessageSent, UserErased

log = structlog.get_logger(__name__)


class Applied(msgspec.Struct):
    """What a batch changed, for the caches and the metrics."""

    events: list[RecordedEvent] = msgspec.field(default_factory=list)
    """Every decoded conversation event, applied or not: the recent history mirrors the log
    (none when applied with ``history=False``: a build's, which writes no cache)."""
    membership: set[uuid.UUID] = msgspec.field(default_factory=set)
    """Conversations whose member list changed."""
    member_changes: set[tuple[uuid.UUID, uuid.UUID]] = msgspec.field(default_factory=set)
    """(conversation, user) of every membership the batch created, changed or ended."""
    conversations: set[uuid.UUID] = msgspec.field(default_factory=set)
    """Conversations whose summary row changed."""
    conversation_rows: dict[uuid.UUID, ConversationRow] = msgspec.field(default_factory=dict)
    """The changed rows of :attr:`conversations` as the projection left them; an erasure's
    set-based redaction may have changed them since (see :attr:`erased`)."""
    erased: list[uuid.UUID] = msgspec.field(default_factory=list)
    """Users erased by this batch, in log order."""
    redacted_conversations: set[uuid.UUID] = msgspec.field(default_factory=set)
    """Conversations holding content of an erased user (recent history to rewrite)."""
    failures: list[str] = msgspec.field(default_factory=list)
    """The error of every item dead-lettered by this batch."""


_MISSING: Final[Any] = object()
_TABLE_NAMED: Final = {table.name: table for table in schema.TABLES}
_SENT_TYPE: Final = MessageSent.type_name()

Item = Decoded | CompactSent
"""What a batch applies: decoded records, and a build's compact sent messages."""


class _WorkingSet:
    """Rows as of the event being projected: the prefetched ones, and what each event's ops
    made of them.

    An operation is stored once, in :attr:`changed`; a read looks there first, then among the
    prefetched rows. Each store hashes a key of :class:`uuid.UUID` values, whose hash runs in
    Python: storing every operation in both places had taken 7 % of a replay worker's profile
    samples. Which keys were absent is read off the prefetched rows (``None``), not kept apart.
    """

    def __init__(self) -> None:
        self.rows: dict[str, dict[Key, Row | None]] = defaultdict(dict)
        """Table name -> key -> row as prefetched (``None``: absent, or assumed absent), for
        every key read."""
        self.changed: dict[str, dict[Key, Row | None]] = defaultdict(dict)
        """Table name -> key -> row as the batch leaves it (``None``: deleted)."""

    def get(self, table: Table, key: Key) -> Row | None:
        name = table.name
        changed = self.changed.get(name)  # not [name]: a read must not add the table
        if changed is not None:
            row = changed.get(key, _MISSING)
            if row is not _MISSING:
                return row  # type: ignore[no-any-return]
        try:
            return self.rows[name][key]
        except KeyError:
            raise LookupError(f"{name} {key} was not prefetched") from None

    def assume_absent(self, table: Table, key: Key) -> None:
        """Take ``key`` as absent without reading it (the insert will find out)."""
        self.rows[table.name][key] = None

    def load(self, table: Table, keys: Iterable[Key], found: Iterable[Row]) -> None:
        rows = self.rows[table.name]
        for key in keys:
            rows[key] = None
        key_of = key_getter(table)
        for row in found:
            rows[key_of(row)] = row

    def writes(self, name: str) -> tuple[list[Key], list[Row], list[Row]]:
        """What changed in table ``name``: keys to delete, new rows (their keys absent at the
        prefetch), replacements (every other row: found, or never read)."""
        deleted: list[Key] = []
        new: list[Row] = []
        replaced: list[Row] = []
        prefetched = self.rows[name]
        for key, value in self.changed[name].items():
            if value is None:
                deleted.append(key)
            elif prefetched.get(key, _MISSING) is None:
                new.append(value)
            else:
                replaced.append(value)
        return deleted, new, replaced


async def _prefetch(
    conn: Connection,
    schema_name: str,
    work: _WorkingSet,
    items: Sequence[Item],
    *,
    assume_new: bool,
) -> None:
    wanted: dict[Table, dict[Key, None]] = defaultdict(dict)
    known = work.rows  # per event and need, a lookup here rather than a method call
    known_messages = known[schema.MESSAGES.name]
    known_conversations = known[schema.CONVERSATIONS.name]
    wanted_messages = wanted[schema.MESSAGES]
    wanted_conversations = wanted[schema.CONVERSATIONS]
    for item in items:
        if type(item) is CompactSent:
            # What creates() and needs() say of its MessageSent, from the ints it holds.
            message = (item.message,)
            if message not in known_messages:
                if assume_new and message not in wanted_messages:
                    known_messages[message] = None  # assumed absent
                else:
                    wanted_messages[message] = None
            if (item.conversation,) not in known_conversations:
                wanted_conversations[(item.conversation,)] = None
            continue
        if not isinstance(item, RecordedEvent):
            continue
        event = item.event
        if assume_new and (created := creates(event)) is not None:
            table, key = created
            if key not in known[table.name] and key not in wanted[table]:
                work.assume_absent(table, key)
        for table, key in needs(event):
            if key not in known[table.name]:
                wanted[table][key] = None
    for table, keys in wanted.items():
        found = await load_rows(conn, schema_name, table, keys)
        work.load(table, keys, found)


def _note_changes(applied: Applied, work: _WorkingSet) -> None:
    """What the caches need to know of the batch's member and conversation changes (once per
    batch, from what changed: not per operation)."""
    for key, member in work.changed.get(schema.MEMBERS.name, {}).items():
        if isinstance(member, MemberRow):
            conversation_id, user_id = member.conversation_id, member.user_id
        else:  # left: the key alone says who (as ints, see projectors.rows.Key)
            conversation_id, user_id = (uuid.UUID(int=part) for part in key)
        applied.membership.add(conversation_id)
        applied.member_changes.add((conversation_id, user_id))
    for (number,), row in work.changed.get(schema.CONVERSATIONS.name, {}).items():
        if isinstance(row, ConversationRow):
            applied.conversations.add(row.conversation_id)
            applied.conversation_rows[row.conversation_id] = row
        else:
            applied.conversations.add(uuid.UUID(int=number))


def _text_headers(headers: Iterable[tuple[str, bytes]]) -> str:
    pairs = [[name, value.decode("utf-8", "replace")] for name, value in headers]
    return msgspec.json.encode(pairs).decode()


def _withheld(event: Event) -> bytes:
    """The event's data with personal values withheld: a dead letter must not outlive erasure.

    A retry never uses this copy; it reads the record again from the log.
    """
    data = msgspec.to_builtins(event)
    for name in event.personal_fields:
        if data.get(name) is not None:
            data[name] = {"kind": "withheld"}
    return msgspec.json.encode(data)


def _dead_letter(layout: TopicLayout, item: Decoded, reason: str, error: str) -> tuple[Any, ...]:
    """A ``dead_letters`` row (without the bookkeeping columns) for ``item``."""
    position = item.position
    if isinstance(item, Skipped):
        payload, headers, type_ = item.value, _text_headers(item.headers), item.type
    else:
        payload = _withheld(item.event)
        headers = _text_headers(envelope_headers(item.envelope))
        type_ = item.envelope.type
    topic = layout.topic(position.stream)
    return (
        topic,
        position.partition,
        position.offset,
        position.token(),
        type_,
        reason,
        error,
        payload,
        headers,
    )


_DEAD_LETTER_SQL = (
    'INSERT INTO {schema}.dead_letters (topic, partition, "offset", position, type, reason, '
    "error, payload, headers, failed_at, resolved) "
    "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9::jsonb, now(), false) "
    'ON CONFLICT (topic, partition, "offset") DO NOTHING'
)
# After an erasure's redactions (projectors.schema.ERASE_SQL): the conversations whose cached
# copies (summary, recent history) hold some of the user's ($1) values.
_ERASED_IN_SQL = (
    "SELECT conversation_id FROM {schema}.conversations WHERE creator_id = $1 "
    "UNION SELECT DISTINCT conversation_id FROM {schema}.messages WHERE sender_id = $1"
)


# Batches of one schema that hold an erasure take this lock exclusively, every other batch
# shares it (transaction-level advisory lock on (class, hashtext(schema))); see apply_items.
# The same statement sets the batch's planner cost (see _BATCH_PLANNER): no round trip of its own.
_ERASURE_LOCK_CLASS = 0x65726173  # "eras"
_ERASURE_EXCLUSIVE_SQL = (
    "SELECT pg_advisory_xact_lock($1, hashtext($2)), set_config('random_page_cost', $3, true)"
)
_ERASURE_SHARED_SQL = (
    "SELECT pg_advisory_xact_lock_shared($1, hashtext($2)), "
    "set_config('random_page_cost', $3, true)"
)
_BATCH_PLANNER = "1.1"
"""``random_page_cost`` of a batch's transaction. A batch reads the rows of its thousands of
keys at once (``= ANY`` of an array), and under PostgreSQL's default of 4 (a random read four
times a sequential one: disks) the planner took a sequential scan of the whole messages table
for a few thousand keys up to a table of some 200,000 rows: a replay of a million events spent
a tenth of its time there. The read model's pages are in memory, where a random read costs
about what a sequential one does; 1.1 is the usual setting for that, and these reads become
index scans."""


async def _write_dead_letters(
    conn: Connection, schema_name: str, letters: list[tuple[Any, ...]]
) -> None:
    if letters:
        await conn.executemany(in_schema(schema_name, _DEAD_LETTER_SQL), letters)


async def _erase(conn: Connection, schema_name: str, user_id: uuid.UUID, applied: Applied) -> None:
    """Redact the personal values of ``user_id`` in every table."""
    await redact(conn, schema_name, user_id)
    touched = [r[0] for r in await conn.fetch(in_schema(schema_name, _ERASED_IN_SQL), user_id)]
    applied.conversations.update(touched)
    applied.redacted_conversations.update(touched)


async def apply_items(
    conn: Connection,
    schema_name: str,
    layout: TopicLayout,
    items: Sequence[Item],
    *,
    history: bool = True,
) -> Applied:
    """Apply ``items`` (log order per partition) to ``schema_name``; return what changed.

    The caller owns the transaction (and stores the offsets in it). ``history=False`` (a
    build, which writes no cache) leaves :attr:`Applied.events` empty.

    Batches of other partitions may be applied concurrently (group members, parallel replay
    workers): their rows are disjoint, except that an erasure redacts rows of every table. So
    a batch holding an erasure first takes the schema's erasure lock exclusively and every other
    batch shares it, before touching any row: an erasure then never runs beside another batch,
    so the two can neither deadlock on rows nor write over each other.

    A batch creating rows assumes their keys absent (see the module doc).
    """
    schema_name = checked_schema_name(schema_name)
    events = [i.event for i in items if isinstance(i, RecordedEvent)]
    # The batch's distinct event types (in C), not a test per item in Python.
    erases = any(issubclass(kind, UserErased) for kind in set(map(type, events)))
    await conn.execute(
        _ERASURE_EXCLUSIVE_SQL if erases else _ERASURE_SHARED_SQL,
        _ERASURE_LOCK_CLASS,
        schema_name,
        _BATCH_PLANNER,
    )
    compact = len(events) < len(items) and any(type(i) is CompactSent for i in items)
    if compact or any(creates(e) is not None for e in events):
        try:
            async with conn.transaction():  # a savepoint: the caller's transaction goes on
                outcome = await _apply(
                    conn, schema_name, layout, items, history=history, assume_new=True
                )
        except asyncpg.UniqueViolationError:
            ASSUMED_KEYS_TAKEN.inc()
            log.info("projector.assumed_key_taken", items=len(items))
        else:
            return outcome.counted()
    outcome = await _apply(conn, schema_name, layout, items, history=history, assume_new=False)
    return outcome.counted()


class _Attempt(msgspec.Struct):
    """One application of a batch, with what it counted and logs once it stands."""

    applied: Applied
    counts: Counter[tuple[str, str]]
    warnings: list[tuple[str, str]]
    """(position, error) of every event whose projection failed."""

    def counted(self) -> Applied:
        for (outcome, type_), count in self.counts.items():
            EVENTS.labels(outcome, type_).inc(count)
        for position, error in self.warnings:
            log.warning("projector.dead_letter", position=position, error=error)
        return self.applied


def _sent_projection(work: _WorkingSet) -> Callable[[CompactSent], bool]:
    """:func:`~projectors.projection.project` of a compact sent message, its operations
    applied to ``work``: it returns ``False`` (having done nothing) if the conversation does
    not exist, which the general path reports.

    Inlined reads and writes of ``work`` (:meth:`_WorkingSet.get`, the apply loop's) on the
    three tables a message touches, bound once per batch: for most of a replay's records."""
    found_conversations = work.rows[schema.CONVERSATIONS.name]
    found_messages = work.rows[schema.MESSAGES.name]
    conversations = work.changed[schema.CONVERSATIONS.name]
    messages = work.changed[schema.MESSAGES.name]
    markers = work.changed[schema.READ_MARKERS.name]

    def project_sent(item: CompactSent) -> bool:
        key = (item.conversation,)
        conversation = conversations.get(key, _MISSING)
        if conversation is _MISSING:
            conversation = found_conversations[key]
        if type(conversation) is not ConversationRow:
            return False
        message_key = (item.message,)
        known = messages.get(message_key, _MISSING)
        if known is _MISSING:
            known = found_messages[message_key]
        if known is not None:
            return True  # first wins
        position = item.position
        message, updated, marker = sent_rows(
            conversation, item.event, item.body, position.partition, position.offset, item.time
        )
        messages[message_key] = message
        conversations[key] = updated
        markers[(item.conversation, item.sender)] = marker
        return True

    return project_sent


async def _apply(
    conn: Connection,
    schema_name: str,
    layout: TopicLayout,
    items: Sequence[Item],
    *,
    history: bool,
    assume_new: bool,
) -> _Attempt:
    applied = Applied()
    work = _WorkingSet()
    await _prefetch(conn, schema_name, work, items, assume_new=assume_new)
    letters: list[tuple[Any, ...]] = []
    erasures: dict[uuid.UUID, None] = {}
    counts: Counter[tuple[str, str]] = Counter()  # metrics, incremented once per batch
    warnings: list[tuple[str, str]] = []
    changed = work.changed
    applied_types: list[str] = []
    sent = 0
    project_sent = None if history else _sent_projection(work)
    for entry in items:
        if isinstance(entry, CompactSent):
            if project_sent is not None:
                try:
                    done = project_sent(entry)
                except Exception:  # noqa: BLE001 - the general path below raises it again
                    done = False  # (project_sent changes nothing before it cannot fail)
                if done:
                    sent += 1
                    continue
            item: Decoded = entry.recorded()  # the path of every event (its history, its error)
        else:
            item = entry
        if isinstance(item, Skipped):
            if item.reason == "unknown_type":
                counts["skipped", item.type[:64]] += 1
            else:
                counts["dead_lettered", item.type[:64]] += 1
                letters.append(_dead_letter(layout, item, item.reason, item.error))
                applied.failures.append(item.error)
            continue
        event = item.event
        if history and isinstance(event, ConversationEvent):
            applied.events.append(item)
        try:
            ops = project(item, work)
        except Exception as exc:  # noqa: BLE001 - pure code: any failure means "cannot apply"
            counts["dead_lettered", item.envelope.type] += 1
            error = f"{type(exc).__name__}: {exc}"
            letters.append(_dead_letter(layout, item, "projection", error))
            applied.failures.append(error)
            warnings.append((item.position.token(), error))
            continue
        for op in ops:
            # Inlined _WorkingSet.apply: this loop runs for every operation of a replay.
            if type(op) is Put:  # the operation classes are final
                row: Row | None = op.row
                table = op.row.table
                key = op.key or key_getter(table)(op.row)  # a key is a non-empty tuple
            elif type(op) is Drop:
                table, key, row = op.table, op.key, None
            else:
                assert isinstance(op, EraseUser)
                erasures[op.user_id] = None
                continue
            changed[table.name][key] = row
        applied_types.append(item.envelope.type)
    for type_, count in Counter(applied_types).items():  # counted in C, not per event
        counts["applied", type_] += count
    if sent:
        counts["applied", _SENT_TYPE] += sent
    _note_changes(applied, work)
    for name in work.changed:
        table = _TABLE_NAMED[name]
        deleted, new, replaced = work.writes(name)
        await delete_rows(conn, schema_name, table, deleted)
        await insert_rows(conn, schema_name, table, new, assumed=assume_new)
        await upsert_rows(conn, schema_name, table, replaced)
    await _write_dead_letters(conn, schema_name, letters)
    if erasures and not await defer_erasures(conn, schema_name, list(erasures)):
        for user_id in erasures:
            await _erase(conn, schema_name, user_id, applied)
    applied.erased.extend(erasures)
    return _Attempt(applied, counts, warnings)
