"""The v1 event catalog: every change in the system, as frozen msgspec Structs.

Each event class carries, as class variables, what the log needs to know about it:

* ``type`` (the Struct tag): the CloudEvents ``type``, e.g. ``chat.message.sent``;
* ``stream``: which kind of stream it belongs to (``user`` or ``conversation``), hence which
  topic it is written to;
* ``stream_field``: the field whose value is the stream id (the Kafka key and CloudEvents
  ``subject``); all events of one stream share a partition and are totally ordered there;
* ``version``: the payload's schema version; older versions are upcast on read
  (:mod:`schemas.upcasting`), never rewritten in the log;
* ``personal_fields`` and ``subject_field``: which fields hold personal data and whose it is
  (:mod:`schemas.personal`).

New fields get defaults so that old payloads still decode; anything else is a new version
with an upcaster.
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

import msgspec

from schemas.fields import (
    GROUP_MEMBERS_MAX,
    ClientMsgId,
    ContentType,
    ConversationName,
    Description,
    Device,
    DisplayName,
    Email,
    Emoji,
    Filename,
    GlobalRole,
    Id,
    MediaSize,
    MemberRole,
    MessageBody,
    MessageKind,
    RevocationReason,
    Settings,
    Sha256Hex,
    StatusText,
    Username,
)
from schemas.personal import Erased

StreamKind = Literal["user", "conversation"]


class Event(msgspec.Struct, frozen=True, kw_only=True, tag_field="type"):
    """Base of every event payload. Unknown fields are ignored so newer writers can add them."""

    stream: ClassVar[StreamKind]
    stream_field: ClassVar[str]
    version: ClassVar[int] = 1
    personal_fields: ClassVar[tuple[str, ...]] = ()
    subject_field: ClassVar[str] = ""

    @property
    def stream_id(self) -> Id:
        """The id of the stream this event belongs to (the Kafka key)."""
        value: Id = getattr(self, self.stream_field)
        return value

    @property
    def subject_id(self) -> Id | None:
        """The user whose data key encrypts this event's personal fields, if it has any."""
        if not self.subject_field:
            return None
        value: Id = getattr(self, self.subject_field)
        return value

    @classmethod
    def type_name(cls) -> str:
        """The CloudEvents ``type`` of this event class."""
        tag = cls.__struct_config__.tag
        assert isinstance(tag, str)
        return tag


class UserEvent(Event, frozen=True, kw_only=True):
    stream: ClassVar[StreamKind] = "user"
    stream_field: ClassVar[str] = "user_id"


class ConversationEvent(Event, frozen=True, kw_only=True):
    stream: ClassVar[StreamKind] = "conversation"
    stream_field: ClassVar[str] = "conversation_id"


# --- users -------------------------------------------------------------------------------


class UserRegistered(UserEvent, frozen=True, kw_only=True, tag="chat.user.registered"):
    """A person created an account. Credentials live in ingest's store, never in the log."""

    personal_fields: ClassVar[tuple[str, ...]] = ("username", "email", "display_name")
    subject_field: ClassVar[str] = "user_id"

    user_id: Id
    username: Username | Erased
    email: Email | Erased
    display_name: DisplayName | Erased | None = None
    role: GlobalRole = "user"


class UserProfileUpdated(UserEvent, frozen=True, kw_only=True, tag="chat.user.profile_updated"):
    """Profile fields changed; a field left ``None`` is unchanged."""

    personal_fields: ClassVar[tuple[str, ...]] = ("display_name", "status")
    subject_field: ClassVar[str] = "user_id"

    user_id: Id
    display_name: DisplayName | Erased | None = None
    status: StatusText | Erased | None = None
    settings: Settings | None = None


class PasswordChanged(UserEvent, frozen=True, kw_only=True, tag="chat.user.password_changed"):
    """The password changed (the hash itself never enters the log)."""

    user_id: Id
    other_sessions_revoked: bool = True


class SessionStarted(UserEvent, frozen=True, kw_only=True, tag="chat.session.started"):
    """A login opened a session (a refresh-token family)."""

    personal_fields: ClassVar[tuple[str, ...]] = ("device",)
    subject_field: ClassVar[str] = "user_id"

    user_id: Id
    session_id: Id
    expires_at: Annotated[int, msgspec.Meta(ge=0, description="Unix time, seconds")]
    device: Device | Erased | None = None


class SessionRevoked(UserEvent, frozen=True, kw_only=True, tag="chat.session.revoked"):
    """A session ended before its expiry; its tokens stop working at once."""

    user_id: Id
    session_id: Id
    reason: RevocationReason


class MediaUploaded(UserEvent, frozen=True, kw_only=True, tag="chat.media.uploaded"):
    """An uploaded object was verified against its declared size and hash."""

    stream_field: ClassVar[str] = "uploader_id"
    personal_fields: ClassVar[tuple[str, ...]] = ("filename",)
    subject_field: ClassVar[str] = "uploader_id"

    media_id: Id
    uploader_id: Id
    content_type: ContentType
    size: MediaSize
    sha256: Sha256Hex
    filename: Filename | Erased | None = None


