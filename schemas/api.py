"""Bodies of the public HTTP API (see ``shared/API.md``): what clients send and receive.

Request bodies refuse unknown fields (a typo is an error, not a silently ignored field) and
reuse the field types of :mod:`schemas.fields`, so a value that fits a command always fits its
event. The served OpenAPI document is generated from these Structs.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from schemas.fields import (
    GROUP_MEMBERS_MAX,
    TEXT,
    ClientMsgId,
    ContentType,
    ConversationName,
    Description,
    Device,
    DisplayName,
    Email,
    Emoji,
    Filename,
    Id,
    MediaSize,
    MemberRole,
    MessageBody,
    MessageKind,
    Settings,
    Sha256Hex,
    StatusText,
    Username,
)

PASSWORD_MAX = 1024
"""Upper bound on a password's length in the body (the policy itself lives in ingest)."""

Password = Annotated[str, msgspec.Meta(min_length=1, max_length=PASSWORD_MAX, pattern=TEXT)]
Login = Annotated[str, msgspec.Meta(min_length=1, max_length=254, pattern=TEXT)]
Token = Annotated[str, msgspec.Meta(min_length=1, max_length=512, pattern=TEXT)]
AssignableRole = Literal["admin", "member"]
Scope = Literal["messages:write", "conversations:write", "read"]


class Body(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Base of request bodies: unknown fields are refused."""


# --- auth ----------------------------------------------------------------------------------


class RegisterBody(Body, frozen=True, kw_only=True):
    username: Username
    email: Email
    password: Password
    display_name: DisplayName | None = None


class LoginBody(Body, frozen=True, kw_only=True):
    login: Login
    password: Password
    device: Device | None = None


class RefreshBody(Body, frozen=True, kw_only=True):
    refresh_token: Token


class PasswordBody(Body, frozen=True, kw_only=True):
    current_password: Password
    new_password: Password


class ApiKeyBody(Body, frozen=True, kw_only=True):
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=TEXT)]
    scopes: Annotated[tuple[Scope, ...], msgspec.Meta(min_length=1, max_length=3)]


class ProfilePatch(Body, frozen=True, kw_only=True):
    display_name: DisplayName | None = None
    status: StatusText | None = None
    settings: Settings | None = None


# --- conversations and messages ------------------------------------------------------------


class CreateConversationBody(Body, frozen=True, kw_only=True):
    name: ConversationName
    description: Description | None = None
    members: Annotated[tuple[Id, ...], msgspec.Meta(max_length=GROUP_MEMBERS_MAX - 1)] = ()


class DirectBody(Body, frozen=True, kw_only=True):
    user_id: Id


class AddMemberBody(Body, frozen=True, kw_only=True):
    user_id: Id
    role: AssignableRole = "member"


class RoleBody(Body, frozen=True, kw_only=True):
    role: MemberRole


class SendMessageBody(Body, frozen=True, kw_only=True):
    client_msg_id: ClientMsgId
    content: MessageBody
    kind: MessageKind = msgspec.field(default="text", name="type")
    reply_to: Id | None = None
    media_id: Id | None = None


class SendBatchBody(Body, frozen=True, kw_only=True):
    """Several messages to one conversation in one request (the batch path)."""

    messages: Annotated[tuple[SendMessageBody, ...], msgspec.Meta(min_length=1, max_length=500)]


class EditMessageBody(Body, frozen=True, kw_only=True):
    content: MessageBody


class ReactionBody(Body, frozen=True, kw_only=True):
    emoji: Emoji


class ReadBody(Body, frozen=True, kw_only=True):
    up_to: Id


class MediaBody(Body, frozen=True, kw_only=True):
    content_type: ContentType
    size: MediaSize
    sha256: Sha256Hex
    filename: Filename | None = None


# --- answers -------------------------------------------------------------------------------


class Answer(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Base of response bodies."""


class UserCreated(Answer, frozen=True, kw_only=True):
    user_id: Id


class TokenPair(Answer, frozen=True, kw_only=True):
    access_token: str
    refresh_token: str
    expires_in: int
    token_type: str = "Bearer"  # noqa: S105 - the OAuth token type name, not a secret


class ApiKeyCreated(Answer, frozen=True, kw_only=True):
    key_id: str
    api_key: Annotated[str, msgspec.Meta(description="Shown once; store it now.")]
    scopes: tuple[Scope, ...]


class Accepted(Answer, frozen=True, kw_only=True):
    """A command's events are durable in the log at ``position``."""

    position: str
    message_id: Id | None = None


class BatchAccepted(Answer, frozen=True, kw_only=True):
    items: tuple[Accepted, ...]


class ConversationCreatedAnswer(Answer, frozen=True, kw_only=True):
    conversation_id: Id
    position: str | None = None


class MediaCreated(Answer, frozen=True, kw_only=True):
    media_id: Id
    upload_url: str
    expires_in: int
    upload_headers: dict[str, str] = msgspec.field(default_factory=dict)
    """Headers the ``PUT`` to ``upload_url`` must carry, exactly (they are signed into it):
    ``Content-Type`` and ``x-amz-checksum-sha256``, the declared digest in base64, by which the
    store refuses any other bytes."""


class Profile(Answer, frozen=True, kw_only=True):
    user_id: Id
    username: str | None = None
    display_name: str | None = None
    status: str | None = None
    role: str | None = None
    erased: bool = False
    settings: dict[str, Any] | None = None


class Problem(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """RFC 9457 problem details, with the request id and, for 422, what was wrong."""

    type: str
    title: str
    status: int
    detail: str = ""
    instance: str | None = None
    request_id: str | None = None
    errors: list[str] | None = None


# --- reads -----------------------------------------------------------------------------------


class ReactionCount(Answer, frozen=True, kw_only=True):
    count: int
    me: bool = False


class MessageItem(msgspec.Struct, frozen=True, kw_only=True):
    message_id: Id
    conversation_id: Id
    sender_id: Id
    type: MessageKind
    content: str | None
    position: str
    created_at: str
    edited_at: str | None
    deleted: bool
    reply_to: Id | None
    media_id: Id | None = None
    reactions: dict[str, ReactionCount] = {}


class ConversationItem(msgspec.Struct, frozen=True, kw_only=True):
    conversation_id: Id
    kind: Literal["group", "direct"]
    name: str | None
    description: str | None = None
    role: MemberRole
    member_count: int
    created_at: str
    last_message: MessageItem | None
    unread_count: int


class MemberItem(msgspec.Struct, frozen=True, kw_only=True):
    user_id: Id
    role: MemberRole
    joined_at: str
    username: str | None = None
    display_name: str | None = None


class MessagePage(msgspec.Struct, frozen=True, kw_only=True):
    items: list[MessageItem]
    next: str | None
    prev: str | None
    position: str | None


class ConversationPage(msgspec.Struct, frozen=True, kw_only=True):
    items: list[ConversationItem]
    next: str | None
    prev: str | None
    position: str | None


class MemberPage(msgspec.Struct, frozen=True, kw_only=True):
    items: list[MemberItem]
    next: str | None
    prev: str | None
    position: str | None


# --- privacy ---------------------------------------------------------------------------------


class ExportStarted(Answer, frozen=True, kw_only=True):
    export_id: Id


class ExportState(Answer, frozen=True, kw_only=True):
    export_id: Id
    state: Literal["running", "done", "failed"]
    created_at: str
    finished_at: str | None = None
    download_url: str | None = None
    expires_in: int | None = None
