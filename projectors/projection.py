"""The pure core: what one event does to the read model.

:func:`needs` says which rows an event may read; :func:`project` turns an event and those
rows into operations (:class:`Put` a row, :class:`Drop` a row, :class:`EraseUser`). Nothing
here does I/O or reads a clock: times come from the envelope, positions from the log, ids
from the event, so replaying the same log yields the same rows, byte for byte.

Every operation is idempotent by construction: a second ``MessageSent`` with a known
``message_id``, a second ``ConversationCreated``, a join of a member, a marker moving
backwards are all no-ops (first wins). An event that contradicts the read model (a message
in a conversation that does not exist, an edit of an unknown message) raises
:class:`~projectors.errors.ProjectionError` and is dead-lettered by the caller.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

import msgspec

from eventstore import RecordedEvent
from projectors import schema
from projectors.errors import ProjectionError
from projectors.rows import (
    ConversationRow,
    Key,
    MediaRow,
    MemberRow,
    MessageRow,
    ReactionRow,
    ReadMarkerRow,
    Row,
    SessionRow,
    UserRow,
)
from projectors.schema import Table
from schemas import (
    ConversationCreated,
    DirectConversationOpened,
    Erased,
    Event,
    MediaUploaded,
    MemberJoined,
    MemberLeft,
    MemberRoleChanged,
    MessageDeleted,
    MessageEdited,
    MessageSent,
    PasswordChanged,
    ReactionAdded,
    ReactionRemoved,
    ReadMarkerMoved,
    SessionRevoked,
    SessionStarted,
    UserErased,
    UserProfileUpdated,
    UserRegistered,
)


class Put(msgspec.Struct, frozen=True):
    """Insert or replace ``row``.

    ``key``, when given, is the row's primary key (:meth:`~projectors.rows.Row.key`), which the
    caller otherwise works out itself. A ``MessageSent``, most of a replay, writes three rows
    whose keys its projection has built anyway: handing them on saves the caller a key getter
    per row, 0.6-0.9 µs of the 10-13 applying a replayed record takes (a test pins that every
    key handed on is its row's)."""

    row: Row
    key: Key | None = None


class Drop(msgspec.Struct, frozen=True):
    """Delete the row of ``table`` with primary key ``key`` (absent is fine; a
    :data:`~projectors.rows.Key`, uuids as their ints)."""

    table: Table
    key: Key


class EraseUser(msgspec.Struct, frozen=True):
    """Redact every personal value of ``user_id`` in every table (set-based, after the batch)."""

    user_id: uuid.UUID


Op = Put | Drop | EraseUser
Need = tuple[Table, Key]


class Rows(Protocol):
    """Read access to the current rows (as of the previous event), by
    :data:`~projectors.rows.Key` (uuids as their ints)."""

    def get(self, table: Table, key: Key) -> Row | None: ...


R = TypeVar("R", bound=Row)


def _get(rows: Rows, cls: type[R], key: Key) -> R | None:
    found = rows.get(cls.table, key)
    if found is not None and not isinstance(found, cls):
        raise TypeError(f"{cls.table.name} holds a {type(found).__name__}")
    return found


def _text(value: str | Erased | None) -> str | None:
    """A personal value as stored: the erased marker is stored as NULL."""
    return value if isinstance(value, str) else None


# --- what each event reads ---------------------------------------------------------------


def needs(event: Event) -> list[Need]:
    """The rows ``event``'s projection may read (prefetched in one query per table)."""
    reads = _NEEDS.get(type(event))
    return [] if reads is None else reads(event)


def _user_needs(
    event: UserRegistered | UserProfileUpdated | PasswordChanged | UserErased,
) -> list[Need]:
    return [(schema.USERS, (event.user_id.int,))]


def _session_needs(event: SessionStarted | SessionRevoked) -> list[Need]:
    return [(schema.SESSIONS, (event.session_id.int,))]


def _media_needs(event: MediaUploaded) -> list[Need]:
    return [(schema.MEDIA, (event.media_id.int,))]


def _conversation_needs(
    event: ConversationCreated | DirectConversationOpened | MemberLeft,
) -> list[Need]:
    return [(schema.CONVERSATIONS, (event.conversation_id.int,)), *_member_needs(event)]


def _joined_needs(event: MemberJoined) -> list[Need]:
    cid = event.conversation_id
    return [
        (schema.CONVERSATIONS, (cid.int,)),
        (schema.MEMBERS, (cid.int, event.user_id.int)),
        (schema.READ_MARKERS, (cid.int, event.user_id.int)),
    ]


def _role_needs(event: MemberRoleChanged) -> list[Need]:
    return [(schema.MEMBERS, (event.conversation_id.int, event.user_id.int))]


def _sent_needs(event: MessageSent) -> list[Need]:
    # Not the sender's read marker: a new message moves it whatever it was (see _message_sent).
    cid = event.conversation_id
    return [(schema.CONVERSATIONS, (cid.int,)), (schema.MESSAGES, (event.message_id.int,))]


def _message_needs(event: MessageEdited | MessageDeleted | ReactionAdded) -> list[Need]:
    return [(schema.MESSAGES, (event.message_id.int,))]


def _marker_needs(event: ReadMarkerMoved) -> list[Need]:
    return [
        (schema.MESSAGES, (event.up_to.int,)),
        (schema.READ_MARKERS, (event.conversation_id.int, event.user_id.int)),
    ]


# By exact type (a lookup, where a ``match`` tried each class in turn): event classes are
# final, and a type without reads is absent.
_NEEDS: dict[type[Event], Callable[[Any], list[Need]]] = {
    UserRegistered: _user_needs,
    UserProfileUpdated: _user_needs,
    PasswordChanged: _user_needs,
    UserErased: _user_needs,
    SessionStarted: _session_needs,
    SessionRevoked: _session_needs,
    MediaUploaded: _media_needs,
    ConversationCreated: _conversation_needs,
    DirectConversationOpened: _conversation_needs,
    MemberLeft: _conversation_needs,
    MemberJoined: _joined_needs,
    MemberRoleChanged: _role_needs,
    MessageSent: _sent_needs,
    MessageEdited: _message_needs,
    MessageDeleted: _message_needs,
    ReactionAdded: _message_needs,
    ReadMarkerMoved: _marker_needs,
}


def creates(event: Event) -> Need | None:
    """The row ``event`` creates if its key is new, and leaves alone otherwise (first wins):
    the one need whose only use is that check, so that a caller may assume the key is absent
    and let the database's primary key confirm it (see :func:`projectors.apply.apply_items`).
    """
    if isinstance(event, MessageSent):
        return (schema.MESSAGES, (event.message_id.int,))
    return None


def _member_needs(event: ConversationCreated | DirectConversationOpened | MemberLeft) -> list[Need]:
    cid = event.conversation_id
    if isinstance(event, MemberLeft):
        users = [event.user_id]
    elif isinstance(event, DirectConversationOpened):
        users = list(event.user_ids)
    else:
        users = [event.creator_id, *(m.user_id for m in event.members)]
    return [(schema.MEMBERS, (cid.int, u.int)) for u in users]


# --- users ---------------------------------------------------------------------------------


def _user_registered(rec: RecordedEvent, e: UserRegistered, rows: Rows) -> list[Op]:
    if _get(rows, UserRow, (e.user_id.int,)) is not None:
        return []
    time = rec.envelope.time
    row = UserRow(
        user_id=e.user_id,
        username=_text(e.username),
        display_name=_text(e.display_name),
        status=None,
        settings=None,
        role=e.role,
        erased=False,
        registered_at=time,
        updated_at=time,
    )
    return [Put(row)]


def _existing_user(rows: Rows, user_id: uuid.UUID) -> UserRow:
    user = _get(rows, UserRow, (user_id.int,))
    if user is None:
        raise ProjectionError(f"user {user_id} is not registered")
    return user


def _profile_updated(rec: RecordedEvent, e: UserProfileUpdated, rows: Rows) -> list[Op]:
    user = _existing_user(rows, e.user_id)
    if user.erased:
        return []
    changes: dict[str, Any] = {"updated_at": rec.envelope.time}
    if e.display_name is not None:
        changes["display_name"] = _text(e.display_name)
    if e.status is not None:
        changes["status"] = _text(e.status)
    if e.settings is not None:
        changes["settings"] = e.settings
    return [Put(msgspec.structs.replace(user, **changes))]


def _password_changed(rec: RecordedEvent, e: PasswordChanged, rows: Rows) -> list[Op]:
    user = _existing_user(rows, e.user_id)
    return [Put(msgspec.structs.replace(user, password_changed_at=rec.envelope.time))]


def _session_started(rec: RecordedEvent, e: SessionStarted, rows: Rows) -> list[Op]:
    if _get(rows, SessionRow, (e.session_id.int,)) is not None:
        return []
    row = SessionRow(
        session_id=e.session_id,
        user_id=e.user_id,
        device=_text(e.device),
        started_at=rec.envelope.time,
        expires_at=dt.datetime.fromtimestamp(e.expires_at, dt.UTC),
    )
    return [Put(row)]


def _session_revoked(rec: RecordedEvent, e: SessionRevoked, rows: Rows) -> list[Op]:
    session = _get(rows, SessionRow, (e.session_id.int,))
    if session is None:
        raise ProjectionError(f"session {e.session_id} was never started")
    if session.revoked_at is not None:
        return []
    revoked = msgspec.structs.replace(session, revoked_at=rec.envelope.time, revoke_reason=e.reason)
    return [Put(revoked)]


def _media_uploaded(rec: RecordedEvent, e: MediaUploaded, rows: Rows) -> list[Op]:
    if _get(rows, MediaRow, (e.media_id.int,)) is not None:
        return []
    row = MediaRow(
        media_id=e.media_id,
        uploader_id=e.uploader_id,
        content_type=e.content_type,
        size=e.size,
        sha256=e.sha256,
        filename=_text(e.filename),
        uploaded_at=rec.envelope.time,
    )
    return [Put(row)]


def _user_erased(rec: RecordedEvent, e: UserErased, rows: Rows) -> list[Op]:
    ops: list[Op] = []
    user = _get(rows, UserRow, (e.user_id.int,))
    if user is not None and not user.erased:
        redacted = msgspec.structs.replace(
            user,
            username=None,
            display_name=None,
            status=None,
            settings=None,
            erased=True,
            updated_at=rec.envelope.time,
        )
        ops.append(Put(redacted))
    # Always: content of a subject who never registered (or was erased before) is redacted too.
    ops.append(EraseUser(e.user_id))
    return ops


# --- conversations and membership -----------------------------------------------------------


def _new_conversation(
    rec: RecordedEvent,
    conversation_id: uuid.UUID,
    kind: str,
    creator: uuid.UUID,
    members: dict[uuid.UUID, str],
    name: str | None = None,
    description: str | None = None,
) -> list[Op]:
    time = rec.envelope.time
    conversation = ConversationRow(
        conversation_id=conversation_id,
        kind=kind,
        name=name,
        description=description,
        creator_id=creator,
        created_at=time,
        partition=rec.position.partition,
        created_offset=rec.position.offset,
        member_count=len(members),
        message_count=0,
        last_message_id=None,
        last_offset=None,
        last_activity_at=time,
    )
    ops: list[Op] = [Put(conversation)]
    ops.extend(Put(MemberRow(conversation_id, user, role, time)) for user, role in members.items())
    return ops


def _conversation_created(rec: RecordedEvent, e: ConversationCreated, rows: Rows) -> list[Op]:
    if _get(rows, ConversationRow, (e.conversation_id.int,)) is not None:
        return []
    # The creator is the owner whatever the list says; otherwise the first mention wins.
    members = {e.creator_id: "owner"}
    for member in e.members:
        members.setdefault(member.user_id, member.role)
    return _new_conversation(
        rec,
        e.conversation_id,
        "group",
        e.creator_id,
        members,
        name=_text(e.name),
        description=_text(e.description),
    )


def _direct_opened(rec: RecordedEvent, e: DirectConversationOpened, rows: Rows) -> list[Op]:
    if _get(rows, ConversationRow, (e.conversation_id.int,)) is not None:
        return []
    members = dict.fromkeys(sorted(e.user_ids), "member")
    return _new_conversation(rec, e.conversation_id, "direct", e.opened_by, members)


def _existing_conversation(rows: Rows, conversation_id: uuid.UUID) -> ConversationRow:
    conversation = _get(rows, ConversationRow, (conversation_id.int,))
    if conversation is None:
        raise ProjectionError(f"conversation {conversation_id} does not exist")
    return conversation


def _member_joined(rec: RecordedEvent, e: MemberJoined, rows: Rows) -> list[Op]:
    conversation = _existing_conversation(rows, e.conversation_id)
    if _get(rows, MemberRow, (e.conversation_id.int, e.user_id.int)) is not None:
        return []
    time = rec.envelope.time
    ops: list[Op] = [
        Put(MemberRow(e.conversation_id, e.user_id, e.role, time)),
        Put(msgspec.structs.replace(conversation, member_count=conversation.member_count + 1)),
    ]
    # History from before the join is not unread: the marker starts at the current message.
    marker = _get(rows, ReadMarkerRow, (e.conversation_id.int, e.user_id.int))
    if marker is None or marker.up_to_seq < conversation.message_count:
        ops.append(
            Put(
                ReadMarkerRow(
                    conversation_id=e.conversation_id,
                    user_id=e.user_id,
                    up_to=conversation.last_message_id,
                    up_to_offset=conversation.last_offset,
                    up_to_seq=conversation.message_count,
                    moved_at=time,
                )
            )
        )
    return ops


def _member_left(rec: RecordedEvent, e: MemberLeft, rows: Rows) -> list[Op]:
    conversation = _existing_conversation(rows, e.conversation_id)
    member = _get(rows, MemberRow, (e.conversation_id.int, e.user_id.int))
    if member is None:
        return []
    return [
        Drop(schema.MEMBERS, member.key()),
        Put(msgspec.structs.replace(conversation, member_count=conversation.member_count - 1)),
    ]


def _role_changed(rec: RecordedEvent, e: MemberRoleChanged, rows: Rows) -> list[Op]:
    member = _get(rows, MemberRow, (e.conversation_id.int, e.user_id.int))
    if member is None or member.role == e.role:
        return []
    return [Put(msgspec.structs.replace(member, role=e.role))]


# --- messages -----------------------------------------------------------------------------


def _message_sent(rec: RecordedEvent, e: MessageSent, rows: Rows) -> list[Op]:
    conversation = _existing_conversation(rows, e.conversation_id)
    message_key = (e.message_id.int,)
    if _get(rows, MessageRow, message_key) is not None:
        return []
    position = rec.position
    message, updated, marker = sent_rows(
        conversation, e, _text(e.body), position.partition, position.offset, rec.envelope.time
    )
    conversation_id = e.conversation_id.int
    return [
        Put(message, message_key),
        Put(updated, (conversation_id,)),
        Put(marker, (conversation_id, e.sender_id.int)),
    ]


def sent_rows(
    conversation: ConversationRow,
    e: MessageSent,
    body: str | None,
    partition: int,
    offset: int,
    time: dt.datetime,
) -> tuple[MessageRow, ConversationRow, ReadMarkerRow]:
    """The rows a new message writes (its ``body`` as stored): the message, its conversation's
    summary, the sender's read marker. The projection of a ``MessageSent`` whose id is new, and
    of a build's :class:`~eventstore.codec.CompactSent` (:mod:`projectors.apply`)."""
    seq = conversation.message_count + 1
    message = MessageRow(
        message_id=e.message_id,
        conversation_id=e.conversation_id,
        partition=partition,
        offset=offset,
        seq=seq,
        sender_id=e.sender_id,
        client_msg_id=e.client_msg_id,
        kind=e.kind,
        body=body,
        reply_to=e.reply_to,
        media_id=e.media_id,
        created_at=time,
    )
    updated = msgspec.structs.replace(
        conversation,
        message_count=seq,
        last_message_id=e.message_id,
        last_offset=offset,
        last_activity_at=time,
    )
    # The sender has read their own message. No marker can be at or past it, so the marker is
    # not read: one points at a message of the conversation (seq <= message_count) or, set by a
    # join, at message_count itself, and message_count only grows. That saves a read per message,
    # most of the keys a batch would look up (:func:`needs` leaves the marker out).
    return message, updated, _marker_at(message, e.sender_id, time)


def _marker_at(message: MessageRow, user_id: uuid.UUID, time: dt.datetime) -> ReadMarkerRow:
    return ReadMarkerRow(
        conversation_id=message.conversation_id,
        user_id=user_id,
        up_to=message.message_id,
        up_to_offset=message.offset,
        up_to_seq=message.seq,
        moved_at=time,
    )


def _existing_message(rows: Rows, conversation_id: uuid.UUID, message_id: uuid.UUID) -> MessageRow:
    message = _get(rows, MessageRow, (message_id.int,))
    if message is None or message.conversation_id != conversation_id:
        raise ProjectionError(f"message {message_id} is not in conversation {conversation_id}")
    return message


def _message_edited(rec: RecordedEvent, e: MessageEdited, rows: Rows) -> list[Op]:
    message = _existing_message(rows, e.conversation_id, e.message_id)
    if message.deleted:
        return []  # a deleted message stays redacted
    edited = msgspec.structs.replace(message, body=_text(e.body), edited_at=rec.envelope.time)
    return [Put(edited)]


def _message_deleted(rec: RecordedEvent, e: MessageDeleted, rows: Rows) -> list[Op]:
    message = _existing_message(rows, e.conversation_id, e.message_id)
    if message.deleted:
        return []
    deleted = msgspec.structs.replace(
        message, body=None, deleted=True, deleted_at=rec.envelope.time, deleted_by=e.deleted_by
    )
    return [Put(deleted)]


def _reaction_added(rec: RecordedEvent, e: ReactionAdded, rows: Rows) -> list[Op]:
    message = _existing_message(rows, e.conversation_id, e.message_id)
    if message.deleted:
        return []
    reaction = ReactionRow(e.message_id, e.user_id, e.emoji, e.conversation_id, rec.envelope.time)
    return [Put(reaction)]


def _reaction_removed(rec: RecordedEvent, e: ReactionRemoved, rows: Rows) -> list[Op]:
    return [Drop(schema.REACTIONS, (e.message_id.int, e.user_id.int, e.emoji))]


def _marker_moved(rec: RecordedEvent, e: ReadMarkerMoved, rows: Rows) -> list[Op]:
    message = _existing_message(rows, e.conversation_id, e.up_to)
    marker = _get(rows, ReadMarkerRow, (e.conversation_id.int, e.user_id.int))
    if marker is not None and marker.up_to_seq >= message.seq:
        return []  # markers only move forward
    return [Put(_marker_at(message, e.user_id, rec.envelope.time))]


_Projection = Callable[[RecordedEvent, Any, Rows], list[Op]]

_PROJECTIONS: dict[type[Event], _Projection] = {
    UserRegistered: _user_registered,
    UserProfileUpdated: _profile_updated,
    PasswordChanged: _password_changed,
    SessionStarted: _session_started,
    SessionRevoked: _session_revoked,
    MediaUploaded: _media_uploaded,
    UserErased: _user_erased,
    ConversationCreated: _conversation_created,
    DirectConversationOpened: _direct_opened,
    MemberJoined: _member_joined,
    MemberLeft: _member_left,
    MemberRoleChanged: _role_changed,
    MessageSent: _message_sent,
    MessageEdited: _message_edited,
    MessageDeleted: _message_deleted,
    ReactionAdded: _reaction_added,
    ReactionRemoved: _reaction_removed,
    ReadMarkerMoved: _marker_moved,
}


def project(recorded: RecordedEvent, rows: Rows) -> list[Op]:
    """The operations ``recorded`` applies to the read model, given the current ``rows``."""
    projection = _PROJECTIONS.get(type(recorded.event))
    if projection is None:
        return []
    return projection(recorded, recorded.event, rows)