class UserErased(UserEvent, frozen=True, kw_only=True, tag="chat.user.erased"):
    """The user's data key was destroyed: their personal data is unreadable everywhere."""

    user_id: Id


# --- conversations -----------------------------------------------------------------------


class InitialMember(msgspec.Struct, frozen=True):
    """A member a group starts with."""

    user_id: Id
    role: MemberRole = "member"


class ConversationCreated(
    ConversationEvent, frozen=True, kw_only=True, tag="chat.conversation.created"
):
    """A group conversation was created with its first members (the creator as owner).

    The members ride in this one event, not in separate ``MemberJoined`` records, so the
    group and its membership appear in the log atomically.
    """

    personal_fields: ClassVar[tuple[str, ...]] = ("name", "description")
    subject_field: ClassVar[str] = "creator_id"

    conversation_id: Id
    creator_id: Id
    name: ConversationName | Erased
    description: Description | Erased | None = None
    members: Annotated[tuple[InitialMember, ...], msgspec.Meta(max_length=GROUP_MEMBERS_MAX)] = ()


class DirectConversationOpened(
    ConversationEvent, frozen=True, kw_only=True, tag="chat.conversation.direct_opened"
):
    """A direct conversation between two users; its id is derived from the pair."""

    conversation_id: Id
    user_ids: Annotated[tuple[Id, Id], msgspec.Meta(description="The pair, sorted")]
    opened_by: Id


class MemberJoined(ConversationEvent, frozen=True, kw_only=True, tag="chat.member.joined"):
    conversation_id: Id
    user_id: Id
    role: MemberRole = "member"
    added_by: Id


class MemberLeft(ConversationEvent, frozen=True, kw_only=True, tag="chat.member.left"):
    """A member left (``removed_by == user_id``) or was removed by an owner/admin."""

    conversation_id: Id
    user_id: Id
    removed_by: Id


class MemberRoleChanged(
    ConversationEvent, frozen=True, kw_only=True, tag="chat.member.role_changed"
):
    conversation_id: Id
    user_id: Id
    role: MemberRole
    changed_by: Id


class MessageSent(ConversationEvent, frozen=True, kw_only=True, tag="chat.message.sent"):
    personal_fields: ClassVar[tuple[str, ...]] = ("body",)
    subject_field: ClassVar[str] = "sender_id"

    conversation_id: Id
    message_id: Id
    sender_id: Id
    client_msg_id: ClientMsgId
    kind: MessageKind = "text"
    body: MessageBody | Erased
    reply_to: Id | None = None
    media_id: Id | None = None


class MessageEdited(ConversationEvent, frozen=True, kw_only=True, tag="chat.message.edited"):
    personal_fields: ClassVar[tuple[str, ...]] = ("body",)
    subject_field: ClassVar[str] = "editor_id"

    conversation_id: Id
    message_id: Id
    editor_id: Id
    body: MessageBody | Erased


class MessageDeleted(ConversationEvent, frozen=True, kw_only=True, tag="chat.message.deleted"):
    conversation_id: Id
    message_id: Id
    deleted_by: Id


class ReactionAdded(ConversationEvent, frozen=True, kw_only=True, tag="chat.reaction.added"):
    conversation_id: Id
    message_id: Id
    user_id: Id
    emoji: Emoji


class ReactionRemoved(ConversationEvent, frozen=True, kw_only=True, tag="chat.reaction.removed"):
    conversation_id: Id
    message_id: Id
    user_id: Id
    emoji: Emoji


class ReadMarkerMoved(ConversationEvent, frozen=True, kw_only=True, tag="chat.read_marker.moved"):
    conversation_id: Id
    user_id: Id
    up_to: Id


AnyEvent = (
    UserRegistered
    | UserProfileUpdated
    | PasswordChanged
    | SessionStarted
    | SessionRevoked
    | MediaUploaded
    | UserErased
    | ConversationCreated
    | DirectConversationOpened
    | MemberJoined
    | MemberLeft
    | MemberRoleChanged
    | MessageSent
    | MessageEdited
    | MessageDeleted
    | ReactionAdded
    | ReactionRemoved
    | ReadMarkerMoved
)

EVENT_CLASSES: tuple[type[Event], ...] = (
    UserRegistered,
    UserProfileUpdated,
    PasswordChanged,
    SessionStarted,
    SessionRevoked,
    MediaUploaded,
    UserErased,
    ConversationCreated,
    DirectConversationOpened,
    MemberJoined,
    MemberLeft,
    MemberRoleChanged,
    MessageSent,
    MessageEdited,
    MessageDeleted,
    ReactionAdded,
    ReactionRemoved,
    ReadMarkerMoved,
)

EVENT_TYPES: dict[str, type[Event]] = {cls.type_name(): cls for cls in EVENT_CLASSES}
