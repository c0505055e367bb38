"""Rows of the read model as frozen Structs, one class per table (fields = columns, in order).

Projection code reads and returns these; :mod:`projectors.store` loads and writes them with
set-based statements derived from :mod:`projectors.schema`. A test pins that every class
matches its table column for column.
"""

from __future__ import annotations

import datetime as dt
import functools
import operator
import uuid
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import msgspec

from projectors import schema
from projectors.schema import Table

Key = tuple[Any, ...]
"""A primary key as projection and its working set hold it: each ``uuid`` column as the
UUID's ``int``, any other column as it is. An ``int`` hashes and compares in C; a
:class:`uuid.UUID` runs Python code for both (and a tuple does not keep its hash), and a
replay looks up a dozen keys an event."""


class Row(msgspec.Struct, frozen=True):
    """A read-model row; ``table`` says where it lives, :meth:`key` is its primary key."""

    table: ClassVar[Table]

    def key(self) -> Key:
        return key_getter(self.table)(self)


@functools.cache
def _uuid_columns(table: Table) -> tuple[bool, ...]:
    """Which of ``table``'s primary-key columns are ``uuid``s (held as ints in a :data:`Key`)."""
    return tuple(table.column(name).type == "uuid" for name in table.primary_key)


@functools.cache
def key_getter(table: Table) -> Callable[[Row], Key]:
    """A fast getter of the :data:`Key` of rows of ``table`` (a replay calls one per write)."""
    uuids = _uuid_columns(table)
    getters = tuple(map(operator.attrgetter, table.primary_key))
    if uuids == (True,):
        (first,) = getters
        return lambda row: (first(row).int,)
    if uuids == (True, True):
        first, second = getters
        return lambda row: (first(row).int, second(row).int)
    pairs = tuple(zip(getters, uuids, strict=True))
    return lambda row: tuple(get(row).int if is_uuid else get(row) for get, is_uuid in pairs)


def key_values(table: Table, keys: Iterable[Key]) -> list[list[Any]]:
    """``keys`` (of ``table``) as query parameters, one list per key column: each ``uuid``
    column's ints as the UUIDs' hex text, which the driver parses in C."""
    uuids = _uuid_columns(table)
    columns: list[list[Any]] = [[] for _ in uuids]
    for key in keys:
        for i, value in enumerate(key):
            columns[i].append(f"{value:032x}" if uuids[i] else value)
    return columns


class UserRow(Row, frozen=True):
    table: ClassVar[Table] = schema.USERS

    user_id: uuid.UUID
    username: str | None
    display_name: str | None
    status: str | None
    settings: dict[str, Any] | None
    role: str
    erased: bool
    registered_at: dt.datetime
    updated_at: dt.datetime
    password_changed_at: dt.datetime | None = None


class ConversationRow(Row, frozen=True):
    table: ClassVar[Table] = schema.CONVERSATIONS

    conversation_id: uuid.UUID
    kind: str
    name: str | None
    description: str | None
    creator_id: uuid.UUID
    created_at: dt.datetime
    partition: int
    created_offset: int
    member_count: int
    message_count: int
    last_message_id: uuid.UUID | None
    last_offset: int | None
    last_activity_at: dt.datetime


class MemberRow(Row, frozen=True):
    table: ClassVar[Table] = schema.MEMBERS

    conversation_id: uuid.UUID
    user_id: uuid.UUID
    role: str
    joined_at: dt.datetime


class MessageRow(Row, frozen=True):
    table: ClassVar[Table] = schema.MESSAGES

    message_id: uuid.UUID
    conversation_id: uuid.UUID
    partition: int
    offset: int
    seq: int
    sender_id: uuid.UUID
    client_msg_id: str
    kind: str
    body: str | None
    reply_to: uuid.UUID | None
    media_id: uuid.UUID | None
    created_at: dt.datetime
    edited_at: dt.datetime | None = None
    deleted: bool = False
    deleted_at: dt.datetime | None = None
    deleted_by: uuid.UUID | None = None


class ReactionRow(Row, frozen=True):
    table: ClassVar[Table] = schema.REACTIONS

    message_id: uuid.UUID
    user_id: uuid.UUID
    emoji: str
    conversation_id: uuid.UUID
    reacted_at: dt.datetime


class ReadMarkerRow(Row, frozen=True):
    table: ClassVar[Table] = schema.READ_MARKERS

    conversation_id: uuid.UUID
    user_id: uuid.UUID
    up_to: uuid.UUID | None
    up_to_offset: int | None
    up_to_seq: int
    moved_at: dt.datetime


class MediaRow(Row, frozen=True):
    table: ClassVar[Table] = schema.MEDIA

    media_id: uuid.UUID
    uploader_id: uuid.UUID
    content_type: str
    size: int
    sha256: str
    filename: str | None
    uploaded_at: dt.datetime


class SessionRow(Row, frozen=True):
    table: ClassVar[Table] = schema.SESSIONS

    session_id: uuid.UUID
    user_id: uuid.UUID
    device: str | None
    started_at: dt.datetime
    expires_at: dt.datetime
    revoked_at: dt.datetime | None = None
    revoke_reason: str | None = None


ROW_CLASSES: tuple[type[Row], ...] = (
    UserRow,
    ConversationRow,
    MemberRow,
    MessageRow,
    ReactionRow,
    ReadMarkerRow,
    MediaRow,
    SessionRow,
)
"""The tables projection writes row by row (offsets and dead letters are bookkeeping)."""
