"""Set-based row writes: the one-statement path and the staged COPY path store the same rows."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import msgspec
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from eventstore import Position, RecordedEvent, Settings, TopicLayout, create_pool
from eventstore.codec import CompactSent, decode_compact, decode_records, encode_event
from projectors import apply as apply_module
from projectors.apply import _ERASURE_LOCK_CLASS, apply_items
from projectors.checksum import checksum
from projectors.metrics import ASSUMED_KEYS_TAKEN, EVENTS
from projectors.rows import MessageRow, ReadMarkerRow, UserRow
from projectors.schema import (
    MESSAGES,
    READ_MARKERS,
    READ_MODEL_VERSION,
    USERS,
    create_schema,
    finish_build,
)
from projectors.tables import COPY_FROM_ROWS, insert_rows, load_rows, load_sql, upsert_rows
from schemas import (
    ConversationCreated,
    Envelope,
    Event,
    InitialMember,
    MemberJoined,
    MessageEdited,
    MessageSent,
    ReactionAdded,
    ReadMarkerMoved,
    SessionStarted,
    UserErased,
    UserRegistered,
    new_event_id,
)
from tests.metrics_support import added, series

NOW = dt.datetime(2026, 11, 25, 12, 0, tzinfo=dt.UTC)

Scratch = Callable[[str], str]
"""Names a fresh schema from a prefix (the ``scratch`` fixture)."""


@pytest.fixture
async def scratch(conn: asyncpg.Connection) -> AsyncIterator[Scratch]:
    """Fresh schema names (the prefix and a random suffix), each dropped after the test."""
    made: list[str] = []

    def name(prefix: str) -> str:
        made.append(f"{prefix}_{uuid.uuid4().hex[:8]}")
        return made[-1]

    yield name
    for schema in made:
        await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


def _user(n: int, *, generation: int) -> UserRow:
    return UserRow(
        user_id=uuid.UUID(int=n + 1),
        username=f"user-{n}-{generation}",
        display_name=None if n % 3 == 0 else f"User {n}",
        status="here",
        settings=None if n % 4 == 0 else {"theme": "dark", "n": n, "g": generation},
        role="member",
        erased=False,
        registered_at=NOW,
        updated_at=NOW + dt.timedelta(seconds=generation),
    )


async def test_small_and_staged_upserts_store_the_same_rows(
    conn: asyncpg.Connection, scratch: Scratch
) -> None:
    schemas = [scratch(f"tables_{kind}") for kind in ("small", "staged")]
    for schema in schemas:
        await create_schema(conn, schema)
    count = COPY_FROM_ROWS + 50
    first = [_user(n, generation=1) for n in range(count)]
    # Half of them again, changed, plus new ones: conflicts update, the rest insert.
    second = [_user(n, generation=2) for n in range(count // 2, count + 40)]
    small, staged = schemas
    for rows in (first, second):
        async with conn.transaction():
            for at in range(0, len(rows), 100):  # below the staging threshold
                await upsert_rows(conn, small, USERS, rows[at : at + 100])
        async with conn.transaction():
            await upsert_rows(conn, staged, USERS, rows)  # staged: one COPY
        # The staging table is empty again after the commit.
        left = await conn.fetchval(
            f"SELECT count(*) FROM pg_temp.stage_v{READ_MODEL_VERSION}_users"
        )
        assert left == 0

    keys = [(n + 1,) for n in range(count + 40)]  # a Key holds each uuid as its int
    expected = {r.user_id: r for r in first[: count // 2] + second}
    for schema in schemas:
        stored = {r.user_id: r for r in await load_rows(conn, schema, USERS, keys)}
        assert stored == expected, schema

    # A rolled-back staged upsert leaves nothing behind, in the table or the stage.
    before = await conn.fetchval(f"SELECT count(*) FROM {staged}.users")
    tx = conn.transaction()
    await tx.start()
    await upsert_rows(conn, staged, USERS, [_user(n, generation=3) for n in range(5000, 5300)])
    await tx.rollback()
    assert await conn.fetchval(f"SELECT count(*) FROM {staged}.users") == before


async def test_inserting_new_rows_copies_them_and_a_taken_key_falls_back_to_upsert(
    conn: asyncpg.Connection, scratch: Scratch
) -> None:
    schema = scratch("tables_insert")
    await create_schema(conn, schema)
    count = COPY_FROM_ROWS + 20
    first = [_user(n, generation=1) for n in range(count)]
    async with conn.transaction():
        await insert_rows(conn, schema, USERS, first)  # COPY straight into the table
    # Rows believed new, one of whose keys another writer stored meanwhile: the COPY is
    # undone (a savepoint), the rows are upserted, and the transaction goes on.
    taken = [_user(n, generation=2) for n in range(count - 1, 2 * count)]
    async with conn.transaction():
        await insert_rows(conn, schema, USERS, taken)
        await conn.execute(f"UPDATE {schema}.users SET status = 'after'")
    keys = [(n + 1,) for n in range(2 * count)]
    stored = {r.user_id: r for r in await load_rows(conn, schema, USERS, keys)}
    expected = {r.user_id: msgspec.structs.replace(r, status="after") for r in first[:-1] + taken}
    assert stored == expected


async def test_rewritten_rows_are_updated_in_place(
    conn: asyncpg.Connection, scratch: Scratch
) -> None:
    """Read markers (and conversation summaries) are rewritten by every batch that moves them;
    their tables leave room on each page, so a rewrite is a HOT update: no new index entry."""
    schema = scratch("tables_hot")
    room = uuid.uuid4()

    def marker(n: int, seq: int) -> ReadMarkerRow:
        return ReadMarkerRow(room, uuid.UUID(int=n + 1), None, None, seq, NOW)

    await create_schema(conn, schema, build=True)
    count = 3000  # some 40 pages
    await insert_rows(conn, schema, READ_MARKERS, [marker(n, 1) for n in range(count)])
    async with conn.transaction():
        await upsert_rows(conn, schema, READ_MARKERS, [marker(n, 2) for n in range(count)])
        hot = await conn.fetchval(
            "SELECT pg_stat_get_xact_tuples_hot_updated($1::regclass)",
            f"{schema}.read_markers",
        )
    assert hot == count
    options = await conn.fetchval(
        "SELECT reloptions FROM pg_class WHERE oid = $1::regclass", f"{schema}.conversations"
    )
    assert options == ["fillfactor=50"]


async def test_a_batch_reads_a_few_thousand_messages_by_index_from_a_large_table(
    conn: asyncpg.Connection, scratch: Scratch, base_settings: Settings
) -> None:
    """A batch's key reads (``= ANY`` of thousands of keys) must not scan the messages table:
    under PostgreSQL's default random_page_cost they did, up to some 200,000 rows."""
    schema = scratch("tables_plan")
    room, sender = uuid.uuid4(), uuid.uuid4()

    def message(n: int) -> MessageRow:
        return MessageRow(
            uuid.uuid4(), room, 0, n, n + 1, sender, f"c{n}", "text", "x" * 40, None, None, NOW
        )

    await create_schema(conn, schema, build=True)
    rows = [message(n) for n in range(60_000)]
    await insert_rows(conn, schema, MESSAGES, rows)
    await conn.execute(f"ANALYZE {schema}.messages")
    ids = [row.message_id for row in rows[::60]]  # 1,000 keys
    layout = TopicLayout.from_settings(base_settings)
    async with conn.transaction():
        await apply_items(conn, schema, layout, [])  # what every batch sets up first
        plan = "\n".join(
            r[0] for r in await conn.fetch(f"EXPLAIN {load_sql(schema, MESSAGES)}", ids)
        )
    assert "Seq Scan" not in plan, plan
    found = await load_rows(conn, schema, MESSAGES, [(i.int,) for i in ids])
    assert sorted(row.message_id for row in found) == sorted(ids)


