"""The pure projection, without any server: same input, same operations; first wins."""

from __future__ import annotations

import datetime as dt
import uuid

import pytest

from eventstore import Position, RecordedEvent
from ops.bench.project import workload
from projectors import schema
from projectors.errors import ProjectionError
from projectors.projection import Drop, Put, needs, project
from projectors.rows import (
    ConversationRow,
    Key,
    MessageRow,
    ReactionRow,
    ReadMarkerRow,
    Row,
    key_values,
)
from schemas import ERASED, Envelope, Event, MessageEdited, MessageSent

ROOM, ALICE, MESSAGE = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
TIME = dt.datetime(2026, 1, 2, 3, 4, 5, 6000, tzinfo=dt.UTC)


class Rows:
    """An in-memory stand-in for the prefetched working set."""

    def __init__(self, *rows: Row) -> None:
        self.rows: dict[tuple[str, Key], Row | None] = {(r.table.name, r.key()): r for r in rows}

    def get(self, table: schema.Table, key: Key) -> Row | None:
        return self.rows.get((table.name, key))


class Prefetched(Rows):
    """Like the working set: only the rows ``needs`` named can be read (``LookupError``)."""

    def __init__(self, event: Event, *rows: Row) -> None:
        super().__init__(*rows)
        self.named = {(table.name, key) for table, key in needs(event)}

    def get(self, table: schema.Table, key: Key) -> Row | None:
        if (table.name, key) not in self.named:
            raise LookupError(f"{table.name} {key} was not prefetched")
        return super().get(table, key)


def recorded(event: Event, offset: int = 7) -> RecordedEvent:
    envelope = Envelope(
        id=uuid.uuid4(), source="urn:t", type=event.type_name(), subject=str(ROOM), time=TIME
    )
    return RecordedEvent(envelope, event, Position(1, "conversation", 2, offset))


def room(message_count: int = 0) -> ConversationRow:
    return ConversationRow(
        conversation_id=ROOM,
        kind="group",
        name="r",
        description=None,
        creator_id=ALICE,
        created_at=TIME,
        partition=2,
        created_offset=0,
        member_count=1,
        message_count=message_count,
        last_message_id=None,
        last_offset=None,
        last_activity_at=TIME,
    )


def sent(body: str = "hi") -> MessageSent:
    return MessageSent(
        conversation_id=ROOM, message_id=MESSAGE, sender_id=ALICE, client_msg_id="c", body=body
    )


def test_a_message_takes_the_next_number_and_its_time_and_position_from_the_log() -> None:
    ops = project(recorded(sent()), Rows(room(message_count=4)))
    message = next(op.row for op in ops if isinstance(op, Put) and isinstance(op.row, MessageRow))
    assert (message.seq, message.offset, message.partition, message.created_at) == (5, 7, 2, TIME)
    assert ops == project(recorded(sent()), Rows(room(message_count=4))), "deterministic"


def test_a_known_message_id_is_ignored_first_wins() -> None:
    existing = project(recorded(sent()), Rows(room()))[0]
    assert isinstance(existing, Put)
    assert project(recorded(sent("again")), Rows(room(1), existing.row)) == []


def test_a_message_of_an_unknown_conversation_cannot_be_applied() -> None:
    with pytest.raises(ProjectionError, match="does not exist"):
        project(recorded(sent()), Rows())


def test_an_erased_body_is_stored_as_null() -> None:
    first = project(recorded(sent()), Rows(room()))[0]
    assert isinstance(first, Put)
    edit = MessageEdited(conversation_id=ROOM, message_id=MESSAGE, editor_id=ALICE, body=ERASED)
    (op,) = project(recorded(edit, 8), Rows(first.row))
    assert isinstance(op, Put)
    assert isinstance(op.row, MessageRow)
    assert (op.row.body, op.row.edited_at) == (None, TIME)


def test_needs_name_every_row_a_projection_reads() -> None:
    # Keys hold each uuid as its int (projectors.rows.Key).
    assert needs(sent()) == [(schema.CONVERSATIONS, (ROOM.int,)), (schema.MESSAGES, (MESSAGE.int,))]


def test_a_message_moves_its_senders_marker_to_it_without_reading_the_marker() -> None:
    ops = project(recorded(sent()), Prefetched(sent(), room(message_count=4)))
    (marker,) = [op.row for op in ops if isinstance(op, Put) and isinstance(op.row, ReadMarkerRow)]
    assert (marker.user_id, marker.up_to, marker.up_to_seq, marker.up_to_offset) == (
        ALICE,
        MESSAGE,
        5,
        7,
    )


def test_keys_hold_each_uuid_as_its_int_and_go_to_queries_as_uuid_text() -> None:
    """Every shape of primary key: one uuid, two, two and a text (a reaction's emoji)."""
    reaction = ReactionRow(MESSAGE, ALICE, "👍", ROOM, TIME)
    marker = ReadMarkerRow(ROOM, ALICE, MESSAGE, 3, 1, TIME)
    assert room().key() == (ROOM.int,)
    assert marker.key() == (ROOM.int, ALICE.int)
    assert reaction.key() == (MESSAGE.int, ALICE.int, "👍")
    columns = key_values(schema.REACTIONS, [reaction.key(), (ALICE.int, ROOM.int, "x")])
    assert [[uuid.UUID(text) for text in column] for column in columns[:2]] == [
        [MESSAGE, ALICE],
        [ALICE, ROOM],
    ]
    assert columns[2] == ["👍", "x"]


def test_every_key_a_projection_hands_on_is_its_rows_key() -> None:
    # A mixed chat log (the replay bench's: registrations, groups, messages with edits,
    # deletes, reactions, read markers and joins), projected event by event over rows kept
    # as the working set keeps them.
    rows = Rows()
    handed_on = 0
    for offset, event in enumerate(workload(3000, seed=5).events):
        for op in project(recorded(event, offset), rows):
            if isinstance(op, Put):
                key = op.row.key()
                if op.key is not None:
                    assert op.key == key, f"{type(event).__name__} keyed {op.row!r} wrongly"
                    handed_on += 1
                rows.rows[(op.row.table.name, key)] = op.row
            elif isinstance(op, Drop):
                rows.rows[(op.table.name, op.key)] = None
    assert handed_on > 3000  # three rows a message