async def test_a_batch_holding_an_erasure_locks_out_every_other_batch_of_its_schema(
    conn: asyncpg.Connection, scratch: Scratch, base_settings: Settings
) -> None:
    """An erasure redacts rows of every partition: its batch takes the schema's erasure lock
    alone, while other batches (group members, replay workers) share it with each other."""
    schema = scratch("tables_lock")
    layout = TopicLayout.from_settings(base_settings)
    alice = uuid.uuid4()

    def item(event: Event, offset: int) -> RecordedEvent:
        envelope = Envelope(
            id=uuid.uuid4(), source="urn:t", type=event.type_name(), subject=str(alice), time=NOW
        )
        return RecordedEvent(envelope, event, Position(1, "user", 0, offset))

    registered = item(UserRegistered(user_id=alice, username="alice", email="a@t.test"), 0)
    erased = item(UserErased(user_id=alice), 1)
    lock = (_ERASURE_LOCK_CLASS, schema)
    await create_schema(conn, schema)
    other = await asyncpg.connect(base_settings.postgres_dsn)
    try:
        for items, shared, alone in (([registered], True, False), ([erased], False, False)):
            async with conn.transaction():
                await apply_items(conn, schema, layout, items)
                async with other.transaction():  # what another batch could take meanwhile
                    assert await other.fetchval(_TRY_SHARED, *lock) is shared, items
                    assert await other.fetchval(_TRY_ALONE, *lock) is alone, items
    finally:
        await other.close()
    assert await conn.fetchval(f"SELECT erased FROM {schema}.users") is True


_TRY_SHARED = "SELECT pg_try_advisory_xact_lock_shared($1, hashtext($2))"
_TRY_ALONE = "SELECT pg_try_advisory_xact_lock($1, hashtext($2))"


class _Record(msgspec.Struct):
    topic: str
    partition: int
    offset: int
    value: bytes | None
    headers: list[tuple[str, bytes]]


class _Log:
    """Records as the producer writes them (sealed under ``keys``), offsets counted per
    partition, without Kafka."""

    def __init__(self, layout: TopicLayout, keys: dict[uuid.UUID, AESGCM]) -> None:
        self._layout = layout
        self._keys = keys
        self._offsets: dict[tuple[str, int], int] = {}

    def record(self, event: Event, seconds: int) -> _Record:
        envelope = Envelope(
            id=new_event_id(),
            source="urn:t",
            type=event.type_name(),
            subject=str(event.stream_id),
            time=NOW + dt.timedelta(seconds=seconds),
        )
        out = encode_event(event, envelope, self._keys, self._layout)
        where = (out.topic, out.partition)
        offset = self._offsets[where] = self._offsets.get(where, -1) + 1
        return _Record(out.topic, out.partition, offset, out.value, out.headers)


def _sent(sender: uuid.UUID, body: str, to: uuid.UUID, mid: uuid.UUID | None = None) -> MessageSent:
    return MessageSent(
        conversation_id=to,
        message_id=mid or uuid.uuid4(),
        sender_id=sender,
        client_msg_id=f"c-{uuid.uuid4().hex[:8]}",
        body=body,
    )


def _registered(user: uuid.UUID) -> UserRegistered:
    return UserRegistered(user_id=user, username=f"u{user.hex[:6]}", email="u@t.test")


async def test_a_build_applies_its_compact_messages_as_every_reader_applies_messages(
    conn: asyncpg.Connection,
    scratch: Scratch,
    base_settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A build reads its sent messages compactly (:func:`decode_compact`) and projects them on
    a path of their own; the same batches applied as every other reader applies them give the
    same model, whatever the batch holds: messages new and repeated, in a conversation made by
    the same batch or in none, edited, reacted to, read, a body sealed under an erased key,
    poison, an id a previous batch stored (the batch is applied again reading every key), an
    erasure."""
    layout = TopicLayout.from_settings(base_settings)
    alice, bob, carol, dave, room = (uuid.uuid4() for _ in range(5))
    written_keys = {user: AESGCM(AESGCM.generate_key(256)) for user in (alice, bob, carol)}
    read_keys: dict[uuid.UUID, AESGCM | None] = {**written_keys, carol: None}  # carol: erased
    record = _Log(layout, written_keys).record

    def sent(
        sender: uuid.UUID, body: str, mid: uuid.UUID | None = None, to: uuid.UUID = room
    ) -> MessageSent:
        return _sent(sender, body, to, mid)

    first, second = sent(alice, "hello"), sent(bob, "hi there")
    poison = record(sent(alice, "soon poison"), 9)
    poison.value = (poison.value or b"").replace(b'"body":"pd1:', b'"body":"pd1:!!')
    batches = [
        [
            *(record(_registered(u), 0) for u in (alice, bob, carol)),
            record(
                ConversationCreated(
                    conversation_id=room,
                    creator_id=alice,
                    name="room",
                    members=(InitialMember(bob, "member"), InitialMember(carol, "member")),
                ),
                1,
            ),
            record(first, 2),
            record(second, 2),
            record(sent(carol, "erased words"), 3),
            record(sent(bob, "a second first", mid=first.message_id), 3),
            record(sent(alice, "to nowhere", to=uuid.uuid4()), 4),
            record(
                MessageEdited(
                    conversation_id=room, message_id=second.message_id, editor_id=bob, body="hi!"
                ),
                5,
            ),
            record(
                ReactionAdded(
                    conversation_id=room, message_id=first.message_id, user_id=bob, emoji="+1"
                ),
                6,
            ),
            record(ReadMarkerMoved(conversation_id=room, user_id=bob, up_to=second.message_id), 7),
            record(
                MemberJoined(conversation_id=room, user_id=dave, role="member", added_by=alice), 8
            ),
            poison,
            *(record(sent(alice, f"message {n}"), 10) for n in range(COPY_FROM_ROWS)),
        ],
        [
            record(sent(alice, "later"), 11),
            record(sent(bob, "taken", mid=second.message_id), 12),
            record(sent(bob, "after"), 13),
            record(UserErased(user_id=bob), 14),
        ],
    ]

    async def fetch(subjects: object) -> dict[uuid.UUID, AESGCM | None]:
        return {s: read_keys[s] for s in subjects if s in read_keys}  # type: ignore[attr-defined]

    fast: list[bool] = []  # what each call of the compact projection returned
    real = apply_module._sent_projection

    def spied(work: Any) -> Callable[[CompactSent], bool]:
        project = real(work)

        def counted(item: CompactSent) -> bool:
            fast.append(project(item))
            return fast[-1]

        return counted

    monkeypatch.setattr(apply_module, "_sent_projection", spied)

    async def build(compact: bool, history: bool) -> tuple[Any, ...]:
        schema = scratch("tables_compact")
        await create_schema(conn, schema, build=True)
        taken, before = ASSUMED_KEYS_TAKEN._value.get(), series(EVENTS)
        events = []
        fast.clear()
        for records in batches:
            decode = decode_compact if compact else decode_records
            items = await decode(records, layout, 1, fetch)
            assert any(isinstance(i, CompactSent) for i in items) is compact
            async with conn.transaction():
                applied = await apply_items(conn, schema, layout, items, history=history)
            events.append(applied.events)
        counted = added(EVENTS, before)
        taken = ASSUMED_KEYS_TAKEN._value.get() - taken
        return await checksum(conn, schema), events, taken, counted, fast.count(True)

    every, every_events, every_taken, every_counts, _ = await build(compact=False, history=True)
    assert every_taken == 1, "the second batch's taken id made it start over"
    assert len(every_events[0]) > COPY_FROM_ROWS
    assert every_counts[("dead_lettered", "chat.message.sent")] == 2  # poison, no conversation
    # The compact path took the messages it could (a first attempt of the second batch, which
    # is then applied again, included); a batch keeping a history takes none.
    built = await build(compact=True, history=False)
    assert built[:4] == (every, [[], []], 1, every_counts)
    assert built[4] > COPY_FROM_ROWS
    assert await build(compact=True, history=True) == (every, every_events, 1, every_counts, 0)


async def test_a_build_defers_its_erasures_until_it_has_the_indexes_they_need(
    conn: asyncpg.Connection, scratch: Scratch, base_settings: Settings
) -> None:
    """A build's tables have no secondary index until it is finished, and erasure finds a
    person's rows by those: its batches record their erasures, and ``finish_build`` applies
    them once the indexes are there (again: nothing more). The model then equals the one the
    same batches make where erasures apply at once, a build that died before finishing keeps
    the record, and only the finished build reads as erased."""
    layout = TopicLayout.from_settings(base_settings)
    alice, bob, room = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    keys = {user: AESGCM(AESGCM.generate_key(256)) for user in (alice, bob)}
    log = _Log(layout, keys)
    batches = [
        [
            *(log.record(_registered(u), 0) for u in (alice, bob)),
            log.record(
                ConversationCreated(
                    conversation_id=room,
                    creator_id=alice,
                    name="alice's room",
                    members=(InitialMember(bob, "member"),),
                ),
                1,
            ),
            *(log.record(_sent(alice, f"words {n}", room), 2) for n in range(3)),
            log.record(_sent(bob, "bob's words", room), 3),
            log.record(
                SessionStarted(
                    user_id=alice, session_id=uuid.uuid4(), expires_at=1_900_000_000, device="pc"
                ),
                3,
            ),
            log.record(UserErased(user_id=alice), 4),
        ],
        [log.record(_sent(bob, "after", room), 5)],
    ]

    async def fetch(subjects: object) -> dict[uuid.UUID, AESGCM | None]:
        # Alice's key still opens her values here, so the redaction has something to do.
        return {s: keys[s] for s in subjects if s in keys}  # type: ignore[attr-defined]

    async def applied(schema: str, build: bool) -> None:
        await create_schema(conn, schema, build=build)
        for records in batches:
            items = await decode_compact(records, layout, 1, fetch)
            async with conn.transaction():
                await apply_items(conn, schema, layout, items, history=not build)

    async def alices(schema: str) -> list[object]:
        return [
            await conn.fetchval(
                f"SELECT count(body) FROM {schema}.messages WHERE sender_id = $1", alice
            ),
            await conn.fetchval(f"SELECT name FROM {schema}.conversations"),
            await conn.fetchval(f"SELECT device FROM {schema}.sessions"),
        ]

    at_once, built = scratch("tables_erase_now"), scratch("tables_erase_built")
    await applied(at_once, build=False)
    await applied(built, build=True)
    assert await alices(at_once) == [0, None, None]
    assert await alices(built) == [3, "alice's room", "pc"], "not yet: deferred"
    pending = f"SELECT array_agg(user_id) FROM {built}.pending_erasures"
    assert await conn.fetchval(pending) == [alice]
    pool = await create_pool(base_settings.postgres_dsn, min_size=1, max_size=2)
    try:
        await finish_build(pool, built)
        assert await alices(built) == [0, None, None]
        assert await conn.fetchval("SELECT to_regclass($1)", f"{built}.pending_erasures") is None
        assert await checksum(conn, built) == await checksum(conn, at_once)
        await finish_build(pool, built)  # a resumed build finishes again: nothing changes
        assert await checksum(conn, built) == await checksum(conn, at_once)
    finally:
        await pool.close()
    bob_words = f"SELECT count(body) FROM {built}.messages WHERE sender_id = $1"
    assert await conn.fetchval(bob_words, bob) == 2


async def test_a_compact_message_whose_projection_fails_takes_the_general_path(
    conn: asyncpg.Connection,
    scratch: Scratch,
    base_settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An exception in a build's compact projection of a message does not fail the batch: the
    message is projected again the general way (which dead-letters it if it fails there too),
    and the model is the one every reader makes."""
    layout = TopicLayout.from_settings(base_settings)
    alice, room = uuid.uuid4(), uuid.uuid4()
    keys = {alice: AESGCM(AESGCM.generate_key(256))}
    log = _Log(layout, keys)
    records = [
        log.record(_registered(alice), 0),
        log.record(ConversationCreated(conversation_id=room, creator_id=alice, name="r"), 1),
        *(log.record(_sent(alice, f"words {n}", room), 2) for n in range(5)),
    ]

    async def fetch(subjects: object) -> dict[uuid.UUID, AESGCM | None]:
        return {s: keys[s] for s in subjects if s in keys}  # type: ignore[attr-defined]

    async def built(decode: Any, history: bool) -> str:
        schema = scratch("tables_fallback")
        await create_schema(conn, schema, build=True)
        items = await decode(records, layout, 1, fetch)
        async with conn.transaction():
            await apply_items(conn, schema, layout, items, history=history)
        return await checksum(conn, schema)

    expected = await built(decode_records, history=True)
    real = apply_module.sent_rows
    failed: list[int] = []

    def flaky(*args: Any) -> Any:
        if not failed:  # the first compact message only
            failed.append(1)
            raise RuntimeError("unexpected")
        return real(*args)

    monkeypatch.setattr(apply_module, "sent_rows", flaky)
    assert await built(decode_compact, history=False) == expected
    assert failed == [1]
